"""Zeroth-order update rules (MeZO, DiZO): estimator maths, noise regeneration, convergence on a
toy problem, DiZO's projection, compiled memory against a first-order AdamW step, and config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bdiff_jax import dizo as dizo_lib
from bdiff_jax import update_rule
from bdiff_jax import zeroth_order as zo
from bdiff_jax.errors import ConfigError

F32_HALF_ULP = 2.0 ** -24  # relative rounding error of one float32 operation


class AdamWRule:
  """Reference first-order rule for the same protocol (the real one is bdiff_jax/update_rule.py)."""

  name = "adamw"

  def __init__(self, learning_rate, weight_decay=0.0):
    self.tx = optax.adamw(learning_rate, weight_decay=weight_decay)

  def init(self, params):
    return self.tx.init(params)

  def update(self, loss_fn, params, rule_state, key, step):
    del key, step
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, rule_state = self.tx.update(grads, rule_state, params)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
    return optax.apply_updates(params, updates), rule_state, metrics


# ------------------------------------------------------------------------ SPSA on a quadratic


def _quadratic():
  """L(θ) = ½ θᵀAθ + bᵀθ over θ = {'a': [2, 3], 'b': [3]} (d = 9); returns (params, L, ∇L)."""
  rng = np.random.default_rng(0)
  m = rng.normal(size=(9, 9))
  a = jnp.asarray(m @ m.T / 9 + np.eye(9), jnp.float32)
  b = jnp.asarray(rng.normal(size=9), jnp.float32)
  params = {"a": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
  flat = lambda p: jnp.concatenate([p["a"].ravel(), p["b"]])
  loss = lambda p: (0.5 * flat(p) @ a @ flat(p) + b @ flat(p), {})
  return params, loss, np.asarray(a @ flat(params) + b), flat


@pytest.mark.parametrize("n", [1, 4])
def test_spsa_estimate_is_unbiased_with_the_predicted_variance(n):
  # For a quadratic the central difference is exact: g = zᵀ∇L, so the estimate ĝ = g z has
  # E[ĝ] = E[z zᵀ]∇L = ∇L and, per coordinate, Var = (∇L_i² + ||∇L||²)/n (Gaussian 4th moment).
  # With N draws the mean is within 5 standard errors per coordinate (false alarm ~1e-5 over
  # all 18 coordinates), and the total variance within 10% (its sampling error here is ~3%).
  params, loss, grad, flat = _quadratic()
  rule = zo.MeZO(1.0, eps=1e-2, num_perturbations=n, freeze_embeddings=False)
  num = 20_000
  keys = jax.random.split(jax.random.PRNGKey(1), num)
  step = jnp.int32(0)
  est = jax.jit(jax.vmap(lambda k: flat(params) - flat(rule.update(loss, params, {}, k, step)[0])))
  est = np.asarray(est(keys), np.float64)
  var = (grad ** 2 + np.sum(grad ** 2)) / n
  np.testing.assert_array_less(np.abs(est.mean(0) - grad), 5 * np.sqrt(var / num))
  assert est.var(0).sum() == pytest.approx(var.sum(), rel=0.10)


@pytest.mark.usefixtures("xla_optimized")  # bits of normal noise inside and outside a fusion
def test_noise_is_regenerated_bit_exactly_and_restore_is_within_rounding():
  params, loss, _, _ = _quadratic()
  key = jax.random.PRNGKey(3)
  everything = lambda names: True
  # Same key -> identical z, whether drawn all at once or leaf by leaf inside `perturb`.
  z = zo.leaf_noise(params, key)
  z_inside = jax.jit(lambda p: zo.map_noise(lambda names, v, z: z, p, key, everything))(params)
  z_again = jax.jit(lambda p: zo.leaf_noise(p, key))(params)
  for name in params:
    np.testing.assert_array_equal(z[name], z_again[name])
    np.testing.assert_array_equal(z_inside[name], z[name])
  assert not np.array_equal(z["b"], zo.leaf_noise(params, jax.random.PRNGKey(4))["b"])
  eps = 1e-3

  @jax.jit
  def there_and_back(p):
    p = zo.perturb(p, key, eps, everything)
    p = zo.perturb(p, key, -2 * eps, everything)
    return zo.perturb(p, key, eps, everything)

  back = there_and_back(params)
  for name, theta in params.items():
    step = np.abs(np.float32(eps) * np.asarray(z[name]))
    # Restored to float rounding, not bit-exactly: three roundings, each <= half an ulp of a
    # value bounded by |θ| + 2|εz|.
    bound = 3 * F32_HALF_ULP * (np.abs(theta) + 2 * step)
    np.testing.assert_array_less(np.abs(np.asarray(back[name]) - theta), bound + 1e-30)

  # The update reuses the perturbation's z: θ' = θ - lr·g·z (to rounding).
  lr = 0.1
  rule = zo.MeZO(lr, eps=eps, freeze_embeddings=False)
  new, _, m = jax.jit(lambda p: rule.update(loss, p, {}, key, jnp.int32(0)))(params)
  g = float(m["projected_grad"])
  assert g != 0.0 and float(m["learning_rate"]) == pytest.approx(lr)
  assert float(m["loss"]) == pytest.approx((float(m["loss_plus"]) + float(m["loss_minus"])) / 2)
  z0 = zo.leaf_noise(params, jax.random.fold_in(key, 0))  # perturbation j = 0
  for name, theta in params.items():
    zj = np.asarray(z0[name])
    expected = np.asarray(theta) - lr * g * zj
    bound = 5 * F32_HALF_ULP * (np.abs(theta) + 2 * eps * np.abs(zj) + np.abs(lr * g * zj))
    np.testing.assert_array_less(np.abs(np.asarray(new[name]) - expected), bound + 1e-30)


# --------------------------------------------------------------------- convergence on a toy


def _toy():
  """A 1-hidden-layer regression net on embedded ids with a teacher near the initial weights."""
  ks = jax.random.split(jax.random.PRNGKey(0), 6)

  def init(k):
    return {"embed": {"embedding": jax.random.normal(k[0], (10, 4))},
            "hidden": {"kernel": jax.random.normal(k[1], (4, 8)) / 2, "bias": jnp.zeros(8)},
            "out": {"kernel": jax.random.normal(k[2], (8, 1)) / 3}}

  def apply(p, ids):
    h = jnp.tanh(p["embed"]["embedding"][ids] @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return (h @ p["out"]["kernel"])[:, 0]

  theta0 = init(ks[:3])
  teacher = jax.tree_util.tree_map(lambda x, d: x + 0.5 * d, theta0, init(ks[3:]))
  ids = jax.random.randint(jax.random.PRNGKey(2), (64,), 0, 10)
  y = apply(teacher, ids)
  return theta0, lambda p: (jnp.mean((apply(p, ids) - y) ** 2), {"mse": 0.0})


@functools.lru_cache(maxsize=None)
def _toy_run(rule_name: str, steps: int = 200):
  theta0, loss_fn = _toy()
  if rule_name == "mezo":
    rule = zo.MeZO(0.05)
  else:
    rule = dizo_lib.DiZO(0.05, interval=25, iterations=5,
                   targets=lambda names: names == ("hidden", "kernel"))

  def body(carry, s):
    p, rs = carry
    p, rs, m = rule.update(loss_fn, p, rs, jax.random.fold_in(jax.random.PRNGKey(3), s), s)
    return (p, rs), m

  run = jax.jit(lambda p: jax.lax.scan(body, (p, rule.init(p)), jnp.arange(steps)))
  (params, _), metrics = run(theta0)
  return theta0, loss_fn, params, jax.tree_util.tree_map(np.asarray, metrics)


@pytest.mark.parametrize("rule_name", ["mezo", "dizo"])
def test_rule_reduces_the_loss_and_keeps_frozen_leaves(rule_name):
  theta0, loss_fn, params, metrics = _toy_run(rule_name)
  before, after = float(loss_fn(theta0)[0]), float(loss_fn(params)[0])
  print(f"{rule_name}: toy loss {before:.4f} -> {after:.5f} in 200 steps")
  assert after < 0.25 * before
  assert metrics["loss"][-20:].mean() < 0.25 * metrics["loss"][:20].mean()
  # The token embedding is frozen by default: never perturbed, never updated.
  np.testing.assert_array_equal(params["embed"]["embedding"], theta0["embed"]["embedding"])
  assert not np.array_equal(params["hidden"]["kernel"], theta0["hidden"]["kernel"])
  if rule_name == "dizo":  # projections after steps 24, 49, ...: exactly 8 in 200 steps
    projected = metrics["projected"] > 0
    assert projected.sum() == 8 and projected[24] and projected[49]
    assert np.all(metrics["projection_ratio_min"][projected] >= 0.8 - 1e-6)
    assert np.all(metrics["projection_ratio_max"][projected] <= 1.2 + 1e-6)


# ------------------------------------------------------------------------- DiZO projection


def _stacked_model():
  """Stacked attention kernels [3 layers, 4, 2] plus an unstacked head; θ = θ0 + Δ where the
  value kernel's layer 2 has not moved (Δ = 0)."""
  rng = np.random.default_rng(5)
  shape = (3, 4, 2)
  theta0 = {"layers": {"attn": {n: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)}
                                for n in ("query", "key", "value")}},
            "head": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}
  delta = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, jnp.float32), theta0)
  delta["layers"]["attn"]["value"]["kernel"] = delta["layers"]["attn"]["value"]["kernel"].at[2].set(0)
  params = jax.tree_util.tree_map(lambda a, b: a + b, theta0, delta)
  # Prefers the midpoint between θ0 and θ: a good γ shrinks every distance. (Scaled so that the
  # γ steps of the default step size are small, as for a language-model loss in nats.)
  target = jax.tree_util.tree_map(lambda a, b: a + 0.5 * b, theta0, delta)
  loss_fn = lambda p: (0.01 * sum(jnp.sum((x - t) ** 2) for x, t in zip(
      jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(target))), {})
  return theta0, params, loss_fn


