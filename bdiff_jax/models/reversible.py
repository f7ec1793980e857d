"""The reversible (bijective) backbone: additive coupling layers with a memory-light backward.

Each layer maps two streams (x1, x2) to (y1, y2) by an additive coupling

    y1 = x1 + F(x2)        F = dropout(attention(adaLN-norm(.)))   (`AttentionSublayer`)
    y2 = x2 + G(y1)        G = dropout(mlp(adaLN-norm(.)))         (`MlpSublayer`)

which is exactly invertible whatever F and G are:

    x2 = y2 - G(y1)
    x1 = y1 - F(x2)

The backbone starts both streams as copies of the embedding h and returns the *mean* of the two
final streams, (y1 + y2) / 2, which the network then passes to its final norm and head. With
F = G = 0 the backbone is the identity, like the standard residual stack.

Parameters are those of the standard backbone: `layers/attn` (F) and `layers/mlp` (G), each
stacked on a leading axis of length num_layers, so both backbones have the same parameter count
and layout and the stack is one `lax.scan` over depth.

Memory-efficient backward (`spec.reversible_backward == "recompute"`): one `jax.custom_vjp`
around the whole stack. Its forward keeps only the final streams (y1, y2) besides the inputs that
exist anyway (params, cond, dropout key, padding mask). Its backward is a reverse `lax.scan` that
at each layer re-evaluates G(y1) and F(x2) under `jax.vjp`, recovers the layer's inputs by the
inversion above, and accumulates the parameter cotangents, the stream cotangents and the
cotangent of `cond` (the adaLN time embedding, which is trained). Activation memory is therefore
that of one layer, independent of depth. `"autodiff"` differentiates the same scanned forward
with ordinary JAX autodiff (activations of every layer are kept); it exists for checking and
for short sequences.

Randomness: layer l uses `fold_in(dropout_key, l)`, and F and G use `fold_in(., 0)` and
`fold_in(., 1)` of that, so the backward replays exactly the dropout masks of the forward.

Numerics: the streams, the coupling additions and the reconstruction subtractions are kept in
the stream dtype (`spec.param_dtype`: float32, or float64 when dtype="float64"); F and G may
compute in bfloat16 (`spec.compute_dtype`) and their outputs are cast to the stream dtype before
being added or subtracted.

Pure functions (params_layers = the backbone's `layers` subtree, {"attn": ..., "mlp": ...} with
a leading layer axis; cond = the time embedding [B, D] or None without time conditioning;
dropout_key = a PRNG key, required only when train and spec.dropout_rate > 0; padding_mask =
bool [B, L] or None):

    reversible_stack_forward(params_layers, x1, x2, cond, *, spec, train, dropout_key=None,
                             padding_mask=None) -> (y1, y2)
        Runs the stack; differentiable, with the backward chosen by spec.reversible_backward.
    reversible_stack_inverse(params_layers, y1, y2, cond, *, spec, train, dropout_key=None,
                             padding_mask=None) -> (x1, x2)
        Recovers the input streams from the output streams (same key => same dropout masks).
    reversible_stack_decode(params_layers, cache_layers, x1, x2, cond, *, spec)
        -> ((y1, y2), new cache_layers)
        One decoding step of a causal model (one token, [B, 1, D] streams): the same coupling,
        y1 = x1 + F(x2), y2 = x2 + G(y1), with F attending through each layer's key/value cache
        (inference needs no inversion). `ReversibleBackbone(..., decode=True)` keeps the stacked
        per-layer caches in the "cache" collection under `layers`.
"""

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdiff_jax.models.layers import AttentionSublayer, MlpSublayer
from bdiff_jax.models.spec import ModelSpec

Params = Any

_F_STREAM = 0  # fold_in index of F's dropout key within a layer
_G_STREAM = 1  # fold_in index of G's dropout key within a layer


def dropout_active(spec: ModelSpec, train: bool) -> bool:
  """Whether the sublayers draw dropout masks (and so need a key)."""
  return bool(train) and spec.dropout_rate > 0.0


