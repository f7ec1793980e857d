"""Train step: optimizer/EMA behaviour, determinism, and data parallelism over 4 CPU devices."""

import subprocess
import sys
import textwrap
import types

import jax
import ml_collections
import numpy as np
import pytest

from bdiff_jax.optim import update_rule
from bdiff_jax.runtime import sharding as mesh_lib
from bdiff_jax.train import builder
from bdiff_jax.train import experiment
from bdiff_jax.train import train_state
from bdiff_jax.train import train_step
from tests import helpers

tiny_config = helpers.tiny_config
REPO = helpers.REPO


def setup(c, vocab=50):
  """(objective, network, update rule, state, batch); see helpers.train_setup."""
  return helpers.train_setup(c, vocab)


def make_step(c, objective, net, rule, mesh=None):
  return train_step.make_train_step(objective, net, rule, ema_decay=c.train.ema_decay, mesh=mesh)


@pytest.fixture(scope="module")
def dropout_step():
  """(config, the jitted train step) of the tiny model with dropout 0.1: compiled once for the
  tests below, each of which starts from its own freshly initialised state."""
  c = tiny_config(dropout_rate=0.1)
  obj, net, opt, _, _ = setup(c)
  return c, make_step(c, obj, net, opt)


def test_step_learns_and_tracks_ema(dropout_step):
  c, step = dropout_step
  _, _, _, state, batch = setup(c)
  p0 = jax.tree_util.tree_map(np.array, state.params)
  losses = []
  for _ in range(15):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert int(state.step) == 15
  assert np.mean(losses[-3:]) < np.mean(losses[:3])  # fits the fixed batch
  # EMA lies between the initial and the current params (decay 0.9 over 15 steps).
  leaf = lambda t: jax.tree_util.tree_leaves(t)[0]
  e, p, i = map(np.asarray, (leaf(state.ema_params), leaf(state.params), leaf(p0)))
  assert not np.allclose(e, p) and not np.allclose(e, i)


def test_step_is_deterministic(dropout_step):
  # Two runs from two separately built initial states: the same losses and parameters, bits
  # included (dropout masks come from the state's key, nothing from global state).
  c, step = dropout_step
  out = []
  for _ in range(2):
    _, _, _, state, batch = setup(c)
    for _ in range(3):
      state, m = step(state, batch)
    out.append((float(m["loss"]), np.asarray(jax.tree_util.tree_leaves(state.params)[0])))
  assert out[0][0] == out[1][0]
  np.testing.assert_array_equal(out[0][1], out[1][1])


def test_learning_rate_schedule_warmup_and_decay():
  c = tiny_config()
  sched = update_rule.learning_rate_schedule(c.train)
  assert float(sched(0)) == 0.0
  assert float(sched(2)) == pytest.approx(c.train.learning_rate)
  assert float(sched(20)) == pytest.approx(c.train.learning_rate *
                                           c.train.end_learning_rate_fraction, rel=1e-4)


def test_indivisible_batch_is_a_config_error():
  from bdiff_jax.errors import ConfigError
  mesh = mesh_lib.make_mesh()
  if mesh.devices.size == 1:
    mesh_lib.check_batch_divisible(7, mesh)  # one device: anything goes
  with pytest.raises(ConfigError):
    mesh_lib.check_batch_divisible(7, mesh_lib.make_mesh(devices=jax.devices() * 2))


_DP_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from tests.test_train import tiny_config, setup, make_step
    from bdiff_jax.runtime import sharding as mesh_lib
    assert jax.local_device_count() == 4, jax.devices()
    results = {}
    for backbone in ("standard", "reversible"):
      c = tiny_config(backbone=backbone, dropout_rate=0.1)
      per_mesh = []
      for devices in (jax.devices()[:1], jax.devices()):
        obj, net, opt, state, batch = setup(c)
        mesh = mesh_lib.make_mesh(devices=devices)
        step = make_step(c, obj, net, opt, mesh)
        state = jax.device_put(state, mesh_lib.replicated(mesh))
        losses = []
        for _ in range(3):
          state, m = step(state, mesh_lib.shard_batch(batch, mesh))
          losses.append(float(m["loss"]))
        sharding = state.params["embed"]["embedding"].sharding
        per_mesh.append((losses, jax.device_get(state.params), len(sharding.device_set)))
      (l1, p1, n1), (l4, p4, n4) = per_mesh
      assert (n1, n4) == (1, 4), (n1, n4)
      np.testing.assert_allclose(l1, l4, rtol=2e-5)
      # Adam divides by sqrt(v): near-zero gradients amplify reduction-order differences, so
      # params agree to ~1e-5 absolute (updates here are ~1e-2); the losses agree tightly.
      for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
      print(backbone, "ok", l1, l4)
