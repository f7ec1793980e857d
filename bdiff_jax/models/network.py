"""The denoising network: embeddings -> backbone -> final norm -> logits over real tokens.

Inputs: token ids int32[B, L] (the diffusion model also sees [MASK] = vocab_size), the diffusion
time t float32[B] (ignored without time conditioning), optional padding mask bool[B, L].
Output: float32 logits [B, L, vocab_size]; [MASK] is never predicted.

Options that change no parameter and no default output:
  logit_positions  int32 [B, K]: return the logits at these positions only, [B, K, vocab_size]
                   (the output head, vocab_size x emb_dim per position, is most of the cost of
                   a small model; samplers need a few positions per call).
  decode=True      causal models: one token per call through key/value caches in the "cache"
                   collection (see `layers.Attention`); learned positions are read at the
                   "cache"/"position" counter. A call inside `init` with a [B, L_max] input
                   creates empty caches for sequences of up to L_max tokens.
"""

from typing import Optional

import flax.linen as nn
import jax
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
               padding_mask: Optional[jnp.ndarray] = None, decode: bool = False,
               logit_positions: Optional[jnp.ndarray] = None, return_hidden: bool = False):
    """Logits float32[B, L, vocab_size] (at `logit_positions` [B, K] only: [B, K, vocab_size]);
    with `return_hidden`, the final normed hidden states float32[B, L or K, emb_dim] instead
    (e.g. for a pooled classification head)."""
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
      stepping = decode and self.has_variable("cache", "position")
      if decode:
        position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      if stepping:
        h = h + jax.lax.dynamic_slice_in_dim(pos, position.value, tokens.shape[1])[None]
        position.value = position.value + tokens.shape[1]
      else:
        h = h + pos[None, :tokens.shape[1]]
    cond = None
    if s.time_conditioned:
      if t is None:
        raise ValueError("this network is time-conditioned: pass the diffusion time t.")
      cond = TimeEmbedding(s, name="time_embedding")(t)
    if decode:
      h = _backbone(s)(h, cond, train=train, padding_mask=padding_mask, decode=True)
    else:
      h = _backbone(s)(h, cond, train=train, padding_mask=padding_mask)
    if logit_positions is not None:  # every step after this one is per position
      h = jnp.take_along_axis(h, logit_positions[..., None].astype(jnp.int32), axis=1)
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