def layer_keys(dropout_key: Optional[jax.Array], layer) -> tuple[Any, Any]:
  """Dropout keys (for F, for G) of layer `layer` (an int or a traced int), or (None, None)."""
  if dropout_key is None:
    return None, None
  layer_key = jax.random.fold_in(dropout_key, layer)
  return jax.random.fold_in(layer_key, _F_STREAM), jax.random.fold_in(layer_key, _G_STREAM)


def _apply_f(spec: ModelSpec, train: bool, p_attn: Params, x, cond, key, padding_mask):
  """F(x) = dropout(attention(norm(x))), cast to the stream dtype of x."""
  rngs = {"dropout": key} if key is not None else None
  y = AttentionSublayer(spec).apply({"params": p_attn}, x, cond, train=train,
                                    padding_mask=padding_mask, rngs=rngs)
  return y.astype(x.dtype)


def _apply_g(spec: ModelSpec, train: bool, p_mlp: Params, x, cond, key):
  """G(x) = dropout(mlp(norm(x))), cast to the stream dtype of x."""
  rngs = {"dropout": key} if key is not None else None
  y = MlpSublayer(spec).apply({"params": p_mlp}, x, cond, train=train, rngs=rngs)
  return y.astype(x.dtype)


def _check_key(spec: ModelSpec, train: bool, dropout_key):
  if dropout_active(spec, train):
    if dropout_key is None:
      raise ValueError("train=True with dropout_rate > 0 needs a dropout_key.")
    return dropout_key
  return None  # no randomness is used: drop the key so nothing depends on it


def _layer_indices(params_layers: Params) -> jnp.ndarray:
  depth = jax.tree_util.tree_leaves(params_layers)[0].shape[0]
  return jnp.arange(depth, dtype=jnp.int32)


def _scan_forward(spec: ModelSpec, train: bool, params_layers, x1, x2, cond, dropout_key,
                  padding_mask):
  """The coupling stack as a scan over the stacked layer params. Plain, differentiable JAX."""

  def body(streams, layer_in):
    a, b = streams
    p, layer = layer_in
    key_f, key_g = layer_keys(dropout_key, layer)
    a = a + _apply_f(spec, train, p["attn"], b, cond, key_f, padding_mask)
    b = b + _apply_g(spec, train, p["mlp"], a, cond, key_g)
    return (a, b), None

  (y1, y2), _ = jax.lax.scan(body, (x1, x2), (params_layers, _layer_indices(params_layers)))
  return y1, y2


def _scan_inverse(spec: ModelSpec, train: bool, params_layers, y1, y2, cond, dropout_key,
                  padding_mask):
  """Inverts `_scan_forward`: walks the layers last to first."""

  def body(streams, layer_in):
    a, b = streams
    p, layer = layer_in
    key_f, key_g = layer_keys(dropout_key, layer)
    b = b - _apply_g(spec, train, p["mlp"], a, cond, key_g)
    a = a - _apply_f(spec, train, p["attn"], b, cond, key_f, padding_mask)
    return (a, b), None

  (x1, x2), _ = jax.lax.scan(body, (y1, y2), (params_layers, _layer_indices(params_layers)),
                             reverse=True)
  return x1, x2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _stack_recompute(spec: ModelSpec, train: bool, params_layers, x1, x2, cond, dropout_key,
                     padding_mask):
  return _scan_forward(spec, train, params_layers, x1, x2, cond, dropout_key, padding_mask)


def _stack_recompute_fwd(spec, train, params_layers, x1, x2, cond, dropout_key, padding_mask):
  y1, y2 = _scan_forward(spec, train, params_layers, x1, x2, cond, dropout_key, padding_mask)
  # Only the outputs are saved; params, cond, key and mask are inputs that exist anyway.
  return (y1, y2), (params_layers, y1, y2, cond, dropout_key, padding_mask)


