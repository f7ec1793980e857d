"""Forward (noising) process of masked diffusion.

Token ids 0..V-1 are real tokens and `mask_id` (= V by convention) is the absorbing [MASK] state.
At time t in [0, 1] each token of a sequence is independently replaced by [MASK] with
probability 1 - alpha(t), where alpha is a `bdiff_jax.diffusion.schedules.Schedule`.

Two modes:

* "absorbing": the process above. It is the only one for which `bdiff_jax.diffusion.elbo` computes a
  valid upper bound on the negative log-likelihood.
* "absorbing" with an exact count (`corrupt_count`): exactly k of the L positions, a uniformly
  random set of them, are [MASK]. Given |M| = k, the mask set of the process above is such a
  set too; `bdiff_jax.diffusion.elbo`'s "count" estimator draws k instead of t.
* "prototype_mix": reproduces the corruption of the older PyTorch prototype, kept only for
  comparison. Of the corrupted positions, a `uniform_fraction` share shows a uniformly random real
  token (which may coincide with the original one) instead of [MASK]. This is NOT the absorbing
  process: the model can no longer tell which positions are corrupted, and the diffusion loss
  computed on top of it is a heuristic training objective, not a bound on the likelihood.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from bdiff_jax.diffusion.schedules import Schedule
from bdiff_jax.errors import ConfigError

CORRUPTION_MODES = ("absorbing", "prototype_mix")
# How `bdiff_jax.diffusion.elbo` draws masks: per-token at a time t, or an exact count k.
ESTIMATORS = ("time", "count")


def check_corruption_args(mode: str, uniform_fraction: float) -> None:
  """Raises ConfigError for an unknown corruption mode or an out-of-range uniform fraction."""
  if mode not in CORRUPTION_MODES:
    raise ConfigError(f"unknown corruption mode {mode!r}.",
                      "use --config.diffusion.corruption=absorbing or prototype_mix.")
  if mode == "prototype_mix" and not 0.0 <= float(uniform_fraction) <= 1.0:
    raise ConfigError(f"uniform_fraction {uniform_fraction} must lie in [0, 1].",
                      "pass --config.diffusion.uniform_fraction=<number in [0, 1]>.")


def check_estimator(estimator: str, corruption: str = "absorbing") -> None:
  """Raises ConfigError for an unknown estimator, or "count" with a non-absorbing corruption."""
  if estimator not in ESTIMATORS:
    raise ConfigError(f"unknown ELBO estimator {estimator!r}.",
                      "use --config.diffusion.estimator=time or count.")
  if estimator == "count" and corruption != "absorbing":
    raise ConfigError(
        f"config.diffusion.estimator='count' masks exactly k tokens of the absorbing process; "
        f"it cannot be combined with corruption={corruption!r}.",
        "pass --config.diffusion.corruption=absorbing, or --config.diffusion.estimator=time.")


def corrupt(key: jax.Array,
            tokens: jnp.ndarray,
            t: jnp.ndarray,
            *,
            schedule: Schedule,
            mask_id: int,
            mode: str = "absorbing",
            uniform_fraction: float = 0.1,
            vocab_size: Optional[int] = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Samples z_t ~ q(z_t | x) for a batch of sequences.

  Args:
    key: PRNG key; consumed (split internally).
    tokens: int[B, L] clean token ids in [0, V).
    t: float[B] diffusion times in [0, 1], one per sequence.
    schedule: the masking schedule; a token is corrupted with probability schedule.mask_prob(t).
    mask_id: id of the [MASK] token (V by convention).
    mode: "absorbing" or "prototype_mix" (see the module docstring; the latter is not the
      absorbing process and its loss is not a likelihood bound).
    uniform_fraction: "prototype_mix" only: probability that a corrupted position shows a uniformly
      random real token instead of [MASK].
    vocab_size: "prototype_mix" only: number V of real tokens to draw substitutes from.

  Returns:
    (noisy, masked): noisy int32[B, L], the corrupted sequences; masked bool[B, L], True at every
    corrupted position (for "prototype_mix" this includes the substituted ones).
  """
  check_corruption_args(mode, uniform_fraction)
  if mode == "prototype_mix" and vocab_size is None:
    raise ValueError("corrupt(mode='prototype_mix') needs vocab_size.")
  tokens = jnp.asarray(tokens, jnp.int32)
  t = jnp.asarray(t, jnp.float32)
  if tokens.ndim != 2 or t.shape != tokens.shape[:1]:
    raise ValueError(f"expected tokens [B, L] and t [B], got {tokens.shape} and {t.shape}.")
  key_mask, key_sub, key_tok = jax.random.split(key, 3)

  # uniform in [0, 1) < p: never corrupts at p = 0 and always corrupts at p = 1.
  p_mask = schedule.mask_prob(t)[:, None]
  masked = jax.random.uniform(key_mask, tokens.shape, jnp.float32) < p_mask
  noisy = jnp.where(masked, jnp.int32(mask_id), tokens)

  if mode == "prototype_mix":
    substitute = masked & (
        jax.random.uniform(key_sub, tokens.shape, jnp.float32) < jnp.float32(uniform_fraction))
    random_tokens = jax.random.randint(key_tok, tokens.shape, 0, vocab_size, jnp.int32)
    noisy = jnp.where(substitute, random_tokens, noisy)
  return noisy, masked


def counts_from_uniform(s: jnp.ndarray, lengths: jnp.ndarray) -> jnp.ndarray:
  """k = ceil(s * L) in {1, ..., L} for s in (0, 1] (0 where L = 0): uniform on {1..L} when s is
  uniform on (0, 1].

  Args:
    s: float[...] in (0, 1].
    lengths: int[...] (broadcast against s), L >= 0.

  Returns:
    int32 counts, the shape of s and lengths broadcast.
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  k = jnp.ceil(jnp.asarray(s, jnp.float32) * lengths.astype(jnp.float32)).astype(jnp.int32)
  return jnp.clip(k, jnp.minimum(lengths, 1), lengths)  # float rounding cannot leave {1..L}


def corrupt_count(key: jax.Array, tokens: jnp.ndarray, counts: jnp.ndarray, *, mask_id: int,
                  valid: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Masks a uniformly random set of exactly counts[b] valid positions of each row b.

  The positions are ranked by a random permutation (a sort on 64 random bits per position, with
  the padding last), and the first counts[b] are masked: every set of that size is equally
  likely (a tie of the 64-bit keys, probability ~ L^2 / 2^65, would favour the earlier position).

  Args:
    key: PRNG key; consumed.
    tokens: int[B, L] clean tokens.
    counts: int[B], 0 <= counts[b] <= number of valid positions of row b.
    mask_id: id of [MASK].
    valid: optional bool[B, L]; padding (False) is never masked. None: all valid.

  Returns:
    (noisy int32[B, L], masked bool[B, L]) as `corruption.corrupt`.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  b, l = tokens.shape
  bits = jax.random.bits(key, (2, b, l), jnp.uint32)
  pad = jnp.zeros((b, l), jnp.uint32) if valid is None else (~valid).astype(jnp.uint32)
  iota = jax.lax.broadcasted_iota(jnp.int32, (b, l), 1)
  order = jax.lax.sort((pad, bits[0], bits[1], iota), dimension=1, num_keys=3)[-1]
  _, rank = jax.lax.sort((order, iota), dimension=1, num_keys=1)  # rank of each position
  masked = rank < jnp.asarray(counts, jnp.int32)[:, None]
  return jnp.where(masked, jnp.int32(mask_id), tokens), masked
