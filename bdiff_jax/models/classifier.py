"""Adapters that give OPT and pooled classification heads the bdiff network interface.

Every network the train step binds is called as `module.apply({"params": p}, tokens, t=None, *,
train, padding_mask=None, ...)`. `OPTLM` wraps `models.opt.OPT` that way (the padding mask is
OPT's attention mask, so OPT's position ids count only real tokens: left padding is exact), and
`PooledClassifier` puts a linear head on the pooled hidden states of any such backbone.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from bdiff_jax.models.opt import OPT, OPTConfig, pool_last_token


class OPTLM(nn.Module):
  """OPT as `(tokens int[B, L], t=None, *, train, padding_mask bool[B, L]) -> logits [B, L, V]`.

  Parameters live under "opt" (the tree of `hf_checkpoint.load_opt`). `t` is ignored (OPT has
  no diffusion time); `padding_mask=None` means no padding.
  """
  config: OPTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, t=None, *, train: bool = False,
               padding_mask: Optional[jnp.ndarray] = None, return_hidden: bool = False):
    del t
    mask = jnp.ones(tokens.shape, jnp.int32) if padding_mask is None else padding_mask
    return OPT(self.config, dtype=self.dtype, name="opt")(
        tokens, mask.astype(jnp.int32), deterministic=not train, return_hidden=return_hidden)


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
