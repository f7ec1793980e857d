"""Continuous-time ELBO of absorbing-state (masked) diffusion.

For a sequence x of length L and a denoiser p_theta(x_i | z_t) the negative log-likelihood is
bounded by

  -log p(x) <= integral_0^1 w(t) E_{z_t ~ q(.|x)} [ sum_{i : z_t,i = [MASK]} -log p_theta(x_i | z_t) ] dt,

with w(t) = -alpha'(t) / (1 - alpha(t)). Since alpha(0) = 1 and alpha(1) = 0 there is no
reconstruction or prior term. The bound is tight when p_theta(x_i | z_t) is the true conditional
of x_i given the unmasked tokens of z_t (which does not depend on t).

All estimators here draw t in (0, 1] (never exactly 0) uniformly, so they are unbiased estimates of
the integral; nothing is clipped away. Near t = 0 the weight w(t) is large but the expected number
of masked tokens is proportionally small; a draw with no masked token contributes exactly 0.

Two Monte Carlo estimators of the bound (`corruption.ESTIMATORS`, `config.diffusion.estimator`):
* "time" (default): t ~ U(0, 1] (stratified), each token masked with probability 1 - alpha(t),
  the masked cross-entropies weighted by w(t); the network sees t.
* "count": k ~ U{1, ..., L} (stratified), exactly k positions masked (a uniform k-subset,
  `corruption.corrupt_count`), weighted by L / k; the network sees t = k / L, the masked fraction
  of its own input. For a denoiser of z alone both have the same expectation for every schedule:
  given |M| = k the mask set is a uniform k-subset under either, and with m = 1 - alpha(t),
  integral w(t) P(|M| = k | t) dt = integral_0^1 C(L, k) m^(k-1) (1 - m)^(L-k) dm = 1 / k, so
    -log p(x) <= E_{k ~ U{1..L}} [ (L / k) E_{|M| = k} sum_{i in M} -log p(x_i | x_{-M}) ],
  the any-order autoregressive bound (Hoogeboom et al. 2022; Ou et al. 2024), valid for any
  denoiser of z and k. Its weights are at most L; the time estimator's w(t) = 1/t makes a draw
  with one masked token at a tiny t arbitrarily heavy (for the linear schedule a draw exceeds x
  with probability ~ 1/x^2: infinite variance), so its gradients and bounds are far noisier.

A model is passed as `logits_fn(noisy: int32[B, L], t: float32[B]) -> float[B, L, V]` over the V
real tokens (no [MASK] column). Logits are cast to float32 before the log-softmax.

`diffusion_loss_gathered` and `nll_bound_gathered` compute the same numbers with the model split in
two, `hidden_fn(noisy, t) -> [B, L, D]` and the head with its cross-entropy, `nll_fn(rows [C, D],
targets [C]) -> [C]` (`masked_head.head_nll(head_fn)` for a head that returns logits), and run
the head only at the masked positions of the batch (gathered into a buffer of `masked_capacity`
rows), which is where nearly all of the work is at a large vocabulary. See
`bdiff_jax.diffusion.masked_head`.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from bdiff_jax.diffusion.corruption import check_corruption_args
from bdiff_jax.diffusion.corruption import check_estimator
from bdiff_jax.diffusion.corruption import corrupt
from bdiff_jax.diffusion.corruption import corrupt_count
from bdiff_jax.diffusion.corruption import counts_from_uniform
from bdiff_jax.diffusion.masked_head import count_capacity
from bdiff_jax.diffusion.masked_head import masked_capacity
from bdiff_jax.diffusion.masked_head import masked_nll_sums
from bdiff_jax.diffusion.masked_head import RowsNllFn
from bdiff_jax.diffusion.masked_head import subsampled_nll_sums
from bdiff_jax.diffusion.schedules import Schedule
from bdiff_jax.diffusion.time_draws import eval_times, sample_times

LogitsFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
HiddenFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (noisy, t) -> [B, L, D]


def _masked_nll_sum(logits: jnp.ndarray, tokens: jnp.ndarray, masked: jnp.ndarray) -> jnp.ndarray:
  """float32[B] (float64 for float64 logits): sum over masked positions of -log softmax[x_i]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  token_logp = jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  # where, not multiplication: logits at unmasked positions must not leak in (not even as NaN).
  return jnp.sum(jnp.where(masked, -token_logp, 0.0), axis=-1)


