"""Ancestral sampling from an absorbing-state (masked) diffusion language model.

The forward process masks each token independently: at time t in [0, 1] a token is still clean
with probability alpha(t) and is [MASK] (id `mask_id`, one past the last real token) otherwise.
The sampler runs that process backwards on a decreasing time grid 1 = t_0 > t_1 > ... > t_N = 0.
Going from t to s < t, each position that is still masked is revealed with probability

    (alpha(s) - alpha(t)) / (1 - alpha(t)) = (m(t) - m(s)) / m(t),   m = 1 - alpha = mask_prob,

and a revealed position takes a token drawn from the model's categorical at that position,
computed from the current noisy sequence at time t. Clean tokens never change. alpha(0) = 1,
so the last step reveals every position still masked: the output never contains `mask_id`.

Categorical draws use the Gumbel-max trick in float32 log-probabilities, but with Gumbel noise
built from 64 random bits per draw (see `gumbel`). The textbook construction from one float32
uniform caps the noise near 16.6 nats, which silently removes rare tokens and lowers the
effective temperature (Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic
masked models and exploit inaccurate categorical sampling"); ours reaches about 45 nats.

How `sample` computes this process exactly, but without a model call and a draw at every
position per step:

1. Reveal steps first. The step-wise sampler reveals a still-masked position p at step i iff its
   uniform U[i, p] < r_i (r_{N-1} := 1). These uniforms are independent of each other, of the
   draw noise and of the model, so each position's reveal step S_p = min{i : U[i, p] < r_i} is
   a function of its own uniforms only: the S_p are independent, P(S_p = i) =
   r_i prod_{j<i} (1 - r_j), and they can be drawn before any model call (`reveal_steps`, by
   inversion of this law). Given the S_p, the step-wise sampler's step i fills {p : S_p = i}
   from the model at (x_i, t_i) and leaves x unchanged when that set is empty.
2. No call without a reveal. A step that reveals nothing uses no logits, so skipping its model
   call changes nothing -- for every model, time-conditioned or not: no logits are ever reused
   at another time or sequence (this is not the approximate "caching" of reusing logits from an
   earlier t). The model is called only at steps that reveal something.
3. Rows at their own steps. When logits_fn treats rows independently (row b of the logits
   depends only on noisy[b] and t[b]: true of every network here), row b needs the model only at
   the steps in {S_p : p in row b}, and the rows need not be at the same step: each call moves
   every row to its own next reveal step (t[b] = that step's time). The number of calls is then
   max_b |{S_p : p in row b}| (instead of |union over b|) -- e.g. 101 for B = 4, L = 128 at
   256 cosine-grid steps (192 with the rows together), where the step-wise sampler makes 256
   (see `SampleStats`).
4. Draws only where tokens are revealed. Every position is drawn exactly once in a run, so its
   noise is one independent slice per (row, position) of Gumbel noise drawn up front from
   draw_key: at its reveal step it is independent of everything that shaped the logits there
   (other positions' noise, the S_p), as in the step-wise sampler. A call draws only the
   revealed positions, gathered in chunks of up to `draw_capacity` per row (with logits_at_fn
   the model computes logits only there, one call per chunk; all chunks of a step see the same
   sequence and time, so a step with more reveals than the capacity is still exact). Draws use
   `categorical_blocked`: the law of `categorical`, with ~2 sqrt(V) instead of V noise values.

So the output has the step-wise sampler's law, and for a given key the tokens do not depend on
the capacity, on logits_at_fn (up to float rounding of the logits) or on independent_rows.
"""

import math
import operator
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax.diffusion import schedules as schedules_lib
# The draws, re-exported: sampling.categorical etc. are the names callers use.
from bdiff_jax.diffusion.categorical import (blocked_layout, categorical, categorical_blocked,  # noqa: F401  pylint: disable=unused-import
                                   categorical_blocked_from_noise, exponential_from_bits, gumbel,
                                   filter_logits, unit_from_bits)
from bdiff_jax.errors import UserError

# logits_fn(noisy: int32[B, L], t: float32[B]) -> float[B, L, V], V real tokens (no [MASK] column).
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
# logits_at_fn(noisy: int32[B, L], t: float32[B], positions: int32[B, K]) -> float[B, K, V]: the
# same model's logits at the given positions only (e.g. Network(..., logit_positions=...)).
LogitsAtFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

