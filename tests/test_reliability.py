"""Reliability end to end (issue 9), through main.py in new processes on the real WikiText-2.

Faults are injected into child processes only, and every test is deterministic:
  * a run is stopped at an exact step by a hook (`pause_at`) that, after the `train` record of
    that step is written, waits for the test to act (send a signal, start a rival process) and
    then to release it; the signal is sent from outside, by the test, while the run is paused;
  * read-only workdirs and full disks are real when this machine lets the test mount (a
    read-only bind mount, a small tmpfs filled up to a few MB) and otherwise simulated by making
    the child's writes fail with EROFS / ENOSPC (`fail_writes`; CI must not rely on mount).

One tiny trained workdir (module fixture `trained`, 8 steps, checkpoints at 4 and 8) is shared;
tests that write work on copies. The `.lock` file records the latest process that locked the
workdir, so "nothing written" means every other file (and directory) byte-identical.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest

from tests import helpers
from tests.helpers import REPO, assert_ok, run_main, smoke_args, subprocess_env, train_losses

# Every test here runs main.py in new processes; they compile fast (conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tiny_compile_children")]

STEPS = 8


def _args(workdir, data_dir, tfds_dir, *extra, config="configs/wikitext2.py:smoke"):
  """A tiny smoke run: a 2 x 32 model on 4 x 32 batches, 8 steps, tiny evaluation/samples."""
  assert STEPS == 8  # helpers.smoke_args's
  return smoke_args(workdir, data_dir, tfds_dir, *helpers.config_flags_of(helpers.NARROW_SMOKE),
                    "--config.eval.seeds=(0,)", "--config.sample.num_samples=1",
                    "--config.sample.length=8", "--config.sample.num_steps=2", *extra,
                    config=config, eval_tokens=64, eval_batch_size=2)


# The child: optional fault injection, then main.py exactly as `python main.py ARGV` runs it.
# With "cases", it imports main.py's modules once and forks one process per case (each parses
# its own flags, injects its own faults and exits with main.py's code): fast failures cost
# about a second each instead of a full interpreter start.
_CHILD = r'''
import builtins, errno, json, os, runpy, sys, time
spec = json.loads(os.environ["BDIFF_TEST_CHILD"])

def hold(pause):  # says "paused", waits for "release"
  open(os.path.join(pause["dir"], "paused"), "w").close()
  release, deadline = os.path.join(pause["dir"], "release"), time.time() + 300
  while not os.path.exists(release) and time.time() < deadline:
    time.sleep(0.01)

def pause_at(pause):  # after the train record of step pause["step"]
  from bdiff_jax.runtime import metrics_log
  _write = metrics_log.MetricsLog.write
  def write(self, kind, step, **values):
    _write(self, kind, step, **values)
    if kind == "train" and int(step) == pause["step"]:
      hold(pause)
  metrics_log.MetricsLog.write = write

def pause_in(pause):  # before "module:function" is called with an argument containing "when"
  import importlib
  module_name, name = pause["function"].split(":")
  module = importlib.import_module(module_name)
  original = getattr(module, name)
  def held(*args, **kwargs):
    if any(pause["when"] in str(a) for a in args):
      hold(pause)
    return original(*args, **kwargs)
  setattr(module, name, held)

def fail_writes(fail):  # writes under fail["under"] (or to files named fail["names"]) fail
  code, under, names = getattr(errno, fail["errno"]), fail["under"], fail.get("names")
  def hit(path):
    path = os.path.abspath(os.fspath(path))
    return ((path + os.sep).startswith(under + os.sep) and
            (names is None or os.path.basename(path) in names))
  def refuse(path):
    raise OSError(code, os.strerror(code), os.fspath(path))
  _os_open, _open = os.open, builtins.open
  def os_open(path, flags, *a, **k):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and hit(path):
      refuse(path)
    return _os_open(path, flags, *a, **k)
  def open_(file, mode="r", *a, **k):
    if not isinstance(file, int) and set(mode) & set("wax+") and hit(file):
      refuse(file)
    return _open(file, mode, *a, **k)
  os.open, builtins.open = os_open, open_
  def guard(original, *which):
    def guarded(*args, **kwargs):
      if any(hit(args[i]) for i in which):
        refuse(args[which[-1]])
      return original(*args, **kwargs)
    return guarded
  for name in ("mkdir", "rmdir", "remove", "unlink"):
    setattr(os, name, guard(getattr(os, name), 0))
  for name in ("rename", "replace"):
    setattr(os, name, guard(getattr(os, name), 0, 1))

def run(case):
  if case.get("pause_at"):
    pause_at(case["pause_at"])
  if case.get("pause_in"):
    pause_in(case["pause_in"])
  if case.get("fail_writes"):
    fail_writes(case["fail_writes"])
  sys.argv = ["main.py", *case["argv"]]
  if "main" in sys.modules:  # a forked case: main.py's flags are already defined
    from absl import app
    app.run(sys.modules["main"].main, flags_parser=sys.modules["main"]._parse_flags)
  runpy.run_path("main.py", run_name="__main__")

if "cases" not in spec:
  run(spec)
else:
  sys.path.insert(0, os.getcwd())
  import main, tensorflow_datasets, jax  # imported once; no JAX backend (no threads) yet
  from bdiff_jax.modes import train, evaluate, sample
  codes = []
  for i, case in enumerate(spec["cases"]):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(os.path.join(spec["dir"], f"{i}.{name}"),
                        os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
      try:
        run(case)
      except SystemExit as e:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
      os._exit(0)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
  print(json.dumps(codes))
'''


def _child_cmd(argv, **spec):
  env = subprocess_env(BDIFF_TEST_CHILD=json.dumps(dict(spec, argv=[str(a) for a in argv])))
  return [sys.executable, "-c", _CHILD], env


def run_child(argv, **spec):
  """Runs main.py ARGV in a child with the faults of `spec`; returns CompletedProcess (text)."""
  cmd, env = _child_cmd(argv, **spec)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def run_cases(cases, tmp_dir) -> list[subprocess.CompletedProcess]:
  """Runs main.py once per case ({"argv": [...], optional faults}), each in its own process
  forked from one parent that imported main.py's modules; CompletedProcess per case."""
  os.makedirs(tmp_dir, exist_ok=True)
  cases = [dict(c, argv=[str(a) for a in c["argv"]]) for c in cases]
  env = subprocess_env(BDIFF_TEST_CHILD=json.dumps({"cases": cases, "dir": str(tmp_dir)}))
  parent = assert_ok(subprocess.run([sys.executable, "-c", _CHILD], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=600))
  codes = json.loads(parent.stdout.strip().splitlines()[-1])
  read = lambda i, name: open(os.path.join(tmp_dir, f"{i}.{name}")).read()
  return [subprocess.CompletedProcess(c["argv"], code, read(i, "stdout"), read(i, "stderr"))
          for i, (c, code) in enumerate(zip(cases, codes))]