def _elbo_weight(t: jnp.ndarray, masked: jnp.ndarray, schedule: Schedule) -> jnp.ndarray:
  """float32[B]: w(t_b), or 0 for sequences with no masked position."""
  t = jnp.asarray(t, jnp.float32)
  p_mask = schedule.mask_prob(t)
  any_masked = jnp.any(masked, axis=-1)
  # w(t) can be huge (or 0/0 once mask_prob underflows) as t -> 0, but then nothing is masked and
  # the term is 0. Zeroing w itself, not only the product, keeps the gradient free of inf * 0.
  safe_p = jnp.where(p_mask > 0.0, p_mask, 1.0)
  w = jnp.where(any_masked & (p_mask > 0.0), -schedule.dalpha(t) / safe_p, 0.0)
  return w.astype(jnp.float32)


def _draw(key, tokens, s, lengths, *, estimator, schedule, mask_id, valid=None,
          corruption="absorbing", uniform_fraction=0.1):
  """One draw per sequence at s float32[B] in (0, 1]: (noisy, masked, the time the network is
  told float32[B], the bound's weight float32[B]).

  "time": s is the time t; tokens masked with probability mask_prob(t), weight w(t).
  "count": exactly k_b = ceil(s_b L_b) of the L_b valid tokens masked, t = k_b / L_b, weight
  L_b / k_b (0 for a row with no valid token)."""
  if estimator == "count":
    counts = counts_from_uniform(s, lengths)
    noisy, masked = corrupt_count(key, tokens, counts, mask_id=mask_id, valid=valid)
    k = counts.astype(jnp.float32)
    n = jnp.asarray(lengths, jnp.float32)
    return noisy, masked, k / jnp.maximum(n, 1.0), jnp.where(k > 0, n / jnp.maximum(k, 1.0), 0.0)
  noisy, masked = corrupt(key, tokens, s, schedule=schedule, mask_id=mask_id, mode=corruption,
                          uniform_fraction=uniform_fraction, vocab_size=mask_id)
  if valid is not None:
    masked = masked & valid
  return noisy, masked, s, _elbo_weight(s, masked, schedule)


def weighted_masked_nll(logits: jnp.ndarray, tokens: jnp.ndarray, masked: jnp.ndarray,
                        t: jnp.ndarray, schedule: Schedule) -> jnp.ndarray:
  """Per-sequence single-draw bound term w(t_b) * sum_{i masked} -log p(x_i | z_t).

  Args:
    logits: float[B, L, V] denoiser logits over real tokens (any dtype; cast to float32).
    tokens: int[B, L] clean tokens.
    masked: bool[B, L] corrupted positions; only these contribute (logits elsewhere are ignored,
      even if they are not finite).
    t: float[B] the times at which the sequences were corrupted.
    schedule: the masking schedule.

  Returns:
    float32[B], in nats per sequence (not divided by L).
  """
  return _elbo_weight(t, masked, schedule) * _masked_nll_sum(logits, tokens, masked)


