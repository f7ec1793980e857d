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
(n-SPSA). z is Gaussian (MeZO's choice) or, with noise="rademacher", uniform over ±1 (SPSA's
original perturbation; the same E[z zᵀ] = I, so the same expected update): 32 entries from each
32-bit PRNG word instead of one, which makes a step of a 5M-parameter model ~3x faster on CPU,
where generating the Gaussian noise three times per step costs more than the two forward passes
(docs/glue.md). z is never stored: the z of leaf i for perturbation j is regenerated from
`split(fold_in(key, j), num_leaves)[i]` (= fold_in(fold_in(key, j), i)) whenever it is needed,
one leaf after the other. The parameters are moved in place,
θ+εz, then -2εz, then +εz, so no second copy of the parameters is kept; the restored θ equals the
original to float rounding (at most 1.5 ulp per element per perturbation, not bit-exact).

DiZO (MeZO plus a divergence-driven projection) lives in `bdiff_jax/optim/dizo.py`.
"""

import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from bdiff_jax.errors import ConfigError

PathNames = tuple[str, ...]
Predicate = Callable[[PathNames], bool]
LearningRate = Union[float, optax.Schedule]

SCHEDULES = ("constant", "linear")
NOISES = ("gaussian", "rademacher")
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


EMBEDDINGS = ("embed", "embed_tokens", "embed_positions")


def frozen_embeddings(names: PathNames) -> bool:
  """The embedding tables: the token embedding (the `embed` module of a bdiff `Network`, tied
  to the head; `embed_tokens` of OPT) and OPT's learned positions (`embed_positions`)."""
  return any(n in EMBEDDINGS for n in names)


def trainable_predicate(freeze_embeddings: bool) -> Predicate:
  """All parameters, or all but the embedding tables (`frozen_embeddings`)."""
  if freeze_embeddings:
    return lambda names: not frozen_embeddings(names)
  return lambda names: True


def is_stacked(names: PathNames) -> bool:
  """Leaves under `layers` are stacked over depth: axis 0 indexes the layer."""
  return "layers" in names


def kv_targets(names: PathNames) -> bool:
  """The attention key and value projection kernels (DiZO's default targets): `key`/`value` of
  a bdiff `Network`, `k_proj`/`v_proj` of OPT."""
  return len(names) >= 2 and names[-1] == "kernel" and names[-2] in (
      "key", "value", "k_proj", "v_proj")


def kernel_targets(names: PathNames) -> bool:
  """Every dense kernel."""
  return bool(names) and names[-1] == "kernel"


def flat_leaves(params):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  return [path_names(p) for p, _ in leaves], [v for _, v in leaves], treedef


def check_noise(noise: str, field: str = "") -> str:
  """`noise` if it is one of NOISES; else a one-line ConfigError, naming the config `field`
  ("glue.zo.noise") that holds it when given."""
  if noise not in NOISES:
    choices = ", ".join(map(repr, NOISES))
    if field:
      raise ConfigError(f"{field}={noise!r} is not a zeroth-order noise.",
                        f"set --config.{field} to one of {choices}.")
    raise ConfigError(f"unknown zeroth-order noise {noise!r}.", f"use one of {choices}.")
  return noise


def draw_noise(key, shape, dtype, noise: str = "gaussian"):
  """One leaf's z: N(0, 1) entries ("gaussian"), or ±1 with equal probability ("rademacher": the
  bits of ceil(size / 32) 32-bit words, bit b of word w for entry 32 w + b)."""
  if noise == "gaussian":
    return jax.random.normal(key, shape, dtype)
  check_noise(noise)
  size = math.prod(shape)
  words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & 1
  return (2 * bits.reshape(-1)[:size].astype(dtype) - 1).reshape(shape)


