"""The (`data`, `fsdp`) mesh and the FSDP sharding rules (bdiff_jax/runtime/sharding.py).

Fast unit tests of the rules in-process; the multi-device checks run in fresh processes with 8
simulated CPU devices (`--xla_force_host_platform_device_count=8`): a sharded train step equals
the replicated one (reversible backbone with the recompute backward and dropout, AdamW; MeZO),
the per-device argument bytes of the compiled step fall by the sharding factor, and a checkpoint
saved from an 8-device fsdp mesh restores in a 1-device process and continues with the losses
of the 8-device continuation.
"""

import json

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bdiff_jax.config import compat as config_compat
from bdiff_jax.config import configuration
from bdiff_jax.errors import ConfigError
from bdiff_jax.runtime import sharding
from tests import helpers


def test_leaf_spec_shards_the_largest_divisible_dimension():
  assert sharding.leaf_spec((2, 32, 64), 8) == P(None, None, "fsdp")
  assert sharding.leaf_spec((51, 32), 8) == P(None, "fsdp")  # 51 is not divisible by 8
  assert sharding.leaf_spec((64, 64), 4) == P("fsdp")  # ties: the first axis
  assert sharding.leaf_spec((3, 5), 2) == P()  # nothing divisible: replicated
  assert sharding.leaf_spec((64,), 8) == P()  # vectors and scalars are replicated
  assert sharding.leaf_spec((), 8) == P()
  assert sharding.leaf_spec((64, 64), 1) == P()


def test_mesh_shape_fills_data_and_refuses_bad_sizes():
  assert sharding.mesh_shape(-1, 1, 8) == (8, 1)
  assert sharding.mesh_shape(-1, 4, 8) == (2, 4)
  assert sharding.mesh_shape(2, 4, 8) == (2, 4)
  with pytest.raises(ConfigError, match="mesh.fsdp=3"):
    sharding.mesh_shape(-1, 3, 8)
  with pytest.raises(ConfigError, match="mesh.data=4"):
    sharding.mesh_shape(4, 4, 8)


def test_mesh_config_fields_validated_and_resumable():
  c = configuration.base_config()
  assert (c.mesh.data, c.mesh.fsdp) == (-1, 1)
  for field in ("mesh.data", "mesh.fsdp"):
    assert field in config_compat.RESUMABLE_FIELDS
  c.mesh.fsdp = 0
  with pytest.raises(ConfigError, match="mesh.fsdp"):
    configuration.validate(c)
  c.mesh.fsdp, c.mesh.data = 1, 0
  with pytest.raises(ConfigError, match="mesh.data"):
    configuration.validate(c)


def test_one_device_mesh_replicates_and_splits_rows():
  import jax  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  assert mesh.axis_names == ("data", "fsdp")
  assert sharding.local_row_range(mesh, 8) == (0, 8)
  batch = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
  np.testing.assert_array_equal(np.asarray(sharding.shard_batch(batch, mesh)), batch)


_EIGHT_DEVICES = r"""
import json, sys, tempfile
import jax, numpy as np
from bdiff_jax.runtime import checkpointing
from bdiff_jax.runtime import sharding
from bdiff_jax.train import train_state
from bdiff_jax.train import train_step
from tests import helpers

out = {"devices": jax.device_count()}

def run(rule_name, fsdp, steps, save_after=None, ckpt_dir=None):
  c = helpers.tiny_config(backbone="reversible", dropout_rate=0.1)
  c.train.update_rule = rule_name
  c.train.zo.freeze_embeddings = False
  objective, net, rule, state, _ = helpers.train_setup(c)
  mesh = sharding.make_mesh(fsdp=fsdp)
  state, shardings = sharding.place_state(state, mesh)
  step = train_step.make_train_step(objective, net, rule, ema_decay=c.train.ema_decay, mesh=mesh,
                                    state_shardings=shardings)
  batches = [np.asarray(jax.random.randint(jax.random.PRNGKey(10 + i), (8, 16), 0, 50))
             for i in range(steps)]
  compiled = step.lower(state, sharding.shard_batch(batches[0], mesh)).compile()
  losses, after_save = [], []
  for i, b in enumerate(batches):
    state, m = compiled(state, sharding.shard_batch(b, mesh))
    (after_save if save_after is not None and i >= save_after else losses).append(
        float(m["loss"]))
    if save_after is not None and i + 1 == save_after:
      with checkpointing.Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(i + 1, state, {"step": i + 1})
  shard_shapes = {jax.tree_util.keystr(k): [list(v.shape), list(v.sharding.shard_shape(v.shape))]
                  for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
  return dict(losses=losses, after_save=after_save, args=compiled.memory_analysis().argument_size_in_bytes,
              params=[np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(state.params)],
              opt=[np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(state.opt_state)],
              ema=[np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(state.ema_params)],
              shard_shapes=shard_shapes,
              state_bytes=sum(x.nbytes for x in jax.tree_util.tree_leaves(state)),
              sharded_state_bytes=sum(
                  int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                  for x in jax.tree_util.tree_leaves(state)))

def maxdiff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))
             for x, y in zip(a, b))


ckpt_dir = sys.argv[1]
for rule_name in ("adamw", "mezo"):
  steps, save_after = (4, 2) if rule_name == "adamw" else (2, None)
  rep = run(rule_name, 1, steps)
  fsdp = run(rule_name, 8, steps, save_after=save_after, ckpt_dir=ckpt_dir)
  if rule_name == "adamw":  # the checkpoint of step 2 and the 8-device continuation after it
    out["continuation"] = fsdp["after_save"]
    fsdp["losses"] += fsdp["after_save"]
  out[rule_name] = {
      "losses": [rep["losses"], fsdp["losses"]],
      "params": maxdiff(rep["params"], fsdp["params"]),
      "opt": maxdiff(rep["opt"], fsdp["opt"]) if rep["opt"] else 0.0,
      "ema": maxdiff(rep["ema"], fsdp["ema"]),
      "args": [rep["args"], fsdp["args"]],
      "state_bytes": [rep["state_bytes"], fsdp["sharded_state_bytes"]],
      "shard_shapes": fsdp["shard_shapes"]}

print(json.dumps(out))
"""

