"""Tests of the ancestral sampler and its categorical draws."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.config import configuration
from bdiff_jax.diffusion import sampling
from bdiff_jax.diffusion import schedules
from bdiff_jax.errors import UserError
from bdiff_jax.models import init_params
from tests.helpers import network

# Largest Gumbel value reachable from one float32 uniform u < 1: -log(-log(1 - 2^-24)).
FLOAT32_GUMBEL_CAP = -math.log(-math.log1p(-2.0**-24))


def _binomial_z(counts: np.ndarray, n: int, probs: np.ndarray) -> np.ndarray:
  """|count - n p| in binomial standard deviations (with a floor of 1 count for p ~ 0)."""
  sd = np.sqrt(n * probs * (1 - probs)) + 1.0
  return np.abs(counts - n * probs) / sd


def _frequencies(tokens: np.ndarray, vocab: int) -> np.ndarray:
  """tokens int[B, L] -> counts int[L, vocab]."""
  return np.stack([np.bincount(col, minlength=vocab) for col in tokens.T])


def _table_fn(table: np.ndarray, dtype=jnp.float32):
  """A model whose logits depend only on the position: table float[L, V]."""
  table = jnp.asarray(table, dtype)

  def logits_fn(noisy, t):
    del t
    return jnp.broadcast_to(table, noisy.shape + table.shape[-1:])
  return logits_fn


def _softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------------ grid


@pytest.mark.parametrize("num_steps", [1, 2, 7, 100])
@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_sampling_grid(num_steps, grid):
  t = np.asarray(sampling.sampling_grid(num_steps, grid))
  assert t.dtype == np.float32 and t.shape == (num_steps + 1,)
  assert t[0] == 1.0 and t[-1] == 0.0
  assert np.all(np.diff(t) < 0)
  i = np.arange(num_steps + 1) / num_steps
  expected = 1 - i if grid == "uniform" else np.cos(np.pi / 2 * i)
  np.testing.assert_allclose(t, expected, atol=1e-6)


def test_sampling_grid_cosine_is_finer_near_one():
  t = np.asarray(sampling.sampling_grid(10, "cosine"))
  steps = -np.diff(t)
  assert np.all(np.diff(steps) > 0)


@pytest.mark.parametrize("num_steps,grid", [(0, "cosine"), (-3, "uniform"), (2.5, "cosine"),
                                            (4, "linear")])
def test_sampling_grid_invalid(num_steps, grid):
  with pytest.raises(ValueError):
    sampling.sampling_grid(num_steps, grid)


# ----------------------------------------------------------------------------- noise and draws


def test_exponential_from_bits_extremes_and_monotone():
  # A sorted set of 64-bit values (hi, lo), including both ends and the branch point at 1/2.
  his = [0, 0, 0, 1, 2**20, 2**31 - 1, 2**31 - 1, 2**31, 2**31, 2**32 - 2, 2**32 - 1, 2**32 - 1]
  los = [0, 1, 2**31, 0, 5, 2**32 - 2, 2**32 - 1, 0, 1, 7, 2**32 - 2, 2**32 - 1]
  e = np.asarray(sampling.exponential_from_bits(jnp.asarray(his, jnp.uint32),
                                                jnp.asarray(los, jnp.uint32)), np.float64)
  assert np.all(np.isfinite(e)) and np.all(e > 0)
  assert np.all(np.diff(e) >= 0)
  # Relative precision at both ends: E = -log(1 - v) with v = (hi + (lo + 1/2) 2^-32) 2^-32.
  np.testing.assert_allclose(e[0], 2.0**-65, rtol=1e-6)
  np.testing.assert_allclose(e[1], 1.5 * 2.0**-64, rtol=1e-6)
  np.testing.assert_allclose(e[2], (2.0**31 + 0.5) * 2.0**-64, rtol=1e-6)
  np.testing.assert_allclose(e[-1], 65 * math.log(2), rtol=1e-6)
  np.testing.assert_allclose(e[6], math.log(2), rtol=1e-6)  # v just below 1/2
  np.testing.assert_allclose(e[7], math.log(2), rtol=1e-6)  # v just above 1/2
  gumbel_max = -math.log(e[0])
  assert gumbel_max > 44.0 > FLOAT32_GUMBEL_CAP


@pytest.mark.parametrize("hi", [0, 2**32 - 1])
def test_exponential_tails_have_correct_conditional_rates(hi):
  # Condition on the rarest 2^-32 of uniforms (all-zero or all-one high word); inside that slice
  # the tail of E must still follow the exponential law: P(E < x) ~ x 2^32 for hi = 0 and
  # P(E > y) = e^-y 2^32 for hi = 2^32 - 1.
  n = 1_000_000
  lo = jax.random.bits(jax.random.key(1), (n,), jnp.uint32)
  e = np.asarray(sampling.exponential_from_bits(jnp.full((n,), hi, jnp.uint32), lo), np.float64)
  for x in (2.0**-34, 2.0**-38, 2.0**-41):
    if hi == 0:
      count, p = np.sum(e < x), x * 2**32
    else:
      count, p = np.sum(e > -math.log(x)), x * 2**32
    assert _binomial_z(count, n, p) < 5, (x, count, n * p)


@pytest.mark.usefixtures("xla_optimized")  # 2^27 / many draws: runtime, not compile
def test_gumbel_distribution_and_tail_beyond_float32_cap():
  # 2^27 draws: about 8 should exceed the single-float32 cap of ~16.64 nats. The same draws
  # check the bulk of the distribution (moments and CDF at a few points).
  chunk, num_chunks = 2**22, 32
  n = chunk * num_chunks
  cap = FLOAT32_GUMBEL_CAP
  points = jnp.asarray([-1.0, 0.0, 2.0, 6.0, 12.0])

  @jax.jit
  def run(key):
    def body(i, carry):
      largest, exceed, total, squares, below = carry
      g = sampling.gumbel(jax.random.fold_in(key, i), (chunk,))
      below = below + jnp.sum(g[:, None] <= points, axis=0)
      # Per-chunk float32 sums stay accurate to ~1e-6 relative; accumulate them in float32 too.
      return (jnp.maximum(largest, g.max()), exceed + jnp.sum(g > cap), total + g.sum() / n,
              squares + jnp.sum(g * g) / n, below)
    init = (jnp.float32(-jnp.inf), jnp.int32(0), jnp.float32(0), jnp.float32(0),
            jnp.zeros(points.shape, jnp.int32))
    return jax.lax.fori_loop(0, num_chunks, body, init)

  largest, exceed, mean, mean_square, below = run(jax.random.key(0))
  expected = n * -math.expm1(-math.exp(-cap))
  assert 7.5 < expected < 8.5
  assert float(largest) > cap
  assert 1 <= int(exceed) <= 25  # Poisson(8): P(outside) < 1e-3.
  np.testing.assert_allclose(float(mean), np.euler_gamma, atol=1e-3)
  np.testing.assert_allclose(float(mean_square) - float(mean)**2, np.pi**2 / 6, rtol=2e-3)
  for x, count in zip(np.asarray(points), np.asarray(below)):
    assert _binomial_z(count, n, math.exp(-math.exp(-x))) < 5, (x, count)


def test_categorical_frequencies():
  probs = np.array([0.5, 0.3, 0.149, 0.05, 0.001, 0.0])
  logits = np.log(np.where(probs > 0, probs, 1.0)) + np.where(probs > 0, 0.0, -np.inf)
  logits = logits + 7.0  # unnormalized on purpose
  n = 400_000
  batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, probs.size))
  draws = np.asarray(sampling.categorical(jax.random.key(5), batch))
  assert draws.shape == (n,) and draws.dtype == np.int32
  counts = np.bincount(draws, minlength=probs.size)
  assert counts[-1] == 0  # -inf logit: never
  assert np.all(_binomial_z(counts, n, probs) < 5), (counts, n * probs)
  assert counts[4] > 250  # the 1e-3 token (expected ~400) is really drawn


def test_categorical_axis_and_bfloat16():
  probs = np.array([0.7, 0.2, 0.099, 0.001])
  n = 200_000
  logits = jnp.log(jnp.asarray(probs, jnp.float32)).astype(jnp.bfloat16)
  draws = np.asarray(sampling.categorical(jax.random.key(2), jnp.broadcast_to(logits[:, None],
                                                                              (4, n)), axis=0))
  assert draws.shape == (n,)
  effective = _softmax(np.asarray(logits, np.float64))  # probabilities after bf16 rounding
  assert np.all(_binomial_z(np.bincount(draws, minlength=4), n, effective) < 5)


# ------------------------------------------------------------------------------------- sampler


V = 8  # real tokens; mask_id = V


def _key(seed: int) -> jax.Array:
  """A key for sampler tests. The sampler is agnostic to the PRNG implementation, and RBG keys
  compile about twice as fast as threefry on CPU; the default threefry keys (new-style and legacy)
  are exercised by test_jit_deterministic_and_key_dependent and the noise tests above."""
  return jax.random.key(seed, impl="rbg")


def _random_model(vocab: int = V, seed: int = 0):
  """A context-dependent model: logits from the token at each position and its left neighbour."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  own = 2.0 * jax.random.normal(k1, (vocab + 1, vocab))
  left = 2.0 * jax.random.normal(k2, (vocab + 1, vocab))

  def logits_fn(noisy, t):
    shifted = jnp.concatenate([jnp.full_like(noisy[:, :1], vocab), noisy[:, :-1]], axis=1)
    return own[noisy] + left[shifted] + t[:, None, None]
  return logits_fn