GRIDS = ("uniform", "cosine")



class SamplingArgumentError(UserError, ValueError):
  """An invalid sampling argument.

  A `UserError` (so the command line reports it as one line) and a `ValueError` (so library
  callers can catch the usual exception type).
  """


def check_int(name: str, value, minimum: int) -> int:
  """Returns `value` as a Python int, or raises if it is not an integer >= `minimum`."""
  if isinstance(value, bool):
    raise SamplingArgumentError(f"{name} must be an integer, got the bool {value}.",
                                f"pass an integer >= {minimum} as {name}.")
  try:
    value = operator.index(value)
  except TypeError:
    raise SamplingArgumentError(f"{name} must be an integer, got {value!r}.",
                                f"pass an integer >= {minimum} as {name}.") from None
  if value < minimum:
    raise SamplingArgumentError(f"{name} = {value} is invalid; it must be >= {minimum}.",
                                f"pass an integer >= {minimum} as {name}.")
  return value


def check_float(name: str, value) -> float:
  """Returns `value` as a Python float, or raises if it is not a finite number."""
  try:
    value = float(value)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    raise SamplingArgumentError(f"{name} must be a number known before tracing, got {value!r}.",
                                f"pass a Python float as {name}.") from None
  if not math.isfinite(value):
    raise SamplingArgumentError(f"{name} = {value} is not finite.",
                                f"pass a finite number as {name}.")
  return value


def sampling_grid(num_steps: int, grid: str = "cosine") -> jax.Array:
  """The decreasing time grid t_0 = 1 > t_1 > ... > t_N = 0 of an N-step sampler.

  Args:
    num_steps: N >= 1, the number of denoising steps.
    grid: "uniform": t_i = 1 - i / N. "cosine": t_i = cos(pi/2 * i / N), i.e. uniform in the
      angle: short steps near t = 1, where few tokens are revealed per step and the model sees
      little context, and long steps near t = 0. Under the linear schedule the number of tokens
      revealed in step i is proportional to t_i - t_{i+1}, so the cosine grid reveals slowly at
      first and fast at the end.

  Returns:
    float32[num_steps + 1] with exact endpoints 1 and 0. Strictly decreasing except that, for
    very large N (~5000 and up with "cosine"), float32 rounding can merge points next to t = 1;
    a merged step reveals nothing and is harmless.
  """
  num_steps = check_int("num_steps", num_steps, 1)
  fraction = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  if grid == "uniform":
    t = 1.0 - fraction
  elif grid == "cosine":
    t = np.cos(0.5 * np.pi * fraction)
  else:
    raise SamplingArgumentError(f"unknown sampling grid {grid!r}.",
                                f"use one of {', '.join(GRIDS)}.")
  t[0], t[-1] = 1.0, 0.0
  return jnp.asarray(t, dtype=jnp.float32)


def initial_sequence(prompt, length: int, batch_size: int, mask_id: int) -> jax.Array:
  """The starting noisy sequence int32[batch_size, length]: the prompt padded with mask_id."""
  if prompt is None:
    return jnp.full((batch_size, length), mask_id, jnp.int32)
  try:
    concrete = np.asarray(prompt)
  except jax.errors.TracerArrayConversionError:
    concrete = None  # A traced prompt (inside jit): its values cannot be checked here.
  array = prompt if concrete is None else concrete
  dtype = np.dtype(array.dtype)
  if not np.issubdtype(dtype, np.integer):
    raise SamplingArgumentError(f"prompt must hold integer token ids, got dtype {dtype}.",
                                "pass token ids as an int array; use mask_id for holes.")
  if array.ndim == 1:
    array = array[None]
  elif array.ndim != 2 or array.shape[0] not in (1, batch_size):
    raise SamplingArgumentError(
        f"prompt has shape {tuple(array.shape)}; expected [length] or "
        f"[batch_size={batch_size}, length].",
        "pass one prompt for all samples, or one per sample.")
  if array.shape[1] > length:
    raise SamplingArgumentError(
        f"prompt has {array.shape[1]} tokens, more than the sample length {length}.",
        "shorten the prompt or increase the sample length.")
  if concrete is not None and array.size:
    bad = (array < 0) | (array > mask_id)
    if bad.any():
      row, col = np.argwhere(bad)[0]
      raise SamplingArgumentError(
          f"prompt holds token id {int(array[row, col])} at position {int(col)}, outside "
          f"[0, {mask_id}] (real tokens 0..{mask_id - 1}, mask_id {mask_id} marks a hole).",
          "encode the prompt with the model's vocabulary.")
  array = jnp.asarray(array).astype(jnp.int32)
  array = jnp.pad(array, ((0, 0), (0, length - array.shape[1])), constant_values=mask_id)
  return jnp.broadcast_to(array, (batch_size, length))