def leaf_noise(params, key, noise: str = "gaussian"):
  """Every leaf's z (`draw_noise`, the leaf's shape and dtype), materialised: for tests and
  debugging.

  Leaf i (in tree_leaves order over all leaves) draws from split(key, num_leaves)[i], which is
  fold_in(key, i) under JAX's default (partitionable) threefry; one split for all leaves
  compiles ~4x faster on CPU than a fold_in per leaf.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [draw_noise(keys[i], v.shape, v.dtype, noise) for i, v in enumerate(leaves)])


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


def map_noise(fn, params, key, trainable: Predicate, noise: str = "gaussian"):
  """Applies fn(names, leaf, z) to the trainable leaves, one leaf after the other.

  z is the leaf's noise of `leaf_noise(params, key, noise)` (keys split over all leaves, so
  freezing a leaf does not change the noise of the others), drawn just before its use. Frozen
  leaves are returned as is.
  """
  names, leaves, treedef = flat_leaves(params)
  keys = jax.random.split(key, len(leaves))
  out, last = [], None
  for i, (nm, v) in enumerate(zip(names, leaves)):
    if not trainable(nm):
      out.append(v)
      continue
    k = keys[i] if last is None else _after(last, keys[i])
    last = fn(nm, v, draw_noise(k, v.shape, v.dtype, noise))
    out.append(last)
  return jax.tree_util.tree_unflatten(treedef, out)


def perturb(params, key, scale, trainable: Predicate, noise: str = "gaussian"):
  """θ + scale·z on the trainable leaves; z regenerated leaf by leaf from `key`."""
  return map_noise(lambda nm, v, z: v + jnp.asarray(scale, v.dtype) * z, params, key, trainable,
                   noise)


def _decays(names: PathNames, leaf, stacked: Predicate) -> bool:
  """Weight decay on matrices only (per layer slice for stacked leaves), not biases or norms."""
  return leaf.ndim - (1 if stacked(names) else 0) >= 2


# ----------------------------------------------------------------------------------------- MeZO


class MeZO:
  """Memory-efficient zeroth-order SGD (n-SPSA, in-place perturbations)."""

  name = "mezo"
  deterministic = True  # losses in eval mode (no dropout), as MeZO's reference evaluates them
  batches_per_step = 1

  def __init__(self, learning_rate: LearningRate, *, eps: float = 1e-3,
               weight_decay: float = 0.0, num_perturbations: int = 1,
               noise: str = "gaussian",
               freeze_embeddings: bool = True, trainable: Optional[Predicate] = None,
               decay: Optional[Callable[[PathNames, Any], bool]] = None,
               stacked: Predicate = is_stacked):
    """learning_rate: η or a schedule step -> η. eps: perturbation scale ε. noise: z's
    distribution, "gaussian" (MeZO's) or "rademacher" (`draw_noise`).

    trainable(path_names) picks the leaves that are perturbed and updated; when given it wins
    over freeze_embeddings (default: all, minus the embedding tables when freeze_embeddings;
    `update_rule.make_rule` always passes it); decay(path_names, leaf) the leaves that get
    weight decay (default: matrices, per layer slice for stacked leaves).
    """
    self.learning_rate = learning_rate
    self.eps = float(eps)
    self.weight_decay = float(weight_decay)
    self.num_perturbations = int(num_perturbations)
    self.noise = check_noise(noise)
    self.trainable = trainable or trainable_predicate(freeze_embeddings)
    self.stacked = stacked
    self.decay = decay or (lambda names, leaf: _decays(names, leaf, stacked))

  def init(self, params) -> dict:
    names = flat_leaves(params)[0]
    if not any(self.trainable(nm) for nm in names):
      raise ConfigError("the zeroth-order rule trains no parameter of this model.",
                        "check the freeze / peft choice against the model's parameters (a LoRA "
                        "rule needs {'base': .., 'lora': ..} parameters, lora.wrap).")
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
      p = perturb(p, key, jnp.where(s == 0, self.eps, -2.0 * self.eps), self.trainable,
                  self.noise)
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
                                                    self.trainable, self.noise), lambda q: q, p)
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

    params = map_noise(last, params, jax.random.fold_in(key, n - 1), self.trainable, self.noise)

    def earlier(j, p):
      coef = lr * g[j] / n
      return map_noise(lambda nm, v, z: v - coef.astype(v.dtype) * z, p,
                       jax.random.fold_in(key, j), self.trainable, self.noise)

    return jax.lax.fori_loop(0, n - 1, earlier, params) if n > 1 else params

  def update(self, loss_fn, params, rule_state, key, step):
    params, g, losses, aux = self.estimate(loss_fn, params, key)
    lr = self.lr(step)
    params = self.apply(params, g, key, lr)
    metrics = dict(aux, loss=jnp.mean(losses), loss_plus=jnp.mean(losses[:, 0]),
                   loss_minus=jnp.mean(losses[:, 1]), projected_grad=jnp.mean(g),
                   learning_rate=lr)
    return params, rule_state, metrics


def learning_rate_schedule(settings, total_steps: int) -> optax.Schedule:
  """`settings` (`update_rule.ZOSettings`): its learning_rate, constant or ("linear") decaying
  to 0 at `total_steps`."""
  if settings.schedule == "linear":
    return optax.linear_schedule(settings.learning_rate, 0.0, max(int(total_steps), 1))
  return optax.constant_schedule(settings.learning_rate)