def _layer_dist(a, b):
  return np.sqrt(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, (1, 2)))


def test_projection_sets_each_layer_distance_to_gamma_within_the_clip():
  theta0, params, loss_fn = _stacked_model()
  tau = 0.2
  rule = dizo_lib.DiZO(1e-3, tau=tau, freeze_embeddings=False)
  state = rule.init(theta0)
  assert set(state["theta0"]["layers"]["attn"]) == {"key", "value"}  # default: K and V kernels
  gamma, norms, losses = jax.jit(lambda p: dizo_lib.search_gamma(
      loss_fn, p, state["theta0"], jax.random.PRNGKey(7), tau=tau))(params)
  projected = dizo_lib.apply_projection(params, state["theta0"], gamma)
  for name in ("key", "value"):
    t0 = theta0["layers"]["attn"][name]["kernel"]
    before = params["layers"]["attn"][name]["kernel"]
    after = projected["layers"]["attn"][name]["kernel"]
    g = np.asarray(gamma["layers"]["attn"][name]["kernel"])
    t = np.asarray(norms["layers"]["attn"][name]["kernel"])
    assert g.shape == (3,)  # one γ per layer slice
    np.testing.assert_allclose(t, _layer_dist(before, t0), rtol=1e-5)
    assert np.all(g >= (1 - tau) * t - 1e-6) and np.all(g <= (1 + tau) * t + 1e-6)
    np.testing.assert_allclose(_layer_dist(after, t0), g, rtol=1e-5, atol=1e-7)
    ratio = np.where(t > 0, g / np.where(t > 0, t, 1), 1.0)
    np.testing.assert_allclose(np.asarray(after) - t0, ratio[:, None, None] * (before - t0),
                               rtol=1e-5, atol=1e-6)  # same direction, scaled by γ/||Δ||
  # The layer that had not moved stays exactly at θ0 (no 0/0).
  np.testing.assert_array_equal(projected["layers"]["attn"]["value"]["kernel"][2],
                                theta0["layers"]["attn"]["value"]["kernel"][2])
  for untouched in (("query",), ):
    np.testing.assert_array_equal(projected["layers"]["attn"][untouched[0]]["kernel"],
                                  params["layers"]["attn"][untouched[0]]["kernel"])
  np.testing.assert_array_equal(projected["head"]["kernel"], params["head"]["kernel"])
  # The γ search descends: this loss prefers shorter distances, so the radii shrink.
  assert float(loss_fn(projected)[0]) < float(loss_fn(params)[0])
  moved = np.concatenate([np.asarray(gamma["layers"]["attn"][n]["kernel"])
                          / np.maximum(np.asarray(norms["layers"]["attn"][n]["kernel"]), 1e-30)
                          for n in ("key", "value")])[:-1]
  assert moved.mean() < 0.95, moved  # 0.85-0.92 over seeds 0-7 of the search key
  assert losses.shape == (10, 2)


