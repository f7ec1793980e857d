"""The standard backbone: a pre-norm residual transformer stack, scanned over layers.

    h <- h + F(h),  h <- h + G(h)    with F = attention(norm(.)), G = mlp(norm(.))

Parameters of all layers are stacked on a leading axis under `layers/` (one `lax.scan` over
depth), the same layout the reversible backbone uses, so the two are drop-in replacements.

With decode=True (causal models) every layer's attention keeps a key/value cache in the "cache"
collection, stacked over depth like the parameters (see `layers.Attention`).

With spec.remat the scanned layer is rematerialised (`nn.remat`): the backward pass recomputes
a layer's intermediates from its input, so training holds [num_layers, B, L, D] layer inputs
instead of every layer's attention and MLP activations.
"""

import flax.linen as nn

from bdiff_jax.models.layers import AttentionSublayer, MlpSublayer
from bdiff_jax.models.spec import ModelSpec


class ResidualLayer(nn.Module):
  spec: ModelSpec
  train: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, h, cond, padding_mask):
    h = h + AttentionSublayer(self.spec, name="attn")(
        h, cond, train=self.train, padding_mask=padding_mask,
        decode=self.decode).astype(h.dtype)
    h = h + MlpSublayer(self.spec, name="mlp")(h, cond, train=self.train).astype(h.dtype)
    return h, None


class StandardBackbone(nn.Module):
  """[B, L, D] hidden states -> [B, L, D], residual stream kept in the parameter dtype."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, h, cond, *, train: bool, padding_mask=None, decode: bool = False):
    # spec.remat: each layer's intermediates are recomputed in the backward pass (only when
    # differentiating; the key/value-cache decode path never is).
    layer = ResidualLayer
    if self.spec.remat and not decode:
      layer = nn.remat(ResidualLayer, prevent_cse=False)
    stack = nn.scan(
        layer,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=self.spec.num_layers,
    )
    h, _ = stack(self.spec, train, decode, name="layers")(h, cond, padding_mask)
    return h
