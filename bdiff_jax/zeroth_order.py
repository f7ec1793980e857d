"""Zeroth-order update rules: MeZO (SPSA) and DiZO (MeZO + divergence-driven projection).

Both follow the train step's update-rule protocol

    rule.init(params) -> rule_state
    rule.update(loss_fn, params, rule_state, key, step) -> (params, rule_state, metrics)

where `loss_fn(params) -> (loss, aux)` has its batch and noise/dropout key already bound, so two
calls see the same randomness, and `key` is a fresh PRNG key for this step's perturbations.

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"). For each of
n perturbations j, with z_j ~ N(0, I) over the trainable parameters,

    g_j = (L(θ + ε z_j) - L(θ - ε z_j)) / (2ε)               (the "projected gradient", a scalar)
    θ  <- θ - η_t (1/n Σ_j g_j z_j + λ θ)                   (λ only on matrices, not biases/norms)

All g_j are taken at the same θ and the averaged estimate is applied once, as in the official code
(n-SPSA). z is never stored: the z of leaf i for perturbation j is regenerated from
`split(fold_in(key, j), num_leaves)[i]` (= fold_in(fold_in(key, j), i)) whenever it is needed,
one leaf after the other. The parameters are moved in place,
θ+εz, then -2εz, then +εz, so no second copy of the parameters is kept; the restored θ equals the
original to float rounding (at most 1.5 ulp per element per perturbation, not bit-exact).

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
(scanned) tensor [num_layers, ...] gets one γ per layer slice, and all γ iterations use the step's
batch (the official code draws a new batch per iteration; the update-rule seam binds one batch).
"""

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bdiff_jax.errors import ConfigError

PathNames = tuple[str, ...]
Predicate = Callable[[PathNames], bool]
LearningRate = Union[float, optax.Schedule]

SCHEDULES = ("constant", "linear")
DIZO_TARGETS = ("kv", "kernels")


# ----------------------------------------------------------------------------- parameter paths


def path_names(path) -> PathNames:
  """A tree_util key path as plain strings, e.g. ('backbone', 'layers', 'mlp', 'up', 'kernel')."""
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return tuple(names)


def trainable_predicate(freeze_embeddings: bool) -> Predicate:
  """All parameters, or all but the token embedding (the `embed` module, tied to the head)."""
  if freeze_embeddings:
    return lambda names: "embed" not in names
  return lambda names: True


def is_stacked(names: PathNames) -> bool:
  """Leaves under `layers` are stacked over depth: axis 0 indexes the layer."""
  return "layers" in names


def kv_targets(names: PathNames) -> bool:
  """The attention key and value projection kernels (DiZO's default targets)."""
  return len(names) >= 2 and names[-1] == "kernel" and names[-2] in ("key", "value")


def kernel_targets(names: PathNames) -> bool:
  """Every dense kernel."""
  return bool(names) and names[-1] == "kernel"


def _flat(params):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  return [path_names(p) for p, _ in leaves], [v for _, v in leaves], treedef