def test_dizo_update_projects_only_after_every_interval_th_step():
  theta0, params, loss_fn = _stacked_model()
  interval, tau = 4, 0.2
  kwargs = dict(eps=1e-3, freeze_embeddings=False)
  rule = dizo_lib.DiZO(1e-3, interval=interval, tau=tau, **kwargs)
  state = rule.init(theta0)
  update = jax.jit(lambda p, s, k: rule.update(loss_fn, p, state, k, s))
  mezo = jax.jit(lambda p, s, k: zo.MeZO(1e-3, **kwargs).update(loss_fn, p, {}, k, s)[0])
  key = jax.random.PRNGKey(11)
  zo_key = jax.random.split(key)[0]  # DiZO's MeZO step uses the first half of split(key)
  for step in (0, 1, 2, 4):
    new, _, m = update(params, jnp.int32(step), key)
    assert float(m["projected"]) == 0.0 and float(m["projection_ratio_mean"]) == 1.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, new,
                           mezo(params, jnp.int32(step), zo_key))
  step = jnp.int32(2 * interval - 1)
  new, _, m = update(params, step, key)
  before = mezo(params, step, zo_key)
  assert float(m["projected"]) == 1.0
  ratios = np.concatenate([
      _layer_dist(new["layers"]["attn"][n]["kernel"], theta0["layers"]["attn"][n]["kernel"])
      / _layer_dist(before["layers"]["attn"][n]["kernel"], theta0["layers"]["attn"][n]["kernel"])
      for n in ("key", "value")])
  assert np.all(ratios >= 1 - tau - 1e-5) and np.all(ratios <= 1 + tau + 1e-5)
  assert float(m["projection_ratio_min"]) == pytest.approx(ratios.min(), rel=1e-5)
  assert float(m["projection_ratio_max"]) == pytest.approx(ratios.max(), rel=1e-5)
  assert float(m["projection_ratio_mean"]) == pytest.approx(ratios.mean(), rel=1e-5)
  np.testing.assert_array_equal(new["layers"]["attn"]["query"]["kernel"],
                                before["layers"]["attn"]["query"]["kernel"])