def diffusion_loss(logits_fn: LogitsFn,
                   tokens: jnp.ndarray,
                   key: jax.Array,
                   *,
                   schedule: Schedule,
                   mask_id: int,
                   antithetic: bool = True,
                   corruption: str = "absorbing",
                   uniform_fraction: float = 0.1,
                   estimator: str = "time") -> tuple[jnp.ndarray, dict[str, Any]]:
  """One-sample Monte Carlo estimate of the diffusion ELBO, in nats per token.

  loss = mean_b [ w(t_b) * sum_{i masked} -log p(x_{b,i} | z_{t_b}) ] / L, with one time t_b per
  sequence (stratified across the batch if `antithetic`); with estimator="count" the weight is
  L / k_b for exactly k_b masked tokens (see the module docstring). For corruption="absorbing"
  this is an unbiased estimate of the upper bound on -log p(x) / L averaged over the batch.

  Args:
    logits_fn: (noisy int32[B, L], t float32[B]) -> logits float[B, L, V].
    tokens: int[B, L] clean tokens in [0, V).
    key: PRNG key; consumed.
    schedule: the masking schedule.
    mask_id: id of [MASK]; must equal V (substitutes for "prototype_mix" are drawn from
      [0, mask_id)).
    antithetic: stratify the times across the batch.
    corruption: "absorbing", or "prototype_mix" to reproduce the old prototype's objective (the
      same formula on its corruption; NOT a likelihood bound).
    uniform_fraction: "prototype_mix" only, see `bdiff_jax.diffusion.corruption.corrupt`.
    estimator: "time" or "count" (`corruption.ESTIMATORS`; "count" needs corruption="absorbing").

  Returns:
    (loss, aux): loss float32 scalar; aux a dict of float32 scalars: 'masked_fraction' (share of
    corrupted positions), 'masked_token_nll' (mean -log p over corrupted positions, unweighted),
    and for "absorbing" only 'nll_bound_per_token' (equal to the loss).
  """
  def nll_sums(noisy, t, masked):
    return _masked_nll_sum(logits_fn(noisy, t), tokens, masked)

  return _loss_from_nll_sums(nll_sums, tokens, key, schedule=schedule, mask_id=mask_id,
                             antithetic=antithetic, corruption=corruption,
                             uniform_fraction=uniform_fraction, estimator=estimator)


def _loss_from_nll_sums(nll_sums, tokens, key, *, schedule, mask_id, antithetic, corruption,
                        uniform_fraction, estimator, subsets_key=False):
  """diffusion_loss with the per-sequence masked NLL sums computed by nll_sums(noisy, t, masked),
  or by nll_sums(noisy, t, masked, key) with a key of its own when `subsets_key`."""
  check_corruption_args(corruption, uniform_fraction)
  check_estimator(estimator, corruption)
  tokens = jnp.asarray(tokens, jnp.int32)
  batch_size, length = tokens.shape
  key_t, key_c = jax.random.split(key)
  if subsets_key:
    key_c, key_s = jax.random.split(key_c)
  noisy, masked, t, weight = _draw(key_c, tokens, sample_times(key_t, batch_size,
                                                               antithetic=antithetic),
                                   length, estimator=estimator, schedule=schedule,
                                   mask_id=mask_id, corruption=corruption,
                                   uniform_fraction=uniform_fraction)
  nll_sum = nll_sums(noisy, t, masked, key_s) if subsets_key else nll_sums(noisy, t, masked)
  loss = jnp.mean(weight * nll_sum) / length

  num_masked = jnp.sum(masked).astype(jnp.float32)
  aux = {
      "masked_fraction": jnp.mean(masked.astype(jnp.float32)),
      "masked_token_nll": jax.lax.stop_gradient(jnp.sum(nll_sum) / jnp.maximum(num_masked, 1.0)),
  }
  if corruption == "absorbing":
    aux["nll_bound_per_token"] = loss
  return loss, aux


def _gathered_nll_sums(hidden_fn, nll_fn, tokens, schedule, capacity, chunk_rows, *,
                       antithetic: bool, estimator: str):
  """(noisy, t, masked) -> per-sequence masked NLL sums, the head only at masked positions
  (`masked_head.masked_nll_sums`); capacity None: `masked_capacity` (`count_capacity` for the
  count estimator) for this batch shape."""
  batch_size, length = tokens.shape
  if capacity is None and estimator == "count":
    capacity = count_capacity(batch_size, length, antithetic=antithetic)
  elif capacity is None:
    capacity = masked_capacity(schedule, batch_size, length, antithetic=antithetic)

  def nll_sums(noisy, t, masked):
    return masked_nll_sums(hidden_fn(noisy, t), nll_fn, tokens, masked, capacity=capacity,
                           chunk_rows=chunk_rows)

  return nll_sums


