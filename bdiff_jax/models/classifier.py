"""Adapters that give OPT and pooled classification heads the bdiff network interface.

Every network the train step binds is called as `module.apply({"params": p}, tokens, t=None, *,
train, padding_mask=None, ...)`. `OPTLM` wraps `models.opt.OPT` that way (the padding mask is
OPT's attention mask, so OPT's position ids count only real tokens: left padding is exact), and
`PooledClassifier` puts a linear head on the pooled hidden states of any such backbone.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from bdiff_jax.models import cross_entropy
from bdiff_jax.models.opt import OPT, OPTConfig, pool_last_token


class OPTLM(nn.Module):
  """OPT as `(tokens int[B, L], t=None, *, train, padding_mask bool[B, L]) -> logits [B, L, V]`.

  Parameters live under "opt" (the tree of `hf_checkpoint.load_opt`). `t` is ignored (OPT has
  no diffusion time); `padding_mask=None` means no padding. As `network.Network`:
  `logit_positions` int[B, K] returns [B, K, V] (the head runs at those positions only),
  `return_hidden` the final hidden states [B, L or K, E], and the methods `head(h)` and
  `token_nll(h, targets)` run the tied LM head on hidden rows, so that a loss can score only the
  positions it reads (`classification.CausalPrompt`).
  """
  config: OPTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, t=None, *, train: bool = False,
               padding_mask: Optional[jnp.ndarray] = None, return_hidden: bool = False,
               logit_positions: Optional[jnp.ndarray] = None):
    del t
    mask = jnp.ones(tokens.shape, jnp.int32) if padding_mask is None else padding_mask
    opt = OPT(self.config, dtype=self.dtype, name="opt")
    if logit_positions is None and not return_hidden:
      return opt(tokens, mask.astype(jnp.int32), deterministic=not train)
    h = opt(tokens, mask.astype(jnp.int32), deterministic=not train, return_hidden=True)
    if logit_positions is not None:
      h = jnp.take_along_axis(h, logit_positions[..., None].astype(jnp.int32), axis=1)
    return h if return_hidden else self.head(h)

  def head(self, h: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Hidden states [..., E] -> float32 logits [..., V]: OPT's tied LM head (what `OPT`
    computes from its hidden states)."""
    del train
    table = self.variables["params"]["opt"]["embed_tokens"]["embedding"]
    logits = jnp.einsum("...e,ve->...v", h.astype(self.dtype), table.astype(self.dtype))
    return logits.astype(jnp.float32)

  def token_nll(self, h: jnp.ndarray, targets: jnp.ndarray, *,
                train: bool = False) -> jnp.ndarray:
    """-log p(target | h) per row: h [..., E], targets int[...] -> float32 [...], the
    cross-entropy of `head(h)` (`cross_entropy.token_nll`)."""
    logits = self.head(h, train=train)
    nll = cross_entropy.token_nll(logits.reshape(-1, logits.shape[-1]),
                                  jnp.asarray(targets, jnp.int32).reshape(-1))
    return nll.reshape(jnp.shape(targets))


def pool_mean(hidden: jnp.ndarray, padding_mask: jnp.ndarray) -> jnp.ndarray:
  """[B, L, H] -> [B, H]: the mean over each row's real (padding_mask True) positions."""
  w = padding_mask.astype(jnp.float32)[..., None]
  return jnp.sum(hidden * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


class PooledClassifier(nn.Module):
  """A linear head on pooled final hidden states: (tokens, t, padding_mask) -> float32[B, C].

  `backbone` must accept `return_hidden=True` (the bdiff `Network`, `OPTLM`). Pooling: the last
  real token for a causal backbone (all earlier tokens feed it), else the mean over real tokens.
  Parameters: {"backbone": ..., "classifier": {"kernel", "bias"}}.
  """
  backbone: nn.Module
  num_outputs: int
  causal: bool

  @nn.compact
  def __call__(self, tokens, t=None, *, train: bool = False,
               padding_mask: Optional[jnp.ndarray] = None):
    mask = jnp.ones(tokens.shape, bool) if padding_mask is None else padding_mask.astype(bool)
    hidden = self.backbone(tokens, t, train=train, padding_mask=mask, return_hidden=True)
    pooled = pool_last_token(hidden, mask) if self.causal else pool_mean(hidden, mask)
    return nn.Dense(self.num_outputs, kernel_init=nn.initializers.normal(0.02),
                    name="classifier")(pooled).astype(jnp.float32)
