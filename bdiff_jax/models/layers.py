"""Transformer building blocks shared by the standard and the reversible backbone.

Two block styles (`ModelSpec.block`):
  simple: LayerNorm (with bias), GELU MLP, biases in every projection.
  qwen3:  RMSNorm, SwiGLU MLP, grouped-query attention with QK-norm, no biases.
Both support RoPE, adaLN time conditioning, bidirectional / causal / padding masks and the
optional candidate-selection sparse attention.

Decoding (causal models only): `Attention(x, decode=True)` keeps a key/value cache in the Flax
"cache" collection (`cached_key`, `cached_value` [B, L_max, kv_heads, head_dim], `cache_index`
int32 scalar), as in the Flax lm1b example. A call with `decode=True` on variables that have no
cache yet (i.e. inside `init`) creates an empty cache sized by the input [B, L_max, D] and
otherwise runs the ordinary forward; later calls take one token [B, 1, D] at position
`cache_index` (used for RoPE), append its key and value, attend to positions 0..cache_index and
advance the index.

A *sublayer* is norm -> (attention | MLP) -> dropout, with no residual: the backbone decides how
to combine it with its input (a residual in the standard backbone, an additive coupling in the
reversible one).
"""

import math
import flax.linen as nn
import jax
import jax.numpy as jnp

from bdiff_jax.models.spec import ModelSpec

_NEG_INF = -1e30


class RMSNorm(nn.Module):
  eps: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)


class AdaptiveNorm(nn.Module):
  """Pre-norm with optional adaLN modulation: norm(x) * (1 + scale(c)) + shift(c).

  The modulation projection starts at zero, so at initialisation it is the plain norm (the block
  is *not* the identity: its attention/MLP weights are ordinary random initialisations).
  """
  spec: ModelSpec

  @nn.compact
  def __call__(self, x, cond):
    s = self.spec
    if s.block == "qwen3":
      y = RMSNorm(s.norm_eps, s.param_dtype, name="norm")(x)
    else:
      y = nn.LayerNorm(epsilon=s.norm_eps, param_dtype=s.param_dtype, name="norm")(x)
    if s.time_conditioned:
      if cond is None:
        raise ValueError("time_conditioning='adaln' needs the time embedding `cond`.")
      mod = nn.Dense(2 * x.shape[-1], kernel_init=nn.initializers.zeros,
                     param_dtype=s.param_dtype, name="modulation")(cond)
      shift, scale = jnp.split(mod[:, None, :].astype(y.dtype), 2, axis=-1)
      y = y * (1.0 + scale) + shift
    return y


def rope(x, positions, theta: float):
  """Rotary position embedding on the last axis of x [B, L, H, D] (rotate-half convention)."""
  d = x.shape[-1]
  half = d // 2
  freqs = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / d))
  angles = positions.astype(jnp.float32)[:, :, None] * freqs  # [B, L, half]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(length: int, *, causal: bool, padding_mask=None):
  """bool [B or 1, 1, L, L]: True where query i may attend to key j."""
  allowed = jnp.ones((1, 1, length, length), dtype=bool)
  if causal:
    allowed = allowed & jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
  if padding_mask is not None:
    allowed = allowed & padding_mask[:, None, None, :].astype(bool)
  return allowed


def candidate_selection_mask(q, k, allowed, num_candidates: int, query_offset=0):
  """Candidate-selection sparse attention mask.

  For each query, keys are ranked by the sign agreement sign(q) . sign(k) (an integer in
  [-D, D]); the top `num_candidates` allowed keys are kept, the diagonal always among them
  (when it is allowed), ties broken towards lower key index. Returns bool [B, H, Lq, Lk].

  Args:
    q: [B, Lq, H, D] queries; k: [B, Lk, H, D] keys (after GQA expansion). Usually Lq = Lk.
    allowed: bool mask broadcastable to [B, H, Lq, Lk] (causal/padding).
    num_candidates: keys kept per query; >= Lk keeps every allowed key (dense attention).
    query_offset: key position of query 0 (an int or a traced int): query i sits at key
      position query_offset + i, which is its "diagonal". 0 for a full forward; the cache index
      when decoding one token against a key cache.
  """
  num_queries, num_keys = q.shape[1], k.shape[1]
  if num_candidates >= num_keys:
    return jnp.broadcast_to(allowed, (q.shape[0], q.shape[2], num_queries, num_keys))
  agree = jnp.einsum("bqhd,bkhd->bhqk", jnp.sign(q).astype(jnp.float32),
                     jnp.sign(k).astype(jnp.float32))
  # Integer-valued ranking key: agreement first, then lower key index; unique per row.
  idx = jnp.arange(num_keys, dtype=jnp.float32)
  rank = agree * num_keys + (num_keys - 1 - idx)[None, None, None, :]
  query_positions = query_offset + jnp.arange(num_queries)
  diag = (query_positions[:, None] == jnp.arange(num_keys)[None, :])[None, None]
  top = (2.0 * q.shape[-1] + 2.0) * num_keys
  rank = jnp.where(diag, top, rank)
  rank = jnp.where(allowed, rank, -top - 1.0)
  kth = jax.lax.top_k(rank, num_candidates)[0][..., -1:]
  return (rank >= kth) & allowed