def diffusion_loss_gathered(hidden_fn: HiddenFn,
                            nll_fn: RowsNllFn,
                            tokens: jnp.ndarray,
                            key: jax.Array,
                            *,
                            schedule: Schedule,
                            mask_id: int,
                            antithetic: bool = True,
                            corruption: str = "absorbing",
                            uniform_fraction: float = 0.1,
                            estimator: str = "time",
                            capacity: Optional[int] = None,
                            chunk_rows: Optional[int] = None,
                            positions_per_row: int = 0
                           ) -> tuple[jnp.ndarray, dict[str, Any]]:
  """`diffusion_loss` with the head run only at the masked positions of the batch.

  Same draws (times, masks) from the same key, and the same loss and aux metrics as
  `diffusion_loss(lambda z, t: head_fn(hidden_fn(z, t)), ...)` when nll_fn is
  `masked_head.head_nll(head_fn)`, up to the order of floating-point additions; the gradients
  are equal in the same sense. See `bdiff_jax.diffusion.masked_head`.

  Args:
    hidden_fn: (noisy int32[B, L], t float32[B]) -> hidden states float[B, L, D].
    nll_fn: (hidden rows [C, D], targets int32[C]) -> -log p(target | row) float[C].
    tokens, key, schedule, mask_id, antithetic, corruption, uniform_fraction, estimator: as in
      `diffusion_loss`.
    capacity: rows of the masked-position buffer; None: `masked_capacity(schedule, B, L,
      antithetic=antithetic)` (`count_capacity(B, L, antithetic=antithetic)` for the count
      estimator). Batches with more masked positions are computed exactly in chunks.
    chunk_rows: None, or run the head on this many rows at a time with recomputation in the
      backward (less memory, ~1/3 more head FLOPs); see `masked_head.masked_nll_sums`.
    positions_per_row: 0 (or >= L): score every masked position, as above. P in [1, L): score a
      uniform random subset of min(k_b, P) of each row's k_b masked positions, scaled by
      k_b / min(k_b, P) (`masked_head.subsampled_nll_sums`): an unbiased estimate of the same
      loss (the same expectation over draws; its gradient is unbiased for the same gradient)
      with the head at B * P rows. The subsets take a key split off the mask key, so the masks
      differ from the P = 0 draws of the same key. For training; `nll_bound_gathered` always
      scores every masked position.

  Returns:
    (loss, aux) as `diffusion_loss`; with P in [1, L) the loss and 'masked_token_nll' are
    their unbiased subset estimates.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if 0 < int(positions_per_row) < tokens.shape[1]:
    per_row = int(positions_per_row)

    def subset_sums(noisy, t, masked, key_s):
      return subsampled_nll_sums(hidden_fn(noisy, t), nll_fn, tokens, masked, key_s,
                                 per_row=per_row)

    return _loss_from_nll_sums(subset_sums, tokens, key, schedule=schedule, mask_id=mask_id,
                               antithetic=antithetic, corruption=corruption,
                               uniform_fraction=uniform_fraction, estimator=estimator,
                               subsets_key=True)
  nll_sums = _gathered_nll_sums(hidden_fn, nll_fn, tokens, schedule, capacity, chunk_rows,
                                antithetic=antithetic, estimator=estimator)
  return _loss_from_nll_sums(nll_sums, tokens, key, schedule=schedule, mask_id=mask_id,
                             antithetic=antithetic, corruption=corruption,
                             uniform_fraction=uniform_fraction, estimator=estimator)


def nll_bound(logits_fn: LogitsFn,
              tokens: jnp.ndarray,
              key: jax.Array,
              *,
              schedule: Schedule,
              mask_id: int,
              num_samples: int,
              valid: Optional[jnp.ndarray] = None,
              estimator: str = "time") -> jnp.ndarray:
  """Monte Carlo upper bound on -log p(tokens) per sequence, in nats (summed over positions).

  Averages the single-draw bound over `num_samples` times per sequence (`eval_times`:
  stratified over the K draws of each sequence and over the B sequences of each draw), with an
  independent mask per draw (estimator="count": as many masked counts k / L_b, stratified the
  same way, each with a uniform set of exactly k valid positions). The draws run
  sequentially under `lax.scan`, so memory stays at one forward pass. jittable with logits_fn
  closed over (num_samples static).

  Args:
    logits_fn: (noisy int32[B, L], t float32[B]) -> logits float[B, L, V].
    tokens: int[B, L] clean tokens in [0, V).
    key: PRNG key; consumed.
    schedule: the masking schedule.
    mask_id: id of [MASK].
    num_samples: K >= 1 time draws per sequence.
    valid: optional bool[B, L]; False marks padding, which is never counted as masked (the
      bound is that of the valid tokens alone, provided `logits_fn` keeps padding from
      influencing them, e.g. through an attention padding mask). None: every position is valid.
    estimator: "time" or "count" (`corruption.ESTIMATORS`).

  Returns:
    float32[B] (float64 for float64 logits), an unbiased estimate of the ELBO bound of each
    sequence.
  """
  def draw_nll_sums(noisy, t, masked):
    return _masked_nll_sum(logits_fn(noisy, t), tokens, masked)

  return _bound_from_nll_sums(draw_nll_sums, tokens, key, schedule=schedule, mask_id=mask_id,
                              num_samples=num_samples, valid=valid, estimator=estimator)


def _bound_from_nll_sums(draw_nll_sums, tokens, key, *, schedule, mask_id, num_samples,
                         valid=None, estimator="time"):
  """nll_bound with each draw's masked NLL sums computed by draw_nll_sums(noisy, t, masked)."""
  num_samples = int(num_samples)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  check_estimator(estimator)
  tokens = jnp.asarray(tokens, jnp.int32)
  batch_size, length = tokens.shape
  key_t, key_c = jax.random.split(key)
  times = eval_times(key_t, batch_size, num_samples)  # [K, B]
  keys = jax.random.split(key_c, num_samples)
  lengths = (jnp.full((batch_size,), length, jnp.int32) if valid is None
             else jnp.sum(valid, axis=-1, dtype=jnp.int32))

  def weighted(draw):
    s, k = draw  # s stratifies t (or k / L_b) over the K draws of each row
    noisy, masked, t, weight = _draw(k, tokens, s, lengths, estimator=estimator,
                                     schedule=schedule, mask_id=mask_id, valid=valid)
    return weight * draw_nll_sums(noisy, t, masked)

  def one_draw(total, draw):
    return total + weighted(draw), None

  # float32, or float64 when the model computes in float64.
  out = jax.eval_shape(weighted, (times[0], keys[0]))
  total, _ = jax.lax.scan(one_draw, jnp.zeros(out.shape, out.dtype), (times, keys))
  return total / num_samples


