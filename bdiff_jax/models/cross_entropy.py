"""Cross-entropy of rows of logits against integer targets, with a one-pass backward.

`token_nll(logits [C, V], targets [C]) -> [C]` is -log softmax(logits)[target] per row, computed in
at least float32. Its custom backward is one elementwise pass, g * (softmax - onehot(target)), with
the one-hot made from an iota compare: no zero-filled [C, V] buffer and no scatter, which autodiff
of `jax.nn.log_softmax` followed by a gather needs (at V = 33k that scatter was a large part of a
train step). The output heads (`network`, `adaptive_head`) and the losses built on them use it.
"""

import jax
import jax.numpy as jnp


@jax.custom_vjp
def token_nll(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """-log softmax(logits)[target] per row: logits float[C, V], targets int[C] -> float[C].

  Computed in at least float32 exactly as `jax.nn.log_softmax` followed by a gather. The custom
  backward is one elementwise pass, g * (softmax - onehot(target)) with the one-hot made from an
  iota compare: no zero-filled [C, V] buffer and no scatter, which autodiff of the gather needs.
  """
  return _token_nll_fwd(logits, targets)[0]


def _token_nll_fwd(logits, targets):
  z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  row_max = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  shifted = z - row_max
  log_norm = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))
  target_shifted = jnp.take_along_axis(shifted, targets[:, None].astype(jnp.int32), axis=-1)
  nll = (log_norm - target_shifted)[:, 0]
  # Only the logits and one constant per row are kept: softmax = exp(z - (max + log_norm)).
  return nll, (logits, row_max + log_norm, targets)


def _token_nll_bwd(residuals, g):
  logits, log_z, targets = residuals
  z = logits.astype(log_z.dtype)
  onehot = jnp.arange(z.shape[-1], dtype=jnp.int32)[None, :] == targets[:, None]
  grad = g[:, None].astype(z.dtype) * (jnp.exp(z - log_z) - onehot.astype(z.dtype))
  return grad.astype(logits.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)
