"""Training on a random subset of the masked positions: an unbiased estimate of the same loss.

`masked_head.subsampled_nll_sums` scores min(k_b, P) of row b's k_b masked positions, scaled by
k_b / min(k_b, P); `diffusion_loss_gathered(positions_per_row=P)` trains with it
(`config.diffusion.train_positions_per_seq`). The tests:
* rows with k_b <= P are scored exactly, for every key (values and gradients, float64);
* the chosen positions are masked ones, exactly min(k_b, P) of them, each chosen with
  frequency m_b / k_b over many keys (read off the gradient with respect to the hidden states);
* over many keys the mean estimate equals the exact sum, and the mean gradient the exact
  gradient, within a few standard errors (a wrong scale or a biased choice fails);
* the diffusion loss with P has the expectation of the loss without it; P >= L is the P = 0
  computation; the objective reads the config field, and a config that cannot use it is
  refused.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.config import configuration
from bdiff_jax.diffusion import schedules
from bdiff_jax.diffusion.elbo import diffusion_loss_gathered
from bdiff_jax.diffusion.masked_head import head_nll, masked_nll_sums, subsampled_nll_sums
from bdiff_jax.errors import ConfigError
from bdiff_jax.train.builder import build_objective
from tests.helpers import network

B, L, D, V = 4, 8, 6, 11
PER_ROW = 3
# Row 0: 6 masked (subsampled), row 1: 2 (exact), row 2: all 8 (subsampled), row 3: none.
MASKED = np.array([[1, 1, 0, 1, 1, 1, 0, 1],
                   [0, 0, 1, 0, 0, 1, 0, 0],
                   [1, 1, 1, 1, 1, 1, 1, 1],
                   [0, 0, 0, 0, 0, 0, 0, 0]], bool)


def _case(dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(keys[0], (B, L, D), dtype)
  w = jax.random.normal(keys[1], (D, V), dtype)
  tokens = jax.random.randint(keys[2], (B, L), 0, V)
  return hidden, w, tokens, jnp.asarray(MASKED)


def _exact(hidden, w, tokens, masked):
  return masked_nll_sums(hidden, head_nll(lambda h: h @ w), tokens, masked, capacity=B * L)


def _subset(hidden, w, tokens, masked, key, per_row=PER_ROW):
  return subsampled_nll_sums(hidden, head_nll(lambda h: h @ w), tokens, masked, key,
                             per_row=per_row)


def test_rows_within_the_limit_are_exact_for_every_key():
  with jax.enable_x64(True):
    hidden, w, tokens, masked = _case(jnp.float64)
    exact = _exact(hidden, w, tokens, masked)
    grad_exact = jax.grad(lambda h, w: jnp.sum(_exact(h, w, tokens, masked)), (0, 1))(hidden, w)
    for seed in range(3):
      key = jax.random.key(seed)
      # per_row = L: every row is within the limit, values and gradients equal the exact ones.
      np.testing.assert_allclose(np.asarray(_subset(hidden, w, tokens, masked, key, L)),
                                 np.asarray(exact), rtol=1e-12)
      grads = jax.grad(lambda h, w: jnp.sum(_subset(h, w, tokens, masked, key, L)),
                       (0, 1))(hidden, w)
      for g, g_exact in zip(grads, grad_exact):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_exact), rtol=1e-12, atol=1e-13)
      # per_row = 3: rows 1 (2 masked) and 3 (none) are still exact.
      est = np.asarray(_subset(hidden, w, tokens, masked, key))
      np.testing.assert_allclose(est[[1, 3]], np.asarray(exact)[[1, 3]], rtol=1e-12)
      assert est[3] == 0.0


@functools.lru_cache(maxsize=None)
def _many(num_keys: int):
  """Estimates [K, B] and chosen positions [K, B, L] (nonzero hidden-state gradient)."""
  hidden, w, tokens, masked = _case(jnp.float32)

  def one(key):
    value, g = jax.value_and_grad(
        lambda h: jnp.sum(_subset(h, w, tokens, masked, key)), has_aux=False)(hidden)
    del value
    return _subset(hidden, w, tokens, masked, key), jnp.any(g != 0.0, axis=-1)

  keys = jax.random.split(jax.random.key(7), num_keys)
  est, chosen = jax.jit(jax.vmap(one))(keys)
  return np.asarray(est, np.float64), np.asarray(chosen)


def test_chosen_positions_are_a_uniform_subset_of_the_masked_ones():
  est, chosen = _many(4000)
  del est
  k = MASKED.sum(axis=1)
  m = np.minimum(k, PER_ROW)
  assert not np.any(chosen & ~MASKED[None]), "an unmasked position was scored"
  np.testing.assert_array_equal(chosen.sum(axis=2), np.broadcast_to(m, chosen.shape[:2]))
  freq = chosen.mean(axis=0)  # [B, L]
  for b in range(B):
    if k[b] == 0:
      continue
    p = m[b] / k[b]
    se = np.sqrt(p * (1 - p) / chosen.shape[0])
    got = freq[b][MASKED[b]]
    assert np.all(np.abs(got - p) <= 5 * se + 1e-12), (b, got, p)
  # Different keys choose different subsets.
  assert len({tuple(c.ravel()) for c in chosen[:50, 0]}) > 10


def test_mean_estimate_and_gradient_equal_the_exact_ones():
  hidden, w, tokens, masked = _case(jnp.float32)
  exact = np.asarray(_exact(hidden, w, tokens, masked), np.float64)
  est, _ = _many(4000)
  mean, se = est.mean(axis=0), est.std(axis=0) / np.sqrt(est.shape[0])
  assert se[0] > 0.01 and se[2] > 0.01  # rows 0 and 2 really are subsampled
  assert np.all(np.abs(mean - exact) <= 5 * se + 1e-4), (mean, exact, se)
  # A scale of 1 instead of k / m (or any biased choice) is far outside those bounds.
  assert np.all(np.abs(mean * MASKED.sum(1).clip(max=PER_ROW) / MASKED.sum(1).clip(min=1)
                       - exact)[[0, 2]] > 20 * se[[0, 2]])

  # The gradient with respect to the head's weights: mean over keys = the exact gradient.
  def grad_w(key):
    return jax.grad(lambda w: jnp.sum(_subset(hidden, w, tokens, masked, key)))(w)

  grads = np.asarray(jax.jit(jax.vmap(grad_w))(jax.random.split(jax.random.key(9), 4000)),
                     np.float64)
  exact_g = np.asarray(jax.grad(lambda w: jnp.sum(_exact(hidden, w, tokens, masked)))(w))
  g_mean, g_se = grads.mean(axis=0), grads.std(axis=0) / np.sqrt(grads.shape[0])
  assert np.all(np.abs(g_mean - exact_g) <= 5 * g_se + 1e-4)


def _toy(params, noisy, t):
  h = params["embed"][noisy] + t[:, None, None] * params["time"]
  return jnp.tanh(h + jnp.mean(h, axis=1, keepdims=True))


def test_diffusion_loss_with_a_subset_has_the_same_expectation():
  keys = jax.random.split(jax.random.key(3), 3)
  params = {"embed": jax.random.normal(keys[0], (V + 1, D)), "time": jax.random.normal(keys[1], (D,)),
            "out": jax.random.normal(keys[2], (D, V))}
  tokens = jax.random.randint(jax.random.key(4), (B, L), 0, V)
  kw = dict(schedule=schedules.linear(), mask_id=V, estimator="count")
  hidden_fn = functools.partial(_toy, params)
  head_fn = lambda h: h @ params["out"]

  def losses(key):
    return jnp.stack([diffusion_loss_gathered(hidden_fn, head_nll(head_fn), tokens, key,
                                              positions_per_row=p, **kw)[0]
                      for p in (0, 2, L)])

  keys = jax.random.split(jax.random.key(5), 6000)
  out = np.asarray(jax.jit(jax.vmap(losses))(keys), np.float64)
  full, subset, at_l = out[:, 0], out[:, 1], out[:, 2]
  np.testing.assert_array_equal(at_l, full)  # P >= L is the P = 0 computation, draw for draw
  assert not np.allclose(subset, full)  # P = 2 really subsamples (and draws its own masks)
  se = np.sqrt(full.var() / full.size + subset.var() / subset.size)
  assert abs(subset.mean() - full.mean()) <= 5 * se, (subset.mean(), full.mean(), se)
  assert subset.var() > full.var()  # the price: more variance per step


def test_objective_reads_the_field_and_validation_refuses_misuse():
  c = configuration.base_config()
  c.model.update(num_layers=1, emb_dim=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
                 positional="learned", tie_embeddings=False, block="simple", dropout_rate=0.0)
  c.data.seq_len = L
  c.diffusion.estimator = "count"
  net = network(c.model, vocab_size=V, max_len=L)
  params = jax.jit(lambda: net.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32),
                                    jnp.zeros((1,)))["params"])()
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, V)
  apply = functools.partial(net.apply, {"params": params})
  values = {}
  for p in (0, 2):
    c.diffusion.train_positions_per_seq = p
    configuration.validate(c)
    objective = build_objective(c, mask_id=V)
    assert objective.train_positions_per_seq == p
    values[p] = float(jax.jit(lambda k: objective.loss(apply, tokens, k)[0])(jax.random.key(2)))
    assert np.isfinite(values[p])
  assert values[0] != values[2]
  c.diffusion.train_positions_per_seq = -1
  with pytest.raises(ConfigError, match="train_positions_per_seq"):
    configuration.validate(c)
  c.diffusion.train_positions_per_seq, c.diffusion.masked_head = 4, False
  with pytest.raises(ConfigError, match="needs the masked head"):
    configuration.validate(c)
