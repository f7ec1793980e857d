"""Tests of the diffusion ELBO: time sampling, the loss, and the bound against an exact denoiser.

The key check enumerates a toy joint distribution over all 27 sequences of length 3 over a
vocabulary of 3. Its exact denoiser (the true conditional of each masked position given the
unmasked ones, independent of t) makes the continuous-time ELBO tight, so the Monte Carlo bound
must reproduce -log p(x) for every x within Monte Carlo error.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.diffusion import schedules
from bdiff_jax.diffusion.corruption import corrupt
from bdiff_jax.diffusion.elbo import diffusion_loss
from bdiff_jax.diffusion.elbo import nll_bound
from bdiff_jax.diffusion.elbo import weighted_masked_nll
from bdiff_jax.diffusion.time_draws import sample_times
from bdiff_jax.diffusion.time_draws import stratified_times

V = 3
L = 3
MASK_ID = V
SEQUENCES = np.array(list(itertools.product(range(V), repeat=L)), np.int32)  # [27, 3]


def _table(seed: int) -> np.ndarray:
  """A fixed, clearly non-uniform and non-factorized distribution over the 27 sequences."""
  logits = 1.2 * np.random.default_rng(seed).standard_normal(len(SEQUENCES))
  p = np.exp(logits)
  return p / p.sum()


PROBS = _table(0)
NEG_LOG_P = -np.log(PROBS)


def _exact_logits_fn(probs: np.ndarray):
  """Returns logits_fn giving log p(x_i = v | unmasked tokens of z) under `probs` (ignores t)."""
  seqs = jnp.asarray(SEQUENCES)
  probs = jnp.asarray(probs, jnp.float32)
  onehot = jax.nn.one_hot(seqs, V, dtype=jnp.float32)  # [27, L, V]

  def logits_fn(noisy, t):
    del t
    visible = noisy != MASK_ID  # [B, L]
    agrees = (seqs[None, :, :] == noisy[:, None, :]) | ~visible[:, None, :]  # [B, 27, L]
    weights = probs[None, :] * jnp.all(agrees, axis=-1)  # [B, 27]
    marginals = jnp.einsum("bs,slv->blv", weights, onehot)
    # Visible positions get log 0 = -inf for the other values; they must be ignored by the loss.
    return jnp.log(marginals)

  return logits_fn


def _uniform_logits_fn(noisy, t):
  del t
  return jnp.zeros(noisy.shape + (V,), jnp.float32)


EXACT = _exact_logits_fn(PROBS)
SCHEDULES = {"linear": schedules.linear(), "cosine": schedules.cosine()}

# Monte Carlo design: every one of the 27 sequences is repeated REPEATS times; each row is an
# unbiased estimate of its bound from NUM_SAMPLES stratified time draws (`eval_times`: rows are
# stratified against each other too, so the spread over repeats overstates the standard error).
REPEATS = 48
NUM_SAMPLES = 128


@functools.lru_cache(maxsize=None)
def _bound_samples(schedule_name: str, denoiser: str) -> np.ndarray:
  """float64[27, REPEATS] estimates of the bound of each sequence."""
  logits_fn = {"exact": EXACT, "uniform": _uniform_logits_fn}[denoiser]
  tokens = jnp.asarray(np.repeat(SEQUENCES, REPEATS, axis=0))
  fn = jax.jit(lambda x, k: nll_bound(logits_fn, x, k, schedule=SCHEDULES[schedule_name],
                                      mask_id=MASK_ID, num_samples=NUM_SAMPLES))
  key = jax.random.fold_in(jax.random.key(2024), len(schedule_name))
  bounds = np.asarray(fn(tokens, key), np.float64)
  return bounds.reshape(len(SEQUENCES), REPEATS)


def test_toy_table_is_non_degenerate():
  assert PROBS.min() > 1e-3
  assert PROBS.max() / PROBS.min() > 20
  # Positions are dependent: the joint entropy is well below the sum of marginal entropies.
  joint_entropy = float(np.sum(PROBS * NEG_LOG_P))
  marginal_entropy = 0.0
  for i in range(L):
    m = np.bincount(SEQUENCES[:, i], weights=PROBS, minlength=V)
    marginal_entropy -= float(np.sum(m * np.log(m)))
  assert marginal_entropy - joint_entropy > 0.2


def test_exact_denoiser_conditionals():
  """Spot-check the analytic denoiser against direct enumeration."""
  noisy = jnp.asarray([[1, MASK_ID, MASK_ID], [MASK_ID, MASK_ID, MASK_ID]], jnp.int32)
  logp = np.asarray(jax.nn.log_softmax(EXACT(noisy, jnp.ones(2)), axis=-1))
  sel = SEQUENCES[:, 0] == 1
  for v in range(V):
    expected = PROBS[sel & (SEQUENCES[:, 2] == v)].sum() / PROBS[sel].sum()
    assert logp[0, 2, v] == pytest.approx(math.log(expected), abs=1e-5)
    assert logp[1, 1, v] == pytest.approx(math.log(PROBS[SEQUENCES[:, 1] == v].sum()), abs=1e-5)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_exact_denoiser_bound_equals_nll(schedule_name):
  samples = _bound_samples(schedule_name, "exact")
  assert np.all(np.isfinite(samples))
  estimate = samples.mean(axis=1)
  se = samples.std(axis=1, ddof=1) / math.sqrt(REPEATS)
  # The estimate must be precise enough for the comparison to mean something. (The time
  # estimator's weight 1/t has a log-divergent variance, so se itself varies with the key: its
  # max over the 27 sequences was 0.14-0.27 over 6 keys, 0.17-0.88 with the earlier design of
  # one independent offset per row.)
  assert se.max() < 0.3, se
  z = (estimate - NEG_LOG_P) / se
  assert np.all(np.abs(z) < 5.0), (estimate, NEG_LOG_P, z)
  # Mean over all x (errors of different x are independent).
  mean_se = math.sqrt(np.sum(se**2)) / len(SEQUENCES)
  assert abs(estimate.mean() - NEG_LOG_P.mean()) < 5.0 * mean_se + 1e-3
  assert mean_se < 0.02
  # Data-weighted: the bound averaged under p reproduces the entropy of p.
  weighted_se = math.sqrt(np.sum((PROBS * se)**2))
  assert abs(np.sum(PROBS * estimate) - np.sum(PROBS * NEG_LOG_P)) < 5.0 * weighted_se + 1e-3


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_wrong_denoiser_gives_larger_bound(schedule_name):
  """A uniform denoiser is tight for the uniform model (L log V per sequence), so under the data
  distribution its bound exceeds the entropy by KL(p || uniform) > 0."""
  exact = _bound_samples(schedule_name, "exact")
  uniform = _bound_samples(schedule_name, "uniform")
  uniform_mean = uniform.mean(axis=1)
  uniform_se = uniform.std(axis=1, ddof=1) / math.sqrt(REPEATS)
  assert np.all(np.abs(uniform_mean - L * math.log(V)) < 5.0 * uniform_se + 1e-3)

  per_row_entropy_exact = PROBS @ exact  # [REPEATS] data-weighted bound per replicate
  per_row_entropy_uniform = PROBS @ uniform
  gap = per_row_entropy_uniform - per_row_entropy_exact
  gap_se = gap.std(ddof=1) / math.sqrt(REPEATS)
  kl = float(np.sum(PROBS * np.log(PROBS * V**L)))
  assert kl > 0.3
  assert gap.mean() > 5.0 * gap_se
  assert abs(gap.mean() - kl) < 5.0 * gap_se + 1e-3


def test_nll_bound_with_context_free_denoiser_is_larger():
  """A denoiser using only per-position marginals (a valid but wrong model) is also worse."""
  marginals = np.stack([np.bincount(SEQUENCES[:, i], weights=PROBS, minlength=V)
                        for i in range(L)])
  log_marginals = jnp.asarray(np.log(marginals), jnp.float32)

  def marginal_logits_fn(noisy, t):
    del t
    return jnp.broadcast_to(log_marginals, noisy.shape + (V,))

  repeats = 32
  tokens = jnp.asarray(np.repeat(SEQUENCES, repeats, axis=0))
  fn = jax.jit(lambda x, k: nll_bound(marginal_logits_fn, x, k, schedule=SCHEDULES["linear"],
                                      mask_id=MASK_ID, num_samples=64))
  samples = np.asarray(fn(tokens, jax.random.key(3)), np.float64).reshape(len(SEQUENCES), repeats)
  bounds = samples.mean(axis=1)
  se = samples.std(axis=1, ddof=1) / math.sqrt(repeats)
  # The context-free model's likelihood is the product of marginals: the bound is tight for it.
  expected = -np.log(marginals[np.arange(L), SEQUENCES]).sum(axis=1)
  assert np.all(np.abs(bounds - expected) < 5.0 * se), (bounds, expected, se)
  # Under the data, it exceeds the entropy by the total correlation of p.
  gap_se = math.sqrt(np.sum((PROBS * se)**2))
  assert PROBS @ bounds > PROBS @ NEG_LOG_P + 5.0 * gap_se


def test_nll_bound_is_deterministic_and_key_dependent():
  tokens = jnp.asarray(SEQUENCES[:4])
  fn = jax.jit(lambda k: nll_bound(EXACT, tokens, k, schedule=SCHEDULES["cosine"],
                                   mask_id=MASK_ID, num_samples=4))
  a, b, c = fn(jax.random.key(0)), fn(jax.random.key(0)), fn(jax.random.key(1))
  assert a.shape == (4,) and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  with pytest.raises(ValueError):
    nll_bound(EXACT, tokens, jax.random.key(0), schedule=SCHEDULES["cosine"], mask_id=MASK_ID,
              num_samples=0)


# ------------------------------------------------------------------------------------------------
# diffusion_loss


@pytest.mark.parametrize("antithetic", [True, False])
def test_loss_matches_bound_per_token(antithetic):
  """Averaged over keys, the per-batch loss estimates mean_x(-log p(x)) / L for the exact model."""
  sched = SCHEDULES["cosine"]
  tokens = jnp.asarray(SEQUENCES)
  loss_fn = jax.jit(jax.vmap(lambda k: diffusion_loss(EXACT, tokens, k, schedule=sched,
                                                      mask_id=MASK_ID, antithetic=antithetic)))
  keys = jax.random.split(jax.random.key(42 + antithetic), 4096)
  losses, aux = loss_fn(keys)
  losses = np.asarray(losses, np.float64)
  assert np.all(np.isfinite(losses))
  np.testing.assert_array_equal(aux["nll_bound_per_token"], losses)
  se = losses.std(ddof=1) / math.sqrt(losses.size)
  target = NEG_LOG_P.mean() / L
  assert se < 0.01
  assert abs(losses.mean() - target) < 5.0 * se, (losses.mean(), target, se)
  # Consistent with nll_bound / L (both estimate the same number).
  bound = _bound_samples("cosine", "exact").mean() / L
  assert abs(losses.mean() - bound) < 5.0 * se + 0.02
  # On average half of the positions are masked (t uniform, E[1 - alpha(t)] = 2/pi for cosine).
  assert abs(float(np.mean(aux["masked_fraction"])) - 2.0 / math.pi) < 0.01


def test_only_masked_positions_contribute():
  sched = SCHEDULES["linear"]
  tokens = jnp.asarray(np.repeat(SEQUENCES, 4, axis=0))
  noise = jax.random.normal(jax.random.key(5), (tokens.shape[0], L, V)) * 30.0

  @jax.jit
  def loss(key, fill, garble_visible, garble_masked):
    def logits_fn(noisy, t):
      visible = (noisy != MASK_ID)[..., None]
      logits = EXACT(noisy, t)
      logits = jnp.where(garble_visible & visible, fill, logits)
      return jnp.where(garble_masked & ~visible, fill, logits)
    return diffusion_loss(logits_fn, tokens, key, schedule=sched, mask_id=MASK_ID)[0]

  nan = jnp.full_like(noise, jnp.nan)
  for seed in range(3):
    key = jax.random.key(100 + seed)
    clean = float(loss(key, noise, False, False))
    assert np.isfinite(clean)
    # Arbitrary, even non-finite, logits at unmasked positions leave the loss bit-identical.
    assert float(loss(key, noise, True, False)) == clean
    assert float(loss(key, nan, True, False)) == clean
    # Garbling the masked positions instead does change it (the check above can fail).
    assert float(loss(key, noise, False, True)) != clean


def _toy_model(params, noisy, t):
  """A tiny parametric denoiser: embeddings (incl. [MASK]) + time feature -> logits."""
  h = params["embed"][noisy] + t[:, None, None] * params["time"]  # [B, L, D]
  h = h + jnp.mean(h, axis=1, keepdims=True)  # mix context
  return (jnp.tanh(h) @ params["out"]).astype(jnp.bfloat16)  # a low-precision output dtype


def _toy_params(key, vocab=V, dim=8):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"embed": jax.random.normal(k1, (vocab + 1, dim)),
          "time": jax.random.normal(k2, (dim,)),
          "out": jax.random.normal(k3, (dim, vocab))}


@pytest.mark.parametrize("corruption", ["absorbing", "prototype_mix"])
def test_jit_and_gradients(corruption):
  sched = SCHEDULES["cosine"]
  params = _toy_params(jax.random.key(0))
  tokens = jnp.asarray(np.repeat(SEQUENCES, 2, axis=0))

  def loss(p, key):
    return diffusion_loss(functools.partial(_toy_model, p), tokens, key, schedule=sched,
                          mask_id=MASK_ID, corruption=corruption, uniform_fraction=0.2)

  key = jax.random.key(7)
  (jit_loss, jit_aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, key)
  assert jit_loss.dtype == jnp.float32
  if corruption == "absorbing":
    # Independent float64 recomputation of the formula from the same draws (the test mirrors the
    # function's key usage: key -> (times key, corruption key)).
    @jax.jit
    def draws(key):
      key_t, key_c = jax.random.split(key)
      t = sample_times(key_t, tokens.shape[0], antithetic=True)
      noisy, masked = corrupt(key_c, tokens, t, schedule=sched, mask_id=MASK_ID)
      return t, masked, _toy_model(params, noisy, t)

    t, masked, logits = draws(key)
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(tokens)[..., None], axis=-1)[..., 0]
    t64 = np.asarray(t, np.float64)
    w = 0.5 * math.pi * np.sin(0.5 * math.pi * (1.0 - t64)) / np.sin(0.5 * math.pi * t64)
    expected = np.mean(w * np.sum(np.where(np.asarray(masked), nll, 0.0), axis=1)) / L
    np.testing.assert_allclose(float(jit_loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(jit_aux["masked_fraction"]), np.mean(masked), rtol=1e-6)
  assert ("nll_bound_per_token" in jit_aux) == (corruption == "absorbing")
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(g))
  assert float(jnp.abs(grads["out"]).sum()) > 0.0
  assert 0.0 < float(jit_aux["masked_fraction"]) < 1.0
  assert float(jit_aux["masked_token_nll"]) > 0.0


def test_weighted_masked_nll_small_t_is_finite():
  """As t -> 0 the weight explodes (or is 0/0 once mask_prob underflows) but nothing is masked."""
  tokens = jnp.zeros((3, 4), jnp.int32)
  masked = jnp.zeros((3, 4), bool)
  t = jnp.asarray([1e-30, 1e-45, 0.0], jnp.float32)
  for sched in [schedules.linear(), schedules.cosine(), schedules.polynomial(8.0)]:
    def f(logits):
      return jnp.sum(weighted_masked_nll(logits, tokens, masked, t, sched))
    logits = jnp.ones((3, 4, V))
    value, grad = jax.jit(jax.value_and_grad(f))(logits)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)
  # A single masked token at small t: weight ~ 1/t, finite.
  masked_one = masked.at[0, 0].set(True)
  out = weighted_masked_nll(jnp.zeros((3, 4, V)), tokens, masked_one,
                            jnp.asarray([1e-7, 0.5, 0.5]), schedules.linear())
  assert float(out[0]) == pytest.approx(math.log(V) / 1e-7, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# time sampling


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_antithetic_times_are_stratified(batch_size):
  for seed in range(20):
    t = np.asarray(sample_times(jax.random.key(seed), batch_size, antithetic=True))
    assert t.shape == (batch_size,) and t.dtype == np.float32
    assert np.all(t > 0.0) and np.all(t <= 1.0)
    strata = np.ceil(t.astype(np.float64) * batch_size).astype(int)  # t in ((j-1)/B, j/B] -> j
    strata = np.clip(strata, 1, batch_size)
    assert sorted(strata.tolist()) == list(range(1, batch_size + 1))
    gaps = np.diff(np.sort(t))
    np.testing.assert_allclose(gaps, 1.0 / batch_size, atol=1e-5)


def test_stratified_times_edge_offsets():
  largest_below_one = np.nextafter(np.float32(1.0), np.float32(0.0))
  for u in [0.0, 0.5, float(largest_below_one)]:
    t = np.asarray(stratified_times(jnp.float32(u), 16))
    assert np.all(t > 0.0) and np.all(t <= 1.0)
  t0 = np.asarray(stratified_times(jnp.float32(0.0), 4))
  np.testing.assert_allclose(t0, [1.0, 0.75, 0.5, 0.25])
  tb = np.asarray(stratified_times(jnp.asarray([0.1, 0.2]), 3))
  assert tb.shape == (2, 3)


@pytest.mark.parametrize("antithetic", [True, False])
def test_times_are_marginally_uniform(antithetic):
  keys = jax.random.split(jax.random.key(9), 2000)
  t = np.asarray(jax.vmap(lambda k: sample_times(k, 8, antithetic=antithetic))(keys))
  assert np.all(t > 0.0) and np.all(t <= 1.0)
  # Marginal of each slot is uniform: compare the decile counts of slot 0 and of all slots.
  for values in (t[:, 0], t.ravel()):
    counts = np.histogram(values, bins=10, range=(0.0, 1.0))[0]
    expected = values.size / 10
    assert np.all(np.abs(counts - expected) < 5.0 * math.sqrt(expected * 0.9))
  # Nothing is clipped away near 0 (that would drop part of the ELBO integral).
  values = t.ravel()
  for edge in (0.02, 0.005):
    expected = values.size * edge
    assert abs(np.sum(values < edge) - expected) < 5.0 * math.sqrt(expected) + 1.0
  assert values.min() < 2e-3
  if not antithetic:
    # iid: no stratification, so some batch has two times in the same half.
    assert np.any(np.sum(t < 0.5, axis=1) != 4)
