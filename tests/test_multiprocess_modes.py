"""Multi-process train, eval and sample modes through main.py (bdiff_jax/runtime/distributed.py).

Two real processes on localhost (gloo collectives), one CPU device each, one (data=1, fsdp=2)
mesh over the 2 devices: the parameters are FSDP-sharded across the processes, so no process
holds the whole model and every checkpoint save is collective (tests/test_distributed.py runs
data parallelism across processes). They train a tiny smoke run together: the periodic
evaluations (and so the best checkpoint), the final full evaluation and the samples run over the
mesh with both processes taking part, and process 0 alone writes the files. The evaluation
equals a one-process `--mode=eval` of the same checkpoint (one device) up to float rounding;
`--mode=eval` and `--mode=sample` in two processes reproduce the training's evaluation and
samples exactly (the same programs). An evaluation batch that the devices do not divide is
refused in one line before the workdir exists. The evaluator and the samplers on a mesh (one
process, 4 devices, FSDP-sharded parameters) give one device's numbers and samples. Those tests
start child processes (`slow`); one fast test runs the mesh path in this process.
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from bdiff_jax.evaluation import evaluator as evaluator_lib
from bdiff_jax.models import init_params
from bdiff_jax.modes import train as train_mode
from bdiff_jax.runtime import distributed, sharding
from bdiff_jax.runtime.reporter import QUIET
from bdiff_jax.train.builder import build_objective
from bdiff_jax.train import experiment
from tests import helpers

CONFIG = "configs/wikitext2.py:smoke"
WRITES = ("results written to", "samples written to", "sample quality written to")


def _args(workdir, data_dir, tfds_dir, *extra):
  """A very small smoke run (the 2 x 32 model of helpers.NARROW_SMOKE, 8 steps, evaluations on a
  few hundred tokens) on a data=1 x fsdp=2 mesh."""
  return helpers.smoke_args(workdir, data_dir, tfds_dir,
                            *helpers.config_flags_of(helpers.NARROW_SMOKE), "--config.mesh.fsdp=2",
                            *extra, log_every=4)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(address: str, index: int) -> dict:
  """Process `index`'s environment, with the session's persistent compilation cache configured
  (conftest.py) as a user's may be: a multi-process CPU run turns it off itself
  (`distributed._no_persistent_cache_on_cpu`; with it, a two-process sample with a judge hung in
  the judge's scoring program whenever process 0 loaded that program from the cache while process
  1 compiled it; docs/scale_out.md)."""
  return helpers.subprocess_env(**helpers.tiny_compile_env(devices=1),
                                JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=2,
                                JAX_PROCESS_ID=index)


def _two_processes(args, timeout=300):
  """Runs `python main.py ARGS` as processes 0 and 1 of one run; returns their
  CompletedProcess-like (returncode, stdout, stderr) after checking both exited 0."""
  address = f"localhost:{_free_port()}"
  procs = []
  for index in range(2):
    env = _env(address, index)
    procs.append(subprocess.Popen([sys.executable, os.path.join(helpers.REPO, "main.py"), *args],
                                  cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  for out in outs:
    helpers.assert_ok(out)
  return outs


def _reports(out):
  """The lines of a process's stdout that report evaluations or written files (not the gloo
  connection notes or the data preparation line, which every process prints)."""
  return [l for l in out.stdout.splitlines()
          if l.startswith("Evaluation:") or any(w in l for w in WRITES)]


def _only_process_0_wrote(outs, writes=WRITES):
  assert all(w in outs[0].stdout for w in writes), outs[0].stdout
  assert _reports(outs[1]) == [], outs[1].stdout  # process 1 reports nothing


def _files(workdir, pattern):
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, pattern)))


def _load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, real_data_dir, shared_tfds_dir):
  """(workdir, the two processes' outputs, their eval_best.json as written by training)."""
  workdir = tmp_path_factory.mktemp("two_processes")
  outs = _two_processes(_args(workdir, real_data_dir, shared_tfds_dir))
  return workdir, outs, _load(os.path.join(workdir, "eval_best.json"))


@pytest.mark.slow
def test_two_processes_train_evaluate_and_sample(trained):
  workdir, outs, evaluation = trained
  _only_process_0_wrote(outs)
  assert "2 cpu device(s), mesh data=1 x fsdp=2" in outs[0].stdout, outs[0].stdout
  # The session's persistent compilation cache (conftest.py) was configured; the run turned it
  # off and said so once.
  assert os.environ.get("JAX_COMPILATION_CACHE_DIR")
  assert outs[0].stderr.count("note: the persistent compilation cache") == 1, outs[0].stderr
  assert "persistent compilation cache" not in outs[1].stderr
  assert "UPPER BOUNDS" in outs[0].stdout and "valid word ppl" in outs[0].stdout
  # The periodic evaluations ran (process 0 logged each once) and chose a best checkpoint.
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [r["step"] for r in records if r["kind"] == "eval"]
  assert evals == [4, 8], evals
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints_best"))
                if s.isdigit()) in ([4], [8])
  trains = [r["step"] for r in records if r["kind"] == "train"]
  assert trains == sorted(set(trains)), trains  # one writer: no record twice
  # The final evaluation, one samples file and one quality table: one writer (a second one
  # would have added samples_step8_1.txt, ...).
  assert evaluation["step"] in (4, 8) and evaluation["baselines"]
  for name in ("valid", "test"):
    r = evaluation["results"][name]
    assert r["upper_bound"] and len(r["word_ppl_per_seed"]) == 3 and 1.0 < r["word_ppl"] < 1e6
  step = evaluation["step"]
  assert _files(workdir, "samples_step*") == [f"samples_step{step}.txt"]
  assert _files(workdir, "sample_quality_step*") == [f"sample_quality_step{step}.json"]
  assert _files(workdir, "eval_*") == ["eval_best.json"]
  assert os.path.exists(os.path.join(workdir, "training_curves.png"))


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process_eval(trained, real_data_dir,
                                                        shared_tfds_dir, tmp_path):
  workdir, _, two = trained
  one_dir = tmp_path / "one"  # a copy: the one-process eval rewrites eval_best.json
  shutil.copytree(workdir, one_dir)
  proc = helpers.run_main(_args(one_dir, real_data_dir, shared_tfds_dir, "--mode=eval",
                                "--config.mesh.fsdp=1"),
                          env_extra=helpers.tiny_compile_env())
  helpers.assert_ok(proc)
  one = _load(os.path.join(one_dir, "eval_best.json"))
  assert one["step"] == two["step"] and one["checkpoint"] == two["checkpoint"]
  for name in ("valid", "test"):
    a, b = two["results"][name], one["results"][name]
    print(f"{name}: 2 processes (2-device mesh) nll/token {a['nll_per_token']!r}; "
          f"1 process (1 device) {b['nll_per_token']!r}")
    assert a["num_tokens"] == b["num_tokens"] and a["seeds"] == b["seeds"]
    np.testing.assert_allclose(a["nll_per_token"], b["nll_per_token"], rtol=1e-6)
    np.testing.assert_allclose(a["word_ppl_per_seed"], b["word_ppl_per_seed"], rtol=1e-5)


