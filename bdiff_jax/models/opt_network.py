"""OPT as a bdiff network: `config.model.backbone = "opt"` (autoregressive objective only).

`OPTNetwork(spec)` is `models.opt.OPT` (the architecture of Hugging Face's OPTForCausalLM, whose
checkpoints load into it) behind the interface of `models.network.Network`, so that the trainer,
the evaluator, the AR sampler and the GLUE benchmark use one network:

    apply(tokens int32[B, L], t=None, *, train, padding_mask=None, decode=False,
          logit_positions=None, return_hidden=False) -> logits float32[B, L or K, V]
    apply(h [..., D], method="head") -> logits [..., V]
    apply(h [..., D], targets int[...], method="token_nll") -> -log p(target | h) [...]

From `config.model` (`ModelSpec`): num_layers, emb_dim (hidden_size), num_heads, mlp_dim
(ffn_dim), dropout_rate (residual dropout; OPT's attention dropout is 0) and dtype (compute).
The rest is OPT's: pre-LN with eps 1e-5, ReLU, biases everywhere, learned positions
(max_position_embeddings = data.seq_len, plus OPT's 2 offset rows inside `opt.py`) and the LM
head tied to the token embedding. The embedding has vocab_size + 1 rows: the last one is the
[MASK] id, which the autoregressive objective reads as its BOS token; the head scores only the
vocab_size real tokens (the embedding rows before it). The spec this module carries says
`positional="learned"` whatever config.model.positional is, since that is what OPT has (the AR
sampler reads it to bound the sample length); block, num_kv_heads, head_dim, rope_theta and
norm_eps are not used.

Parameters live under "opt" with OPT's names (`opt/embed_tokens`, `opt/embed_positions`,
`opt/layers/self_attn/{q,k,v,out}_proj`, ...; layers stacked on a leading axis), the tree of
`classifier.OPTLM` with Hugging Face weights, so the zeroth-order rules find the same targets
(k_proj/v_proj kernels for DiZO, embed_tokens/embed_positions frozen for MeZO).

`padding_mask` is OPT's attention mask: positions count only the real tokens (left or right
padding is exact at the real positions). `decode=True` decodes with OPT's key/value caches
(unpadded rows; see `opt.OPT`).
"""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from bdiff_jax.models import cross_entropy
from bdiff_jax.models.opt import OPT, OPTConfig
from bdiff_jax.models.spec import ModelSpec


def opt_spec(spec: ModelSpec) -> ModelSpec:
  """The spec of an OPT network: `spec` with what OPT fixes (learned positions, tied head)."""
  return dataclasses.replace(spec, positional="learned", tie_embeddings=True)


def opt_config(spec: ModelSpec) -> OPTConfig:
  """The `OPTConfig` of a network of shape `spec`: vocab_size + 1 embedding rows ([MASK] last),
  max_position_embeddings = spec.max_len."""
  return OPTConfig(vocab_size=spec.embed_rows, hidden_size=spec.emb_dim,
                   num_hidden_layers=spec.num_layers, ffn_dim=spec.mlp_dim,
                   num_attention_heads=spec.num_heads, max_position_embeddings=spec.max_len,
                   do_layer_norm_before=True, activation_function="relu",
                   dropout=spec.dropout_rate, attention_dropout=0.0, pad_token_id=None,
                   bos_token_id=spec.vocab_size, eos_token_id=None)


class OPTNetwork(nn.Module):
  """OPT with the bdiff network interface; see the module docstring. Build it with
  `models.build_network` (which passes `opt_spec`)."""
  spec: ModelSpec

  def setup(self):
    self.opt = OPT(opt_config(self.spec), dtype=self.spec.compute_dtype)

  def __call__(self, tokens, t: Optional[jnp.ndarray] = None, *, train: bool = False,
               padding_mask: Optional[jnp.ndarray] = None, decode: bool = False,
               logit_positions: Optional[jnp.ndarray] = None, return_hidden: bool = False):
    """Logits float32[B, L, V] (at `logit_positions` [B, K]: [B, K, V]); with `return_hidden`
    the final-normed hidden states float32[B, L or K, D]. `t` is ignored (no diffusion time)."""
    del t
    if decode and padding_mask is not None:
      raise ValueError("decode=True does not take a padding mask.")
    mask = (jnp.ones(tokens.shape, jnp.int32) if padding_mask is None
            else padding_mask.astype(jnp.int32))
    h = self.opt(tokens, mask, deterministic=not train, return_hidden=True, decode=decode)
    if logit_positions is not None:
      h = jnp.take_along_axis(h, logit_positions[..., None].astype(jnp.int32), axis=1)
    if return_hidden:
      return h
    return self.head(h)

  def head(self, h: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Hidden states [..., D] -> float32 logits [..., V]: OPT's tied LM head restricted to the
    real tokens (what `OPT` computes, without the [MASK] column)."""
    del train
    table = self.opt.variables["params"]["embed_tokens"]["embedding"][:self.spec.vocab_size]
    dtype = self.spec.compute_dtype
    logits = jnp.einsum("...e,ve->...v", h.astype(dtype), table.astype(dtype))
    return logits.astype(jnp.float32)

  def token_nll(self, h: jnp.ndarray, targets: jnp.ndarray, *,
                train: bool = False) -> jnp.ndarray:
    """-log p(target | h) per row: the cross-entropy of `head(h)` (`cross_entropy.token_nll`)."""
    logits = self.head(h, train=train)
    nll = cross_entropy.token_nll(logits.reshape(-1, logits.shape[-1]),
                                  jnp.asarray(targets, jnp.int32).reshape(-1))
    return nll.reshape(targets.shape)
