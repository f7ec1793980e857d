"""Tests of the reversible backbone: layout, forward = unrolled reference, exact inversion, and the
memory-light (recompute) backward = plain autodiff, also with dropout and data parallelism.

Models are tiny (D=32) and every computation is jitted once per test to keep the file fast.
"""

import functools
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.config import configuration
from bdiff_jax.diffusion import elbo
from bdiff_jax.diffusion import schedules
from bdiff_jax.models import count_params, init_params
from bdiff_jax.models.layers import AttentionSublayer, MlpSublayer, TimeEmbedding
from bdiff_jax.models.network import Network
from bdiff_jax.models.reversible import (layer_keys, reversible_stack_forward,
                                         reversible_stack_inverse, with_backward)

from tests import helpers

REPO = helpers.REPO
VOCAB = 50
LENGTH = 16
BATCH = 4
BACKWARDS = ("recompute", "autodiff")
# The programs are tiny and compile time dominates the tests: compile without LLVM optimisation.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
_jit = functools.partial(jax.jit, compiler_options=_FAST_COMPILE)


def _network(**overrides) -> Network:
  m = configuration.base_config().model
  m.backbone = "reversible"
  m.num_layers = 3
  m.emb_dim = 32
  m.num_heads = 2
  m.num_kv_heads = 2
  m.head_dim = 16
  m.mlp_dim = 64
  m.time_conditioning = "adaln"
  for k, v in overrides.items():
    m[k] = v
  return helpers.network(m, vocab_size=VOCAB, max_len=LENGTH)


