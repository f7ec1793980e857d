"""The "count" ELBO estimator (`config.diffusion.estimator=count`): exactly k ~ U{1..L} masked
tokens, weight L / k, the network conditioned on k / L.

* its expectation is the continuous-time ELBO, checked exactly by enumerating every mask of a
  short sequence under a denoiser of z alone (for two schedules), and deterministically: with
  K = L stratified draws each row sees every k once, so a denoiser whose output depends only on
  the position and the count gives the enumerated value to float precision;
* Monte Carlo: it reproduces the enumerated bound, its spread is a fraction of the time
  estimator's on the same model, and the exact denoiser makes it tight (-log p(x));
* `corrupt_count` masks exactly k valid positions, never padding, every k-subset equally often;
* the training loss passes the masked fraction as t, and its capacity never overflows;
* the evaluation's draws (`eval_times`) are a Latin design whose draws fit the same buffer.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.config import configuration
from bdiff_jax.diffusion import corruption
from bdiff_jax.diffusion import schedules
from bdiff_jax.diffusion.corruption import corrupt_count, counts_from_uniform
from bdiff_jax.diffusion.elbo import diffusion_loss, nll_bound
from bdiff_jax.diffusion.masked_head import count_capacity
from bdiff_jax.diffusion.time_draws import eval_times, sample_times
from bdiff_jax.errors import ConfigError
from bdiff_jax.modes import sample as sample_mode
from tests.test_diffusion import EXACT, MASK_ID as TOY_MASK, NEG_LOG_P, SEQUENCES

V = 5
L = 5
MASK_ID = V
SCHEDULES = {"linear": schedules.linear(), "cosine": schedules.cosine()}


def _context_denoiser(noisy, t):
  """Logits of a fixed denoiser of z alone (t ignored) that mixes position and context."""
  del t
  rng = np.random.default_rng(7)
  table = jnp.asarray(rng.standard_normal((V + 1, V)), jnp.float32)
  pos = jnp.asarray(rng.standard_normal((L, V)), jnp.float32)
  ctx = jnp.mean(table[noisy], axis=1, keepdims=True)  # [B, 1, V]
  return 2.0 * jnp.tanh(table[noisy] + pos[None] + 1.5 * ctx)


def _masked_ce_sum(logits_fn, x, mask):
  noisy = np.where(mask, MASK_ID, x)[None]
  logp = np.asarray(jax.nn.log_softmax(logits_fn(jnp.asarray(noisy), jnp.ones(1)), -1))[0]
  return float(sum(-logp[i, x[i]] for i in range(L) if mask[i]))


def _time_elbo_by_quadrature(logits_fn, x, schedule, nodes=400):
  """integral_0^1 w(t) E_{M ~ Bern(m(t))} [sum_{i in M} CE_i] dt by enumeration and quadrature."""
  masks = [np.array(m, bool) for m in itertools.product([0, 1], repeat=L) if any(m)]
  sums = np.array([_masked_ce_sum(logits_fn, x, m) for m in masks])
  ks = np.array([m.sum() for m in masks])
  # Gauss-Legendre nodes on (0, 1): the integrand is a polynomial in m(t) times w(t).
  u, wq = np.polynomial.legendre.leggauss(nodes)
  t = 0.5 * (u + 1.0)
  m = np.asarray(schedule.mask_prob(jnp.asarray(t, jnp.float32)), np.float64)
  w = np.asarray(schedule.weight(jnp.asarray(t, jnp.float32)), np.float64)
  prob = m[:, None]**ks[None] * (1.0 - m[:, None])**(L - ks[None])  # [T, masks]
  return float(0.5 * np.sum(wq * w * (prob @ sums)))


def _count_elbo_by_enumeration(logits_fn, x):
  """sum_k (1 / k) mean_{|M| = k} sum_{i in M} CE_i, every mask enumerated."""
  total = 0.0
  for k in range(1, L + 1):
    subsets = list(itertools.combinations(range(L), k))
    mean = np.mean([_masked_ce_sum(logits_fn, x, np.isin(np.arange(L), s)) for s in subsets])
    total += mean / k
  return total


def _count_bounds(logits_fn, tokens, key, num_samples, valid=None):
  fn = jax.jit(lambda x, k: nll_bound(logits_fn, x, k, schedule=SCHEDULES["linear"],
                                      mask_id=MASK_ID, num_samples=num_samples, valid=valid,
                                      estimator="count"))
  return np.asarray(fn(tokens, key), np.float64)


X = np.array([3, 0, 4, 4, 1], np.int32)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_count_form_equals_the_time_elbo_exactly(schedule_name):
  count = _count_elbo_by_enumeration(_context_denoiser, X)
  time = _time_elbo_by_quadrature(_context_denoiser, X, SCHEDULES[schedule_name])
  assert count > 5.0
  assert abs(count - time) < 1e-4 * count, (count, time)


def test_k_equals_l_draws_see_every_count_once():
  """K = L stratified draws: k / L covers each ((j - 1) / L, j / L] once, so k = 1..L each once.
  With rows of one repeated token and a denoiser of the count alone, no draw is left to chance:
  the estimate is sum_k (L / k) * k * CE(k) / L = sum_k CE(k), whatever the masked sets."""
  rng = np.random.default_rng(3)
  table = jnp.asarray(rng.standard_normal((L + 1, V)), jnp.float32)  # [k, V]

  def count_denoiser(noisy, t):
    k = jnp.sum(noisy == MASK_ID, axis=-1)
    # t is the masked fraction k / L (the estimator says so): check it here.
    ok = jnp.all(jnp.abs(t - k / L) < 1e-6)
    logits = jnp.broadcast_to(table[k][:, None, :], noisy.shape + (V,))
    return jnp.where(ok, logits, jnp.nan)

  tokens = jnp.asarray(np.repeat(np.arange(V)[:, None], L, axis=1), jnp.int32)
  logp = np.asarray(jax.nn.log_softmax(table, -1), np.float64)
  expected = [-logp[1:, c].sum() for c in range(V)]
  for seed in range(3):
    got = _count_bounds(count_denoiser, tokens, jax.random.key(seed), num_samples=L)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_count_estimator_is_unbiased_and_far_less_noisy():
  tokens = jnp.asarray(np.repeat(X[None], 4000, axis=0))
  count = _count_bounds(_context_denoiser, tokens, jax.random.key(11), num_samples=1)
  exact = _count_elbo_by_enumeration(_context_denoiser, X)
  se = count.std(ddof=1) / math.sqrt(count.size)
  assert abs(count.mean() - exact) < 4.0 * se, (count.mean(), exact, se)
  time = np.asarray(jax.jit(lambda k: nll_bound(
      _context_denoiser, tokens, k, schedule=SCHEDULES["linear"], mask_id=MASK_ID,
      num_samples=1))(jax.random.key(11)), np.float64)
  assert count.var() < 0.25 * time.var(), (count.var(), time.var())
  assert time.max() > 3.0 * count.max()  # the heavy tail of w(t) = 1/t


def test_exact_denoiser_makes_the_count_bound_tight():
  """The toy joint of tests/test_diffusion.py: the bound equals -log p(x) for every x."""
  repeats = 64
  tokens = jnp.asarray(np.repeat(SEQUENCES, repeats, axis=0))
  fn = jax.jit(lambda x, k: nll_bound(EXACT, x, k, schedule=SCHEDULES["linear"],
                                      mask_id=TOY_MASK, num_samples=12, estimator="count"))
  samples = np.asarray(fn(tokens, jax.random.key(5)), np.float64).reshape(len(SEQUENCES), -1)
  est = samples.mean(axis=1)
  se = samples.std(axis=1, ddof=1) / math.sqrt(repeats)
  assert se.max() < 0.1
  assert np.all(np.abs(est - NEG_LOG_P) < 5.0 * se + 1e-4), (est, NEG_LOG_P, se)


def test_padding_is_never_masked_and_rows_use_their_own_length():
  tokens = jnp.asarray(np.tile(X, (3, 1)), jnp.int32)
  valid = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
  got = _count_bounds(_context_denoiser, tokens, jax.random.key(2), num_samples=4, valid=valid)
  assert got[2] == 0.0 and got[1] > 0.0
  counts = jnp.asarray([5, 3, 0])
  for seed in range(20):
    noisy, masked = corrupt_count(jax.random.key(seed), tokens, counts, mask_id=MASK_ID,
                                  valid=valid)
    np.testing.assert_array_equal(np.sum(masked, axis=1), counts)
    assert not np.any(np.asarray(masked) & ~np.asarray(valid))
    np.testing.assert_array_equal(np.where(masked, MASK_ID, tokens), noisy)


def test_every_subset_of_a_count_is_equally_likely():
  tokens = jnp.zeros((1, 4), jnp.int32)
  draw = jax.jit(jax.vmap(lambda k: corrupt_count(k, tokens, jnp.asarray([2]), mask_id=9)[1][0]))
  masks = np.asarray(draw(jax.random.split(jax.random.key(0), 6000)))
  codes = masks @ (1 << np.arange(4))
  freq = np.bincount(codes, minlength=16)
  subsets = [sum(1 << i for i in s) for s in itertools.combinations(range(4), 2)]
  assert freq.sum() == freq[subsets].sum() == 6000
  # 1000 expected per subset, sd ~ 29: 5 sd either way.
  assert np.all(np.abs(freq[subsets] - 1000) < 150), freq[subsets]


def test_counts_are_uniform_and_stratified():
  s = jnp.asarray(np.linspace(1e-7, 1.0, 1000), jnp.float32)
  k = np.asarray(counts_from_uniform(s, 7))
  assert k.min() == 1 and k.max() == 7
  np.testing.assert_allclose(np.bincount(k, minlength=8)[1:], 1000 / 7, atol=2)
  np.testing.assert_array_equal(counts_from_uniform(jnp.asarray([0.5, 1.0]), jnp.asarray([0, 3])),
                                [0, 3])
  # Stratified over a batch of B: exactly B / L rows per count when L divides B.
  t = sample_times(jax.random.key(4), 32, antithetic=True)
  np.testing.assert_array_equal(np.bincount(np.asarray(counts_from_uniform(t, 8)))[1:], 4)


def test_training_loss_conditions_on_the_masked_fraction_and_fits_its_capacity():
  batch, length = 16, 24
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, V)

  def logits_fn(noisy, t):  # NaN unless t is the row's masked fraction
    frac = jnp.mean((noisy == MASK_ID).astype(jnp.float32), axis=-1)
    ok = jnp.abs(t - frac) < 1e-6
    return jnp.where(ok[:, None, None], jnp.zeros(noisy.shape + (V,)), jnp.nan)

  loss_fn = jax.jit(jax.vmap(lambda k: diffusion_loss(
      logits_fn, tokens, k, schedule=SCHEDULES["linear"], mask_id=MASK_ID, estimator="count")))
  losses, aux = loss_fn(jax.random.split(jax.random.key(1), 500))
  # A uniform denoiser: every masked token costs log V, and the weights L / k make the loss
  # exactly log V per token whatever the draw.
  np.testing.assert_allclose(np.asarray(losses), math.log(V), rtol=1e-5)
  masked = np.asarray(aux["masked_fraction"]) * batch * length
  cap = count_capacity(batch, length)
  assert masked.max() <= cap < masked.max() + batch + 16
  iid = count_capacity(batch, length, antithetic=False)
  assert cap < iid <= batch * length


@pytest.mark.parametrize("batch,draws", [(64, 1), (12, 4), (10, 3)])
def test_eval_times_are_a_latin_design_uniform_and_within_the_stratified_buffer(batch, draws):
  keys = jax.random.split(jax.random.key(3), 400)
  s = np.asarray(jax.jit(jax.vmap(lambda k: eval_times(k, batch, draws)))(keys), np.float64)
  assert s.shape == (400, draws, batch) and s.min() > 0.0 and s.max() <= 1.0
  # Row b's K values sit in one cell of width 1 / B, shifted by j / K: the cell is pi(b), a
  # permutation, so every draw has one value per cell of width 1 / B (shifted by j / K) and
  # every row one value per interval of width 1 / K.
  x = np.mod(1.0 - s - (np.arange(draws) / draws)[None, :, None], 1.0)
  cell = np.floor(x * batch + 1e-6).astype(int)
  assert np.all(cell == cell[:, :1, :])
  assert np.all(np.sort(cell[:, 0, :], axis=-1) == np.arange(batch))
  # Marginally uniform: the mean and the deciles of every position's values.
  flat = s.reshape(400, -1)
  assert abs(flat.mean() - 0.5) < 0.01
  hist = np.histogram(flat, bins=10, range=(0, 1))[0] / flat.size
  np.testing.assert_allclose(hist, 0.1, atol=0.01)
  assert np.abs(flat.mean(axis=0) - 0.5).max() < 4.5 * math.sqrt(1 / 12 / 400)
  # A draw of a batch with padded rows masks at most the stratified (training) capacity.
  length = 128
  lengths = np.full(batch, length)
  lengths[-1], lengths[0] = 37, 0
  counts = np.asarray(counts_from_uniform(jnp.asarray(s, jnp.float32), jnp.asarray(lengths)))
  assert counts.sum(axis=-1).max() <= count_capacity(batch, length)
  assert np.all(counts[..., 0] == 0) and counts[..., -1].max() <= 37


def test_config_rejects_count_with_a_non_absorbing_corruption():
  c = configuration.base_config()
  c.diffusion.estimator = "count"
  configuration.validate(c)
  c.diffusion.corruption = "prototype_mix"
  with pytest.raises(ConfigError, match="estimator='count'"):
    configuration.validate(c)
  c.diffusion.estimator = "steps"
  with pytest.raises(ConfigError, match="diffusion.estimator"):
    configuration.validate(c)
  assert configuration.ESTIMATORS == corruption.ESTIMATORS


def test_objective_trains_evaluates_and_samples_with_the_masked_fraction_as_time():
  """Through the objective on a real (tiny, time-conditioned) network: the sampler feeds the
  network the masked fraction of its input, exactly as training and evaluation do."""
  from bdiff_jax import models  # pylint: disable=g-import-not-at-top
  from bdiff_jax.diffusion import sampling  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  c = helpers.tiny_config(num_layers=1)
  c.diffusion.estimator = "count"
  c.sample.update(num_samples=2, length=16, num_steps=8)
  objective, net, _, state, batch = helpers.train_setup(c, vocab=50)
  # Every leaf perturbed: the zero-initialised time modulation then really depends on t.
  leaves, tree = jax.tree_util.tree_flatten(state.params)
  keys = jax.random.split(jax.random.key(9), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [x + 0.5 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
  apply = models.bind(net, params, train=False)
  loss, _ = jax.jit(lambda p, x, k: objective.loss(models.bind(net, p, train=False), x, k))(
      params, jnp.asarray(batch), jax.random.key(0))
  assert np.isfinite(float(loss)) and float(loss) > 1.0
  valid = jnp.arange(16)[None, :] < jnp.arange(1, 9)[:, None]
  nll = jax.jit(lambda x, k: objective.sequence_nll(apply, x, valid, k, num_samples=2))(
      jnp.asarray(batch), jax.random.key(1))
  assert np.all(np.isfinite(nll)) and np.all(np.asarray(nll) > 0.0)

  key = jax.random.key(3)
  got = objective.sample(net, params, key, settings=sample_mode.sample_settings(c.sample),
                         max_len=16)
  frac = lambda z: jnp.mean((z == 50).astype(jnp.float32), axis=-1)
  want = sampling.sample(lambda z, t: apply(z, frac(z)), key, length=16, num_steps=8,
                         mask_id=50, batch_size=2, schedule=objective.schedule,
                         logits_at_fn=lambda z, t, pos: apply(z, frac(z), logit_positions=pos))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # ... and not what the schedule's time would give (the network is time-conditioned).
  other = sampling.sample(lambda z, t: apply(z, t), key, length=16, num_steps=8, mask_id=50,
                          batch_size=2, schedule=objective.schedule,
                          logits_at_fn=lambda z, t, pos: apply(z, t, logit_positions=pos))
  assert not np.array_equal(np.asarray(got), np.asarray(other))
