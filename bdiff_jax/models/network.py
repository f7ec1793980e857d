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
                   "cache"/"decode_position"/"position" counter. A call inside `init` with a [B, L_max] input
                   creates empty caches for sequences of up to L_max tokens.

The output head can also be applied on its own, so that a loss can run it only where it is
needed (e.g. at the masked positions of a batch):

    h = network.apply(variables, tokens, t, return_hidden=True)     # [B, L, D], final-normed
    logits = network.apply(variables, h_rows, method=Network.head)  # h_rows [..., D] -> [..., V]

`network.apply(variables, tokens, t)` equals `head(hidden)` exactly: both paths run the same
code. Parameters (names and shapes) are those of the single-method network this replaced:
`embed`, `position_embedding` (learned positions), `time_embedding`, `backbone`, `final_norm`,
`head/kernel` (untied head) and `head_bias` (simple block).

The head computes h @ W + b as one matrix product [h, 1] @ [W; b] when there is an output bias,
so that the bias gradient (a column sum of the logits' cotangent, [N, V] -> [V]) is a row of the
weight gradient's GEMM instead of a separate reduction, which XLA:CPU runs far slower than the
GEMM (seconds at V = 33k) with its YNNPACK reduce fusion.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdiff_jax.models.layers import AdaptiveNorm, TimeEmbedding
from bdiff_jax.models.reversible import ReversibleBackbone
from bdiff_jax.models.spec import ModelSpec
from bdiff_jax.models.standard import StandardBackbone


def _backbone(spec: ModelSpec) -> nn.Module:
  if spec.backbone == "standard":
    return StandardBackbone(spec)
  if spec.backbone == "reversible":
    return ReversibleBackbone(spec)
  raise ValueError(f"unknown backbone {spec.backbone!r}")


class HeadKernel(nn.Module):
  """Holds the untied head matrix `kernel` [D, V] (the layout and init of `nn.Dense`)."""
  features: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int) -> jnp.ndarray:
    return self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features),
                      self.param_dtype)


class DecodePosition(nn.Module):
  """Decoding with learned positions: where this call's tokens start ("cache"/"position").

  Returns (start, stepping): in the call that creates the caches (inside `init`) nothing is
  stored yet and the tokens start at 0; afterwards each call starts where the last one ended."""

  @nn.compact
  def __call__(self, num_tokens: int):
    stepping = self.has_variable("cache", "position")
    position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
    start = position.value
    if stepping:
      position.value = position.value + num_tokens
    return start, stepping


class Network(nn.Module):
  """Embeddings, backbone, final norm and output head; see the module docstring."""
  spec: ModelSpec

  def setup(self):
    s = self.spec
    self.embed = nn.Embed(s.embed_rows, s.emb_dim, param_dtype=s.param_dtype,
                          embedding_init=nn.initializers.normal(stddev=1.0))
    if s.positional == "learned":
      self.position_embedding = self.param("position_embedding",
                                           nn.initializers.normal(stddev=0.02),
                                           (s.max_len, s.emb_dim), s.param_dtype)
      self.decode_position = DecodePosition()
    if s.time_conditioned:
      self.time_embedding = TimeEmbedding(s)
    self.backbone = _backbone(s)
    self.final_norm = AdaptiveNorm(s)
    if not s.tie_embeddings:
      self.head_kernel = HeadKernel(s.vocab_size, s.param_dtype, name="head")
    if s.use_bias:  # a per-token output bias (simple block only; Qwen3-style has no biases)
      self.head_bias = self.param("head_bias", nn.initializers.zeros, (s.vocab_size,),
                                  s.param_dtype)

  def __call__(self, tokens, t: Optional[jnp.ndarray] = None, *, train: bool = False,
               padding_mask: Optional[jnp.ndarray] = None, decode: bool = False,
               logit_positions: Optional[jnp.ndarray] = None, return_hidden: bool = False):
    """Logits float32[B, L, V] (at `logit_positions` [B, K] only: [B, K, V]); with
    `return_hidden`, the final-normed hidden states [B, L or K, D] instead.

    The hidden states are in the parameter dtype (float32, or float64 for float64 runs);
    `head(hidden)` turns them into exactly the logits this call returns otherwise.
    """
    s = self.spec
    h = self.embed(tokens).astype(s.param_dtype)
    if s.positional == "learned":
      if tokens.shape[1] > s.max_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the learned position "
                         f"table ({s.max_len}).")
      if decode:
        start, stepping = self.decode_position(tokens.shape[1])
      if decode and stepping:
        h = h + jax.lax.dynamic_slice_in_dim(self.position_embedding, start,
                                             tokens.shape[1])[None]
      else:
        h = h + self.position_embedding[None, :tokens.shape[1]]
    cond = None
    if s.time_conditioned:
      if t is None:
        raise ValueError("this network is time-conditioned: pass the diffusion time t.")
      cond = self.time_embedding(t)
    if decode:
      h = self.backbone(h, cond, train=train, padding_mask=padding_mask, decode=True)
    else:
      h = self.backbone(h, cond, train=train, padding_mask=padding_mask)
    if logit_positions is not None:  # every step after this one is per position
      h = jnp.take_along_axis(h, logit_positions[..., None].astype(jnp.int32), axis=1)
    h = self.final_norm(h, cond)
    if return_hidden:
      return h
    return self.head(h)

  def head(self, h: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Output head: final-normed hidden states [..., D] -> logits [..., V].

    Logits are float32 (float64 for float64 runs). Tied embeddings use the embedding table
    scaled by 1/sqrt(D), so that tied logits start at unit scale whatever D is. `train` is
    accepted so that the same `apply` closure serves both methods; the head has no dropout.
    """
    del train
    s = self.spec
    out_dtype = jnp.promote_types(s.param_dtype, jnp.float32)
    if s.tie_embeddings:
      kernel = (self.embed.embedding[:s.vocab_size].astype(s.compute_dtype).T
                / jnp.sqrt(jnp.asarray(s.emb_dim, s.compute_dtype)))
    else:
      kernel = self.head_kernel(s.emb_dim).astype(s.compute_dtype)
    x = h.astype(s.compute_dtype)
    fold_bias = s.use_bias and jnp.dtype(s.compute_dtype).itemsize >= 4
    if fold_bias:
      # [h, 1] @ [W; b]: the bias is the last row of the matrix (see the module docstring).
      # Not in bfloat16, where the bias would be rounded to 8 bits of mantissa.
      x = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)
      kernel = jnp.concatenate([kernel, self.head_bias[None].astype(kernel.dtype)], axis=0)
    logits = jnp.einsum("...d,dv->...v", x, kernel).astype(out_dtype)
    if s.use_bias and not fold_bias:
      logits = logits + self.head_bias.astype(out_dtype)
    return logits
