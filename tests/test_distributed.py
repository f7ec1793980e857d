"""Multi-process training on JAX's distributed runtime (bdiff_jax/runtime/distributed.py).

Two real processes on localhost (CPU collectives: gloo, jax 0.10.2's default), 2 simulated CPU
devices each, one (data=2, fsdp=2) mesh over the 4 devices: each process reads only its rows of
the global batch, the processes train 4 steps and save the step-2 checkpoint together (orbax,
collective). One process with 4 devices and the same global batches must see the same losses, and
restoring the 2-process checkpoint on 1 process must continue with the 2-process losses.
"""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from bdiff_jax.errors import ConfigError
from bdiff_jax.runtime import distributed
from tests import helpers


def test_initialize_arguments_from_the_environment():
  assert distributed.initialize_arguments({}) is None
  assert distributed.initialize_arguments({"BDIFF_DISTRIBUTED": "on"}) == {}
  assert distributed.initialize_arguments({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == {}
  assert distributed.initialize_arguments({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.initialize_arguments({"TPU_WORKER_HOSTNAMES": "a,b"}) == {}
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.initialize_arguments(env) == {
      "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  assert distributed.initialize_arguments(dict(env, BDIFF_DISTRIBUTED="off")) is None
  with pytest.raises(ConfigError, match="JAX_PROCESS_ID=2"):
    distributed.initialize_arguments(dict(env, JAX_PROCESS_ID="2"))
  with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES"):
    distributed.initialize_arguments({"JAX_COORDINATOR_ADDRESS": "h:1"})
  with pytest.raises(ConfigError, match="BDIFF_DISTRIBUTED"):
    distributed.initialize_arguments({"BDIFF_DISTRIBUTED": "yes"})


_TRAIN = r"""
import json, os, sys
from bdiff_jax.runtime import distributed
started = distributed.initialize()
import jax, numpy as np
from bdiff_jax.runtime import checkpointing
from bdiff_jax.runtime import sharding
from bdiff_jax.train import train_step
from tests import helpers

ckpt_dir, mode = sys.argv[1], sys.argv[2]
c = helpers.tiny_config(dropout_rate=0.1)  # the reversible backbone: test_sharding.py
objective, net, rule, state, _ = helpers.train_setup(c)
mesh = sharding.make_mesh(fsdp=2)
abstract = jax.eval_shape(lambda: state)
shardings = sharding.state_shardings(abstract, mesh)
state = jax.device_put(state, shardings)
step = train_step.make_train_step(objective, net, rule, ema_decay=c.train.ema_decay, mesh=mesh,
                                  state_shardings=shardings)
global_batches = [np.asarray(jax.random.randint(jax.random.PRNGKey(10 + i), (8, 16), 0, 50))
                  for i in range(4)]
read = []

def batch(i):
  def rows(start, stop):
    read.append([start, stop])
    return global_batches[i][start:stop]
  return sharding.global_batch(mesh, (8, 16), rows)

def train(state, steps, save_at=None):
  losses = []
  for i in steps:
    state, m = step(state, batch(i))
    losses.append(float(m["loss"]))
    if i + 1 == save_at:
      with checkpointing.Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(i + 1, state, {"step": i + 1})
  return state, losses

out = {"started": started, "processes": jax.process_count(), "devices": jax.device_count(),
       "index": jax.process_index()}
if mode == "train":
  state, out["losses"] = train(state, range(4), save_at=2)
else:  # one process: the same 4 steps, then resume the 2-process checkpoint of step 2
  _, out["losses"] = train(state, range(4))
  with checkpointing.Checkpointer(ckpt_dir, read_only=True) as ckpt:
    restored, meta, _ = ckpt.restore("latest", sharding.with_shardings(abstract, shardings))
  out["restored_step"] = int(restored.step)
  _, out["resumed"] = train(restored, range(2, 4))
out["read"] = read
print("RESULT " + json.dumps(out), flush=True)
if started:
  jax.distributed.shutdown()
"""


# Compiling is most of this test's time (three processes): all of them compile alike, fast
# (helpers.tiny_compile_env).


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _result(stdout: str) -> dict:
  lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, stdout
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(tmp_path):
  ckpt_dir = str(tmp_path / "ckpt")
  address = f"localhost:{_free_port()}"
  procs = []
  for index in range(2):
    env = helpers.subprocess_env(
        **helpers.tiny_compile_env(devices=2), JAX_COORDINATOR_ADDRESS=address,
        JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=index)
    procs.append(subprocess.Popen([sys.executable, "-c", _TRAIN, ckpt_dir, "train"],
                                  cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, stderr[-3000:]
    outs.append(_result(stdout))
  one = helpers.run_python(_TRAIN.replace("sys.argv[1], sys.argv[2]", f"{ckpt_dir!r}, 'one'"),
                           env_extra=helpers.tiny_compile_env(devices=4))
  helpers.assert_ok(one)
  single = _result(one.stdout)
  print(f"2 processes: losses {outs[0]['losses']}; 1 process: {single['losses']}; resumed "
        f"from the 2-process step-2 checkpoint: {single['resumed']}")
  assert [o["processes"] for o in outs] == [2, 2] and [o["index"] for o in outs] == [0, 1]
  assert all(o["devices"] == 4 for o in outs) and single["devices"] == 4
  assert single["processes"] == 1 and not single["started"]
  # Each process read only its half of every global batch (rows 0-3 and 4-7).
  assert outs[0]["read"] == [[0, 4]] * 4 and outs[1]["read"] == [[4, 8]] * 4
  assert single["read"][:4] == [[0, 8]] * 4
  # Both processes see the same (replicated) losses, equal to the one-process run's.
  assert outs[0]["losses"] == outs[1]["losses"]
  np.testing.assert_allclose(outs[0]["losses"], single["losses"], rtol=1e-5)
  assert single["restored_step"] == 2
  np.testing.assert_allclose(single["resumed"], outs[0]["losses"][2:], rtol=1e-5)