def _stack_recompute_bwd(spec, train, residuals, cotangents):
  params_layers, y1, y2, cond, dropout_key, padding_mask = residuals
  g_y1, g_y2 = cotangents
  g_cond = jax.tree_util.tree_map(jnp.zeros_like, cond)

  def body(carry, layer_in):
    a, b, g_a, g_b, g_c = carry  # a, b: this layer's outputs; g_a, g_b: their cotangents
    p, layer = layer_in
    key_f, key_g = layer_keys(dropout_key, layer)
    # y2 = x2 + G(y1): recover x2, pull g_y2 back through G.
    g_out, g_vjp = jax.vjp(lambda pg, u, c: _apply_g(spec, train, pg, u, c, key_g),
                           p["mlp"], a, cond)
    b = b - g_out
    g_pg, g_from_g, g_c_g = g_vjp(g_b)
    g_a = g_a + g_from_g
    # y1 = x1 + F(x2): recover x1, pull the cotangent of y1 back through F.
    f_out, f_vjp = jax.vjp(lambda pf, u, c: _apply_f(spec, train, pf, u, c, key_f, padding_mask),
                           p["attn"], b, cond)
    a = a - f_out
    g_pf, g_from_f, g_c_f = f_vjp(g_a)
    g_b = g_b + g_from_f
    g_c = jax.tree_util.tree_map(lambda t, u, v: t + u + v, g_c, g_c_g, g_c_f)
    return (a, b, g_a, g_b, g_c), {"attn": g_pf, "mlp": g_pg}

  (_, _, g_x1, g_x2, g_cond), g_params = jax.lax.scan(
      body, (y1, y2, g_y1, g_y2, g_cond), (params_layers, _layer_indices(params_layers)),
      reverse=True)
  # No cotangents for the dropout key and the padding mask (not differentiable inputs).
  return g_params, g_x1, g_x2, g_cond, None, None


_stack_recompute.defvjp(_stack_recompute_fwd, _stack_recompute_bwd)


def reversible_stack_forward(params_layers: Params, x1: jnp.ndarray, x2: jnp.ndarray, cond,
                             *, spec: ModelSpec, train: bool,
                             dropout_key: Optional[jax.Array] = None,
                             padding_mask: Optional[jnp.ndarray] = None):
  """Runs the coupling stack on streams (x1, x2) [B, L, D] -> (y1, y2).

  Differentiable with respect to params_layers, x1, x2 and cond; the backward is the
  memory-light reconstruction (spec.reversible_backward="recompute") or plain autodiff.

  Args:
    params_layers: the backbone's `layers` subtree, {"attn": ..., "mlp": ...}, leading layer axis.
    x1, x2: the input streams, in the stream dtype (spec.param_dtype).
    cond: the time embedding [B, D] (adaLN), or None without time conditioning.
    spec: the model spec.
    train: training mode (dropout on when spec.dropout_rate > 0).
    dropout_key: PRNG key; required when train and spec.dropout_rate > 0, else ignored.
    padding_mask: optional bool [B, L], True at real tokens; passed to every attention.

  Returns:
    (y1, y2), the output streams.
  """
  key = _check_key(spec, train, dropout_key)
  if spec.reversible_backward == "recompute":
    return _stack_recompute(spec, bool(train), params_layers, x1, x2, cond, key, padding_mask)
  if spec.reversible_backward == "autodiff":
    return _scan_forward(spec, bool(train), params_layers, x1, x2, cond, key, padding_mask)
  raise ValueError(f"unknown reversible_backward {spec.reversible_backward!r}")


def reversible_stack_inverse(params_layers: Params, y1: jnp.ndarray, y2: jnp.ndarray, cond,
                             *, spec: ModelSpec, train: bool,
                             dropout_key: Optional[jax.Array] = None,
                             padding_mask: Optional[jnp.ndarray] = None):
  """Inverse of `reversible_stack_forward` with the same arguments: (y1, y2) -> (x1, x2)."""
  key = _check_key(spec, train, dropout_key)
  return _scan_inverse(spec, bool(train), params_layers, y1, y2, cond, key, padding_mask)