class Paused:
  """main.py ARGV in a child that stops after logging step `step` until `release()`; or, with
  `pause_in={"function": "module:name", "when": text}`, before it calls that function with an
  argument that contains `text` (the function as the module that calls it names it)."""

  def __init__(self, argv, step: Optional[int], ctl, *, pause_in: Optional[dict] = None):
    os.makedirs(ctl)
    self.ctl = str(ctl)
    self.out_path, self.err_path = os.path.join(ctl, "stdout"), os.path.join(ctl, "stderr")
    spec = ({"pause_in": dict(pause_in, dir=self.ctl)} if pause_in else
            {"pause_at": {"step": step, "dir": self.ctl}})
    cmd, env = _child_cmd(argv, **spec)
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
    self._wait_for(lambda: os.path.exists(os.path.join(self.ctl, "paused")), "pause")

  def _wait_for(self, predicate, what, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
      if self.proc.poll() is not None:
        raise AssertionError(f"child exited {self.proc.returncode} before {what}:\n"
                             f"{self.stdout}\n{self.stderr}")
      assert time.time() < deadline, f"timed out waiting for {what}"
      time.sleep(0.01)

  @property
  def stdout(self) -> str:
    return open(self.out_path).read()

  @property
  def stderr(self) -> str:
    return open(self.err_path).read()

  def signal(self, signum) -> None:
    """Sends `signum` and, unless it kills, waits until the child's handler has seen it."""
    self.proc.send_signal(signum)
    if signum != signal.SIGKILL:
      self._wait_for(lambda: "received SIG" in self.stderr, "the signal handler")

  def release(self) -> int:
    open(os.path.join(self.ctl, "release"), "w").close()
    return self.proc.wait(timeout=600)


def _error_line(proc, *needles, code=2):
  """The single `error:` line of a failed run (no traceback), containing every needle."""
  out = proc.stdout + proc.stderr
  assert proc.returncode == code, f"exit {proc.returncode}\n{out}"
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, f"expected one 'error:' line\nSTDERR:\n{proc.stderr}"
  assert "Traceback" not in out, out
  for n in needles:
    assert n.lower() in lines[0].lower(), lines[0]
  return lines[0]


def _tree(path, skip=(".lock",)) -> dict:
  """{relative path: sha256 of the file, or "dir"} for everything under `path`."""
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path)] = "dir"
    for name in files:
      p = os.path.join(root, name)
      rel = os.path.relpath(p, path)
      if rel not in skip:
        with open(p, "rb") as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


