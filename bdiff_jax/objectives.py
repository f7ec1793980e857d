"""The two training objectives behind one interface, so trainer and evaluator need not branch.

`apply(tokens, t=None, *, padding_mask=None) -> logits [B, L, V]` is the network with its
parameters and dropout key bound.

diffusion       absorbing masked diffusion; loss = continuous-time ELBO; evaluation gives an
                *upper bound* on -log p(x) (Monte Carlo over diffusion times).
autoregressive  causal next-token model; the input is the block shifted right behind a BOS
                token (the [MASK] id, which is no word), so *every* token of a block is scored
                and -log p(x) is exact — the same quantity the diffusion bound bounds.
"""

import jax
import jax.numpy as jnp

from bdiff_jax import diffusion, schedules


def ar_inputs(tokens, bos_id: int):
  """The AR model's input: the block shifted right behind a BOS token."""
  bos = jnp.full((tokens.shape[0], 1), bos_id, tokens.dtype)
  return jnp.concatenate([bos, tokens[:, :-1]], axis=1)


def ar_token_nll(apply, tokens, *, bos_id: int):
  """-log p(x_i | x_<i) for every position, float32 [B, L]."""
  logits = apply(ar_inputs(tokens, bos_id)).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def training_loss(apply, tokens, key, config, *, vocab_size: int):
  """(loss in nats/token, aux metrics) for config.model.objective."""
  mask_id = vocab_size
  if config.model.objective == "autoregressive":
    nll = ar_token_nll(apply, tokens, bos_id=mask_id)
    loss = jnp.mean(nll)
    return loss, {"nll_per_token": loss}
  d = config.diffusion
  logits_fn = lambda z, t: apply(z, t)
  return diffusion.diffusion_loss(
      logits_fn, tokens, key, schedule=schedules.from_config(d), mask_id=mask_id,
      antithetic=d.antithetic, corruption=d.corruption, uniform_fraction=d.uniform_fraction)


def sequence_nll(apply, tokens, key, config, *, vocab_size: int, num_samples: int):
  """Per-sequence -log p(tokens) in nats, float32 [B]: exact (AR) or an upper bound (diffusion)."""
  mask_id = vocab_size
  if config.model.objective == "autoregressive":
    return jnp.sum(ar_token_nll(apply, tokens, bos_id=mask_id), axis=-1)
  logits_fn = lambda z, t: apply(z, t)
  return diffusion.nll_bound(logits_fn, tokens, key,
                             schedule=schedules.from_config(config.diffusion),
                             mask_id=mask_id, num_samples=num_samples)


def is_upper_bound(config) -> bool:
  return config.model.objective == "diffusion"