def reversible_stack_decode(params_layers: Params, cache_layers: Params, x1: jnp.ndarray,
                            x2: jnp.ndarray, cond, *, spec: ModelSpec):
  """One decoding step through the coupling stack, in inference mode (no dropout).

  Args:
    params_layers: the backbone's `layers` subtree, {"attn": ..., "mlp": ...}, leading layer axis.
    cache_layers: the attention caches of all layers (the "cache" collection of one
      `AttentionSublayer`, stacked on a leading layer axis), from `init_layer_cache`.
    x1, x2: the input streams of the new token, [B, 1, D].
    cond: the time embedding [B, D], or None.
    spec: the model spec (causal).

  Returns:
    ((y1, y2), new cache_layers).
  """

  def body(streams, layer_in):
    a, b = streams
    p, cache = layer_in
    f_out, mutated = AttentionSublayer(spec).apply(
        {"params": p["attn"], "cache": cache}, b, cond, train=False, decode=True,
        mutable=["cache"])
    a = a + f_out.astype(a.dtype)
    b = b + _apply_g(spec, False, p["mlp"], a, cond, None)
    return (a, b), mutated["cache"]

  (y1, y2), new_cache = jax.lax.scan(body, (x1, x2), (params_layers, cache_layers))
  return (y1, y2), new_cache


def init_layer_cache(spec: ModelSpec, h: jnp.ndarray, cond) -> Params:
  """Empty attention caches of all layers for sequences of h's shape [B, L_max, D] (zeros,
  cache_index 0), stacked on a leading layer axis."""
  x = jnp.zeros(h.shape, spec.param_dtype)
  c = None if cond is None else jnp.zeros(cond.shape, cond.dtype)
  shapes = jax.eval_shape(
      lambda: AttentionSublayer(spec).init({"params": jax.random.key(0)}, x, c, train=False,
                                           decode=True)["cache"])
  return jax.tree_util.tree_map(
      lambda leaf: jnp.zeros((spec.num_layers,) + leaf.shape, leaf.dtype), shapes)


def init_layer_params(spec: ModelSpec, key: jax.Array, h: jnp.ndarray, cond,
                      padding_mask=None) -> Params:
  """Freshly initialised stacked params {"attn", "mlp"} for inputs shaped like h [B, L, D]."""
  x = jnp.zeros((1,) + h.shape[1:], spec.param_dtype)
  c = None if cond is None else jnp.zeros((1,) + cond.shape[1:], cond.dtype)
  del padding_mask  # parameter shapes do not depend on it

  def one_layer(layer_key):
    key_f, key_g = jax.random.split(layer_key)
    p_attn = AttentionSublayer(spec).init({"params": key_f}, x, c, train=False)["params"]
    p_mlp = MlpSublayer(spec).init({"params": key_g}, x, c, train=False)["params"]
    return {"attn": p_attn, "mlp": p_mlp}

  return jax.vmap(one_layer)(jax.random.split(key, spec.num_layers))


class ReversibleBackbone(nn.Module):
  """[B, L, D] hidden states -> [B, L, D]: the mean of the two streams after the coupling stack.

  Same call signature, parameter layout (`layers/attn`, `layers/mlp`, stacked over depth) and
  parameter count as `StandardBackbone`.
  """
  spec: ModelSpec

  @nn.compact
  def __call__(self, h, cond, *, train: bool, padding_mask=None, decode: bool = False):
    s = self.spec
    params_layers = self.param("layers", functools.partial(init_layer_params, s), h, cond,
                               padding_mask)
    x = h.astype(s.param_dtype)
    if decode:
      stepping = self.has_variable("cache", "layers")  # False while the cache is created
      cache = self.variable("cache", "layers", init_layer_cache, s, h, cond)
      if stepping:
        if train or padding_mask is not None:
          raise ValueError("decode=True runs in inference mode without a padding mask.")
        (y1, y2), cache.value = reversible_stack_decode(params_layers, cache.value, x, x, cond,
                                                        spec=s)
        return 0.5 * (y1 + y2)
    key = self.make_rng("dropout") if dropout_active(s, train) else None
    y1, y2 = reversible_stack_forward(params_layers, x, x, cond, spec=s, train=train,
                                      dropout_key=key, padding_mask=padding_mask)
    return 0.5 * (y1 + y2)


def with_backward(spec: ModelSpec, backward: str) -> ModelSpec:
  """A copy of spec with reversible_backward set to `backward` ("recompute" | "autodiff")."""
  return dataclasses.replace(spec, reversible_backward=backward)
