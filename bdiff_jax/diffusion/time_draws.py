"""Draws of the diffusion time (or of the masked fraction) for training and evaluation.

`sample_times`: a training batch's times, stratified across the batch from one offset.
`eval_times`: the K draws of an evaluation batch, a Latin design (stratified across the batch
in every draw and across the draws of every row). `stratified_times`: the shared grid.
"""

import jax
import jax.numpy as jnp


def stratified_times(u: jnp.ndarray, num: int) -> jnp.ndarray:
  """Stratified times t_k = 1 - ((u + k / num) mod 1), k = 0..num-1, in (0, 1].

  Args:
    u: float[...] offsets in [0, 1).
    num: number of strata.

  Returns:
    float32[..., num]. Each t_k is marginally uniform on (0, 1] when u is uniform on [0, 1), and
    exactly one t_k falls in each interval ((j - 1) / num, j / num].
  """
  u = jnp.asarray(u, jnp.float32)
  offsets = jnp.arange(num, dtype=jnp.float32) / num
  t = 1.0 - jnp.mod(u[..., None] + offsets, 1.0)
  # mod(., 1) is in [0, 1), so t > 0 already; a wrap to 0 is the same point as 1 in any case.
  return jnp.where(t > 0.0, t, 1.0)


def sample_times(key: jax.Array, batch_size: int, *, antithetic: bool = True) -> jnp.ndarray:
  """Draws diffusion times float32[batch_size] in (0, 1], each marginally uniform.

  Args:
    key: PRNG key; consumed.
    batch_size: number of times B.
    antithetic: if True, the times are stratified: t_i = 1 - ((u + i / B) mod 1) from a single
      uniform u, so exactly one t lies in each interval ((j - 1) / B, j / B]. Otherwise iid.

  Returns:
    float32[batch_size].
  """
  if antithetic:
    u = jax.random.uniform(key, (), jnp.float32)
    return stratified_times(u, batch_size)
  return 1.0 - jax.random.uniform(key, (batch_size,), jnp.float32)


def eval_times(key: jax.Array, batch_size: int, num_samples: int) -> jnp.ndarray:
  """The K draws' s (t, or k / L_b) of an evaluation batch, float32[K, B] in (0, 1].

  A Latin design: s[j, b] = 1 - (((pi(b) + f[j, b]) / B + j / K) mod 1), with pi a uniform
  random permutation of the B rows and f[j, b] iid uniform on [0, 1). Within every draw the B
  values are stratified (one per interval of width 1 / B, shifted by j / K), so a draw's masked
  total is nearly constant and its masked-position buffer is the stratified one (`masked_head`);
  the K values of every row are stratified too (one per interval of width 1 / K, shifted by
  pi(b) / B). Each s[j, b] is uniform on (0, 1], so every row's estimate is unbiased; rows are
  exchangeable, each with its own jitter (no two rows share a set of times), and dependent only
  through the permutation, which lowers the variance of a split's sum.
  """
  key_p, key_f = jax.random.split(key)
  rank = jax.random.permutation(key_p, batch_size).astype(jnp.float32)  # pi(b)
  jitter = jax.random.uniform(key_f, (num_samples, batch_size), jnp.float32)
  shift = jnp.arange(num_samples, dtype=jnp.float32)[:, None] / num_samples
  t = 1.0 - jnp.mod((rank[None, :] + jitter) / batch_size + shift, 1.0)
  return jnp.where(t > 0.0, t, 1.0)