class Attention(nn.Module):
  """Multi-head attention with grouped-query heads, optional QK-norm and RoPE.

  With decode=True it keeps a key/value cache (see the module docstring).
  """
  spec: ModelSpec

  @nn.compact
  def __call__(self, x, *, padding_mask=None, decode: bool = False):
    s = self.spec
    b, length, _ = x.shape
    dense = lambda feats, name: nn.DenseGeneral(
        feats, use_bias=s.use_bias, dtype=s.compute_dtype, param_dtype=s.param_dtype, name=name)
    q = dense((s.num_heads, s.head_dim), "query")(x)
    k = dense((s.num_kv_heads, s.head_dim), "key")(x)
    v = dense((s.num_kv_heads, s.head_dim), "value")(x)
    if s.block == "qwen3":  # QK-norm over head_dim, before RoPE
      q = RMSNorm(s.norm_eps, s.param_dtype, name="query_norm")(q)
      k = RMSNorm(s.norm_eps, s.param_dtype, name="key_norm")(k)
    stepping = False
    if decode:
      if not s.causal:
        raise ValueError("decode=True needs a causal (autoregressive) model.")
      if padding_mask is not None:
        raise ValueError("decode=True does not take a padding mask.")
      stepping = self.has_variable("cache", "cached_key")  # False while the cache is created
      cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if stepping:
      if length != 1:
        raise ValueError(f"decoding takes one token per call, got {length}.")
      index = cache_index.value
      if s.positional == "rope":
        positions = jnp.full((b, 1), index)
        q = rope(q, positions, s.rope_theta)
        k = rope(k, positions, s.rope_theta)
      cached_key.value = jax.lax.dynamic_update_slice(
          cached_key.value, k.astype(cached_key.value.dtype), (0, index, 0, 0))
      cached_value.value = jax.lax.dynamic_update_slice(
          cached_value.value, v.astype(cached_value.value.dtype), (0, index, 0, 0))
      cache_index.value = index + 1
      k, v = cached_key.value, cached_value.value
      # The causal mask of query `index` over the whole cache: only the filled slots.
      allowed = (jnp.arange(k.shape[1]) <= index)[None, None, None, :]
      query_offset = index
    else:
      if s.positional == "rope":
        positions = jnp.broadcast_to(jnp.arange(length)[None], (b, length))
        q = rope(q, positions, s.rope_theta)
        k = rope(k, positions, s.rope_theta)
      allowed = attention_mask(length, causal=s.causal, padding_mask=padding_mask)
      query_offset = 0
    groups = s.num_heads // s.num_kv_heads
    k = jnp.repeat(k, groups, axis=2)
    v = jnp.repeat(v, groups, axis=2)
    if s.attention == "candidate":
      allowed = candidate_selection_mask(q, k, allowed, s.candidate_k, query_offset)
    # Softmax in at least float32 (float64 when computing in float64).
    softmax_dtype = jnp.promote_types(s.compute_dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(softmax_dtype) / math.sqrt(s.head_dim)
    logits = jnp.where(allowed, logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    # A query with no allowed key (a fully padded row) attends to nothing instead of averaging.
    probs = jnp.where(jnp.any(allowed, axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(s.compute_dtype), v)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), use_bias=s.use_bias,
                           dtype=s.compute_dtype, param_dtype=s.param_dtype, name="out")(out)


class Mlp(nn.Module):
  spec: ModelSpec

  @nn.compact
  def __call__(self, x):
    s = self.spec
    dense = lambda feats, name: nn.Dense(feats, use_bias=s.use_bias, dtype=s.compute_dtype,
                                         param_dtype=s.param_dtype, name=name)
    if s.block == "qwen3":
      h = nn.silu(dense(s.mlp_dim, "gate")(x)) * dense(s.mlp_dim, "up")(x)
    else:
      h = nn.gelu(dense(s.mlp_dim, "up")(x))
    return dense(x.shape[-1], "down")(h)


class AttentionSublayer(nn.Module):
  """F(x) = dropout(attention(norm(x))): no residual inside."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, x, cond, *, train: bool, padding_mask=None, decode: bool = False):
    y = AdaptiveNorm(self.spec, name="pre_norm")(x, cond)
    y = Attention(self.spec, name="attention")(y.astype(self.spec.compute_dtype),
                                               padding_mask=padding_mask, decode=decode)
    return nn.Dropout(self.spec.dropout_rate, deterministic=not train)(y)


class MlpSublayer(nn.Module):
  """G(x) = dropout(mlp(norm(x))): no residual inside."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, x, cond, *, train: bool):
    y = AdaptiveNorm(self.spec, name="pre_norm")(x, cond)
    y = Mlp(self.spec, name="mlp")(y.astype(self.spec.compute_dtype))
    return nn.Dropout(self.spec.dropout_rate, deterministic=not train)(y)


class TimeEmbedding(nn.Module):
  """Sinusoidal features of t in [0, 1] followed by a 2-layer MLP -> [B, emb_dim]."""
  spec: ModelSpec
  num_features: int = 256

  @nn.compact
  def __call__(self, t):
    half = self.num_features // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None]
    feats = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    feats = feats.astype(self.spec.param_dtype)
    h = nn.Dense(self.spec.emb_dim, param_dtype=self.spec.param_dtype, name="dense_in")(feats)
    h = nn.Dense(self.spec.emb_dim, param_dtype=self.spec.param_dtype,
                 name="dense_out")(nn.silu(h))
    return h
