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

`model.head = "adaptive"` replaces the softmax over V by the adaptive softmax
(`adaptive_head`): the head then scores the shortlist [0, c_0) and one logit per tail cluster,
and tail cluster i scores its words from a d_i-dimensional projection of h. Its parameters:
`head/kernel` [D, c_0] (untied; tied heads use the first c_0 embedding rows), `head_bias`
[c_0 + n], `cluster_kernel` [D, n], and per cluster `tail<i>_proj` [D, d_i], `tail<i>_bias`, and
either `tail<i>_kernel` [d_i, size_i] (untied) or `tail<i>_down` [D, d_i] (tied: the cluster's
embedding rows, scaled by 1/sqrt(D), projected to d_i). `head(h)` then returns log-probabilities,
normalised over the V words, where a full head returns logits: softmax of either is the model's
distribution, so every consumer of logits works unchanged. `token_nll(h, targets)` is
-log p(target | h) per row, computed without all V logits where the head allows it (for the
full head it is the cross-entropy of `head(h)`); losses use it (`masked_head.RowsNllFn`).
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdiff_jax.models import adaptive_head, cross_entropy
from bdiff_jax.models.layers import AdaptiveNorm, TimeEmbedding
from bdiff_jax.models.reversible import ReversibleBackbone
from bdiff_jax.models.spec import ModelSpec
from bdiff_jax.models.standard import StandardBackbone


def output_layout(spec: ModelSpec) -> Optional[adaptive_head.Layout]:
  """The adaptive head's layout, or None for the full softmax head."""
  if spec.head != "adaptive":
    return None
  return adaptive_head.make_layout(spec.vocab_size, spec.adaptive_cutoffs, spec.emb_dim,
                                   spec.adaptive_shrink)