def test_peaked_model_output_never_masked():
  def logits_fn(noisy, t):
    del t
    logits = jnp.zeros(noisy.shape + (V,), jnp.bfloat16)
    return logits.at[..., 3].set(1e4)

  out = sampling.sample(logits_fn, _key(0), length=20, num_steps=5, mask_id=V,
                        batch_size=3)
  assert out.dtype == jnp.int32 and out.shape == (3, 20)
  np.testing.assert_array_equal(np.asarray(out), 3)


@pytest.mark.parametrize("grid,num_steps", [("cosine", 1), ("uniform", 50)])
def test_random_model_output_in_range(grid, num_steps):
  out = np.asarray(sampling.sample(_random_model(), _key(num_steps), length=33,
                                   num_steps=num_steps, mask_id=V, batch_size=4, grid=grid,
                                   schedule=schedules.cosine()))
  assert out.shape == (4, 33)
  assert out.min() >= 0 and out.max() < V
  assert len(np.unique(out)) > 1


def test_prefix_prompt_kept():
  prompt = np.array([5, 1, 7])
  out = np.asarray(sampling.sample(_random_model(), _key(1), length=12, num_steps=6,
                                   mask_id=V, batch_size=5, prompt=prompt))
  np.testing.assert_array_equal(out[:, :3], np.broadcast_to(prompt, (5, 3)))
  assert out.max() < V