def test_dizo_refuses_a_model_without_projection_targets():
  with pytest.raises(ConfigError, match="targets"):
    dizo_lib.DiZO(1e-3).init({"dense": {"kernel": jnp.ones((2, 2))}})


# ---------------------------------------------------------------------------------- memory


def _mlp(depth: int, width: int = 512, batch: int = 16):
  """A tanh MLP of `depth` [width, width] kernels (1 MiB each at width 512), no biases."""
  ks = jax.random.split(jax.random.PRNGKey(0), depth + 1)
  params = {f"dense{i}": {"kernel": jax.random.normal(ks[i], (width, width)) / np.sqrt(width)}
            for i in range(depth)}
  x = jax.random.normal(ks[-1], (batch, width))

  def loss_fn(p):
    h = x
    for i in range(depth):
      h = jnp.tanh(h @ p[f"dense{i}"]["kernel"])
    return jnp.mean(h ** 2), {}

  return params, loss_fn


def _step_memory(rule, params, loss_fn) -> dict:
  """XLA's compiled memory analysis of one jitted, state-donating step of `rule` (bytes)."""
  def step(state, key, s):
    p, rs = state
    p, rs, m = rule.update(loss_fn, p, rs, key, s)
    return (p, rs), m

  compiled = jax.jit(step, donate_argnums=0).lower(
      (params, rule.init(params)), jax.random.PRNGKey(0), jnp.int32(0)).compile()
  mem = compiled.memory_analysis()
  out = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output")}
  out["total"] = out["temp"] + out["argument"] + out["output"]
  return out