def output_bias_params(spec: ModelSpec, log_probs: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """The output-bias parameters with which the head, its kernels zero, predicts the distribution
  `log_probs` [V] (e.g. the unigram model): {"head_bias": ...} (and "tail<i>_bias")."""
  layout = output_layout(spec)
  if layout is None:
    return {"head_bias": jnp.asarray(log_probs)}
  head, tails = adaptive_head.bias_values(layout, log_probs)
  return {"head_bias": head, **{f"tail{i}_bias": b for i, b in enumerate(tails)}}


def _affine(x, kernel, bias, out_dtype):
  """x @ kernel (+ bias) as out_dtype logits; the bias folded into the GEMM (see the module
  docstring) unless the compute dtype is narrower than 32 bits, where it would be rounded."""
  fold = bias is not None and jnp.dtype(x.dtype).itemsize >= 4
  if fold:
    x = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)
    kernel = jnp.concatenate([kernel, bias[None].astype(kernel.dtype)], axis=0)
  logits = jnp.einsum("...d,dv->...v", x, kernel).astype(out_dtype)
  if bias is not None and not fold:
    logits = logits + bias.astype(out_dtype)
  return logits


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
    layout = output_layout(s)
    words = s.vocab_size if layout is None else layout.shortlist_size
    if not s.tie_embeddings:
      self.head_kernel = HeadKernel(words, s.param_dtype, name="head")
    if s.use_bias:  # a per-token output bias (simple block only; Qwen3-style has no biases)
      self.head_bias = self.param("head_bias", nn.initializers.zeros,
                                  (words if layout is None else layout.head_size,),
                                  s.param_dtype)
    if layout is not None:
      init = nn.initializers.lecun_normal()
      self.cluster_kernel = self.param("cluster_kernel", init, (s.emb_dim, layout.num_tails),
                                       s.param_dtype)
      proj, down, kernel, bias = [], [], [], []
      for i, dim in enumerate(layout.tail_dims):
        lo, hi = layout.tail_range(i)
        proj.append(self.param(f"tail{i}_proj", init, (s.emb_dim, dim), s.param_dtype))
        if s.tie_embeddings:
          down.append(self.param(f"tail{i}_down", init, (s.emb_dim, dim), s.param_dtype))
        else:
          kernel.append(self.param(f"tail{i}_kernel", init, (dim, hi - lo), s.param_dtype))
        if s.use_bias:
          bias.append(self.param(f"tail{i}_bias", nn.initializers.zeros, (hi - lo,),
                                 s.param_dtype))
      self.tail_proj, self.tail_down, self.tail_kernel, self.tail_bias = proj, down, kernel, bias

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

  def _output_fns(self):
    """(layout, shortlist_fn, tail_fn): the head as pure functions of hidden rows [..., D], over
    parameter values read here (so that they can run inside `lax.cond`). For the full head,
    shortlist_fn returns the logits over all V words and there are no tails."""
    s = self.spec
    layout = output_layout(s)
    out_dtype = jnp.promote_types(s.param_dtype, jnp.float32)
    cdt = s.compute_dtype
    words = s.vocab_size if layout is None else layout.shortlist_size
    if s.tie_embeddings:
      kernel = (self.embed.embedding[:words].astype(cdt).T
                / jnp.sqrt(jnp.asarray(s.emb_dim, cdt)))
    else:
      kernel = self.head_kernel(s.emb_dim).astype(cdt)
    bias = self.head_bias if s.use_bias else None
    if layout is not None:
      kernel = jnp.concatenate([kernel, self.cluster_kernel.astype(cdt)], axis=1)
      tails = []
      for i in range(layout.num_tails):
        if s.tie_embeddings:
          lo, hi = layout.tail_range(i)
          rows = self.embed.embedding[lo:hi].astype(cdt) / jnp.sqrt(jnp.asarray(s.emb_dim, cdt))
          tail_kernel = (rows @ self.tail_down[i].astype(cdt)).T  # [d_i, size_i]
        else:
          tail_kernel = self.tail_kernel[i].astype(cdt)
        tails.append((self.tail_proj[i].astype(cdt), tail_kernel,
                      self.tail_bias[i] if s.use_bias else None))

      def tail_fn(i, rows):
        proj, tail_kernel, tail_bias = tails[i]
        return _affine(rows.astype(cdt) @ proj, tail_kernel, tail_bias, out_dtype)
    else:
      tail_fn = None

    def shortlist_fn(rows):
      return _affine(rows.astype(cdt), kernel, bias, out_dtype)

    return layout, shortlist_fn, tail_fn

  def head(self, h: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Output head: final-normed hidden states [..., D] -> logits [..., V].

    Logits are float32 (float64 for float64 runs). Tied embeddings use the embedding table
    scaled by 1/sqrt(D), so that tied logits start at unit scale whatever D is. The adaptive
    head returns its log-probabilities (normalised logits). `train` is accepted so that the same
    `apply` closure serves every method; the head has no dropout.
    """
    del train
    layout, shortlist_fn, tail_fn = self._output_fns()
    if layout is None:
      return shortlist_fn(h)
    return adaptive_head.log_probs(layout, shortlist_fn(h),
                                   [tail_fn(i, h) for i in range(layout.num_tails)])

  def token_nll(self, h: jnp.ndarray, targets: jnp.ndarray, *,
                train: bool = False) -> jnp.ndarray:
    """-log p(target | h) per row: h [..., D], targets int[...] -> float32 [...] (float64 for
    float64 runs): the cross-entropy of `head(h)` (`cross_entropy.token_nll`), which the
    adaptive head computes without its tail clusters' logits for rows whose target is not in
    them (`adaptive_head.token_nll`)."""
    del train
    layout, shortlist_fn, tail_fn = self._output_fns()
    rows = h.reshape(-1, h.shape[-1])
    flat = jnp.asarray(targets, jnp.int32).reshape(-1)
    if layout is None:
      nll = cross_entropy.token_nll(shortlist_fn(rows), flat)
    else:
      nll = adaptive_head.token_nll(layout, shortlist_fn, tail_fn, rows, flat,
                                    capacity_fraction=self.spec.adaptive_tail_capacity)
    return nll.reshape(targets.shape)