def _raw_records(workdir) -> list[dict]:
  """Every line of metrics.jsonl as written (no de-duplication)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _no_duplicates(workdir) -> None:
  keys = [(r["kind"], r["step"]) for r in _raw_records(workdir)]
  dups = sorted({k for k in keys if keys.count(k) > 1})
  assert not dups, f"duplicate (kind, step) records in metrics.jsonl: {dups}"


def _can_mount(tmp_path) -> bool:
  """Whether this process may mount (root with CAP_SYS_ADMIN, as on a developer machine).
  BDIFF_TEST_NO_MOUNT=1 forces the simulated faults (what CI without mount rights runs)."""
  if os.environ.get("BDIFF_TEST_NO_MOUNT") or os.geteuid() != 0 or not shutil.which("mount"):
    return False
  probe = tmp_path / "mount-probe"
  probe.mkdir()
  ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                      capture_output=True).returncode == 0
  if ok:
    subprocess.run(["umount", str(probe)], check=True)
  return ok


@pytest.fixture(scope="module")
def trained(tmp_path_factory, real_data_dir, shared_tfds_dir):
  """An 8-step run, paused after step 2 while a second trainer tries the same workdir.

  Returns (workdir, first run's exit code, its stdout, the rival's CompletedProcess, first PID).
  """
  base = tmp_path_factory.mktemp("trained")
  workdir = base / "w"
  args = _args(workdir, real_data_dir, shared_tfds_dir)
  first = Paused(args, 2, base / "ctl")
  rival = run_main(args)  # while the first holds the lock
  code = first.release()
  return workdir, code, first.stdout + first.stderr, rival, first.proc.pid


def _copy(trained, dest):
  shutil.copytree(trained[0], dest)
  return dest


def test_second_trainer_refused_first_unaffected(trained):
  workdir, code, out, rival, pid = trained
  _error_line(rival, "in use", f"PID {pid}")
  assert code == 0, out
  records = _raw_records(workdir)
  train = [r["step"] for r in records if r["kind"] == "train"]
  assert train == list(range(1, STEPS + 1))  # one record per step, in order: no interleaving
  assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]
  _no_duplicates(workdir)
  with open(os.path.join(workdir, ".lock")) as f:
    assert json.load(f)["pid"] == pid  # the rival never wrote its PID
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


CHANGED = (("--config.model.emb_dim=48", "model.emb_dim"),
           ("--config.model.num_layers=3", "model.num_layers"),
           ("--config.model.backbone=reversible", "model.backbone"),
           ("--config.data.seq_len=64", "data.seq_len"),
           ("--config.diffusion.schedule=cosine", "diffusion.schedule"))


def test_resume_with_changed_field_refused_nothing_written(trained, tmp_path, real_data_dir,
                                                           shared_tfds_dir):
  workdir = trained[0]
  before = _tree(workdir)
  procs = run_cases([{"argv": _args(workdir, real_data_dir, shared_tfds_dir, override,
                                    "--config.train.num_steps=12")}
                     for override, _ in CHANGED], tmp_path / "cases")
  for (_, field), proc in zip(CHANGED, procs):
    line = _error_line(proc, field, "another config")
    others = [f for _, f in CHANGED if f != field]
    assert not any(f in line for f in others), line  # only the changed field is named
  assert _tree(workdir) == before


def test_eval_with_default_config_reproduces_training_eval(trained, tmp_path, real_data_dir,
                                                          shared_tfds_dir):
  copy = _copy(trained, tmp_path / "w")
  with open(copy / "eval_best.json") as f:
    after_training = json.load(f)
  # No preset: configs/wikitext2.py picks `cpu` (another model); the model comes from the
  # workdir's config.json. Evaluation settings are the smoke run's, so the numbers must agree.
  proc = assert_ok(run_main(["--config", "configs/wikitext2.py", "--workdir", str(copy),
                             "--mode=eval", f"--config.data.data_dir={real_data_dir}",
                             f"--config.data.tfds_dir={shared_tfds_dir}",
                             "--config.eval.batch_size=2", "--config.eval.max_tokens=64",
                             "--config.eval.seeds=(0,)"]))
  assert "using the workdir's config.json" in proc.stdout and "model.emb_dim=32" in proc.stdout
  with open(copy / "eval_best.json") as f:
    assert json.load(f) == after_training
  # The same settings: the same file was rewritten, not one of another evaluation's.
  assert f"results written to {copy / 'eval_best.json'}" in proc.stdout
  assert not [n for n in os.listdir(copy) if n.startswith("eval_best_")]


def test_interrupts_and_kill_resume_to_identical_losses(trained, tmp_path, real_data_dir,
                                                        shared_tfds_dir):
  """SIGINT at step 2, SIGKILL after step 4, SIGTERM at step 5, then a run to the end: the
  losses equal the uninterrupted run's bit for bit, with no duplicate metrics records."""
  straight = trained[0]
  workdir = tmp_path / "w"
  # No periodic checkpoints or evaluations: the interrupts' checkpoints are the only ones.
  args = _args(workdir, real_data_dir, shared_tfds_dir, "--config.train.checkpoint_every=1000",
               "--config.train.eval_every=1000")
  ckpts = lambda: sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())

  for signum, pause_at, code, name in ((signal.SIGINT, 2, 130, "SIGINT (Ctrl-C)"),
                                       (signal.SIGKILL, 4, -9, None),
                                       (signal.SIGTERM, 5, 143, "SIGTERM")):
    run = Paused(args, pause_at, tmp_path / f"ctl{pause_at}")
    run.signal(signum)
    assert run.release() == code, run.stdout + run.stderr
    if name is None:  # killed: steps 3 and 4 were logged but never checkpointed
      assert ckpts() == [2]
      assert [r["step"] for r in _raw_records(workdir) if r["kind"] == "train"] == [1, 2, 3, 4]
      continue
    assert "Traceback" not in run.stderr, run.stderr
    line = (f"interrupted by {name} at step {pause_at}; checkpoint saved; rerun the same "
            "command to resume")
    assert (run.stdout + run.stderr).count(line) == 1, run.stdout + run.stderr
    assert pause_at in ckpts()
    assert os.path.exists(workdir / "checkpoints" / str(pause_at) / "bdiff_digests.json")
    _no_duplicates(workdir)
    if signum == signal.SIGTERM:  # this run resumed after the kill: it dropped steps 3, 4
      assert "resuming from latest step 2" in run.stdout
      assert "dropped 2 metrics records after step 2" in run.stdout
  assert ckpts() == [2, 5]

  proc = assert_ok(run_main(args))
  assert "resuming from latest step 5" in proc.stdout
  _no_duplicates(workdir)
  assert [r["step"] for r in _raw_records(workdir) if r["kind"] == "train"] == list(
      range(1, STEPS + 1))
  assert train_losses(workdir) == train_losses(straight)  # bit-identical