def test_infill_prompt_kept_and_holes_filled():
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, V, size=(4, 16))
  holes = rng.random((4, 16)) < 0.5
  prompt[holes] = V
  # Make the model want to overwrite everything with token 0: fixed tokens must not move.
  def logits_fn(noisy, t):
    del t
    return jnp.zeros(noisy.shape + (V,)).at[..., 0].set(50.0)

  out = np.asarray(sampling.sample(logits_fn, _key(2), length=16, num_steps=4,
                                   mask_id=V, batch_size=4, prompt=jnp.asarray(prompt)))
  np.testing.assert_array_equal(out[~holes], prompt[~holes])
  np.testing.assert_array_equal(out[holes], 0)


def test_model_sees_current_sequence():
  # The model predicts (almost surely) the number of already revealed tokens in the row. Tokens
  # revealed in the same step then share a value, and each step's value must equal the previous
  # step's value plus the number of tokens that step revealed.
  length, num_prompt = 12, 3

  def logits_fn(noisy, t):
    del t
    revealed = jnp.sum(noisy != length + 1, axis=1)
    return 40.0 * jax.nn.one_hot(revealed, length + 1)[:, None, :] * jnp.ones((1, length, 1))

  out = np.asarray(sampling.sample(logits_fn, _key(3), length=length, num_steps=8,
                                   mask_id=length + 1, batch_size=64,
                                   prompt=np.zeros(num_prompt, np.int32)))
  num_groups = []
  for row in out[:, num_prompt:]:
    values, counts = np.unique(row, return_counts=True)
    assert values[0] == num_prompt
    np.testing.assert_array_equal(values[1:], values[:-1] + counts[:-1])
    assert values[-1] + counts[-1] == length
    num_groups.append(len(values))
  assert max(num_groups) > 2  # several steps did reveal tokens


