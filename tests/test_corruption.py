"""Tests of the forward corruption process (absorbing and the old prototype's mix)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.diffusion import schedules
from bdiff_jax.diffusion.corruption import corrupt
from bdiff_jax.errors import ConfigError

VOCAB = 50
MASK_ID = VOCAB
LENGTH = 512
TIMES = (1e-3, 0.05, 0.3, 0.5, 0.9)
ROWS_PER_TIME = 16


def _tokens(seed: int, batch: int) -> jnp.ndarray:
  return jax.random.randint(jax.random.key(seed), (batch, LENGTH), 0, VOCAB, jnp.int32)


def _times() -> jnp.ndarray:
  return jnp.repeat(jnp.asarray(TIMES, jnp.float32), ROWS_PER_TIME)


def _assert_binomial(count: int, n: int, p: float, sigmas: float = 5.0):
  mean, sd = n * p, np.sqrt(n * p * (1.0 - p))
  assert abs(count - mean) <= sigmas * sd + 1.0, (count, n, p, mean, sd)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_absorbing_mask_fraction_matches_schedule(name):
  sched = schedules.get_schedule(name)
  t = _times()
  tokens = _tokens(0, t.shape[0])
  noisy, masked = corrupt(jax.random.key(1), tokens, t, schedule=sched, mask_id=MASK_ID)
  assert noisy.shape == tokens.shape and noisy.dtype == jnp.int32
  assert masked.shape == tokens.shape and masked.dtype == jnp.bool_
  masked = np.asarray(masked).reshape(len(TIMES), ROWS_PER_TIME * LENGTH)
  for i, time in enumerate(TIMES):
    p = float(sched.mask_prob(jnp.float32(time)))
    _assert_binomial(int(masked[i].sum()), masked.shape[1], p)


def test_absorbing_unmasked_unchanged_and_masked_is_mask_id():
  sched = schedules.linear()
  t = _times()
  tokens = _tokens(2, t.shape[0])
  noisy, masked = corrupt(jax.random.key(3), tokens, t, schedule=sched, mask_id=MASK_ID)
  noisy, masked, tokens = map(np.asarray, (noisy, masked, tokens))
  np.testing.assert_array_equal(noisy[~masked], tokens[~masked])
  assert np.all(noisy[masked] == MASK_ID)
  np.testing.assert_array_equal(masked, noisy == MASK_ID)


def test_extreme_times():
  sched = schedules.cosine()
  tokens = _tokens(4, 4)
  t = jnp.asarray([0.0, 1e-9, 1.0, 1.0], jnp.float32)
  noisy, masked = corrupt(jax.random.key(5), tokens, t, schedule=sched, mask_id=MASK_ID)
  masked = np.asarray(masked)
  assert not masked[:2].any()  # p = 0 and p ~ 1.6e-9: nothing (with overwhelming probability)
  assert masked[2:].all()  # alpha(1) = 0: everything
  np.testing.assert_array_equal(np.asarray(noisy)[:2], np.asarray(tokens)[:2])


def test_keys_determine_the_mask():
  sched = schedules.linear()
  tokens = _tokens(6, 8)
  t = jnp.full((8,), 0.5, jnp.float32)
  a = corrupt(jax.random.key(7), tokens, t, schedule=sched, mask_id=MASK_ID)[1]
  b = corrupt(jax.random.key(7), tokens, t, schedule=sched, mask_id=MASK_ID)[1]
  c = corrupt(jax.random.key(8), tokens, t, schedule=sched, mask_id=MASK_ID)[1]
  np.testing.assert_array_equal(a, b)
  assert np.mean(np.asarray(a) != np.asarray(c)) > 0.3
  # Rows share t but get independent masks.
  assert np.mean(np.asarray(a)[0] != np.asarray(a)[1]) > 0.3


def test_jit_matches_eager():
  sched = schedules.cosine()
  tokens = _tokens(9, 8)
  t = jnp.linspace(0.1, 1.0, 8, dtype=jnp.float32)
  fn = lambda k, x, s: corrupt(k, x, s, schedule=sched, mask_id=MASK_ID, mode="prototype_mix",
                               uniform_fraction=0.2, vocab_size=VOCAB)
  eager = fn(jax.random.key(10), tokens, t)
  jitted = jax.jit(fn)(jax.random.key(10), tokens, t)
  for e, j in zip(eager, jitted):
    np.testing.assert_array_equal(e, j)


@pytest.mark.parametrize("uniform_fraction", [0.1, 0.3])
def test_prototype_mix(uniform_fraction):
  sched = schedules.linear()
  t = _times()
  tokens = _tokens(11, t.shape[0])
  noisy, masked = corrupt(jax.random.key(12), tokens, t, schedule=sched, mask_id=MASK_ID,
                          mode="prototype_mix", uniform_fraction=uniform_fraction,
                          vocab_size=VOCAB)
  noisy, masked, tokens = map(np.asarray, (noisy, masked, tokens))
  # All corrupted positions are marked, at the absorbing rate.
  by_time = masked.reshape(len(TIMES), -1)
  for i, time in enumerate(TIMES):
    _assert_binomial(int(by_time[i].sum()), by_time.shape[1], time)
  np.testing.assert_array_equal(noisy[~masked], tokens[~masked])
  # Substituted positions: corrupted but not showing [MASK]; they hold real tokens.
  substituted = masked & (noisy != MASK_ID)
  assert np.all((noisy[substituted] >= 0) & (noisy[substituted] < VOCAB))
  assert np.all(noisy[masked & ~substituted] == MASK_ID)
  num_masked = int(masked.sum())
  _assert_binomial(int(substituted.sum()), num_masked, uniform_fraction)
  # Substitutes are uniform over the real vocabulary, not copies of the clean token.
  assert np.mean(noisy[substituted] == tokens[substituted]) < 0.1
  counts = np.bincount(noisy[substituted], minlength=VOCAB)
  assert counts.min() > 0


def test_prototype_mix_zero_fraction_equals_absorbing():
  sched = schedules.cosine()
  tokens = _tokens(13, 4)
  t = jnp.full((4,), 0.6, jnp.float32)
  key = jax.random.key(14)
  absorbing = corrupt(key, tokens, t, schedule=sched, mask_id=MASK_ID)
  mix = corrupt(key, tokens, t, schedule=sched, mask_id=MASK_ID, mode="prototype_mix",
                uniform_fraction=0.0, vocab_size=VOCAB)
  for a, m in zip(absorbing, mix):
    np.testing.assert_array_equal(a, m)


def test_argument_errors():
  sched = schedules.linear()
  tokens = _tokens(15, 2)
  t = jnp.full((2,), 0.5, jnp.float32)
  key = jax.random.key(16)
  with pytest.raises(ConfigError):
    corrupt(key, tokens, t, schedule=sched, mask_id=MASK_ID, mode="uniform")
  with pytest.raises(ConfigError):
    corrupt(key, tokens, t, schedule=sched, mask_id=MASK_ID, mode="prototype_mix",
            uniform_fraction=1.5, vocab_size=VOCAB)
  with pytest.raises(ValueError):
    corrupt(key, tokens, t, schedule=sched, mask_id=MASK_ID, mode="prototype_mix")
  with pytest.raises(ValueError):
    corrupt(key, tokens, t[:1], schedule=sched, mask_id=MASK_ID)
