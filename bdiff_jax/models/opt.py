"""OPT (Zhang et al., 2022, "OPT: Open Pre-trained Transformer Language Models") in Flax Linen.

A decoder-only transformer with the layout of Hugging Face's `OPTForCausalLM`, so that the weights
of a `facebook/opt-*` checkpoint load into it unchanged (see `bdiff_jax.models.hf_checkpoint`):

    e   = embed_tokens[ids]                              [B, L, E]   (E = word_embed_proj_dim)
    e   = e @ project_in          if E != D               [B, L, D]   (D = hidden_size; opt-350m)
    h   = e + embed_positions[pos + 2]                    pos = cumsum(mask) * mask - 1
    h   = layer_N(... layer_1(h))                         (nn.scan over stacked layer params)
    h   = final_layer_norm(h)     if pre-LN (and not _remove_final_layer_norm)
    h   = h @ project_out         if E != D               [B, L, E]
    logits = h @ embed_tokens^T                           [B, L, V]   (tied LM head, no bias)

Each layer, pre-LN (`do_layer_norm_before`, every size except 350m):

    h <- h + attn(ln_1(h));          h <- h + fc2(act(fc1(ln_2(h))))

and post-LN (opt-350m):

    h <- ln_1(h + attn(h));          h <- ln_2(h + fc2(act(fc1(h))))

Attention: q, k, v, out projections with biases (`enable_bias`); q is multiplied by
1/sqrt(head_dim) after its projection (as in the reference implementation); a key is visible to a
query iff it is not later (causal) and is not padding (`attention_mask == 1`). The position ids
count only the non-pad tokens, so a LEFT-padded row gets the same positions (and, at its non-pad
positions, the same logits) as the unpadded sequence. Layer norms use eps = 1e-5 and the exact
two-pass variance. Pad positions produce finite but meaningless outputs.

Generation: `decode=True` runs a few tokens per call through key/value caches (see `OPT`);
`bdiff_jax.models.opt_network` trains this architecture from scratch in the bdiff trainer.

To get real weights (with network access), download a checkpoint directory and point the loader at
it, e.g.

    hf download facebook/opt-125m --local-dir /data/opt-125m   # huggingface-hub's CLI
    # or: hf download facebook/opt-1.3b --local-dir /data/opt-1.3b

    from bdiff_jax.models.hf_checkpoint import load_opt
    config, params = load_opt("/data/opt-125m")
    logits = OPT(config).apply({"params": params}, input_ids, attention_mask)
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdiff_jax.errors import ConfigError

LAYER_NORM_EPS = 1e-5
POSITION_OFFSET = 2  # OPT's learned position table has 2 extra leading rows.

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


class OPTConfigError(ConfigError):
  """An OPT `config.json` with a missing, malformed or unsupported value."""


@dataclasses.dataclass(frozen=True)
class OPTConfig:
  """The architecture fields of a Hugging Face OPT `config.json`.

  `word_embed_proj_dim` None means `hidden_size` (as in HF). `remove_final_layer_norm` is HF's
  `_remove_final_layer_norm` (a backward-compatibility flag; False for all published checkpoints).
  `dropout` (residual) and `attention_dropout` (attention probabilities) are used only when the
  model is applied with `deterministic=False`.
  """
  vocab_size: int = 50272
  hidden_size: int = 768
  num_hidden_layers: int = 12
  ffn_dim: int = 3072
  num_attention_heads: int = 12
  max_position_embeddings: int = 2048
  word_embed_proj_dim: int | None = None
  do_layer_norm_before: bool = True
  remove_final_layer_norm: bool = False
  enable_bias: bool = True
  layer_norm_elementwise_affine: bool = True
  activation_function: str = "relu"
  dropout: float = 0.1
  attention_dropout: float = 0.0
  pad_token_id: int | None = 1
  bos_token_id: int | None = 2
  eos_token_id: int | None = 2

  def __post_init__(self):
    if self.word_embed_proj_dim is None:
      object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim",
                 "num_attention_heads", "max_position_embeddings", "word_embed_proj_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise OPTConfigError(f"OPT config: {name} must be a positive integer, got {value!r}.",
                             f"set {name} in config.json to a positive integer.")
    for name in ("do_layer_norm_before", "remove_final_layer_norm", "enable_bias",
                 "layer_norm_elementwise_affine"):
      if not isinstance(getattr(self, name), bool):
        raise OPTConfigError(f"OPT config: {name} must be true or false, got "
                             f"{getattr(self, name)!r}.", f"set {name} to true or false.")
    for name in ("dropout", "attention_dropout"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise OPTConfigError(f"OPT config: {name} must be a number in [0, 1), got {value!r}.",
                             f"set {name} to a probability such as 0.1.")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or not 0 <= value < self.vocab_size):
        raise OPTConfigError(f"OPT config: {name}={value!r} is not a token id below vocab_size "
                             f"{self.vocab_size}.", f"set {name} to a valid id or null.")
    if self.activation_function not in _ACTIVATIONS:
      raise OPTConfigError(
          f"OPT config: activation_function {self.activation_function!r} is not supported.",
          f"use one of {sorted(_ACTIVATIONS)}.")
    if self.hidden_size % self.num_attention_heads:
      raise OPTConfigError(
          f"OPT config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
          f"{self.num_attention_heads}.", "use a head count that divides hidden_size.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def has_projections(self) -> bool:
    """Whether `project_in` / `project_out` exist (word_embed_proj_dim != hidden_size)."""
    return self.word_embed_proj_dim != self.hidden_size

  @property
  def has_final_layer_norm(self) -> bool:
    """HF's condition: `do_layer_norm_before and not _remove_final_layer_norm`."""
    return self.do_layer_norm_before and not self.remove_final_layer_norm

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> "OPTConfig":
    """Reads the fields of a parsed HF `config.json`; keys it does not need are ignored.

    Raises:
      OPTConfigError: the model type is not OPT, a required size is missing, or a value is
        unsupported (e.g. untied embeddings, layerdrop > 0, an unknown activation).
    """
    model_type = d.get("model_type", "opt")
    if model_type != "opt":
      raise OPTConfigError(f"config.json has model_type {model_type!r}, not 'opt'.",
                           "point the OPT loader at an OPT checkpoint directory (facebook/opt-*).")
    if not d.get("tie_word_embeddings", True):
      raise OPTConfigError("config.json sets tie_word_embeddings=false; only OPT's tied LM head "
                           "is supported.", "use a checkpoint with tied input/output embeddings.")
    if d.get("layerdrop", 0.0):
      raise OPTConfigError(f"config.json sets layerdrop={d['layerdrop']!r}; layer drop is not "
                           "supported.", "set layerdrop to 0.0.")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads",
                "max_position_embeddings")
    missing = [k for k in required if k not in d]
    if missing:
      raise OPTConfigError(f"config.json lacks {', '.join(missing)}.",
                           "use the config.json that came with the OPT checkpoint.")
    eos = d.get("eos_token_id", 2)
    if isinstance(eos, list):  # HF allows a list of end tokens; the first is the canonical one.
      eos = eos[0] if eos else None
    kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
    kwargs["remove_final_layer_norm"] = d.get("_remove_final_layer_norm", False)
    kwargs["eos_token_id"] = eos
    return cls(**kwargs)