@pytest.mark.parametrize("schedule,grid", [(schedules.linear(), "cosine"),
                                           (schedules.cosine(), "uniform"),
                                           (schedules.polynomial(3.0), "cosine")])
def test_reveal_counts_follow_schedule(schedule, grid):
  # The model emits (almost surely) the index of the step it is called at, read off t; so each
  # output token records the step that revealed it. After step i the fraction revealed must be
  # alpha(t_{i+1}).
  num_steps, length, batch = 6, 64, 128
  times = sampling.sampling_grid(num_steps, grid)

  def logits_fn(noisy, t):
    step = jnp.argmin(jnp.abs(times[:-1][None, :] - t[:, None]), axis=1)
    logits = 40.0 * jax.nn.one_hot(step, num_steps)
    return jnp.broadcast_to(logits[:, None, :], noisy.shape + (num_steps,))

  out = np.asarray(sampling.sample(logits_fn, _key(4), length=length,
                                   num_steps=num_steps, mask_id=num_steps, batch_size=batch,
                                   schedule=schedule, grid=grid))
  n = out.size
  revealed = np.cumsum(np.bincount(out.ravel(), minlength=num_steps))
  alpha_next = np.asarray(schedule.alpha(times[1:]), np.float64)
  assert revealed[-1] == n
  for i in range(num_steps - 1):
    assert _binomial_z(revealed[i], n, alpha_next[i]) < 5, (i, revealed[i] / n, alpha_next[i])


@pytest.mark.parametrize("grid,temperature", [("cosine", 1.0), ("uniform", 1.7)])
def test_context_free_frequencies_unbiased(grid, temperature):
  rng = np.random.default_rng(1)
  length, batch = 6, 4000
  table = rng.normal(size=(length, V)) * 2.0
  table[0, 0] = table[0].max() + 4.0  # a peaked position with rare tokens
  out = np.asarray(sampling.sample(_table_fn(table), _key(6), length=length,
                                   num_steps=4, mask_id=V, batch_size=batch,
                                   temperature=temperature, grid=grid))
  probs = _softmax(table / temperature)
  z = _binomial_z(_frequencies(out, V), batch, probs)
  assert np.all(z < 5), z.max()


def test_top_k_respected_and_renormalized():
  rng = np.random.default_rng(2)
  length, batch, top_k = 10, 3000, 3
  table = rng.normal(size=(length, V)) * 1.5
  out = np.asarray(sampling.sample(_table_fn(table), _key(7), length=length,
                                   num_steps=5, mask_id=V, batch_size=batch, top_k=top_k,
                                   temperature=1.3))
  allowed = np.argsort(-table, axis=1)[:, :top_k]
  for pos in range(length):
    assert np.all(np.isin(out[:, pos], allowed[pos]))
  inside = np.zeros(table.shape, bool)
  np.put_along_axis(inside, allowed, True, axis=1)
  probs = _softmax(np.where(inside, table, -np.inf) / 1.3)
  assert np.all(_binomial_z(_frequencies(out, V), batch, probs) < 5)


def _nucleus(probs: np.ndarray, top_p: float) -> list[set[int]]:
  """Reference nucleus per row: sorted tokens whose preceding mass is below top_p."""
  result = []
  for row in probs:
    order = np.argsort(-row)
    before = np.concatenate([[0.0], np.cumsum(row[order])[:-1]])
    assert np.all(np.abs(before - top_p) > 1e-3)  # no borderline cases in this test
    result.append(set(order[before < top_p].tolist()))
  return result


