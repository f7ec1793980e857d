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
"""

import math
import operator
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax import schedules as schedules_lib
from bdiff_jax.errors import UserError

# logits_fn(noisy: int32[B, L], t: float32[B]) -> float[B, L, V], V real tokens (no [MASK] column).
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]

GRIDS = ("uniform", "cosine")

_TWO_POW_M32 = 2.0**-32


class SamplingArgumentError(UserError, ValueError):
  """An invalid sampling argument.

  A `UserError` (so the command line reports it as one line) and a `ValueError` (so library
  callers can catch the usual exception type).
  """


def _check_int(name: str, value, minimum: int) -> int:
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


def _check_float(name: str, value) -> float:
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
  num_steps = _check_int("num_steps", num_steps, 1)
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


def _unit_from_bits(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """(hi + (lo + 1/2) 2^-32) 2^-32 in float32: a uniform in (0, 1) with relative error ~2^-23.

  Unlike the usual 23-bit float32 uniform, values near 0 keep full relative precision down to
  2^-65, because the low word is scaled separately before the two are added.
  """
  scale = jnp.float32(_TWO_POW_M32)
  return (hi.astype(jnp.float32) + (lo.astype(jnp.float32) + 0.5) * scale) * scale


def exponential_from_bits(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """Exp(1) variates from two uint32 words each, accurate in both tails.

  With v the 64-bit uniform of `_unit_from_bits`, E = -log(1 - v). For v < 1/2 this is
  -log1p(-v), exact in relative terms for tiny v (small E: the large-Gumbel tail). For v >= 1/2
  it is -log(w), where w = 1 - v is rebuilt from the complemented words (exactly 1 - v before
  rounding), so the large-E tail is not truncated at float32's 1 - 2^-24 either.
  Range: [2^-65, ~45.1], never 0 or inf.

  Args:
    hi: uint32 array, the high words.
    lo: uint32 array of the same shape, the low words.

  Returns:
    float32 array of the same shape.
  """
  v = _unit_from_bits(hi, lo)
  w = _unit_from_bits(~hi, ~lo)
  return jnp.where(hi < jnp.uint32(2**31), -jnp.log1p(-v), -jnp.log(w))


def gumbel(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Standard Gumbel noise -log(E), E ~ Exp(1) from 64 random bits: float32 in ~[-3.8, 45.1].

  The single-float32 construction -log(-log(u)) cannot exceed -log(-log(1 - 2^-24)) ~ 16.6;
  here values up to ~45 occur with their correct probabilities.
  """
  words = jax.random.bits(key, (2,) + tuple(shape), jnp.uint32)
  return -jnp.log(exponential_from_bits(words[0], words[1]))