def leaf_noise(params, key):
  """Every leaf's z (N(0, 1), the leaf's shape and dtype), materialised: for tests and debugging.

  Leaf i (in tree_leaves order over all leaves) draws from split(key, num_leaves)[i], which is
  fold_in(key, i) under JAX's default (partitionable) threefry; one split for all leaves
  compiles ~4x faster on CPU than a fold_in per leaf.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(keys[i], v.shape, v.dtype) for i, v in enumerate(leaves)])


def _after(previous, key):
  """`key`, made to depend on the array `previous` (the value changes only if previous[0] is NaN).

  XLA otherwise schedules the noise of every leaf before the first update that consumes it, so
  the noise of all leaves is live at once (temp memory ~ the parameter count); with this
  dependency the noise of leaf i is drawn after leaf i-1 is written and at most one leaf's noise
  is live (measured in tests/test_zeroth_order.py).
  """
  if not previous.size:
    return key
  nan = jnp.isnan(jnp.ravel(previous)[0])
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    data = jax.random.key_data(key)
    return jax.random.wrap_key_data(data + nan.astype(data.dtype), impl=jax.random.key_impl(key))
  return key + nan.astype(key.dtype)


def map_noise(fn, params, key, trainable: Predicate):
  """Applies fn(names, leaf, z) to the trainable leaves, one leaf after the other.

  z is the leaf's noise of `leaf_noise(params, key)` (keys split over all leaves, so freezing a
  leaf does not change the noise of the others), drawn just before its use. Frozen leaves are
  returned as is.
  """
  names, leaves, treedef = _flat(params)
  keys = jax.random.split(key, len(leaves))
  out, last = [], None
  for i, (nm, v) in enumerate(zip(names, leaves)):
    if not trainable(nm):
      out.append(v)
      continue
    k = keys[i] if last is None else _after(last, keys[i])
    last = fn(nm, v, jax.random.normal(k, v.shape, v.dtype))
    out.append(last)
  return jax.tree_util.tree_unflatten(treedef, out)


def perturb(params, key, scale, trainable: Predicate):
  """θ + scale·z on the trainable leaves; z regenerated leaf by leaf from `key`."""
  return map_noise(lambda nm, v, z: v + jnp.asarray(scale, v.dtype) * z, params, key, trainable)


def _decays(names: PathNames, leaf, stacked: Predicate) -> bool:
  """Weight decay on matrices only (per layer slice for stacked leaves), not biases or norms."""
  return leaf.ndim - (1 if stacked(names) else 0) >= 2


# ----------------------------------------------------------------------------------------- MeZO


class MeZO:
  """Memory-efficient zeroth-order SGD (n-SPSA, in-place perturbations)."""

  name = "mezo"

  def __init__(self, learning_rate: LearningRate, *, eps: float = 1e-3,
               weight_decay: float = 0.0, num_perturbations: int = 1,
               freeze_embeddings: bool = True, trainable: Optional[Predicate] = None,
               decay: Optional[Callable[[PathNames, Any], bool]] = None,
               stacked: Predicate = is_stacked):
    """learning_rate: η or a schedule step -> η. eps: perturbation scale ε.

    trainable(path_names) picks the leaves that are perturbed and updated (default: all, minus
    the token embedding when freeze_embeddings); decay(path_names, leaf) the leaves that get
    weight decay (default: matrices, per layer slice for stacked leaves).
    """
    self.learning_rate = learning_rate
    self.eps = float(eps)
    self.weight_decay = float(weight_decay)
    self.num_perturbations = int(num_perturbations)
    self.trainable = trainable or trainable_predicate(freeze_embeddings)
    self.stacked = stacked
    self.decay = decay or (lambda names, leaf: _decays(names, leaf, stacked))

  def init(self, params) -> dict:
    del params
    return {}

  def lr(self, step) -> jax.Array:
    lr = self.learning_rate(step) if callable(self.learning_rate) else self.learning_rate
    return jnp.asarray(lr, jnp.float32)

  def _evaluate(self, loss_fn, params, key, aux):
    """θ += εz; L+ = L(θ); θ -= 2εz; L- = L(θ) (one two-trip loop: the network compiles once).

    Returns (θ - εz, [L+, L-], aux + aux+ + aux-).
    """
    def phase(s, carry):
      p, losses, aux = carry
      p = perturb(p, key, jnp.where(s == 0, self.eps, -2.0 * self.eps), self.trainable)
      loss, a = loss_fn(p)
      aux = jax.tree_util.tree_map(lambda x, y: x + jnp.asarray(y, jnp.float32), aux, a)
      return p, losses.at[s].set(loss.astype(jnp.float32)), aux

    return jax.lax.fori_loop(0, 2, phase, (params, jnp.zeros((2,), jnp.float32), aux))

  def estimate(self, loss_fn, params, key):
    """The n SPSA estimates at θ. Returns (θ - εz_{n-1}, g [n], losses [n, 2], aux mean).

    Perturbation j uses z_j from fold_in(key, j); θ is restored (+εz_j) after every estimate
    but the last, whose restore is fused into `apply`.
    """
    n = self.num_perturbations
    aux_shape = jax.eval_shape(loss_fn, params)[1]
    aux = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), aux_shape)
    if n == 1:
      params, l0, aux = self._evaluate(loss_fn, params, jax.random.fold_in(key, 0), aux)
      losses = l0[None]
    else:
      def one(j, carry):
        p, losses, aux = carry
        p = jax.lax.cond(j > 0, lambda q: perturb(q, jax.random.fold_in(key, j - 1), self.eps,
                                                    self.trainable), lambda q: q, p)
        p, lj, aux = self._evaluate(loss_fn, p, jax.random.fold_in(key, j), aux)
        return p, losses.at[j].set(lj), aux

      params, losses, aux = jax.lax.fori_loop(
          0, n, one, (params, jnp.zeros((n, 2), jnp.float32), aux))
    g = (losses[:, 0] - losses[:, 1]) / (2.0 * self.eps)
    return params, g, losses, jax.tree_util.tree_map(lambda x: x / (2 * n), aux)

  def apply(self, params, g, key, lr):
    """From θ - εz_{n-1}: θ <- θ - lr (1/n Σ_j g_j z_j + λθ) on the trainable leaves.

    The last estimate's restore (+εz_{n-1}) is fused with its update (one noise draw).
    """
    n, eps = self.num_perturbations, self.eps
    shrink = 1.0 - lr * self.weight_decay

    def last(nm, v, z):
      restored = v + jnp.asarray(eps, v.dtype) * z
      if self.weight_decay and self.decay(nm, v):
        restored = restored * shrink.astype(v.dtype)
      return restored - (lr * g[n - 1] / n).astype(v.dtype) * z

    params = map_noise(last, params, jax.random.fold_in(key, n - 1), self.trainable)

    def earlier(j, p):
      coef = lr * g[j] / n
      return map_noise(lambda nm, v, z: v - coef.astype(v.dtype) * z, p,
                       jax.random.fold_in(key, j), self.trainable)

    return jax.lax.fori_loop(0, n - 1, earlier, params) if n > 1 else params

  def update(self, loss_fn, params, rule_state, key, step):
    params, g, losses, aux = self.estimate(loss_fn, params, key)
    lr = self.lr(step)
    params = self.apply(params, g, key, lr)
    metrics = dict(aux, loss=jnp.mean(losses), loss_plus=jnp.mean(losses[:, 0]),
                   loss_minus=jnp.mean(losses[:, 1]), projected_grad=jnp.mean(g),
                   learning_rate=lr)
    return params, rule_state, metrics


# ---------------------------------------------------------------------------------------- DiZO


def target_subtree(params, targets: Predicate) -> dict:
  """The target leaves as a nested dict with the same key paths as in `params`."""
  out: dict = {}
  names, leaves, _ = _flat(params)
  for nm, v in zip(names, leaves):
    if targets(nm):
      node = out
      for k in nm[:-1]:
        node = node.setdefault(k, {})
      node[nm[-1]] = v
  return out


def _by_names(tree) -> dict:
  names, leaves, _ = _flat(tree)
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
                 step_size: float = 2.0, tau: float = 0.2, stacked: Predicate = is_stacked):
  """DiZO's zeroth-order search of the projection radii. Returns (gamma, norms, losses).

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
    loss = loss_fn(apply_projection(params, theta0, probe, stacked))[0].astype(jnp.float32)
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
               targets: Predicate = kv_targets, **mezo_kwargs):
    """interval κ, iterations, eps_p, step_size and tau as in DiZO; targets(path_names) picks
    the projected tensors (default: attention key/value kernels). Other arguments: MeZO's."""
    super().__init__(learning_rate, **mezo_kwargs)
    self.interval = int(interval)
    self.iterations = int(iterations)
    self.eps_p = float(eps_p)
    self.step_size = float(step_size)
    self.tau = float(tau)
    self.targets = targets

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
        step_size=self.step_size, tau=self.tau, stacked=self.stacked)
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