def test_zeroth_order_step_memory_is_below_adamw_and_independent_of_leaf_count():
  params, loss_fn = _mlp(depth=3)
  first = lambda names: names == ("dense0", "kernel")
  mem = {"adamw": _step_memory(AdamWRule(1e-3), params, loss_fn),
         "mezo": _step_memory(zo.MeZO(1e-3), params, loss_fn),
         "dizo": _step_memory(dizo_lib.DiZO(1e-3, targets=first), params, loss_fn)}
  for name, m in mem.items():
    print(f"3x[512, 512] MLP, {name} step: temp {m['temp']:,} B, argument {m['argument']:,} B, "
          f"output {m['output']:,} B, total {m['total']:,} B")
  assert mem["mezo"]["total"] < mem["adamw"]["total"]
  assert mem["dizo"]["total"] < mem["adamw"]["total"]
  # No parameter-sized buffer: the noise of one leaf at a time, so three more 1 MiB kernels add
  # (almost) nothing to the temp memory (without the sequencing in zo.map_noise: 2-4 MiB each).
  deep = _step_memory(zo.MeZO(1e-3), *_mlp(depth=6))
  print(f"MeZO temp: 3 kernels {mem['mezo']['temp']:,} B, 6 kernels {deep['temp']:,} B")
  assert deep["temp"] - mem["mezo"]["temp"] < 0.5 * 2 ** 20


# ---------------------------------------------------------------------------------- config


def test_default_config_builds_both_rules():
  train = zo.default_config()
  zo.validate(train)
  train.zo.schedule = "linear"
  train.zo.num_perturbations = 2
  mezo = update_rule.zeroth_order_rule(train, 100, "mezo")
  assert type(mezo) is zo.MeZO and mezo.eps == 1e-3 and mezo.num_perturbations == 2
  assert float(mezo.lr(0)) == pytest.approx(1e-6) and float(mezo.lr(50)) == pytest.approx(5e-7)
  assert float(mezo.lr(100)) == 0.0
  assert not mezo.trainable(("embed", "embedding")) and mezo.trainable(("head", "kernel"))
  dizo = update_rule.zeroth_order_rule(train, 100, "dizo")
  assert isinstance(dizo, dizo_lib.DiZO) and (dizo.interval, dizo.iterations, dizo.tau) == (50, 10, 0.2)
  assert dizo.targets(("backbone", "layers", "attn", "attention", "key", "kernel"))
  assert not dizo.targets(("backbone", "layers", "attn", "attention", "query", "kernel"))
  with pytest.raises(ConfigError, match="'mezo' or 'dizo'"):
    update_rule.zeroth_order_rule(train, 100, "sgd")


@pytest.mark.parametrize("section,field,value", [
    ("zo", "learning_rate", -1e-6), ("zo", "eps", 0.0), ("zo", "num_perturbations", 0),
    ("zo", "weight_decay", -0.1), ("zo", "schedule", "cosine"), ("dizo", "interval", 0),
    ("dizo", "iterations", 0), ("dizo", "eps_p", 0.0), ("dizo", "step_size", -2.0),
    ("dizo", "tau", 1.0), ("dizo", "targets", "qkv")])
def test_validate_names_the_bad_field(section, field, value):
  train = zo.default_config()
  train[section][field] = value
  with pytest.raises(ConfigError, match=f"config.train.{section}.{field}="):
    zo.validate(train)
