"""`ModelSpec`: the hashable, validated description of a network (`train.builder.model_spec`
makes it from `config.model`)."""

import dataclasses

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything a network needs to know. Frozen so it can be a Flax module attribute."""
  vocab_size: int  # real tokens; the [MASK] id is vocab_size and is never predicted
  max_len: int
  backbone: str = "standard"
  block: str = "simple"
  causal: bool = False  # set from the objective (Objective.causal), never from its name
  num_layers: int = 4
  emb_dim: int = 256
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 64
  mlp_dim: int = 1024
  dropout_rate: float = 0.0
  time_conditioning: str = "adaln"
  positional: str = "rope"
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"
  reversible_backward: str = "recompute"
  remat: bool = False  # standard backbone: recompute each layer in the backward pass
  attention: str = "dense"
  candidate_k: int = 0
  head: str = "full"  # "full" softmax over V | "adaptive" (models/adaptive_head.py)
  adaptive_cutoffs: tuple[int, ...] = (4000, 12000)
  adaptive_shrink: int = 4
  adaptive_tail_capacity: float = 0.15

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def param_dtype(self):
    # float64 runs (numerical tests) keep float64 params; otherwise params are float32.
    return jnp.float64 if self.dtype == "float64" else jnp.float32

  @property
  def time_conditioned(self) -> bool:
    return self.time_conditioning == "adaln"

  @property
  def use_bias(self) -> bool:
    return self.block == "simple"  # Qwen3-style blocks have no biases

  @property
  def embed_rows(self) -> int:
    # Row vocab_size embeds [MASK]. The AR model never sees it; the row is kept so that both
    # objectives share one parameter layout.
    return self.vocab_size + 1