# -------------------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
  """Defaults for config.train.zo (MeZO, also used by DiZO) and config.train.dizo."""
  c = ml_collections.ConfigDict()
  c.zo = ml_collections.ConfigDict()
  c.zo.learning_rate = 1e-6  # MeZO's OPT full-parameter setting (grid 1e-6 / 1e-7)
  c.zo.schedule = "constant"  # "constant" | "linear" (decay to 0 at total_steps)
  c.zo.eps = 1e-3
  c.zo.num_perturbations = 1
  c.zo.weight_decay = 0.0
  c.zo.freeze_embeddings = True  # token embedding (tied head) not perturbed nor updated
  c.dizo = ml_collections.ConfigDict()
  c.dizo.interval = 50  # κ: project after steps κ-1, 2κ-1, ...
  c.dizo.iterations = 10  # zeroth-order iterations on γ per projection
  c.dizo.eps_p = 0.1
  c.dizo.step_size = 2.0
  c.dizo.tau = 0.2  # γ/||θ-θ0|| clipped to [1-τ, 1+τ]
  c.dizo.targets = "kv"  # "kv": attention key/value kernels | "kernels": every dense kernel
  return c


def _int_at_least(low):
  return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


_CHECKS = (  # (field of config.train, test, what it must be)
    ("zo.learning_rate", lambda v: v > 0, "> 0"),
    ("zo.schedule", lambda v: v in SCHEDULES, " or ".join(map(repr, SCHEDULES))),
    ("zo.eps", lambda v: v > 0, "> 0"),
    ("zo.num_perturbations", _int_at_least(1), "an integer >= 1"),
    ("zo.weight_decay", lambda v: v >= 0, ">= 0"),
    ("zo.freeze_embeddings", lambda v: isinstance(v, bool), "True or False"),
    ("dizo.interval", _int_at_least(1), "an integer >= 1"),
    ("dizo.iterations", _int_at_least(1), "an integer >= 1"),
    ("dizo.eps_p", lambda v: v > 0, "> 0"),
    ("dizo.step_size", lambda v: v > 0, "> 0"),
    ("dizo.tau", lambda v: 0 < v < 1, "in (0, 1)"),
    ("dizo.targets", lambda v: v in DIZO_TARGETS, " or ".join(map(repr, DIZO_TARGETS))),
)