def test_byte_flipped_checkpoint_refused(trained, tmp_path, real_data_dir, shared_tfds_dir):
  copy = _copy(trained, tmp_path / "w")
  state = copy / "checkpoints" / "8" / "state"
  files = [os.path.join(r, n) for r, _, ns in os.walk(state) for n in ns]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  before = _tree(copy)
  procs = run_cases([{"argv": _args(copy, real_data_dir, shared_tfds_dir, *mode_args)}
                     for mode_args in ([], ["--mode=eval", "--config.eval.checkpoint=latest"])],
                    tmp_path / "cases")
  for proc in procs:  # resume, then eval of the latest checkpoint
    line = _error_line(proc, os.path.relpath(victim, copy), "SHA-256", "corrupt")
    assert re.search(r"steps? 4\b", line), line  # the intact earlier step is named
    assert "Nothing was deleted" in line
    assert _tree(copy) == before


def _read_only_copy(trained, tmp_path, can_mount):
  """(path of a read-only view of a copy of the workdir, child fault spec, cleanup)."""
  copy = _copy(trained, tmp_path / "w")
  if not can_mount:
    return copy, {"fail_writes": {"under": str(copy), "errno": "EROFS"}}, lambda: None
  view = tmp_path / "ro"
  view.mkdir()
  subprocess.run(["mount", "--bind", str(copy), str(view)], check=True)
  subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
  return view, {}, lambda: subprocess.run(["umount", str(view)], check=True)


