"""Zeroth-order update rules (MeZO, DiZO): estimator maths, noise regeneration, convergence on a
toy problem, DiZO's projection, compiled memory against a first-order AdamW step, and config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bdiff_jax.errors import ConfigError
from bdiff_jax.optim import dizo as dizo_lib
from bdiff_jax.optim import update_rule
from bdiff_jax.optim import zeroth_order as zo
from bdiff_jax.config import rule_settings
from bdiff_jax.train import builder

F32_HALF_ULP = 2.0 ** -24  # relative rounding error of one float32 operation


class AdamWRule:
  """Reference first-order rule for the same protocol (the real one: optim/update_rule.py)."""

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


@pytest.mark.parametrize("noise", zo.NOISES)
@pytest.mark.parametrize("n", [1, 4])
def test_spsa_estimate_is_unbiased_with_the_predicted_variance(n, noise):
  # For a quadratic the central difference is exact: g = zᵀ∇L, so the estimate ĝ = g z has
  # E[ĝ] = E[z zᵀ]∇L = ∇L and, per coordinate, Var = (∇L_i² + ||∇L||²)/n for Gaussian z (its
  # 4th moment is 3), (||∇L||² - ∇L_i²)/n for Rademacher z (z_i² = 1: only the other
  # coordinates add noise). With N draws the mean is within 5 standard errors per coordinate
  # (false alarm ~1e-5 over all 18 coordinates), and the total variance within 10% (its
  # sampling error here is ~3%; the two noises' totals differ by 2||∇L||²/n, ~20%).
  params, loss, grad, flat = _quadratic()
  rule = zo.MeZO(1.0, eps=1e-2, num_perturbations=n, noise=noise, freeze_embeddings=False)
  num = 20_000
  keys = jax.random.split(jax.random.PRNGKey(1), num)
  step = jnp.int32(0)
  est = jax.jit(jax.vmap(lambda k: flat(params) - flat(rule.update(loss, params, {}, k, step)[0])))
  est = np.asarray(est(keys), np.float64)
  var = (np.sum(grad ** 2) + (grad ** 2 if noise == "gaussian" else -grad ** 2)) / n
  np.testing.assert_array_less(np.abs(est.mean(0) - grad), 5 * np.sqrt(var / num))
  assert est.var(0).sum() == pytest.approx(var.sum(), rel=0.10)


@pytest.mark.parametrize("noise", zo.NOISES)
@pytest.mark.usefixtures("xla_optimized")  # bits of normal noise inside and outside a fusion
def test_noise_is_regenerated_bit_exactly_and_restore_is_within_rounding(noise):
  params, loss, _, _ = _quadratic()
  key = jax.random.PRNGKey(3)
  everything = lambda names: True
  # Same key -> identical z, whether drawn all at once or leaf by leaf inside `perturb`.
  z = zo.leaf_noise(params, key, noise)
  z_inside = jax.jit(lambda p: zo.map_noise(lambda names, v, z: z, p, key, everything,
                                            noise))(params)
  z_again = jax.jit(lambda p: zo.leaf_noise(p, key, noise))(params)
  for name in params:
    np.testing.assert_array_equal(z[name], z_again[name])
    np.testing.assert_array_equal(z_inside[name], z[name])
  assert not np.array_equal(z["b"], zo.leaf_noise(params, jax.random.PRNGKey(4), noise)["b"])
  eps = 1e-3

  @jax.jit
  def there_and_back(p):
    p = zo.perturb(p, key, eps, everything, noise)
    p = zo.perturb(p, key, -2 * eps, everything, noise)
    return zo.perturb(p, key, eps, everything, noise)

  back = there_and_back(params)
  for name, theta in params.items():
    step = np.abs(np.float32(eps) * np.asarray(z[name]))
    # Restored to float rounding, not bit-exactly: three roundings, each <= half an ulp of a
    # value bounded by |θ| + 2|εz|.
    bound = 3 * F32_HALF_ULP * (np.abs(theta) + 2 * step)
    np.testing.assert_array_less(np.abs(np.asarray(back[name]) - theta), bound + 1e-30)

  # The update reuses the perturbation's z: θ' = θ - lr·g·z (to rounding).
  lr = 0.1
  rule = zo.MeZO(lr, eps=eps, noise=noise, freeze_embeddings=False)
  new, _, m = jax.jit(lambda p: rule.update(loss, p, {}, key, jnp.int32(0)))(params)
  g = float(m["projected_grad"])
  assert g != 0.0 and float(m["learning_rate"]) == pytest.approx(lr)
  assert float(m["loss"]) == pytest.approx((float(m["loss_plus"]) + float(m["loss_minus"])) / 2)
  z0 = zo.leaf_noise(params, jax.random.fold_in(key, 0), noise)  # perturbation j = 0
  for name, theta in params.items():
    zj = np.asarray(z0[name])
    expected = np.asarray(theta) - lr * g * zj
    bound = 5 * F32_HALF_ULP * (np.abs(theta) + 2 * eps * np.abs(zj) + np.abs(lr * g * zj))
    np.testing.assert_array_less(np.abs(np.asarray(new[name]) - expected), bound + 1e-30)


@pytest.mark.parametrize("shape,dtype", [((), jnp.float32), ((3, 7), jnp.float32),
                                         ((2, 33), jnp.bfloat16), ((50_000,), jnp.float32)])
def test_rademacher_noise_is_the_bits_of_the_key_as_plus_or_minus_one(shape, dtype):
  key = jax.random.PRNGKey(5)
  z = np.asarray(zo.draw_noise(key, shape, dtype, "rademacher"))
  assert z.shape == shape and z.dtype == dtype
  size = int(np.prod(shape))
  words = np.asarray(jax.random.bits(key, (-(-size // 32),), jnp.uint32))
  bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1  # entry 32 w + b: bit b of word w
  np.testing.assert_array_equal(z.astype(np.float32).ravel(),
                                2.0 * bits.ravel()[:size] - 1.0)
  if size >= 50_000:  # balanced: the mean within 5 standard errors of 0, and no pattern in
    assert abs(z.mean()) < 5 / np.sqrt(size)  # neighbours (the lag-1 correlation likewise)
    assert abs(np.mean(z[1:] * z[:-1])) < 5 / np.sqrt(size)
  with pytest.raises(ConfigError, match="unknown zeroth-order noise 'uniform'"):
    zo.draw_noise(key, shape, dtype, "uniform")


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
  train = rule_settings.default_config()
  rule_settings.validate(train)
  train.zo.schedule = "linear"
  train.zo.num_perturbations = 2
  mezo = builder.zeroth_order_rule(train, 100, "mezo")
  assert type(mezo) is zo.MeZO and mezo.eps == 1e-3 and mezo.num_perturbations == 2
  assert float(mezo.lr(0)) == pytest.approx(1e-6) and float(mezo.lr(50)) == pytest.approx(5e-7)
  assert float(mezo.lr(100)) == 0.0
  assert not mezo.trainable(("embed", "embedding")) and mezo.trainable(("head", "kernel"))
  dizo = builder.zeroth_order_rule(train, 100, "dizo")
  assert isinstance(dizo, dizo_lib.DiZO) and (dizo.interval, dizo.iterations, dizo.tau) == (50, 10, 0.2)
  assert dizo.targets(("backbone", "layers", "attn", "attention", "key", "kernel"))
  assert not dizo.targets(("backbone", "layers", "attn", "attention", "query", "kernel"))
  with pytest.raises(ConfigError, match="'mezo' or 'dizo'"):
    builder.zeroth_order_rule(train, 100, "sgd")


@pytest.mark.parametrize("section,field,value", [
    ("zo", "learning_rate", -1e-6), ("zo", "eps", 0.0), ("zo", "num_perturbations", 0),
    ("zo", "weight_decay", -0.1), ("zo", "schedule", "cosine"), ("dizo", "interval", 0),
    ("dizo", "iterations", 0), ("dizo", "eps_p", 0.0), ("dizo", "step_size", -2.0),
    ("dizo", "tau", 1.0), ("dizo", "targets", "qkv")])
def test_validate_names_the_bad_field(section, field, value):
  train = rule_settings.default_config()
  train[section][field] = value
  with pytest.raises(ConfigError, match=f"config.train.{section}.{field}="):
    rule_settings.validate(train)


# ----------------------------------------------------------- one factory, one freeze choice


def _named_params():
  """The tiny OPT fixture's parameters next to bdiff-named leaves (token embedding `embed`,
  stacked attention kernels, a bias): every kind of leaf the freeze choice distinguishes."""
  from bdiff_jax.models.hf_checkpoint import load_opt
  from tests import helpers
  _, opt = load_opt(f"{helpers.REPO}/tests/fixtures/tiny_opt")
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {"opt": opt, "embed": {"embedding": normal(12, 4)},
          "backbone": {"layers": {"attn": {"query": {"kernel": normal(2, 4, 2, 2)}}}},
          "final_norm": {"scale": normal(4)}}


def _sum_loss(params):
  return sum(jnp.mean(x * x + x) for x in jax.tree_util.tree_leaves(params)), {}


def _plain(g):
  from bdiff_jax.glue.settings import GlueSettings
  return GlueSettings.from_dict(g.to_dict())


def _glue_config(freeze_embeddings: bool):
  from tests import helpers
  g = helpers.load_config("configs/glue.py", "test").glue
  g.zo.freeze = "embeddings" if freeze_embeddings else "none"
  g.zo.learning_rate = 1e-2
  return g


def _lm_train_config(freeze_embeddings: bool):
  train = rule_settings.default_config()
  train.zo.freeze_embeddings = freeze_embeddings
  train.zo.learning_rate = 1e-2
  return train


def _embedding_leaf(names) -> bool:
  return bool({"embed", "embed_tokens", "embed_positions"} & set(names))


@pytest.mark.parametrize("factory", ["glue", "lm", "make_rule"])
@pytest.mark.parametrize("freeze", [False, True])
def test_the_freeze_choice_is_honoured_by_every_factory(factory, freeze):
  # glue.zo.freeze_embeddings=False used to freeze the token embedding anyway (MeZO's default
  # won), and the LM factory left OPT's embed_positions trainable: two factories, two sets.
  params = _named_params()
  if factory == "glue":
    from bdiff_jax.glue import rows as glue_rows
    rule = glue_rows.build_rule("mezo", _plain(_glue_config(freeze)), 10)
  elif factory == "lm":
    rule = builder.zeroth_order_rule(_lm_train_config(freeze), 10, "mezo")
  else:
    rule = update_rule.make_rule("mezo", 10, zo=update_rule.ZOSettings(learning_rate=1e-2),
                                 freeze="embeddings" if freeze else "none")
  new, _, m = jax.jit(lambda p: rule.update(_sum_loss, p, rule.init(p), jax.random.PRNGKey(0),
                                            jnp.int32(0)))(params)
  assert float(m["projected_grad"]) != 0.0
  names, before, _ = zo.flat_leaves(params)
  after = jax.tree_util.tree_leaves(new)
  assert {n[-2] for n in names if _embedding_leaf(n)} >= {"embed", "embed_tokens",
                                                          "embed_positions"}
  for nm, b, a in zip(names, before, after):
    if freeze and _embedding_leaf(nm):
      np.testing.assert_array_equal(a, b, err_msg=str(nm))  # bit-identical
    else:
      assert not np.array_equal(a, b), f"{nm} did not move"
  frozen = sum(int(np.size(b)) for nm, b in zip(names, before) if _embedding_leaf(nm))
  total = sum(int(np.size(b)) for b in before)
  assert update_rule.trainable_count(rule, params) == total - (frozen if freeze else 0)


def test_freeze_choice_of_a_config_section_and_bad_values():
  import ml_collections
  assert builder.freeze_choice(rule_settings.default_config().zo) == "embeddings"  # the LM default
  assert builder.freeze_choice(_glue_config(False).zo) == "none"
  section = ml_collections.ConfigDict(dict(freeze="none", freeze_embeddings=True))
  assert builder.freeze_choice(section) == "none"  # the explicit choice wins
  with pytest.raises(ConfigError, match="freeze='all'"):
    update_rule.make_rule("mezo", 10, freeze="all")
  with pytest.raises(ConfigError, match="peft='prefix'"):
    update_rule.make_rule("mezo", 10, peft="prefix")
  with pytest.raises(ConfigError, match="settings"):
    update_rule.make_rule("adamw", 10)


# ------------------------------------------------------------ deterministic zeroth-order losses


def test_zeroth_order_losses_are_evaluated_without_dropout():
  # MeZO evaluates L(θ ± εz) with the network in eval mode. With ε = 0 both losses are the
  # loss at θ; with dropout 0.5 that is the eval-mode loss, not a dropped-out one.
  from bdiff_jax.train import train_step
  from bdiff_jax.train.train_state import create_train_state
  from tests import helpers
  c = helpers.tiny_config(dropout_rate=0.5)
  obj, net, _, state, batch = helpers.train_setup(c)
  rule = zo.MeZO(0.0, eps=0.0, freeze_embeddings=False)
  state = create_train_state(state.params, rule, state.rng)
  loss_key = jax.random.split(jax.random.fold_in(state.rng, state.step))[0]
  evaluate = jax.jit(lambda p, train: train_step.loss_fn(p, obj, net, batch, loss_key,
                                                         train=train)[0], static_argnums=1)
  eval_loss, dropped = float(evaluate(state.params, False)), float(evaluate(state.params, True))
  assert abs(eval_loss - dropped) > 1e-3, (eval_loss, dropped)  # dropout is active in train mode
  _, m = train_step.make_train_step(obj, net, rule, ema_decay=0.0)(state, batch)
  assert float(m["loss_plus"]) == float(m["loss_minus"])
  np.testing.assert_allclose(float(m["loss_plus"]), eval_loss, rtol=1e-6)
  assert update_rule.is_deterministic(rule) and not update_rule.is_deterministic(
      builder.build_update_rule(c.train))
  assert update_rule.is_deterministic(dizo_lib.DiZO(0.0))


# -------------------------------------------------------------- DiZO: a fresh batch per γ step


def test_gamma_iteration_it_uses_batch_one_plus_it():
  theta0, params, loss_fn = _stacked_model()
  state = dizo_lib.DiZO(1e-3).init(theta0)
  offsets = jnp.asarray([100.0, 10.0, 20.0, 30.0])  # the "batches": a constant added to the loss
  fresh = lambda p, i=0: (loss_fn(p)[0] + offsets[i], {})
  search = lambda f, fb: jax.jit(lambda p: dizo_lib.search_gamma(
      f, p, state["theta0"], jax.random.PRNGKey(7), iterations=3, fresh_batches=fb))(params)
  g_fresh, _, l_fresh = search(fresh, True)
  g_same, _, l_same = search(loss_fn, False)
  # Iteration it saw batch 1 + it (never batch 0); a constant does not change the SPSA steps.
  np.testing.assert_allclose(np.asarray(l_fresh) - np.asarray(l_same),
                             np.repeat(np.asarray(offsets[1:])[:, None], 2, 1), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g_fresh), jax.tree_util.tree_leaves(g_same)):
    np.testing.assert_allclose(a, b, rtol=1e-4)


class _KV:
  """A tiny flax network with attention-named dense layers `key` and `value` (DiZO's targets)."""

  def __new__(cls):
    import flax.linen as nn

    class KV(nn.Module):
      @nn.compact
      def __call__(self, x, t=None, *, train: bool = False):
        del t, train
        h = jnp.tanh(nn.Dense(4, name="key")(x))
        return nn.Dense(1, name="value")(h)[..., 0]

    return KV()


class _Regression:
  """Objective: mean squared error of apply(batch["x"]) against batch["y"]; counts the passes."""

  def __init__(self):
    self.calls = []

  def loss(self, apply, batch, key):
    del key
    err = apply(batch["x"]) - batch["y"]
    jax.debug.callback(lambda e: self.calls.append(1), err[0])
    return jnp.mean(err ** 2), {}


def _regression_batches(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(n, 8, 3)), jnp.float32),
          "y": jnp.asarray(rng.normal(size=(n, 8)), jnp.float32)}