_ONE_DEVICE_RESUME = r"""
import json, sys
import jax, numpy as np
from bdiff_jax.runtime import checkpointing
from bdiff_jax.runtime import sharding
from bdiff_jax.train import train_state
from bdiff_jax.train import train_step
from tests import helpers

c = helpers.tiny_config(backbone="reversible", dropout_rate=0.1)
objective, net, rule, state, _ = helpers.train_setup(c)
mesh = sharding.make_mesh()
shardings = sharding.state_shardings(jax.eval_shape(lambda: state), mesh)
target = sharding.with_shardings(jax.eval_shape(lambda: state), shardings)
with checkpointing.Checkpointer(sys.argv[1], read_only=True) as ckpt:
  state, meta, _ = ckpt.restore("latest", target)
assert int(state.step) == 2 and meta["step"] == 2
step = train_step.make_train_step(objective, net, rule, ema_decay=c.train.ema_decay, mesh=mesh,
                                  state_shardings=shardings)
losses = []
for i in (2, 3):
  b = np.asarray(jax.random.randint(jax.random.PRNGKey(10 + i), (8, 16), 0, 50))
  state, m = step(state, sharding.shard_batch(b, mesh))
  losses.append(float(m["loss"]))
print(json.dumps({"devices": jax.device_count(), "losses": losses,
                  "leaf_devices": len(jax.tree_util.tree_leaves(state.params)[0].sharding.device_set)}))
"""


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
  ckpt_dir = str(tmp_path_factory.mktemp("fsdp_ckpt"))
  proc = helpers.run_python(
      _EIGHT_DEVICES.replace("sys.argv[1]", repr(ckpt_dir)),
      env_extra=helpers.tiny_compile_env(devices=8))
  helpers.assert_ok(proc)
  return json.loads(proc.stdout.strip().splitlines()[-1]), ckpt_dir


# float32 tolerances: sharded and replicated steps reduce in different orders (the gradient
# reduce-scatter vs all-reduce, sharded matmuls), so they agree to float32 rounding, not bits.
# Losses over 4 steps agree to 1e-5 relative. Parameters (values ~0.1, learning rate 1e-2)
# to 1e-4 absolute, 1% of one AdamW step: Adam divides by sqrt(v), so a gradient entry near zero
# turns its rounding difference into a visible, but bounded (<= lr), update difference.
LOSS_RTOL = 1e-5
STATE_ATOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["adamw", "mezo"])
def test_fsdp_step_equals_replicated_step(eight_device_run, rule):
  out = eight_device_run[0][rule]
  assert eight_device_run[0]["devices"] == 8
  print(f"{rule}: losses {out['losses']}, max |Δparams| {out['params']:.2e}, "
        f"|Δopt| {out['opt']:.2e}, |Δema| {out['ema']:.2e}")
  replicated, sharded = out["losses"]
  np.testing.assert_allclose(sharded, replicated, rtol=LOSS_RTOL)
  assert out["params"] <= STATE_ATOL and out["opt"] <= STATE_ATOL and out["ema"] <= STATE_ATOL
  # The layout really is the rule's: each device holds 1/8 of a >= 2-D leaf's largest dimension
  # divisible by 8 (e.g. [2, 32, 64] MLP kernels -> [2, 32, 8]); vectors stay whole.
  num_sharded = 0
  for name, (shape, shard) in out["shard_shapes"].items():
    spec = sharding.leaf_spec(shape, 8)
    expected = [d // 8 if i < len(spec) and spec[i] == "fsdp" else d for i, d in enumerate(shape)]
    assert shard == expected, (name, shape, shard)
    num_sharded += shard != shape
    if len(shape) >= 2 and max(shape) % 8 == 0:
      assert shard != shape, name
  assert num_sharded >= 10, out["shard_shapes"]


@pytest.mark.slow
def test_fsdp_per_device_argument_bytes_drop_by_the_sharding_factor(eight_device_run):
  out = eight_device_run[0]["adamw"]
  (rep_args, fsdp_args), (state_bytes, sharded_state_bytes) = out["args"], out["state_bytes"]
  batch_bytes = 8 * 16 * 4
  print(f"per-device argument bytes: replicated {rep_args}, fsdp=8 {fsdp_args} "
        f"(state {state_bytes} -> {sharded_state_bytes})")
  # XLA's memory analysis of the compiled step counts exactly the state shards + the batch rows.
  assert rep_args == state_bytes + batch_bytes // 8
  assert fsdp_args == sharded_state_bytes + batch_bytes // 8
  # Only vectors, scalars and the key stay whole; everything else is divided by 8.
  assert fsdp_args < rep_args / 6


@pytest.mark.slow
def test_checkpoint_from_eight_device_fsdp_mesh_resumes_on_one_device(eight_device_run):
  out, ckpt_dir = eight_device_run
  proc = helpers.run_python(_ONE_DEVICE_RESUME.replace("sys.argv[1]", repr(ckpt_dir)),
                            env_extra=helpers.tiny_compile_env())
  helpers.assert_ok(proc)
  one = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"continuation after step 2: 8-device fsdp {out['continuation']}, 1 device "
        f"{one['losses']}")
  assert one["devices"] == 1 and one["leaf_devices"] == 1
  np.testing.assert_allclose(one["losses"], out["continuation"], rtol=LOSS_RTOL)
