"""DiZO: MeZO plus a divergence-driven projection of selected tensors (`zeroth_order.MeZO`).

DiZO (Tan et al. 2025, "Harmony in Divergence"). MeZO, plus every `interval` steps (after the
update of step `interval-1`, `2*interval-1`, ...) a projection of each target tensor per layer,
with θ0 the pretrained weights and t_l = ||θ_l - θ0_l||:

    γ_l <- t_l;  repeat `iterations` times (SPSA on γ, one shared scalar):
        u_l = clip(z_l, ±(τ/ε_p) t_l),  z ~ N(0, I)           (so |ε_p u_l| <= τ t_l)
        g   = (L(θ0 + (γ+ε_p u)·d) - L(θ0 + (γ-ε_p u)·d)) / (2 ε_p),   d_l = (θ_l-θ0_l)/t_l
        γ_l <- clip(γ_l - step_size · t_l · g · u_l, (1-τ) t_l, (1+τ) t_l)
    θ_l <- θ0_l + γ_l d_l                                     (so ||θ_l - θ0_l|| = γ_l)

as in the official implementation (github.com/Skilteee/DiZO: k_proj and v_proj weights only,
defaults interval 50, 10 iterations, ε_p 0.1, step size 2.0, τ 0.2). Differences: a stacked
(scanned) tensor [num_layers, ...] gets one γ per layer slice. With `fresh_batches` (the
official code's choice) γ iteration `it` evaluates its two losses on batch 1 + it of the step's
`batches_per_step = 1 + iterations` stacked batches (`loss_fn(params, 1 + it)`), batch 0 being the
MeZO step's; without, every iteration reuses the step's one batch.
"""

import jax
import jax.numpy as jnp

from bdiff_jax.errors import ConfigError
from bdiff_jax.optim.zeroth_order import (LearningRate, MeZO, Predicate, flat_leaves, is_stacked,
                                    kv_targets, path_names)


# ---------------------------------------------------------------------------------------- DiZO


def target_subtree(params, targets: Predicate) -> dict:
  """The target leaves as a nested dict with the same key paths as in `params`."""
  out: dict = {}
  names, leaves, _ = flat_leaves(params)
  for nm, v in zip(names, leaves):
    if targets(nm):
      node = out
      for k in nm[:-1]:
        node = node.setdefault(k, {})
      node[nm[-1]] = v
  return out


def _by_names(tree) -> dict:
  names, leaves, _ = flat_leaves(tree)
  return dict(zip(names, leaves))


def layer_norms(delta, stacked: bool) -> jax.Array:
  """||delta|| in float32: per layer slice [L] when stacked, else a scalar."""
  d = delta.astype(jnp.float32)
  axes = tuple(range(1, d.ndim)) if stacked else None
  return jnp.sqrt(jnp.sum(d * d, axis=axes))


def _scaled(theta, theta0, factor, stacked: bool):
  """theta0 + factor·(theta - theta0), factor per layer slice when stacked."""
  delta = theta.astype(jnp.float32) - theta0.astype(jnp.float32)
  f = factor.reshape(factor.shape + (1,) * (delta.ndim - factor.ndim)) if stacked else factor
  return (theta0.astype(jnp.float32) + f * delta).astype(theta.dtype)


def _ratio(gamma, norm):
  """γ / ||θ - θ0||, 1 where the tensor has not moved (then γ = 0 too)."""
  safe = jnp.where(norm > 0, norm, 1.0)
  return jnp.where(norm > 0, gamma / safe, 1.0)


def apply_projection(params, theta0, gamma, stacked: Predicate = is_stacked):
  """θ_l <- θ0_l + γ_l (θ_l - θ0_l)/||θ_l - θ0_l|| on the leaves present in theta0."""
  t0, gm = _by_names(theta0), _by_names(gamma)

  def one(path, v):
    nm = path_names(path)
    if nm not in t0:
      return v
    norm = layer_norms(v.astype(jnp.float32) - t0[nm].astype(jnp.float32), stacked(nm))
    return _scaled(v, t0[nm], _ratio(gm[nm], norm), stacked(nm))

  return jax.tree_util.tree_map_with_path(one, params)