def test_dizo_train_step_with_fresh_batches():
  from bdiff_jax import models
  from bdiff_jax.glue import rows as glue_rows
  from bdiff_jax.train import train_step
  from bdiff_jax.train.train_state import create_train_state
  net, obj = _KV(), _Regression()
  params = models.init_params(net, jax.random.PRNGKey(0), seq_len=3)
  rule = dizo_lib.DiZO(1e-2, interval=1, iterations=2, fresh_batches=True, eps=1e-2,
                       freeze_embeddings=False)
  assert update_rule.batches_per_step(rule) == 3
  assert update_rule.batches_per_step(zo.MeZO(1e-2)) == 1
  assert update_rule.batches_per_step(dizo_lib.DiZO(1e-2, iterations=2)) == 1  # reuses batch 0
  step = train_step.make_train_step(obj, net, rule, ema_decay=0.0)
  fresh = lambda: create_train_state(jax.tree_util.tree_map(jnp.copy, params), rule,
                                     jax.random.PRNGKey(1))  # (the step donates the state)
  state = fresh()
  batch = _regression_batches(3)
  # The step of a 2-step run moves the parameters with MeZO and projects (interval 1)...
  new, m = step(state, batch)
  jax.effects_barrier()
  assert float(m["projected"]) == 1.0
  assert len(obj.calls) == glue_rows.forward_passes(rule, 1)["forward"] == 2 + 2 * 2
  # ...and γ iteration 1's batch (batch 2) changes the projection, not the MeZO step's loss.
  other = dict(batch, y=batch["y"].at[2].multiply(-3.0))
  new2, m2 = step(fresh(), other)
  assert float(m2["loss"]) == float(m["loss"])
  kernel = lambda s, n: np.asarray(s.params[n]["kernel"])
  assert not np.array_equal(kernel(new2, "value"), kernel(new, "value"))
  # Batch 1 (iteration 0) too.
  other = dict(batch, x=batch["x"].at[1].multiply(2.0))
  new3, _ = step(fresh(), other)
  assert not np.array_equal(kernel(new3, "value"), kernel(new, "value"))
  with pytest.raises(ValueError, match="3 stacked batches"):
    step(fresh(), _regression_batches(4))


def test_glue_dizo_fresh_batches_and_forward_passes():
  from bdiff_jax.glue import rows as glue_rows
  g = _glue_config(False)
  assert g.dizo.fresh_batches  # the benchmark's default, as the reference draws them
  g.dizo.fresh_batches = False
  assert update_rule.batches_per_step(glue_rows.build_rule("dizo", _plain(g), 10)) == 1
  g.dizo.fresh_batches = True
  rule = glue_rows.build_rule("dizo", _plain(g), 10)
  assert update_rule.batches_per_step(rule) == 1 + g.dizo.iterations
  fp = glue_rows.forward_passes(rule, 10)
  assert fp == {"forward": 2 * 10 + 2 * g.dizo.iterations * (10 // g.dizo.interval),
                "backward": 0}
  assert glue_rows.forward_passes(glue_rows.build_rule("adamw", _plain(g), 10), 10) == {
      "forward": 10, "backward": 10}