def test_top_p_respected_and_renormalized():
  rng = np.random.default_rng(3)
  length, batch, top_p = 10, 3000, 0.8
  table = rng.normal(size=(length, V)) * 1.5
  out = np.asarray(sampling.sample(_table_fn(table), _key(8), length=length,
                                   num_steps=5, mask_id=V, batch_size=batch, top_p=top_p))
  probs = _softmax(table)
  nuclei = _nucleus(probs, top_p)
  assert any(len(s) > 1 for s in nuclei)
  counts = _frequencies(out, V)
  for pos, nucleus in enumerate(nuclei):
    assert set(np.unique(out[:, pos]).tolist()) <= nucleus
    inside = np.array([j in nucleus for j in range(V)])
    expected = np.where(inside, probs[pos], 0.0) / probs[pos][inside].sum()
    assert np.all(_binomial_z(counts[pos], batch, expected) < 5)


def test_top_k_and_top_p_combined():
  rng = np.random.default_rng(4)
  table = rng.normal(size=(10, V)) * 1.5
  out = np.asarray(sampling.sample(_table_fn(table), _key(9), length=10, num_steps=3,
                                   mask_id=V, batch_size=500, top_k=4, top_p=0.7))
  kept = np.where(table >= np.sort(table, axis=1)[:, -4:-3], table, -np.inf)
  for pos, nucleus in enumerate(_nucleus(_softmax(kept), 0.7)):
    assert set(np.unique(out[:, pos]).tolist()) <= nucleus


@pytest.mark.parametrize("kwargs", [{"top_k": 1}, {"top_p": 1e-6}])
def test_greedy_limits_pick_argmax(kwargs):
  table = np.random.default_rng(5).normal(size=(12, V))
  out = np.asarray(sampling.sample(_table_fn(table), _key(10), length=12, num_steps=4,
                                   mask_id=V, batch_size=6, **kwargs))
  np.testing.assert_array_equal(out, np.broadcast_to(table.argmax(1), (6, 12)))


def test_jit_deterministic_and_key_dependent():
  model = _random_model()
  run = functools.partial(sampling.sample, model, length=24, num_steps=6, mask_id=V,
                          batch_size=3, top_k=5, temperature=0.9)
  eager = np.asarray(run(jax.random.key(0)))
  jitted = jax.jit(run)
  np.testing.assert_array_equal(np.asarray(jitted(jax.random.key(0))), eager)
  np.testing.assert_array_equal(np.asarray(jitted(jax.random.key(0))), eager)
  other = np.asarray(jitted(jax.random.key(1)))
  assert np.mean(other != eager) > 0.3
  # Legacy uint32 keys work too.
  legacy = np.asarray(run(jax.random.PRNGKey(0)))
  assert legacy.shape == (3, 24) and legacy.max() < V


def test_jit_with_traced_prompt():
  model = _random_model()
  prompt = np.full((2, 10), V, np.int32)
  prompt[:, [0, 4, 9]] = [[1, 2, 3], [4, 5, 6]]

  @jax.jit
  def run(key, prompt):
    return sampling.sample(model, key, length=10, num_steps=4, mask_id=V, batch_size=2,
                           prompt=prompt)

  out = np.asarray(run(_key(3), jnp.asarray(prompt)))
  np.testing.assert_array_equal(out[:, [0, 4, 9]], prompt[:, [0, 4, 9]])
  assert out.max() < V
  eager = sampling.sample(model, _key(3), length=10, num_steps=4, mask_id=V,
                          batch_size=2, prompt=prompt)
  np.testing.assert_array_equal(out, np.asarray(eager))