def search_gamma(loss_fn, params, theta0, key, *, iterations: int = 10, eps_p: float = 0.1,
                 step_size: float = 2.0, tau: float = 0.2, stacked: Predicate = is_stacked,
                 fresh_batches: bool = False):
  """DiZO's zeroth-order search of the projection radii. Returns (gamma, norms, losses).

  fresh_batches: iteration `it` evaluates `loss_fn(params, 1 + it)` (its own batch; `it` is
  traced), else `loss_fn(params)`.

  gamma, norms: nested like theta0, [L] per stacked leaf, scalars otherwise; norms are
  ||θ_l - θ0_l|| and every gamma lies in [(1-τ) norms, (1+τ) norms]. losses: [iterations, 2]
  float32, L+ and L- of each iteration.
  """
  params_by_name = _by_names(params)
  norms = jax.tree_util.tree_map_with_path(
      lambda p, t0: layer_norms(params_by_name[path_names(p)].astype(jnp.float32)
                                - t0.astype(jnp.float32), stacked(path_names(p))), theta0)
  leaves_n, treedef = jax.tree_util.tree_flatten(norms)

  def direction(it):  # u of iteration `it`, clipped so that |ε_p u| <= τ t
    ks = jax.random.split(jax.random.fold_in(key, it), len(leaves_n))
    u = [jnp.clip(jax.random.normal(ks[i], t.shape, jnp.float32),
                  -(tau / eps_p) * t, (tau / eps_p) * t) for i, t in enumerate(leaves_n)]
    return jax.tree_util.tree_unflatten(treedef, u)

  def phase(k, carry):  # phase 2·it: L+ at γ + ε_p u; phase 2·it+1: L- at γ - ε_p u, update γ
    gam, losses = carry
    it, s = k // 2, k % 2
    u = direction(it)
    sign = jnp.where(s == 0, eps_p, -eps_p)
    probe = jax.tree_util.tree_map(lambda a, b: a + sign * b, gam, u)
    probed = apply_projection(params, theta0, probe, stacked)
    loss = (loss_fn(probed, 1 + it) if fresh_batches else loss_fn(probed))[0]
    loss = loss.astype(jnp.float32)
    losses = losses.at[it, s].set(loss)
    g = (losses[it, 0] - loss) / (2.0 * eps_p)
    stepped = jax.tree_util.tree_map(
        lambda a, b, t: jnp.clip(a - step_size * t * g * b, (1 - tau) * t, (1 + tau) * t),
        gam, u, norms)
    gam = jax.tree_util.tree_map(lambda new, old: jnp.where(s == 1, new, old), stepped, gam)
    return gam, losses

  gamma, losses = jax.lax.fori_loop(
      0, 2 * iterations, phase, (norms, jnp.zeros((iterations, 2), jnp.float32)))
  return gamma, norms, losses


class DiZO(MeZO):
  """MeZO with DiZO's periodic, layer-wise projection of the target tensors towards θ0."""

  name = "dizo"

  def __init__(self, learning_rate: LearningRate, *, interval: int = 50, iterations: int = 10,
               eps_p: float = 0.1, step_size: float = 2.0, tau: float = 0.2,
               targets: Predicate = kv_targets, fresh_batches: bool = False, **mezo_kwargs):
    """interval κ, iterations, eps_p, step_size and tau as in DiZO; targets(path_names) picks
    the projected tensors (default: attention key/value kernels); fresh_batches: a batch of its
    own for each γ iteration (`batches_per_step` = 1 + iterations). Other arguments: MeZO's."""
    super().__init__(learning_rate, **mezo_kwargs)
    self.interval = int(interval)
    self.iterations = int(iterations)
    self.eps_p = float(eps_p)
    self.step_size = float(step_size)
    self.tau = float(tau)
    self.targets = targets
    self.fresh_batches = bool(fresh_batches)

  @property
  def batches_per_step(self) -> int:
    """1 + iterations with fresh batches (batch 0: the MeZO step's), else 1."""
    return 1 + self.iterations if self.fresh_batches else 1

  def init(self, params) -> dict:
    """{'theta0': a copy of the target leaves of `params` (the pretrained weights)}."""
    theta0 = target_subtree(params, lambda nm: self.targets(nm) and self.trainable(nm))
    if not jax.tree_util.tree_leaves(theta0):
      raise ConfigError("DiZO's projection targets match no parameter of this model.",
                        "choose targets that exist (e.g. config.train.dizo.targets='kv' needs "
                        "attention 'key'/'value' kernels).")
    return {"theta0": jax.tree_util.tree_map(jnp.copy, theta0)}

  def project(self, loss_fn, params, rule_state, key):
    """Searches γ and projects. Returns (params, metrics: ratio_mean/min/max, gamma losses)."""
    theta0 = rule_state["theta0"]
    gamma, norms, _ = search_gamma(
        loss_fn, params, theta0, key, iterations=self.iterations, eps_p=self.eps_p,
        step_size=self.step_size, tau=self.tau, stacked=self.stacked,
        fresh_batches=self.fresh_batches)
    ratios = jnp.concatenate([jnp.ravel(_ratio(g, t)) for g, t in
                              zip(jax.tree_util.tree_leaves(gamma),
                                  jax.tree_util.tree_leaves(norms))])
    metrics = dict(projection_ratio_mean=jnp.mean(ratios), projection_ratio_min=jnp.min(ratios),
                   projection_ratio_max=jnp.max(ratios))
    return apply_projection(params, theta0, gamma, self.stacked), metrics

  def update(self, loss_fn, params, rule_state, key, step):
    zo_key, proj_key = jax.random.split(key)
    params, rule_state, metrics = super().update(loss_fn, params, rule_state, zo_key, step)
    theta0 = rule_state["theta0"]
    names = set(_by_names(theta0))
    current = target_subtree(params, lambda nm: nm in names)

    def project(_):
      projected, m = self.project(loss_fn, params, rule_state, proj_key)
      return target_subtree(projected, lambda nm: nm in names), dict(m, projected=1.0)

    def keep(_):
      one = jnp.float32(1.0)
      return current, dict(projection_ratio_mean=one, projection_ratio_min=one,
                           projection_ratio_max=one, projected=jnp.float32(0.0))

    is_projection_step = (step % self.interval) == (self.interval - 1)
    new_targets, proj_metrics = jax.lax.cond(is_projection_step, project, keep, None)
    by_name = _by_names(new_targets)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: by_name.get(path_names(p), v), params)
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in proj_metrics.items()})
    return params, rule_state, metrics