def validate(train_config) -> None:
  """Raises ConfigError naming the first invalid field of train.zo / train.dizo."""
  for path, ok, need in _CHECKS:
    section, field = path.split(".")
    value = train_config[section][field]
    if not ok(value):
      raise ConfigError(f"config.train.{path}={value!r} is invalid: it must be {need}.",
                        f"pass --config.train.{path}=<{need}>.")


def learning_rate_schedule(zo_config, total_steps: int) -> optax.Schedule:
  if zo_config.schedule == "linear":
    return optax.linear_schedule(zo_config.learning_rate, 0.0, max(int(total_steps), 1))
  return optax.constant_schedule(zo_config.learning_rate)


def from_config(train_config, total_steps: int, rule: str = "mezo") -> MeZO:
  """The MeZO or DiZO rule ("mezo" | "dizo") of config.train.zo / config.train.dizo."""
  validate(train_config)
  z = train_config.zo
  kwargs = dict(eps=z.eps, weight_decay=z.weight_decay, num_perturbations=z.num_perturbations,
                freeze_embeddings=z.freeze_embeddings)
  lr = learning_rate_schedule(z, total_steps)
  if rule == "mezo":
    return MeZO(lr, **kwargs)
  if rule == "dizo":
    d = train_config.dizo
    targets = kv_targets if d.targets == "kv" else kernel_targets
    return DiZO(lr, interval=d.interval, iterations=d.iterations, eps_p=d.eps_p,
                step_size=d.step_size, tau=d.tau, targets=targets, **kwargs)
  raise ConfigError(f"unknown zeroth-order update rule {rule!r}.", "use 'mezo' or 'dizo'.")