def test_read_only_workdir_is_one_line_and_untouched(trained, tmp_path, real_data_dir,
                                                     shared_tfds_dir):
  view, spec, cleanup = _read_only_copy(trained, tmp_path, _can_mount(tmp_path))
  try:
    before = _tree(view, skip=())
    procs = run_cases([dict(spec, argv=_args(view, real_data_dir, shared_tfds_dir, *mode_args))
                       for mode_args in (["--config.train.num_steps=12"], ["--mode=eval"],
                                         ["--mode=sample"])], tmp_path / "cases")
    for proc in procs:  # train (resume), eval, sample
      _error_line(proc, str(view), "read-only")
      assert "Evaluation" not in proc.stdout and "sample 0" not in proc.stdout  # refused first
    assert _tree(view, skip=()) == before
  finally:
    cleanup()


def test_full_disk_during_save_is_one_line_and_keeps_checkpoints(trained, tmp_path,
                                                                 real_data_dir, shared_tfds_dir):
  """A workdir at step 4 (the step-8 checkpoints moved out) retrains steps 5..8 with the same
  config (same compiled step); the save at step 8 hits a full disk."""
  spec, cleanup = {}, lambda: None
  if _can_mount(tmp_path):  # a real full disk: a tmpfs with 2 MB left, less than a checkpoint
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], check=True)
    cleanup = lambda: subprocess.run(["umount", str(disk)], check=True)
    workdir = disk / "w"
  else:  # simulated: the checkpoint's first write (its space reserve) fails with ENOSPC
    workdir = tmp_path / "w"
    spec = {"fail_writes": {"under": str(workdir), "errno": "ENOSPC",
                            "names": [".checkpoint_space_reserve"]}}
  try:
    shutil.copytree(trained[0], workdir, ignore=lambda d, names: [
        n for n in names if n == str(STEPS) and os.path.basename(d).startswith("checkpoints")])
    if not spec:
      st = os.statvfs(disk)
      with open(disk / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - (2 << 20))
    before = {d: _tree(workdir / d) for d in ("checkpoints", "checkpoints_best")}
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
    proc = run_child(_args(workdir, real_data_dir, shared_tfds_dir), **spec)
    _error_line(proc, f"saving checkpoint {STEPS}", "no space left")
    assert "resuming from latest step 4" in proc.stdout
    for d, tree in before.items():  # the existing checkpoints are intact, none was published
      after = _tree(workdir / d)
      assert sorted(x for x in os.listdir(workdir / d) if x.isdigit()) == sorted(
          x for x in tree if x.isdigit())
      assert {k: v for k, v in after.items() if k in tree} == tree
  finally:
    cleanup()


def test_samples_never_overwritten(trained, tmp_path, real_data_dir, shared_tfds_dir):
  copy = _copy(trained, tmp_path / "w")
  original = (copy / f"samples_step{STEPS}.txt").read_bytes()
  for proc in run_cases([{"argv": _args(copy, real_data_dir, shared_tfds_dir, "--mode=sample",
                                         f"--config.sample.seed={seed}")} for seed in (1, 2)],
                        tmp_path / "cases"):
    assert_ok(proc)
  names = sorted(f for f in os.listdir(copy) if f.startswith("samples_"))
  assert names == [f"samples_step{STEPS}.txt", f"samples_step{STEPS}_1.txt",
                   f"samples_step{STEPS}_2.txt"]
  assert (copy / f"samples_step{STEPS}.txt").read_bytes() == original
  assert "seed=1" in (copy / f"samples_step{STEPS}_1.txt").read_text()
  assert "seed=2" in (copy / f"samples_step{STEPS}_2.txt").read_text()