@pytest.mark.parametrize("overrides", [
    {"num_steps": 0},
    {"length": 0},
    {"batch_size": 0},
    {"top_p": 0.0},
    {"top_p": 1.5},
    {"top_p": float("nan")},
    {"temperature": 0.0},
    {"temperature": -1.0},
    {"top_k": -1},
    {"grid": "log"},
    {"prompt": np.zeros(9, np.int32)},
    {"prompt": np.array([0, V + 1])},
    {"prompt": np.array([[-1, 0]])},
    {"prompt": np.zeros((3, 4), np.int32)},  # batch 3 != batch_size 2
    {"prompt": np.zeros(4, np.float32)},
    {"mask_id": V + 1},  # logits have V columns, not mask_id
    {"schedule": "linear"},
])
def test_invalid_arguments(overrides):
  kwargs = dict(length=8, num_steps=2, mask_id=V, batch_size=2)
  kwargs.update(overrides)
  with pytest.raises(ValueError) as info:
    sampling.sample(_random_model(), jax.random.key(0), **kwargs)
  assert isinstance(info.value, UserError)
  assert info.value.fix


# --------------------------------------------------------------- the event-driven fast sampler


@pytest.mark.parametrize("vocab", [11, 200])
def test_categorical_blocked_frequencies(vocab):
  # V = 11: blocks of 4 (the last padded), a 1e-3 token and two impossible ones; V = 200: random
  # logits spanning ~e^-12 .. 1 (many blocks, unnormalised).
  n = 400_000 if vocab == 11 else 100_000
  if vocab == 11:
    probs = np.array([0.3, 0.2, 0.0, 0.149, 0.001, 0.1, 0.1, 0.05, 0.05, 0.05, 0.0])
    logits = np.where(probs > 0, np.log(np.where(probs > 0, probs, 1.0)) + 3.0, -np.inf)
  else:
    logits = np.random.default_rng(7).normal(size=vocab) * 3.0
    probs = _softmax(logits)
  batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, vocab))
  draws = np.asarray(sampling.categorical_blocked(jax.random.key(11), batch))
  assert draws.shape == (n,) and draws.dtype == np.int32
  counts = np.bincount(draws, minlength=vocab)
  assert counts.size == vocab  # never an id >= V (the padding)
  assert np.all(counts[probs == 0] == 0)
  assert np.all(_binomial_z(counts, n, probs) < 5), np.max(_binomial_z(counts, n, probs))
  if vocab == 11:
    assert counts[4] > 250  # the 1e-3 token (expected ~400) is really drawn


@pytest.mark.usefixtures("xla_optimized")  # 2^27 / many draws: runtime, not compile
def test_reveal_steps_law():
  # P(step = i) = r_i prod_{j<i} (1 - r_j), the last step takes the rest; tiny, zero and
  # certain reveal probabilities included.
  n = 1_000_000
  for r in (np.array([1e-4, 0.0, 0.3, 0.5, 0.2], np.float32),
            np.array([0.25, 1.0, 0.5, 0.5], np.float32)):
    steps = np.asarray(sampling.reveal_steps(_key(12), r, (n,)))
    expected = np.empty(r.size)
    still = 1.0
    for i, ri in enumerate(np.append(r[:-1], 1.0).astype(np.float64)):
      expected[i], still = still * ri, still * (1 - ri)
    counts = np.bincount(steps, minlength=r.size)
    assert counts.size == r.size
    assert np.all(counts[expected == 0] == 0)
    assert np.all(_binomial_z(counts, n, expected) < 5), (counts, n * expected)


def _stepwise_reference(logits_fn, key, *, length, num_steps, mask_id, batch_size, prompt=None,
                        temperature=1.0, top_k=0, top_p=1.0, schedule=None, grid="cosine"):
  """The textbook sampler, from the same primitives and keys as `sample`: a model call at every
  step (all rows at t_i) and a draw at every position, kept where the position is revealed."""
  schedule = schedule or schedules.linear()
  times = sampling.sampling_grid(num_steps, grid)
  reveal_key, draw_key = jax.random.split(key)
  steps = sampling.reveal_steps(reveal_key, sampling.reveal_probabilities(schedule, times),
                                (batch_size, length))
  num_blocks, block = sampling.blocked_layout(mask_id)
  noise = sampling.gumbel(draw_key, (batch_size, length, num_blocks + block))
  noisy = sampling.initial_sequence(prompt, length, batch_size, mask_id)
  for i in range(num_steps):
    logits = logits_fn(noisy, jnp.full((batch_size,), times[i]))
    draws = sampling.categorical_blocked_from_noise(
        noise, sampling.filter_logits(logits, temperature, top_k, top_p))
    noisy = jnp.where((noisy == mask_id) & (steps == i), draws, noisy)
  return np.asarray(noisy)