class OPTAttention(nn.Module):
  """Causal multi-head self-attention with padding mask: [B, L, D] -> [B, L, D].

  With `decode=True` it keeps a key/value cache in the "cache" collection (`cached_key`,
  `cached_value` [B, L_max, H, head_dim], `cache_index`): the call that creates it (inside
  `init`, input [B, L_max, D]) computes as without `decode`; each later call appends its L keys
  and values at `cache_index` and its queries attend to the filled slots up to their own.
  """
  config: OPTConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, h, visible, deterministic: bool, decode: bool = False):
    cfg = self.config
    dense = lambda name: nn.Dense(cfg.hidden_size, use_bias=cfg.enable_bias, dtype=self.dtype,
                                  precision=self.precision, name=name)
    b, l, _ = h.shape
    split = lambda x: x.reshape(b, l, cfg.num_attention_heads, cfg.head_dim)
    q = split(dense("q_proj")(h) * (cfg.head_dim ** -0.5))
    k = split(dense("k_proj")(h))
    v = split(dense("v_proj")(h))
    if decode:
      stepping = self.has_variable("cache", "cached_key")  # False while the cache is created
      cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      if stepping:
        start = cache_index.value
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, k.astype(cached_key.value.dtype), (0, start, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, v.astype(cached_value.value.dtype), (0, start, 0, 0))
        cache_index.value = start + l
        k, v = cached_key.value, cached_value.value
        slots = jnp.arange(k.shape[1])
        visible = (slots[None, :] <= start + jnp.arange(l)[:, None])[None]  # [1, Lq, L_max]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision).astype(jnp.float32)
    scores = jnp.where(visible[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, precision=self.precision)
    out = out.reshape(b, l, cfg.hidden_size)
    return dense("out_proj")(out)


def _layer_norm(cfg: OPTConfig, name: str, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_bias=cfg.layer_norm_elementwise_affine,
                      use_scale=cfg.layer_norm_elementwise_affine, use_fast_variance=False,
                      dtype=dtype, name=name)


class OPTDecoderLayer(nn.Module):
  """One OPT block (pre- or post-LN), written as a scan body: (h, visible) -> (h, None)."""
  config: OPTConfig
  deterministic: bool = True
  dtype: Any = jnp.float32
  precision: Any = None
  decode: bool = False

  @nn.compact
  def __call__(self, h, visible):
    cfg = self.config
    drop = lambda x: nn.Dropout(cfg.dropout)(x, deterministic=self.deterministic)
    ln_attn = _layer_norm(cfg, "self_attn_layer_norm", self.dtype)
    ln_ffn = _layer_norm(cfg, "final_layer_norm", self.dtype)
    pre = cfg.do_layer_norm_before

    x = ln_attn(h) if pre else h
    x = OPTAttention(cfg, self.dtype, self.precision, name="self_attn")(
        x, visible, self.deterministic, self.decode)
    h = h + drop(x)
    if not pre:
      h = ln_attn(h)

    x = ln_ffn(h) if pre else h
    x = nn.Dense(cfg.ffn_dim, use_bias=cfg.enable_bias, dtype=self.dtype,
                 precision=self.precision, name="fc1")(x)
    x = _ACTIVATIONS[cfg.activation_function](x)
    x = nn.Dense(cfg.hidden_size, use_bias=cfg.enable_bias, dtype=self.dtype,
                 precision=self.precision, name="fc2")(x)
    h = h + drop(x)
    if not pre:
      h = ln_ffn(h)
    return h, None


def position_ids(attention_mask: jax.Array) -> jax.Array:
  """OPT position ids [B, L]: 0, 1, ... over the non-pad tokens, -1 at pad positions."""
  mask = attention_mask.astype(jnp.int32)
  return jnp.cumsum(mask, axis=1) * mask - 1


def pool_last_token(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """[B, L, E] hidden states -> [B, E] at each row's last non-pad position.

  This is the pooling of HF's `OPTForSequenceClassification`; it works for left and right padding.
  """
  length = attention_mask.shape[1]
  last = length - 1 - jnp.argmax(attention_mask[:, ::-1].astype(jnp.int32), axis=1)
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


class OPT(nn.Module):
  """OPT causal LM: (input_ids int[B, L], attention_mask int[B, L]) -> logits float32 [B, L, V].

  With `return_hidden=True` it returns the final hidden states float32 [B, L, E] instead (what the
  LM head reads, E = word_embed_proj_dim), e.g. for a pooled classification head
  (`pool_last_token`). `dtype` is the computation dtype (parameters keep theirs); `precision`
  goes to every matmul (None = JAX's default, which on GPUs/TPUs may round float32 inputs to
  TF32/bf16; pass `jax.lax.Precision.HIGHEST` for reference-exact float32). With
  `deterministic=False` dropout is applied and a 'dropout' rng is needed. Parameter tree:
  embed_tokens, embed_positions, [project_in, project_out], [final_layer_norm], and layers/
  (self_attn/{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm) stacked on a
  leading [num_hidden_layers] axis.

  `decode=True` decodes with key/value caches (the "cache" collection, its layer caches stacked
  like the parameters): the call that creates them (inside `init`, with a [B, L_max] input)
  computes as without `decode` and sizes the caches for L_max tokens; each later call takes the
  next L tokens of unpadded sequences (`attention_mask` is ignored) at positions
  "cache"/"position" onwards, and returns what a full forward returns at those positions.

  Raises:
    OPTConfigError: the sequence is longer than max_position_embeddings (checked at trace time).
  """
  config: OPTConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, input_ids, attention_mask, *, deterministic: bool = True,
               return_hidden: bool = False, decode: bool = False):
    cfg = self.config
    length = input_ids.shape[1]
    stepping = False
    if decode:  # the next position to decode; see the class docstring
      stepping = self.has_variable("cache", "position")
      counter = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
    if length > cfg.max_position_embeddings:
      raise OPTConfigError(
          f"OPT input of length {length} exceeds max_position_embeddings "
          f"{cfg.max_position_embeddings}.", "truncate the inputs to the model's maximum length.")
    init = nn.initializers.normal(0.02)
    embed = nn.Embed(cfg.vocab_size, cfg.word_embed_proj_dim, embedding_init=init,
                     dtype=self.dtype, name="embed_tokens")
    h = embed(input_ids)
    if cfg.has_projections:
      h = nn.Dense(cfg.hidden_size, use_bias=False, dtype=self.dtype, precision=self.precision,
                   name="project_in")(h)
    if stepping:
      pos = jnp.broadcast_to(counter.value + jnp.arange(length)[None], input_ids.shape)
      counter.value = counter.value + length
    else:
      pos = position_ids(attention_mask)
    pos = pos + POSITION_OFFSET
    h = h + nn.Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size,
                     embedding_init=init, dtype=self.dtype, name="embed_positions")(pos)

    keys = attention_mask.astype(bool)[:, None, :]                          # [B, 1, Lk]
    causal = jnp.tril(jnp.ones((length, length), bool))[None]               # [1, Lq, Lk]
    visible = causal & keys                                                 # [B, Lq, Lk]
    stack = nn.scan(OPTDecoderLayer, variable_axes={"params": 0, "cache": 0},
                    split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                    length=cfg.num_hidden_layers)
    h, _ = stack(cfg, deterministic, self.dtype, self.precision, decode,
                 name="layers")(h, visible)

    if cfg.has_final_layer_norm:
      h = _layer_norm(cfg, "final_layer_norm", self.dtype)(h)
    if cfg.has_projections:
      h = nn.Dense(cfg.word_embed_proj_dim, use_bias=False, dtype=self.dtype,
                   precision=self.precision, name="project_out")(h)
    if return_hidden:
      return h.astype(jnp.float32)
    logits = jnp.einsum("ble,ve->blv", h, embed.embedding.astype(h.dtype),
                        precision=self.precision)                       # tied LM head
    return logits.astype(jnp.float32)