@pytest.mark.slow
def test_two_process_eval_and_sample_modes(trained, real_data_dir, shared_tfds_dir, tmp_path):
  workdir, _, after_training = trained
  step = after_training["step"]
  outs = _two_processes(_args(workdir, real_data_dir, shared_tfds_dir, "--mode=eval"))
  assert "results written to" in outs[0].stdout and _reports(outs[1]) == [], outs[1].stdout
  again = _load(os.path.join(workdir, "eval_best.json"))
  assert again["results"] == after_training["results"]  # the same program: the same numbers
  # Sampling with a judge (an autoregressive model trained in one process): its checkpoint is
  # restored onto the mesh too and scores the samples there.
  # (The judge trains in this process: what is tested is its restore and use on the mesh.)
  judge = tmp_path / "judge"
  c = helpers.load_config("configs/wikitext2.py", "smoke")
  c.update_from_flattened_dict(helpers.NARROW_SMOKE)
  c.data.data_dir, c.data.tfds_dir = real_data_dir, shared_tfds_dir
  c.model.objective, c.model.time_conditioning = "autoregressive", "none"
  c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 4, 4, 4
  c.eval.max_tokens, c.eval.during_training_max_tokens, c.eval.batch_size = 128, 128, 8
  c.eval.seeds, c.sample.num_samples, c.sample.length = (0,), 1, 8
  assert train_mode.run(c, str(judge), QUIET).evaluated
  # (Several quality step counts in one table: tests/test_sample_quality.py, in one process.)
  outs = _two_processes(_args(workdir, real_data_dir, shared_tfds_dir, "--mode=sample",
                              f"--config.sample.judge_workdir={judge}"))
  _only_process_0_wrote(outs, WRITES[1:])
  assert _files(workdir, "samples_step*") == [f"samples_step{step}.txt",
                                              f"samples_step{step}_1.txt"]
  first, second = (open(os.path.join(workdir, f)).read().split("\n", 1)[1]
                   for f in (f"samples_step{step}.txt", f"samples_step{step}_1.txt"))
  assert first == second  # the same key, program and mesh: the same samples
  table = _load(os.path.join(workdir, f"sample_quality_step{step}_1.json"))
  assert [r["name"] for r in table["rows"]] == ["diffusion@16", "ar", "real"]
  assert all(1.0 < r["gen_ppl"] < 1e6 for r in table["rows"]), table["rows"]