""")


@pytest.mark.slow
def test_data_parallel_over_four_devices_matches_one():
  # Tiny models: compiling dominates, so compile without most XLA optimisations.
  env = helpers.subprocess_env(**helpers.tiny_compile_env(devices=4))
  proc = subprocess.run([sys.executable, "-c", _DP_SCRIPT], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "standard ok" in proc.stdout and "reversible ok" in proc.stdout


@pytest.mark.parametrize("rule", ["mezo", pytest.param("dizo", marks=pytest.mark.slow)])
def test_zeroth_order_rules_plug_into_the_train_step(rule):
  """The update-rule seam: the same step function, a rule that takes the loss, not gradients."""
  c = tiny_config()
  c.train.update_rule = rule
  c.train.zo.learning_rate = 1e-3
  c.train.dizo.interval = 2
  c.train.ema_decay = 0.0
  obj, net, opt, state, batch = setup(c)
  assert opt.name == rule
  embed0 = np.array(state.params["embed"]["embedding"])
  others0 = [np.array(x) for x in jax.tree_util.tree_leaves(state.params["backbone"])]
  step = make_step(c, obj, net, opt)
  for _ in range(2):
    state, m = step(state, batch)
  assert np.isfinite(float(m["loss"])) and "projected_grad" in m and "grad_norm" not in m
  np.testing.assert_array_equal(np.array(state.params["embed"]["embedding"]), embed0)  # frozen
  moved = [np.abs(np.array(a) - b).max() for a, b in
           zip(jax.tree_util.tree_leaves(state.params["backbone"]), others0)]
  assert max(moved) > 0
  if rule == "dizo":
    assert float(m["projected"]) == 1.0  # step 1 = interval - 1: the projection ran


def test_remat_gives_the_same_loss_and_gradients_with_less_memory():
  """model.remat (standard backbone): the same loss and gradients, fewer temporary bytes."""
  from bdiff_jax import models
  from bdiff_jax.benchmarks import step_memory
  from bdiff_jax.errors import ConfigError
  c = tiny_config(dropout_rate=0.1)
  c.model.num_layers = 4
  r = tiny_config(dropout_rate=0.1, remat=True)
  r.model.num_layers = 4
  obj, net, _, state, batch = setup(c)
  _, rnet, _, _, _ = setup(r)
  assert rnet.spec.remat and not net.spec.remat

  def loss_and_grads(network):
    def loss(p):
      return obj.loss(models.bind(network, p, train=True, dropout_key=jax.random.key(5)),
                      jax.numpy.asarray(batch), jax.random.key(6))[0]
    return jax.jit(jax.value_and_grad(loss))(state.params)

  (l0, g0), (l1, g1) = loss_and_grads(net), loss_and_grads(rnet)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # A longer sequence, so that activations dominate: the compiled step keeps fewer of them.
  for cfg in (c, r):
    cfg.data.seq_len, cfg.train.batch_size = 64, 16
  plain, remat = (step_memory.compile_train_step(cfg, 50).stats["temp_bytes"] for cfg in (c, r))
  assert remat < 0.8 * plain, (remat, plain)
  with pytest.raises(ConfigError, match="remat"):
    tiny_config(backbone="reversible", remat=True)


def test_a_saved_model_config_without_remat_still_builds():
  """The config.json of a workdir trained before model.remat existed: the default (off)."""
  c = tiny_config()
  saved = c.model.to_dict()
  del saved["remat"]
  spec = builder.model_spec(ml_collections.ConfigDict(saved), vocab_size=50, max_len=16,
                             causal=False)
  assert spec.remat is False and spec.num_layers == c.model.num_layers


def test_abstract_state_is_traced_once_per_network_and_update_rule(monkeypatch):
  """Experiment.abstract_state: a train run asks for it several times (the shardings, the model
  report, restoring); it is traced once, and again after the update rule is replaced (as the
  wall-clock fit does), always with the shapes a fresh `jax.eval_shape` gives."""
  c = tiny_config()
  vocab = 50
  objective, net, rule, _, _ = setup(c, vocab)
  splits = types.SimpleNamespace(train=np.arange(400, dtype=np.int32) % vocab)
  exp = experiment.Experiment(config=c, workdir="", splits=splits, objective=objective,
                              network=net, update_rule=rule, evaluator=None)
  shapes = lambda tree: [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(tree)]
  fresh = shapes(jax.eval_shape(exp._init_state))  # pylint: disable=protected-access
  traces = []
  original = train_state.init_train_state
  monkeypatch.setattr(train_state, "init_train_state",
                      lambda *a, **k: traces.append(1) or original(*a, **k))
  first = exp.abstract_state()
  assert exp.abstract_state() is first and exp.num_params() > 0 and len(traces) == 1
  assert shapes(first) == fresh
  exp.update_rule = builder.build_update_rule(c.train)
  again = exp.abstract_state()
  assert again is not first and len(traces) == 2 and shapes(again) == fresh
