"""Numerically safe categorical draws over large vocabularies, and logit filtering.

Categorical draws use the Gumbel-max trick in float32 log-probabilities, but with Gumbel noise
built from 64 random bits per draw (see `gumbel`). The textbook construction from one float32
uniform caps the noise near 16.6 nats, which silently removes rare tokens and lowers the
effective temperature (Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic
masked models and exploit inaccurate categorical sampling"); ours reaches about 45 nats.
`categorical_blocked` has the same law with about 2 sqrt(V) noise values instead of V.
"""

import math

import jax
import jax.numpy as jnp

_TWO_POW_M32 = 2.0**-32


def unit_from_bits(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """(hi + (lo + 1/2) 2^-32) 2^-32 in float32: a uniform in (0, 1) with relative error ~2^-23.

  Unlike the usual 23-bit float32 uniform, values near 0 keep full relative precision down to
  2^-65, because the low word is scaled separately before the two are added.
  """
  scale = jnp.float32(_TWO_POW_M32)
  return (hi.astype(jnp.float32) + (lo.astype(jnp.float32) + 0.5) * scale) * scale


def exponential_from_bits(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """Exp(1) variates from two uint32 words each, accurate in both tails.

  With v the 64-bit uniform of `unit_from_bits`, E = -log(1 - v). For v < 1/2 this is
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
  v = unit_from_bits(hi, lo)
  w = unit_from_bits(~hi, ~lo)
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


def blocked_layout(vocab: int) -> tuple[int, int]:
  """(num_blocks, block) of `categorical_blocked`: block = ceil(sqrt(V)) consecutive ids per
  block, num_blocks = ceil(V / block)."""
  block = math.isqrt(vocab - 1) + 1
  return -(-vocab // block), block


def categorical_blocked(key: jax.Array, logits: jax.Array) -> jax.Array:
  """Draws one index along the last axis with probabilities softmax(logits), from ~2 sqrt(V)
  noise values instead of V.

  The V ids are split into nb = ceil(V / bs) blocks of bs = ceil(sqrt(V)) consecutive ids (the
  last one padded with -inf). A block j is drawn with probabilities softmax(lse), lse_j the
  logsumexp of block j, then an id inside block j with probabilities softmax(block j's logits):
  P(v) = exp(lse_j - lse) exp(l_v - lse_j) = softmax(logits)_v, the law of `categorical`. Both
  are Gumbel-max draws with the 64-bit noise of `gumbel` on float32 log-probabilities normalised
  at their level, so a rare id's probability is the product of two float32 probabilities, each
  exact to ~1e-6 relative, with no absolute floor. 2 (nb + bs) random words per draw: 732
  instead of 66,556 for V = 33,278. Logits equal to -inf are never drawn.

  Args:
    key: a PRNG key.
    logits: float[..., V] (any float dtype; cast to float32), not all -inf along the last axis.

  Returns:
    int32[...].
  """
  num_blocks, block = blocked_layout(logits.shape[-1])
  return categorical_blocked_from_noise(gumbel(key, logits.shape[:-1] + (num_blocks + block,)),
                                        logits)


def categorical_blocked_from_noise(noise: jax.Array, logits: jax.Array) -> jax.Array:
  """`categorical_blocked` with given standard Gumbel noise float32[..., nb + bs] (independent
  per draw; `blocked_layout` gives nb, bs): the first nb values pick the block, the rest the
  id inside it."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  num_blocks, block = blocked_layout(vocab)
  pad = [(0, 0)] * (logits.ndim - 1) + [(0, num_blocks * block - vocab)]
  blocks = jnp.pad(logits, pad, constant_values=-jnp.inf)
  blocks = blocks.reshape(logits.shape[:-1] + (num_blocks, block))
  outer = jax.nn.log_softmax(jax.nn.logsumexp(blocks, axis=-1), axis=-1)
  chosen = jnp.argmax(outer + noise[..., :num_blocks], axis=-1)
  inner = jax.nn.log_softmax(
      jnp.take_along_axis(blocks, chosen[..., None, None], axis=-2)[..., 0, :], axis=-1)
  within = jnp.argmax(inner + noise[..., num_blocks:], axis=-1)
  return (chosen * block + within).astype(jnp.int32)


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