@pytest.mark.slow
def test_eval_batch_not_a_multiple_of_the_devices_is_one_line(real_data_dir, shared_tfds_dir,
                                                              tmp_path):
  workdir = tmp_path / "never"
  address = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(helpers.REPO, "main.py"),
       *_args(workdir, real_data_dir, shared_tfds_dir, "--config.eval.batch_size=5")],
      cwd=helpers.REPO, env=_env(address, index),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  # Process 0 says it in one line. Process 1 refuses alike, unless process 0 (which hosts the
  # coordination service) was gone first: then jaxlib ends it from C++ (docs/scale_out.md).
  _, stderr = outs[0]
  lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert procs[0].returncode == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
  assert "config.eval.batch_size=5 is not divisible by the 2 devices" in lines[0], lines[0]
  assert "Fix: pass --config.eval.batch_size=<a multiple of 2>" in lines[0], lines[0]
  assert procs[1].returncode not in (0, None) and "Traceback" not in outs[1][1], outs[1][1]
  assert not os.path.exists(workdir)  # refused before the workdir was created


_MESH_EVAL = r"""
import json, types
import jax, numpy as np
from bdiff_jax.evaluation import evaluator as evaluator_lib
from bdiff_jax.runtime import distributed, sharding
from bdiff_jax.errors import ConfigError
from bdiff_jax.models import init_params
from bdiff_jax.modes import sample as sample_mode
from bdiff_jax.train.builder import build_objective
from tests import helpers

VOCAB, SEQ = 30, 16
mesh = sharding.make_mesh(fsdp=2)
rng = np.random.default_rng(0)
splits = types.SimpleNamespace(valid=rng.integers(0, VOCAB, 150).astype(np.int32),
                               test=rng.integers(0, VOCAB, 77).astype(np.int32),
                               tokenizer=types.SimpleNamespace())
out = {}
for name in ("diffusion", "autoregressive"):
  fields = dict(objective=name)
  if name == "autoregressive":
    fields["time_conditioning"] = "none"
  c = helpers.tiny_config(**fields)
  c.data.seq_len = SEQ
  c.sample.num_samples, c.sample.length, c.sample.num_steps = 2, 12, 6
  objective = build_objective(c, mask_id=VOCAB)
  net = helpers.network(c.model, vocab_size=VOCAB, max_len=SEQ)
  params = jax.jit(lambda k: init_params(net, k, seq_len=SEQ))(jax.random.key(0))
  kw = dict(seq_len=SEQ, batch_size=4, num_time_samples=2)
  one = evaluator_lib.Evaluator(objective, net, **kw)
  on_mesh = evaluator_lib.Evaluator(objective, net, mesh=mesh, **kw)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **_: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  a = on_mesh.evaluate(params, splits, seeds=(0, 1))
  before = len(compiles)
  again = on_mesh.evaluate(on_mesh.place(params), splits, seeds=(0, 1))
  recompiles = len(compiles) - before
  rows = rng.integers(0, VOCAB, (7, 12)).astype(np.int32)
  exps = [types.SimpleNamespace(config=c, objective=objective, network=net, mesh=m, evaluator=e)
          for m, e in ((None, one), (mesh, on_mesh))]
  key = sample_mode.draw_key(0, 6)
  out[name] = {
      "mesh": a, "one": one.evaluate(params, splits, seeds=(0, 1)), "again": again == a,
      "compiled": before, "recompiles": recompiles,
      "rows_mesh": on_mesh.rows_nll(params, rows, jax.random.PRNGKey(3)).tolist(),
      "rows_one": one.rows_nll(params, rows, jax.random.PRNGKey(3)).tolist(),
      "sample_one": sample_mode.draw_samples(exps[0], params, key).tolist(),
      "sample_mesh": sample_mode.draw_samples(exps[1], on_mesh.place(params), key).tolist(),
      "param_shardings": sorted({str(x.sharding.spec) for x in
                                 jax.tree_util.tree_leaves(on_mesh.place(params))})}
try:
  evaluator_lib.Evaluator(objective, net, mesh=mesh, seq_len=SEQ, batch_size=6,
                          num_time_samples=1)
except ConfigError as e:
  out["refused"] = str(e)
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_multi_process_cpu_run_turns_the_persistent_cache_off(capsys):
  """A configured persistent cache is turned off in a multi-process CPU run, with one note
  (distributed._no_persistent_cache_on_cpu, called by distributed.initialize); accelerators and
  runs without a cache are left alone."""
  assert distributed.cache_hangs("/tmp/cache", True, "cpu")
  assert not distributed.cache_hangs("/tmp/cache", False, "cpu")
  assert not distributed.cache_hangs(None, True, "cpu")
  assert not distributed.cache_hangs("/tmp/cache", True, "gpu")
  assert jax.config.jax_compilation_cache_dir  # the session's (conftest.py)
  try:
    distributed._no_persistent_cache_on_cpu()  # pylint: disable=protected-access
    assert not jax.config.jax_enable_compilation_cache
    assert capsys.readouterr().err.count("note: the persistent compilation cache") == 1
  finally:
    jax.config.update("jax_enable_compilation_cache", True)


def test_evaluator_and_sampler_on_a_mesh_equal_one_device():
  """The programs every process of a multi-process run takes part in, here in one process with
  4 devices on a data=2 x fsdp=2 mesh: the same numbers as on one device."""
  proc = helpers.assert_ok(helpers.run_python(
      _MESH_EVAL, env_extra=helpers.tiny_compile_env(devices=4)))
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  assert "eval.batch_size=6 is not divisible by the 4 devices" in out.pop("refused")
  for name, r in out.items():
    assert any("fsdp" in s for s in r["param_shardings"]), r["param_shardings"]  # FSDP-sharded
    # One compiled program on the mesh (the listener does see compilations: the first call's).
    assert r["compiled"] >= 1 and r["again"] and r["recompiles"] == 0, (name, r)
    for split in ("valid", "test"):
      a, b = r["mesh"][split], r["one"][split]
      assert a["num_tokens"] == b["num_tokens"]
      np.testing.assert_allclose(a["nll_per_token"], b["nll_per_token"], rtol=1e-6)
      np.testing.assert_allclose(a["word_ppl_per_seed"], b["word_ppl_per_seed"], rtol=1e-5)
    np.testing.assert_allclose(r["rows_mesh"], r["rows_one"], rtol=1e-6)
    assert r["sample_mesh"] == r["sample_one"], name


def test_one_process_has_no_inference_mesh_and_a_mesh_evaluator_agrees():
  """Fast, in this process: one process evaluates without a mesh (inference_mesh is None); the
  mesh path (rows fed through `sharding.shard_batch`, the key through `sharding.replicate`, the
  NLLs gathered) on this process's devices gives the numbers of the one-device path."""
  c = helpers.tiny_config(num_layers=1)
  assert experiment.inference_mesh(c) is None
  vocab = 30
  objective = build_objective(c, mask_id=vocab)
  net = helpers.network(c.model, vocab_size=vocab, max_len=c.data.seq_len)
  params = jax.jit(lambda k: init_params(net, k, seq_len=c.data.seq_len))(jax.random.key(0))
  mesh = sharding.make_mesh()
  kw = dict(seq_len=c.data.seq_len, batch_size=4 * mesh.devices.size, num_time_samples=2)
  rng = np.random.default_rng(0)
  splits = types.SimpleNamespace(valid=rng.integers(0, vocab, 150).astype(np.int32),
                                 test=rng.integers(0, vocab, 77).astype(np.int32),
                                 tokenizer=types.SimpleNamespace())
  one = evaluator_lib.Evaluator(objective, net, **kw).evaluate(params, splits, seeds=(0, 1))
  on_mesh = evaluator_lib.Evaluator(objective, net, mesh=mesh, **kw)
  got = on_mesh.evaluate(params, splits, seeds=(0, 1))
  for split in ("valid", "test"):
    np.testing.assert_allclose(got[split]["nll_per_token"], one[split]["nll_per_token"],
                               rtol=1e-6)
  key = sharding.replicate(jax.random.PRNGKey(3), mesh)
  assert key.sharding.is_fully_replicated and (np.asarray(key) ==
                                               np.asarray(jax.random.PRNGKey(3))).all()