def reveal_probabilities(schedule: schedules_lib.Schedule, times: jax.Array) -> np.ndarray:
  """P(reveal | still masked) of each step from times[i] to times[i + 1]: float32[N].

  (m(t) - m(s)) / m(t) with m = mask_prob (not 1 - alpha: accurate near t = 0); a zero mask
  probability (underflow) means "reveal". `times`: a concrete float32[N + 1] grid (under jit,
  make it inside jax.ensure_compile_time_eval()).
  """
  with jax.ensure_compile_time_eval():
    masked_now = schedule.mask_prob(times[:-1]).astype(jnp.float32)
    masked_next = schedule.mask_prob(times[1:]).astype(jnp.float32)
    safe_now = jnp.where(masked_now > 0, masked_now, 1.0)
    reveal = jnp.where(masked_now > 0,
                       jnp.clip((masked_now - masked_next) / safe_now, 0, 1), 1.0)
    return np.asarray(reveal, np.float32)


def reveal_steps(key: jax.Array, reveal_prob, shape: tuple[int, ...]) -> jax.Array:
  """The step at which each position is revealed if it is masked, int32[shape] in [0, N).

  The law of the step-wise sampler's reveal decisions (a still-masked position is revealed at
  step i with probability reveal_prob[i]; step N - 1 reveals all the rest), independently per
  position: P(step <= i) = c_i = 1 - prod_{j<=i} (1 - reveal_prob[j]). Drawn by inversion,
  step = #{i < N - 1 : u >= c_i}, from one uniform u per position built from 64 random bits;
  c_i is computed in float64 as -expm1(sum log1p(-r)) and compared in float32, so each
  P(step <= i) is exact to ~1e-7 relative however small it is (the usual 23-bit float32
  uniform resolves probabilities only to ~1e-7 absolute).

  Args:
    key: a PRNG key.
    reveal_prob: float[N], concrete (e.g. from `reveal_probabilities`).
    shape: the positions' shape, e.g. (B, L).
  """
  r = np.asarray(reveal_prob, np.float64)
  with np.errstate(divide="ignore"):  # log1p(-1) = -inf: everything is revealed from there on
    cdf = -np.expm1(np.cumsum(np.log1p(-np.clip(r[:-1], 0.0, 1.0))))
  thresholds = jnp.asarray(cdf, jnp.float32)  # non-decreasing
  words = jax.random.bits(key, (2,) + tuple(shape), jnp.uint32)
  u = unit_from_bits(words[0], words[1])
  return jnp.searchsorted(thresholds, u, side="right").astype(jnp.int32)


def default_draw_capacity(reveal_prob, length: int) -> int:
  """Positions per row drawn in one chunk: the largest expected number of positions of a row
  revealed in one step, lam = L max_i P(step = i), plus 2 sqrt(lam) + 3 (a row needs a second
  chunk with probability ~1e-3 or less), at most L."""
  r = np.asarray(reveal_prob, np.float64).copy()
  r[-1] = 1.0
  still_masked = np.concatenate([[1.0], np.cumprod(1.0 - r)[:-1]])
  lam = length * float(np.max(still_masked * r))
  return min(length, math.ceil(lam + 2.0 * math.sqrt(lam) + 3.0))