def _perturb_modulation(params, key, scale=0.5):
  """Gives the zero-initialised adaLN projections random values, so that the time embedding
  really modulates F and G (and the cond cotangent is non-zero). Everything else keeps its
  training initialisation."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = []
  for i, (path, leaf) in enumerate(flat):
    if "modulation" in [getattr(p, "key", "") for p in path]:
      fan_in = leaf.shape[-2] if leaf.ndim >= 2 else 1
      noise = jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
      leaf = leaf + scale * noise / np.sqrt(fan_in)
    leaves.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, leaves)


MAX_DEPTH = 24


@functools.lru_cache(maxsize=None)
def _setup_cached(float64: bool, x64: bool):
  """Params of a MAX_DEPTH-layer network (initialising once per dtype keeps the tests fast)."""
  del x64  # part of the cache key only: arrays made with and without x64 differ
  net = _network(num_layers=MAX_DEPTH, dtype="float64" if float64 else "float32")

  @_jit
  def make(key):
    s = net.spec
    params = init_params(net, jax.random.fold_in(key, 0), seq_len=LENGTH)
    params = _perturb_modulation(params, jax.random.fold_in(key, 1))
    h = jax.random.normal(jax.random.fold_in(key, 2), (BATCH, LENGTH, s.emb_dim), s.param_dtype)
    t = jnp.linspace(0.1, 0.9, BATCH, dtype=jnp.float32)
    cond = TimeEmbedding(s).apply({"params": params["time_embedding"]}, t)
    padding = jnp.arange(LENGTH)[None, :] < jnp.array([LENGTH, LENGTH - 3, LENGTH, 5])[:, None]
    return params, h, cond, padding

  return make(jax.random.key(0))


def _setup(net: Network):
  """Training-initialised params for `net` (adaLN perturbed), a stream h [B, L, D], cond and a
  padding mask (rows 1 and 3 padded). The backbone keeps the first num_layers of MAX_DEPTH
  independently initialised layers; params do not depend on dtype (beyond float64) or dropout."""
  s = net.spec
  params, h, cond, padding = _setup_cached(s.param_dtype == jnp.float64,
                                           bool(jax.config.jax_enable_x64))
  assert s.num_layers <= MAX_DEPTH
  layers = jax.tree_util.tree_map(lambda w: w[:s.num_layers], params["backbone"]["layers"])
  params = dict(params, backbone={"layers": layers})
  return params, h, cond, padding


def _rel(a, b) -> float:
  """Relative L2 error ||a - b|| / ||b|| over all leaves of two pytrees, in float64 numpy."""
  la = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(a)]
  lb = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(b)]
  assert len(la) == len(lb) and la
  num = sum(np.sum((x - y)**2) for x, y in zip(la, lb))
  den = sum(np.sum(y**2) for y in lb)
  assert den > 0
  return float(np.sqrt(num / den))


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64)**2)
                           for x in jax.tree_util.tree_leaves(tree))))


def _unrolled_reference(params_layers, x1, x2, cond, spec, train, dropout_key, padding_mask):
  """The coupling written out with a Python loop over layers (no scan, no custom_vjp)."""
  depth = jax.tree_util.tree_leaves(params_layers)[0].shape[0]
  for layer in range(depth):
    p = jax.tree_util.tree_map(lambda w, i=layer: w[i], params_layers)
    key_f, key_g = layer_keys(dropout_key, layer)
    rngs_f = {"dropout": key_f} if key_f is not None else None
    rngs_g = {"dropout": key_g} if key_g is not None else None
    f = AttentionSublayer(spec).apply({"params": p["attn"]}, x2, cond, train=train,
                                      padding_mask=padding_mask, rngs=rngs_f)
    x1 = x1 + f.astype(x1.dtype)
    g = MlpSublayer(spec).apply({"params": p["mlp"]}, x1, cond, train=train, rngs=rngs_g)
    x2 = x2 + g.astype(x2.dtype)
  return x1, x2


def test_param_layout_and_count_equal_standard():
  shapes = {}
  for backbone in ("reversible", "standard"):
    net = _network(backbone=backbone)
    shapes[backbone] = jax.eval_shape(lambda k, n=net: init_params(n, k, seq_len=LENGTH),
                                      jax.random.key(0))
  assert shapes["reversible"] == shapes["standard"]
  assert count_params(shapes["reversible"]) == count_params(shapes["standard"])
  layers = shapes["reversible"]["backbone"]["layers"]
  assert set(layers) == {"attn", "mlp"}
  assert layers["attn"]["attention"]["query"]["kernel"].shape == (3, 32, 2, 16)
  # Layers are initialised independently (not copies of one another).
  params, _, _, _ = _setup(_network())
  q = params["backbone"]["layers"]["attn"]["attention"]["query"]["kernel"]
  assert float(jnp.max(jnp.abs(q[0] - q[1]))) > 1e-3


def test_forward_equals_unrolled_reference():
  net = _network(dropout_rate=0.2)
  params, h, cond, padding = _setup(net)
  layers = params["backbone"]["layers"]
  key = jax.random.key(7)

  @_jit
  def both(layers, a, b, c, m):
    outs = {bw: reversible_stack_forward(layers, a, b, c, spec=with_backward(net.spec, bw),
                                         train=True, dropout_key=key, padding_mask=m)
            for bw in BACKWARDS}
    outs["reference"] = _unrolled_reference(layers, a, b, c, net.spec, True, key, m)
    outs["no_dropout"] = reversible_stack_forward(layers, a, b, c, spec=net.spec, train=False,
                                                  padding_mask=m)
    return outs

  outs = both(layers, h, 0.5 * h, cond, padding)
  for bw in BACKWARDS:
    assert _rel(outs[bw], outs["reference"]) < 1e-6, bw
  assert _rel(outs["no_dropout"], outs["reference"]) > 1e-2  # dropout really was on

  # The module: both streams start as the embedding, its output is their mean.
  tokens = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, VOCAB + 1)
  t = jnp.full((BATCH,), 0.5)

  @_jit
  def module_vs_reference(params):
    _, inter = net.apply({"params": params}, tokens, t, train=False,
                         capture_intermediates=lambda mdl, _: mdl.name == "backbone")
    h0 = params["embed"]["embedding"][tokens]
    c0 = TimeEmbedding(net.spec).apply({"params": params["time_embedding"]}, t)
    r1, r2 = _unrolled_reference(params["backbone"]["layers"], h0, h0, c0, net.spec, False,
                                 None, None)
    return inter["intermediates"]["backbone"]["__call__"][0], 0.5 * (r1 + r2)

  out, ref = module_vs_reference(params)
  assert _rel(out, ref) < 1e-6


def test_padding_mask_and_dropout_keys():
  net = _network(dropout_rate=0.3)
  params, h, cond, padding = _setup(net)
  layers = params["backbone"]["layers"]
  # Garbage at padded positions of row 3 (5 real tokens) must not reach its real positions.
  h_alt = h.at[3, 5:].set(123.0)

  @_jit
  def run(a, key, mask):
    return reversible_stack_forward(layers, a, a, cond, spec=net.spec, train=key is not None,
                                    dropout_key=key, padding_mask=mask)[0]

  k1, k2 = jax.random.key(1), jax.random.key(2)
  assert _rel(run(h_alt, k1, padding)[3, :5], run(h, k1, padding)[3, :5]) < 1e-6
  assert _rel(run(h, k1, None)[3, :5], run(h, k1, padding)[3, :5]) > 1e-3  # the mask acts
  assert _rel(run(h, k1, padding), run(h, k1, padding)) == 0.0  # same key, same masks
  assert _rel(run(h, k1, padding), run(h, k2, padding)) > 1e-2
  with pytest.raises(ValueError, match="dropout_key"):
    reversible_stack_forward(layers, h, h, cond, spec=net.spec, train=True)

  # Through the module the key comes from the flax 'dropout' rng.
  tokens = jnp.ones((BATCH, LENGTH), jnp.int32)
  apply = _jit(lambda k, train: net.apply({"params": params}, tokens, jnp.full((BATCH,), 0.5),
                                             train=train, rngs={"dropout": k}),
                  static_argnums=1)
  assert _rel(apply(k1, True), apply(k1, True)) == 0.0
  assert _rel(apply(k1, True), apply(k2, True)) > 1e-3
  assert _rel(apply(k1, False), apply(k2, False)) == 0.0


def _inversion_error(net: Network, *, dropout_key=None):
  """Returns relative reconstruction error of the input streams, ||F(x2)||/||x2|| and
  ||G(x1)||/||x1|| of layer 0, and ||y - x||/||x|| of the whole stack."""
  params, h, cond, padding = _setup(net)
  layers = params["backbone"]["layers"]
  train = dropout_key is not None

  @_jit
  def go(layers, x1, x2, c):
    kw = dict(spec=net.spec, train=train, dropout_key=dropout_key, padding_mask=padding)
    y1, y2 = reversible_stack_forward(layers, x1, x2, c, **kw)
    r1, r2 = reversible_stack_inverse(layers, y1, y2, c, **kw)
    p0 = jax.tree_util.tree_map(lambda w: w[0], layers)
    f = AttentionSublayer(net.spec).apply({"params": p0["attn"]}, x2, c, train=False,
                                          padding_mask=padding)
    g = MlpSublayer(net.spec).apply({"params": p0["mlp"]}, x1, c, train=False)
    return (y1, y2), (r1, r2), f, g

  x1, x2 = h, jnp.flip(h, axis=1)  # two distinct streams
  y, r, f, g = go(layers, x1, x2, cond)
  return _rel(r, (x1, x2)), _norm(f) / _norm(x2), _norm(g) / _norm(x1), _rel(y, (x1, x2))


def test_inversion_float64():
  """Training initialisation, time conditioning, padding and dropout all on."""
  with jax.enable_x64(True):
    net = _network(dtype="float64", num_layers=8, dropout_rate=0.1)
    err, f_ratio, g_ratio, change = _inversion_error(net, dropout_key=jax.random.key(3))
  print(f"float64 inversion, 8 layers: relative error {err:.2e} "
        f"(|F|/|x| {f_ratio:.2f}, |G|/|x| {g_ratio:.2f}, |y - x|/|x| {change:.2f})")
  assert f_ratio > 0.05 and g_ratio > 0.05  # the sublayers are far from zero
  assert change > 0.5  # the stack moves the streams a lot
  assert err <= 1e-10


def test_inversion_float32_by_depth(record_property):
  errors = {}
  for depth in (4, 8, 16, 24):
    errors[depth] = _inversion_error(_network(num_layers=depth))[0]
  print("float32 inversion relative error by depth: " +
        ", ".join(f"{d}: {e:.2e}" for d, e in errors.items()))
  record_property("float32_inversion_error_by_depth", json.dumps(errors))
  assert all(e < 1e-4 for e in errors.values()), errors


def _grad_errors(dtype: str, dropout_rate: float):
  """Gradients of the real diffusion loss w.r.t. all params, recompute vs autodiff."""
  net = _network(dtype=dtype, num_layers=4, dropout_rate=dropout_rate)
  params, _, _, _ = _setup(net)
  tokens = jax.random.randint(jax.random.key(5), (BATCH, LENGTH), 0, VOCAB)
  dropout_key, noise_key = jax.random.key(6), jax.random.key(8)

  @_jit
  def grads(params):
    out = {}
    for bw in BACKWARDS:
      model = Network(with_backward(net.spec, bw))

      def loss(p, model=model):
        logits_fn = lambda z, t: model.apply({"params": p}, z, t, train=True,
                                             rngs={"dropout": dropout_key})
        return elbo.diffusion_loss(logits_fn, tokens, noise_key,
                                        schedule=schedules.linear(), mask_id=VOCAB)[0]

      out[bw] = jax.value_and_grad(loss)(params)
    return out

  out = grads(params)
  (loss_r, g_r), (loss_a, g_a) = out["recompute"], out["autodiff"]
  assert float(loss_r) == pytest.approx(float(loss_a), rel=1e-6)
  # The time embedding (which feeds cond) receives gradient through F and G of every layer.
  assert _norm(g_a["time_embedding"]) > 1e-4
  return _rel(g_r, g_a), _rel(g_r["time_embedding"], g_a["time_embedding"])


def test_diffusion_gradients_recompute_equal_autodiff_float64_dropout():
  with jax.enable_x64(True):
    err, err_time = _grad_errors("float64", 0.1)
  print(f"float64 grad rel error (dropout 0.1): all {err:.2e}, time emb {err_time:.2e}")
  assert err <= 1e-8 and err_time <= 1e-8


def test_diffusion_gradients_recompute_equal_autodiff_float32():
  err, err_time = _grad_errors("float32", 0.0)
  print(f"float32 grad rel error (no dropout): all {err:.2e}, time emb {err_time:.2e}")
  assert err <= 1e-4 and err_time <= 1e-4


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 1e-2)])
def test_stack_cotangents_with_padding(dtype, tol):
  """All four cotangents (params, both streams, cond) with a padding mask and dropout, also
  with F and G computing in bfloat16 (the streams stay float32)."""
  net = _network(dtype=dtype, num_layers=4, dropout_rate=0.1)
  params, h, cond, padding = _setup(net)
  layers = params["backbone"]["layers"]
  w = jax.random.normal(jax.random.key(10), h.shape, h.dtype)

  def objective(p, a, b, c, backward):
    y1, y2 = reversible_stack_forward(p, a, b, c, spec=with_backward(net.spec, backward),
                                      train=True, dropout_key=jax.random.key(11),
                                      padding_mask=padding)
    assert y1.dtype == jnp.float32 and y2.dtype == jnp.float32
    return jnp.sum(jnp.tanh(y1) * w) + 0.1 * jnp.sum(y2 * y2 * w)

  @_jit
  def grads(p, a, b, c):
    return {bw: jax.grad(objective, argnums=(0, 1, 2, 3))(p, a, b, c, bw) for bw in BACKWARDS}

  g = grads(layers, h, 0.5 * h, cond)
  for i, name in enumerate(("params", "x1", "x2", "cond")):
    err = _rel(g["recompute"][i], g["autodiff"][i])
    print(f"{dtype} compute: {name} cotangent rel error {err:.2e}")
    assert err <= tol, (dtype, name, err)
  assert _norm(g["recompute"][3]) > 0  # the cond cotangent is there


_DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from bdiff_jax.config import configuration
    from bdiff_jax.train import train_state
    from bdiff_jax.train import train_step
    from bdiff_jax.train import builder
    from bdiff_jax.runtime import sharding as mesh_lib
    from bdiff_jax.models import init_params
    from bdiff_jax.train.builder import build_objective
    from tests.helpers import network

    assert jax.device_count() == 4, jax.devices()
    c = configuration.base_config()
    m = c.model
    m.backbone, m.num_layers, m.emb_dim, m.num_heads, m.num_kv_heads = "reversible", 3, 32, 2, 2
    m.head_dim, m.mlp_dim, m.dropout_rate, m.dtype = 16, 64, 0.1, "float64"
    c.train.batch_size, c.train.warmup_steps, c.train.learning_rate = 8, 0, 1e-2
    mesh = mesh_lib.make_mesh()
    objective = build_objective(c, mask_id=50)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tokens = np.random.default_rng(0).integers(0, 50, size=(2, 8, 16)).astype(np.int32)
    nets = {}
    for backward in ("recompute", "autodiff"):
      m.reversible_backward = backward
      nets[backward] = network(m, vocab_size=50, max_len=16)
    params = jax.jit(lambda k: init_params(nets["recompute"], k, seq_len=16))(jax.random.key(0))
    opt = builder.build_update_rule(c.train)
    rng = jax.random.key_data(jax.random.key(1))

    # Gradients of the trainer's loss (the diffusion ELBO) with the batch sharded over 4 devices.
    grads = jax.jit(lambda p, b, k: {bw: jax.grad(lambda q: train_step.loss_fn(q, objective, n, b, k)[0])(p)
                                     for bw, n in nets.items()},
                    in_shardings=(replicated, sharded, replicated))
    batch0 = mesh_lib.shard_batch(tokens[0], mesh)
    assert len(batch0.sharding.device_set) == 4
    g = grads(jax.device_put(params, mesh_lib.replicated(mesh)), batch0, rng)

    # Two steps of the real data-parallel train step.
    states, losses = {}, {}
    for backward, net in nets.items():
      fresh = jax.tree_util.tree_map(jnp.copy, (params, rng))  # the step donates its state
      state = jax.device_put(train_state.create_train_state(*fresh[:1], opt, fresh[1]),
                             mesh_lib.replicated(mesh))
      step = train_step.make_train_step(objective, net, opt, ema_decay=c.train.ema_decay,
                                        mesh=mesh)
      losses[backward] = []
      for i in range(2):
        state, metrics = step(state, mesh_lib.shard_batch(tokens[i], mesh))
        losses[backward].append(float(metrics["loss"]))
      states[backward] = state.params

    def rel(a, b):
      la = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(a)]
      lb = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(b)]
      return float(np.sqrt(sum(np.sum((x - y)**2) for x, y in zip(la, lb)) /
                           sum(np.sum(y**2) for y in lb)))
    moved = rel(states["recompute"], params)
    print(json.dumps({"grad": rel(g["recompute"], g["autodiff"]),
                      "params": rel(states["recompute"], states["autodiff"]), "moved": moved,
                      "losses": losses, "devices": jax.device_count()}))
""")


@pytest.mark.slow
def test_data_parallel_train_step_recompute_equals_autodiff():
  """float64, dropout on, batch sharded over a 4-device mesh (fresh process for the flags)."""
  env = helpers.subprocess_env(**helpers.tiny_compile_env(devices=4, JAX_ENABLE_X64="1"))
  proc = subprocess.run([sys.executable, "-c", _DATA_PARALLEL_SCRIPT], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"4-device data-parallel (float64): grad rel error {out['grad']:.2e}, params after 2 "
        f"steps {out['params']:.2e} (moved {out['moved']:.2e}), losses {out['losses']}")
  assert out["devices"] == 4
  assert out["grad"] <= 1e-8
  assert out["moved"] > 1e-4  # the steps really changed the params ...
  assert out["params"] <= 1e-8  # ... identically
  np.testing.assert_allclose(out["losses"]["recompute"], out["losses"]["autodiff"], rtol=1e-6)