def categorical(key: jax.Array, logits: jax.Array, axis: int = -1) -> jax.Array:
  """Draws one index along `axis` with probabilities softmax(logits), in float32.

  Gumbel-max on float32 log-probabilities with the long-tailed noise of `gumbel`, so that tokens
  with tiny probability are drawn at their correct rate. Logits equal to -inf are never drawn.

  Args:
    key: a PRNG key.
    logits: float array (any float dtype; cast to float32). Not all -inf along `axis`.
    axis: the category axis.

  Returns:
    int32 array of `logits.shape` without `axis`.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=axis)
  return jnp.argmax(log_probs + gumbel(key, log_probs.shape), axis=axis).astype(jnp.int32)


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Temperature, then top-k, then top-p (nucleus) filtering along the last axis, in float32.

  Removed tokens get logit -inf. Tokens tied with the last kept one are kept too, so with ties
  top-k may keep more than k tokens.

  Args:
    logits: float[..., V].
    temperature: > 0; logits are divided by it.
    top_k: keep the k largest logits per row; 0 (or >= V) keeps all.
    top_p: keep the smallest set of most probable tokens whose total probability (after
      temperature and top-k) reaches top_p; the most probable token is always kept. 1 keeps all.

  Returns:
    float32[..., V].
  """
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth_largest, logits, -jnp.inf)
  if top_p < 1.0:
    descending = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    mass_before = jnp.concatenate([jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]],
                                  axis=-1)
    # Sorted token j is needed while the tokens before it have not reached top_p. Token 0 always
    # qualifies (mass_before = 0 < top_p).
    needed = mass_before < top_p
    threshold = jnp.min(jnp.where(needed, descending, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return logits


def _initial_sequence(prompt, length: int, batch_size: int, mask_id: int) -> jax.Array:
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


def sample(logits_fn: LogitsFn, key: jax.Array, *, length: int, num_steps: int, mask_id: int,
           batch_size: int = 1, prompt=None, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, schedule: schedules_lib.Schedule | None = None,
           grid: str = "cosine") -> jax.Array:
  """Ancestral sampling of the absorbing-state diffusion process (see the module docstring).

  Jittable: every argument except `key` and `prompt` must be a Python value (they fix shapes and
  control flow); wrap with e.g. `jax.jit(functools.partial(sample, logits_fn, length=...))`.
  A traced `prompt` is allowed, but then its token ids cannot be range-checked.

  Args:
    logits_fn: the model, logits_fn(noisy int32[B, L], t float32[B]) -> float[B, L, V] with
      V = mask_id real tokens and no [MASK] column; any float dtype (computed on in float32).
    key: a PRNG key. Step i uses jax.random.fold_in(key, i).
    length: L, the sequence length.
    num_steps: N >= 1, the number of denoising steps (= model calls).
    mask_id: the [MASK] id, equal to the number V of real tokens.
    batch_size: B, the number of samples.
    prompt: None, or int token ids of shape [P] or [1 or B, P] with P <= L: a prefix padded with
      mask_id to length L. Real tokens stay fixed; positions holding mask_id are holes to fill.
    temperature: > 0; logits are divided by it.
    top_k: > 0 restricts each draw to the k most likely tokens; 0 disables.
    top_p: in (0, 1]; < 1 restricts each draw to the nucleus of probability top_p.
    schedule: the masking schedule the model was trained with; None means linear.
    grid: time-grid spacing, "cosine" or "uniform" (see `sampling_grid`).

  Returns:
    int32[batch_size, length] with every id in [0, mask_id).

  Raises:
    SamplingArgumentError (a ValueError) for invalid arguments.
  """
  length = _check_int("length", length, 1)
  num_steps = _check_int("num_steps", num_steps, 1)
  mask_id = _check_int("mask_id", mask_id, 1)
  batch_size = _check_int("batch_size", batch_size, 1)
  top_k = _check_int("top_k", top_k, 0)
  temperature = _check_float("temperature", temperature)
  if temperature <= 0:
    raise SamplingArgumentError(f"temperature = {temperature} is invalid; it must be > 0.",
                                "pass a positive temperature (1 samples the model as is).")
  top_p = _check_float("top_p", top_p)
  if not 0.0 < top_p <= 1.0:
    raise SamplingArgumentError(f"top_p = {top_p} is invalid; it must be in (0, 1].",
                                "pass top_p in (0, 1]; 1 disables nucleus filtering.")
  if schedule is None:
    schedule = schedules_lib.linear()
  elif not isinstance(schedule, schedules_lib.Schedule):
    raise SamplingArgumentError(f"schedule must be a Schedule, got {schedule!r}.",
                                "pass bdiff_jax.schedules.get_schedule(name) or None.")
  times = sampling_grid(num_steps, grid)
  noisy = _initial_sequence(prompt, length, batch_size, mask_id)

  # P(reveal | still masked) for the step from times[i] to times[i + 1], from mask_prob rather
  # than 1 - alpha for accuracy near t = 0. A zero mask probability (underflow) means "reveal".
  masked_now = schedule.mask_prob(times[:-1]).astype(jnp.float32)
  masked_next = schedule.mask_prob(times[1:]).astype(jnp.float32)
  safe_now = jnp.where(masked_now > 0, masked_now, 1.0)
  reveal_prob = jnp.where(masked_now > 0, jnp.clip((masked_now - masked_next) / safe_now, 0, 1),
                          1.0)

  def step(i, noisy):
    reveal_key, draw_key = jax.random.split(jax.random.fold_in(key, i))
    t = jnp.full((batch_size,), times[i], jnp.float32)
    logits = logits_fn(noisy, t)
    if logits.shape != (batch_size, length, mask_id):
      raise SamplingArgumentError(
          f"logits_fn returned shape {tuple(logits.shape)}; expected "
          f"{(batch_size, length, mask_id)} = [batch, length, mask_id real tokens].",
          "set mask_id to the model's vocabulary size (the model has no [MASK] output).")
    logits = filter_logits(logits, temperature, top_k, top_p)
    draws = categorical(draw_key, logits)
    # The last step goes to t = 0, where alpha = 1: reveal everything regardless of rounding.
    reveal = (jax.random.uniform(reveal_key, noisy.shape) < reveal_prob[i]) | (i == num_steps - 1)
    return jnp.where((noisy == mask_id) & reveal, draws, noisy)

  return jax.lax.fori_loop(0, num_steps, step, noisy)