def test_fast_sampler_equals_stepwise_reference():
  # Same key => same tokens, whichever path: rows at their own steps or together, draws in one
  # chunk or several (capacity 1 and 2 force extra chunks), logits from logits_fn or from
  # logits_at_fn. The model depends on t and on the context.
  model = _random_model(seed=3)
  logits_at = lambda noisy, t, positions: jnp.take_along_axis(model(noisy, t),
                                                              positions[..., None], axis=1)
  prompt = np.full((5, 16), V, np.int32)
  prompt[:, [0, 7]] = [[1, 2], [3, 4], [5, 6], [7, 0], [1, 1]]
  common = dict(length=16, num_steps=7, mask_id=V, batch_size=5, top_k=6, temperature=1.3,
                prompt=prompt, schedule=schedules.cosine())
  expected = _stepwise_reference(model, _key(13), **common)
  assert np.all(expected < V) and len(np.unique(expected)) > 3
  variants = [dict(), dict(independent_rows=False, draw_capacity=1, logits_at_fn=logits_at),
              dict(draw_capacity=2)]
  for variant in variants:
    out, stats = sampling.sample(model, _key(13), return_stats=True, **common, **variant)
    np.testing.assert_array_equal(np.asarray(out), expected, err_msg=str(variant))
    assert 1 <= int(stats.network_calls) <= 7 + int(stats.overflow_calls)
    if "logits_at_fn" in variant:
      assert int(stats.overflow_calls) > 0  # the overflow path really ran


def _exact_output_law(logits_fn, *, length, vocab, num_steps, schedule, grid):
  """P(output) of the step-wise sampler by enumeration: dict tuple -> probability (float64)."""
  times = np.asarray(sampling.sampling_grid(num_steps, grid), np.float64)
  m = lambda t: float(schedule.mask_prob(float(t)))
  mask = vocab
  law = {(mask,) * length: 1.0}
  for i in range(num_steps):
    r = 1.0 if i == num_steps - 1 else (m(times[i]) - m(times[i + 1])) / m(times[i])
    states = list(law)
    logits = np.asarray(logits_fn(jnp.asarray(states, jnp.int32),
                                  jnp.full((len(states),), times[i], jnp.float32)), np.float64)
    new = {}
    for state, p_state, row in zip(states, (law[s] for s in states), logits):
      probs = _softmax(row)
      masked = [j for j in range(length) if state[j] == mask]
      for reveal in itertools.product([False, True], repeat=len(masked)):
        chosen = [j for j, hit in zip(masked, reveal) if hit]
        p_reveal = r**len(chosen) * (1 - r)**(len(masked) - len(chosen))
        if p_reveal == 0:
          continue
        for tokens in itertools.product(range(vocab), repeat=len(chosen)):
          nxt = list(state)
          p = p_state * p_reveal
          for j, tok in zip(chosen, tokens):
            nxt[j] = tok
            p *= probs[j, tok]
          new[tuple(nxt)] = new.get(tuple(nxt), 0.0) + p
    law = new
  return law


