"""The denoising network: embeddings -> backbone -> final norm -> logits over real tokens.

Inputs: token ids int32[B, L] (the diffusion model also sees [MASK] = vocab_size), the diffusion
time t float32[B] (ignored without time conditioning), optional padding mask bool[B, L].
Output: float32 logits [B, L, vocab_size]; [MASK] is never predicted.
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from bdiff_jax.models.layers import AdaptiveNorm, TimeEmbedding
from bdiff_jax.models.spec import ModelSpec
from bdiff_jax.models.standard import StandardBackbone


def _backbone(spec: ModelSpec):
  if spec.backbone == "standard":
    return StandardBackbone(spec, name="backbone")
  if spec.backbone == "reversible":
    from bdiff_jax.models.reversible import ReversibleBackbone  # pylint: disable=g-import-not-at-top
    return ReversibleBackbone(spec, name="backbone")
  raise ValueError(f"unknown backbone {spec.backbone!r}")


class Network(nn.Module):
  spec: ModelSpec

  @nn.compact
  def __call__(self, tokens, t: Optional[jnp.ndarray] = None, *, train: bool = False,
               padding_mask: Optional[jnp.ndarray] = None, return_hidden: bool = False):
    """Logits float32[B, L, vocab_size]; with `return_hidden`, the final normed hidden states
    float32[B, L, emb_dim] instead (e.g. for a pooled classification head)."""
    s = self.spec
    embed = nn.Embed(s.embed_rows, s.emb_dim, param_dtype=s.param_dtype,
                     embedding_init=nn.initializers.normal(stddev=1.0), name="embed")
    h = embed(tokens).astype(s.param_dtype)
    if s.positional == "learned":
      pos = self.param("position_embedding", nn.initializers.normal(stddev=0.02),
                       (s.max_len, s.emb_dim), s.param_dtype)
      if tokens.shape[1] > s.max_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the learned position "
                         f"table ({s.max_len}).")
      h = h + pos[None, :tokens.shape[1]]
    cond = None
    if s.time_conditioned:
      if t is None:
        raise ValueError("this network is time-conditioned: pass the diffusion time t.")
      cond = TimeEmbedding(s, name="time_embedding")(t)
    h = _backbone(s)(h, cond, train=train, padding_mask=padding_mask)
    h = AdaptiveNorm(s, name="final_norm")(h, cond)
    if return_hidden:
      return h.astype(jnp.float32)
    if s.tie_embeddings:
      table = embed.embedding[:s.vocab_size].astype(s.compute_dtype)
      # Scale so that tied logits start at unit scale whatever emb_dim is.
      logits = jnp.einsum("bld,vd->blv", h.astype(s.compute_dtype), table) / jnp.sqrt(
          jnp.asarray(s.emb_dim, s.compute_dtype))
    else:
      logits = nn.Dense(s.vocab_size, use_bias=False, dtype=s.compute_dtype,
                        param_dtype=s.param_dtype, name="head")(h.astype(s.compute_dtype))
    logits = logits.astype(jnp.promote_types(s.param_dtype, jnp.float32))
    if s.use_bias:  # a per-token output bias (simple block only; Qwen3-style has no biases)
      logits = logits + self.param("head_bias", nn.initializers.zeros, (s.vocab_size,),
                                   s.param_dtype)
    return logits