class SampleStats(NamedTuple):
  """Work done by one `sample` call: int32 scalars (traced under jit).

  network_calls: model calls (of logits_fn, or of logits_at_fn when given); at most num_steps
    plus overflow_calls.
  overflow_calls: the calls of logits_at_fn beyond one per step that reveals something, made
    because a row revealed more than draw_capacity positions in one step (0 without
    logits_at_fn, where one logits_fn call serves all chunks of a step).
  """
  network_calls: jax.Array
  overflow_calls: jax.Array


def sample(logits_fn: LogitsFn, key: jax.Array, *, length: int, num_steps: int, mask_id: int,
           batch_size: int = 1, prompt=None, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, schedule: schedules_lib.Schedule | None = None,
           grid: str = "cosine", logits_at_fn: LogitsAtFn | None = None,
           independent_rows: bool = True, draw_capacity: int | None = None,
           return_stats: bool = False):
  """Ancestral sampling of the absorbing-state diffusion process (see the module docstring).

  The law of the output is that of the step-wise sampler (a model call and a reveal decision
  per step); the model is called only at steps that reveal something, and tokens are drawn only
  where they are revealed. Exact for every model, time-conditioned or not.

  Jittable: every argument except `key` and `prompt` must be a Python value (they fix shapes and
  control flow); wrap with e.g. `jax.jit(functools.partial(sample, logits_fn, length=...))`.
  A traced `prompt` is allowed, but then its token ids cannot be range-checked.

  Args:
    logits_fn: the model, logits_fn(noisy int32[B, L], t float32[B]) -> float[B, L, V] with
      V = mask_id real tokens and no [MASK] column; any float dtype (computed on in float32).
      With independent_rows=True (the default), row b of its output must depend only on
      noisy[b] and t[b] -- true of any network without cross-example interaction -- and the
      rows of one call may be at different times.
    key: a PRNG key.
    length: L, the sequence length.
    num_steps: N >= 1, the number of denoising steps (model calls: at most N, plus any extra
      chunks of logits_at_fn; see return_stats).
    mask_id: the [MASK] id, equal to the number V of real tokens.
    batch_size: B, the number of samples.
    prompt: None, or int token ids of shape [P] or [1 or B, P] with P <= L: a prefix padded with
      mask_id to length L. Real tokens stay fixed; positions holding mask_id are holes to fill.
    temperature: > 0; logits are divided by it.
    top_k: > 0 restricts each draw to the k most likely tokens; 0 disables.
    top_p: in (0, 1]; < 1 restricts each draw to the nucleus of probability top_p.
    schedule: the masking schedule the model was trained with; None means linear.
    grid: time-grid spacing, "cosine" or "uniform" (see `sampling_grid`).
    logits_at_fn: optional, the same model evaluated at chosen positions only,
      logits_at_fn(noisy, t, positions int32[B, K]) -> float[B, K, V] with K = draw_capacity
      (every position in [0, L); entries past a row's reveals are ignored), so that the model
      skips its output head elsewhere. When given, logits_fn is not called.
    independent_rows: True: each call moves every row to its own next reveal step (fewer
      calls). False: all rows share the step (t[b] all equal), for a logits_fn that mixes rows.
    draw_capacity: positions per row drawn at once; a step where a row reveals more is drawn
      in several chunks (with logits_at_fn, one model call per chunk, on the same sequence and
      time). None: `default_draw_capacity`. Changes the speed only, not the output (for a
      given key).
    return_stats: also return a `SampleStats`.

  Returns:
    int32[batch_size, length] with every id in [0, mask_id); with return_stats, the pair
    (tokens, SampleStats).

  Raises:
    SamplingArgumentError (a ValueError) for invalid arguments.
  """
  length = check_int("length", length, 1)
  num_steps = check_int("num_steps", num_steps, 1)
  mask_id = check_int("mask_id", mask_id, 1)
  batch_size = check_int("batch_size", batch_size, 1)
  top_k = check_int("top_k", top_k, 0)
  temperature = check_float("temperature", temperature)
  if temperature <= 0:
    raise SamplingArgumentError(f"temperature = {temperature} is invalid; it must be > 0.",
                                "pass a positive temperature (1 samples the model as is).")
  top_p = check_float("top_p", top_p)
  if not 0.0 < top_p <= 1.0:
    raise SamplingArgumentError(f"top_p = {top_p} is invalid; it must be in (0, 1].",
                                "pass top_p in (0, 1]; 1 disables nucleus filtering.")
  if schedule is None:
    schedule = schedules_lib.linear()
  elif not isinstance(schedule, schedules_lib.Schedule):
    raise SamplingArgumentError(f"schedule must be a Schedule, got {schedule!r}.",
                                "pass bdiff_jax.diffusion.schedules.get_schedule(name) or None.")
  with jax.ensure_compile_time_eval():  # constants, also under jit
    times = sampling_grid(num_steps, grid)
    reveal_prob = reveal_probabilities(schedule, times)
  if draw_capacity is None:
    draw_capacity = default_draw_capacity(reveal_prob, length)
  capacity = min(check_int("draw_capacity", draw_capacity, 1), length)
  noisy = initial_sequence(prompt, length, batch_size, mask_id)
  reveal_key, draw_key = jax.random.split(key)
  steps = reveal_steps(reveal_key, reveal_prob, (batch_size, length))
  rows = jnp.arange(batch_size)[:, None]

  def check_shape(logits, expected):
    if logits.shape != expected:
      raise SamplingArgumentError(
          f"the model returned logits of shape {tuple(logits.shape)}; expected {expected} = "
          f"[batch, positions, mask_id real tokens].",
          "set mask_id to the model's vocabulary size (the model has no [MASK] output).")

  # Each position is drawn once in a run: its noise, drawn up front (B L 2 sqrt(V) values).
  num_blocks, block = blocked_layout(mask_id)
  noise = gumbel(draw_key, (batch_size, length, num_blocks + block))

  def draw(logits, positions):
    """Tokens int32[B, K] at positions int32[B, K] from logits [B, K, V]."""
    logits = filter_logits(logits, temperature, top_k, top_p)
    return categorical_blocked_from_noise(noise[rows, positions], logits)

  def reveal_at(noisy, t, reveal):
    """noisy with the positions `reveal` filled from the model at (noisy, t), drawn in chunks
    of up to `capacity` positions per row (all chunks see the same logits); and the number of
    model calls made."""
    if logits_at_fn is None:
      full = logits_fn(noisy, t)
      check_shape(full, (batch_size, length, mask_id))
      logits_at = lambda positions: jnp.take_along_axis(full, positions[..., None], axis=1)
    else:
      def logits_at(positions):
        logits = logits_at_fn(noisy, t, positions)
        check_shape(logits, (batch_size, capacity, mask_id))
        return logits

    def chunk(carry):
      tokens, todo, chunks = carry
      # Each row's first `capacity` positions still to draw, in increasing order.
      positions = jnp.argsort(~todo, axis=1, stable=True)[:, :capacity].astype(jnp.int32)
      drawn = draw(logits_at(positions), positions)
      targets = jnp.where(jnp.take_along_axis(todo, positions, axis=1), positions, length)
      tokens = tokens.at[rows, targets].set(drawn, mode="drop")
      todo = todo.at[rows, targets].set(False, mode="drop")
      return tokens, todo, chunks + 1

    tokens, _, chunks = jax.lax.while_loop(lambda carry: jnp.any(carry[1]), chunk,
                                           (noisy, reveal, jnp.int32(0)))
    return tokens, (1 if logits_at_fn is None else chunks)

  def unfinished(carry):
    noisy, steps_done, _, _ = carry
    return jnp.any(noisy == mask_id) & (steps_done < num_steps)

  def call(carry):
    noisy, steps_done, calls, overflow = carry
    masked = noisy == mask_id
    next_step = jnp.min(jnp.where(masked, steps, num_steps), axis=1)  # [B]; N: row finished
    if not independent_rows:
      next_step = jnp.broadcast_to(jnp.min(next_step), next_step.shape)
    reveal = masked & (steps == next_step[:, None])
    noisy, num_calls = reveal_at(noisy, times[jnp.minimum(next_step, num_steps - 1)], reveal)
    return noisy, steps_done + 1, calls + num_calls, overflow + num_calls - 1

  noisy, _, calls, overflow = jax.lax.while_loop(
      unfinished, call, (noisy, jnp.int32(0), jnp.int32(0), jnp.int32(0)))
  if return_stats:
    return noisy, SampleStats(calls, overflow)
  return noisy