def nll_bound_gathered(hidden_fn: HiddenFn,
                       nll_fn: RowsNllFn,
                       tokens: jnp.ndarray,
                       key: jax.Array,
                       *,
                       schedule: Schedule,
                       mask_id: int,
                       num_samples: int,
                       capacity: Optional[int] = None,
                       chunk_rows: Optional[int] = None,
                       valid: Optional[jnp.ndarray] = None,
                       estimator: str = "time") -> jnp.ndarray:
  """`nll_bound` with the head run only at each draw's masked positions.

  Same draws and, up to the order of floating-point additions, the same float32[B] as
  `nll_bound(lambda z, t: head_fn(hidden_fn(z, t)), ...)` when nll_fn is
  `masked_head.head_nll(head_fn)`.

  Args:
    hidden_fn, nll_fn: as in `diffusion_loss_gathered`.
    tokens, key, schedule, mask_id, num_samples, valid, estimator: as in `nll_bound`.
    capacity: rows of each draw's masked-position buffer; None: `masked_capacity(schedule, B, L)`
      (each draw's times are stratified across the batch, `eval_times`), or
      `count_capacity(B, L)` for the count estimator.
    chunk_rows: None, or run the head on this many rows at a time (less memory).

  Returns:
    float32[B] (float64 for float64 logits), per-sequence bounds in nats.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  # Each draw's times are stratified across the batch (eval_times): the stratified capacity.
  draw_nll_sums = _gathered_nll_sums(hidden_fn, nll_fn, tokens, schedule, capacity, chunk_rows,
                                     antithetic=True, estimator=estimator)
  return _bound_from_nll_sums(draw_nll_sums, tokens, key, schedule=schedule, mask_id=mask_id,
                              num_samples=num_samples, valid=valid, estimator=estimator)