def test_fast_sampler_output_law_is_exact():
  # 3 positions, 3 real tokens, 3 steps, a time- and context-dependent model: the frequencies of
  # all 27 outputs match the step-wise sampler's exact law (enumerated independently).
  vocab, length, num_steps, n = 3, 3, 3, 40_000
  base = _random_model(vocab=vocab, seed=4)
  model = lambda noisy, t: 2.0 * base(noisy, t)  # sharper: the context matters more
  schedule = schedules.cosine()
  law = _exact_output_law(model, length=length, vocab=vocab, num_steps=num_steps,
                          schedule=schedule, grid="uniform")
  outcomes = sorted(law)
  assert len(outcomes) == vocab**length and abs(sum(law.values()) - 1) < 1e-9
  expected = np.array([law[o] for o in outcomes])
  out = np.asarray(sampling.sample(model, _key(14), length=length, num_steps=num_steps,
                                   mask_id=vocab, batch_size=n, schedule=schedule,
                                   grid="uniform"))
  index = {o: k for k, o in enumerate(outcomes)}
  counts = np.bincount([index[tuple(row)] for row in out.tolist()], minlength=len(outcomes))
  assert np.all(_binomial_z(counts, n, expected) < 5)
  chi2 = np.sum((counts - n * expected)**2 / (n * expected))
  assert chi2 < 70, chi2  # 26 degrees of freedom: P(chi2 > 70) ~ 1e-5
  # Not vacuous: the law is far from the product of per-position marginals (context matters).
  joint = expected.reshape((vocab,) * length)
  independent = np.einsum("i,j,k->ijk", joint.sum((1, 2)), joint.sum((0, 2)), joint.sum((0, 1)))
  assert np.abs(joint - independent).max() > 0.01


def test_network_calls_at_256_steps():
  # L = 128, B = 4, 256 steps: the model is called once per distinct reveal step of the busiest
  # row (fewer than half the steps), whether or not it is time-conditioned; rows sharing steps
  # (independent_rows=False) need one call per distinct step of any row.
  table = np.random.default_rng(8).normal(size=(128, V))
  timed = lambda noisy, t: _table_fn(table)(noisy, t) + t[:, None, None]
  common = dict(length=128, num_steps=256, mask_id=V, batch_size=4, return_stats=True)
  key = _key(15)
  steps = np.asarray(sampling.reveal_steps(
      jax.random.split(key)[0], sampling.reveal_probabilities(
          schedules.linear(), sampling.sampling_grid(256)), (4, 128)))
  per_row = max(len(np.unique(row)) for row in steps)
  _, plain = sampling.sample(_table_fn(table), key, **common)
  _, with_t = sampling.sample(timed, key, **common)
  _, shared = sampling.sample(_table_fn(table), key, independent_rows=False, **common)
  assert int(plain.network_calls) == int(with_t.network_calls) == per_row < 128
  assert int(shared.network_calls) == len(np.unique(steps)) <= 256
  assert int(plain.overflow_calls) == 0
  print(f"network calls at 256 steps, L=128, B=4: {int(plain.network_calls)} (rows at own "
        f"steps), {int(shared.network_calls)} (rows together)")


def test_network_logit_positions_in_sampler():
  # Network(logit_positions=...) gives the full logits at those positions, and sampling a tiny
  # time-conditioned network through it draws the tokens of sampling through the full logits.
  m = configuration.base_config().model
  m.num_layers, m.emb_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 1, 16, 2, 2, 8, 32
  net = network(m, vocab_size=V, max_len=10)
  params = jax.jit(lambda k: init_params(net, k, seq_len=10))(jax.random.key(0))
  apply = jax.jit(lambda p, z, t, pos=None: net.apply({"params": p}, z, t, logit_positions=pos))
  full = lambda z, t: apply(params, z, t)
  at = lambda z, t, pos: apply(params, z, t, pos)
  z = jax.random.randint(jax.random.key(1), (2, 10), 0, V + 1)
  t = jnp.array([0.3, 0.8])
  pos = jnp.array([[9, 0, 4], [2, 2, 7]])
  np.testing.assert_allclose(np.asarray(at(z, t, pos)),
                             np.take_along_axis(np.asarray(full(z, t)), pos[..., None], 1),
                             rtol=1e-5, atol=1e-5)
  common = dict(length=10, num_steps=6, mask_id=V, batch_size=2)
  a = sampling.sample(full, _key(16), **common)
  b = sampling.sample(full, _key(16), logits_at_fn=at, draw_capacity=2, **common)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
