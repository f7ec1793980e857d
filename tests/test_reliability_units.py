"""Reliability building blocks: workdir lock and checks, checkpoint digests, config compatibility,
metrics truncation, graceful interruption and concurrent data preparation.

Tests run as root in CI containers, where permission bits do not stop writes (chmod 0555 on a
directory changes nothing for root). Read-only, permission and disk-full conditions are therefore
simulated by making the write itself fail with EROFS / EACCES / ENOSPC; where the tests do not run
as root, a real chmod-ed directory is checked as well.
"""

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest

from bdiff_jax.config import compat as config_compat
from bdiff_jax.config import configuration
from bdiff_jax.data import pipeline, wikitext2
from bdiff_jax.errors import (CheckpointError, ConfigError, ConfigMismatchError, DiskFullError,
                              StorageError, UserError, WorkdirBusyError, WorkdirError)
from bdiff_jax.modes import launch
from bdiff_jax.runtime import checkpoint_digests
from bdiff_jax.runtime import checkpointing
from bdiff_jax.runtime import interrupt
from bdiff_jax.runtime import metrics_log
from bdiff_jax.runtime import orbax_failures
from bdiff_jax.runtime import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env():
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def _one_line(e: UserError) -> str:
  text = str(e)
  assert "\n" not in text
  return text


# ---------------------------------------------------------------------------------------------
# Workdir: lock, checks, unique paths, storage errors.


def test_lock_is_exclusive_names_the_holder_and_dies_with_it(tmp_path):
  child = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(f"""
          import sys
          from bdiff_jax.runtime.workdir import WorkdirLock
          lock = WorkdirLock({str(tmp_path)!r})
          lock.acquire()
          print("locked", flush=True)
          sys.stdin.read()
      """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_child_env())
  try:
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirBusyError, match=rf"in use by another process: PID {child.pid} on "
                                               r"host .*Fix: wait for that run"):
      workdir_lib.WorkdirLock(tmp_path).acquire()
    holder = workdir_lib.read_lock_holder(os.path.join(tmp_path, ".lock"))
    assert holder["pid"] == child.pid and holder["started"]
  finally:
    child.kill()  # SIGKILL: no cleanup code runs; the kernel must drop the lock
    child.wait()
  with workdir_lib.WorkdirLock(tmp_path) as lock:
    assert lock.held
    assert workdir_lib.read_lock_holder(lock.path)["pid"] == os.getpid()
    # flock locks belong to the open file: a second lock in the same process conflicts too.
    with pytest.raises(WorkdirBusyError, match=rf"PID {os.getpid()}"):
      workdir_lib.WorkdirLock(tmp_path).acquire()
  assert not lock.held
  with workdir_lib.WorkdirLock(tmp_path):  # released on exit: can be taken again
    pass


def test_unique_path_never_overwrites(tmp_path):
  first = tmp_path / "samples_step40.txt"
  first.write_text("earlier samples")
  paths = [workdir_lib.unique_path(tmp_path, "samples_step40", ".txt") for _ in range(3)]
  assert [os.path.basename(p) for p in paths] == [
      "samples_step40_1.txt", "samples_step40_2.txt", "samples_step40_3.txt"]
  assert first.read_text() == "earlier samples"
  assert all(os.path.getsize(p) == 0 for p in paths)  # created (reserved), empty
  assert os.path.basename(workdir_lib.unique_path(tmp_path, "eval", ".json")) == "eval.json"


def _failing_open(monkeypatch, code, marker):
  real_open = os.open

  def fake_open(path, flags, *args, **kwargs):
    if marker in os.fspath(path):
      raise OSError(code, os.strerror(code), os.fspath(path))
    return real_open(path, flags, *args, **kwargs)

  monkeypatch.setattr(os, "open", fake_open)


def test_prepare_writable_workdir(tmp_path, monkeypatch):
  made = workdir_lib.prepare_writable_workdir(tmp_path / "a" / "b")
  assert os.path.isdir(made) and os.listdir(made) == []  # the probe file is gone
  regular = tmp_path / "file"
  regular.write_text("x")
  with pytest.raises(WorkdirError, match=r"is a file, not a directory"):
    workdir_lib.prepare_writable_workdir(regular)
  with pytest.raises(WorkdirError, match=r"a part of that path is a file"):
    workdir_lib.prepare_writable_workdir(regular / "sub")
  # A read-only workdir (as root, simulated: the probe write fails with EROFS).
  _failing_open(monkeypatch, errno.EROFS, ".write-probe-")
  with pytest.raises(StorageError, match=r"writing into --workdir .* failed: the file system is "
                                         r"read-only\. Fix: pass a --workdir on a writable"):
    workdir_lib.prepare_writable_workdir(made)
  monkeypatch.undo()
  # A parent that does not let us create the workdir.
  real_makedirs = os.makedirs

  def denied(path, *a, **kw):
    if "locked_parent" in os.fspath(path):
      raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
    return real_makedirs(path, *a, **kw)

  monkeypatch.setattr(os, "makedirs", denied)
  with pytest.raises(StorageError, match=r"creating --workdir .*locked_parent/run .*permission "
                                         r"denied"):
    workdir_lib.prepare_writable_workdir(tmp_path / "locked_parent" / "run")
  monkeypatch.undo()
  if os.geteuid() != 0:  # a real read-only directory; as root, chmod does not stop writes
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
      with pytest.raises(StorageError, match="permission denied"):
        workdir_lib.prepare_writable_workdir(ro)
    finally:
      ro.chmod(0o755)


def test_require_existing_workdir(tmp_path, monkeypatch):
  missing = tmp_path / "typo"
  with pytest.raises(WorkdirError, match=r"no such workdir: .*typo\. Fix: pass the --workdir of "
                                         r"a trained run"):
    workdir_lib.require_existing_workdir(missing)
  assert not missing.exists()  # eval/sample never create a workdir
  assert workdir_lib.require_existing_workdir(tmp_path) == str(tmp_path)
  _failing_open(monkeypatch, errno.EACCES, ".write-probe-")
  with pytest.raises(StorageError, match="permission denied"):
    workdir_lib.require_existing_workdir(tmp_path)
  assert workdir_lib.require_existing_workdir(tmp_path, writable=False) == str(tmp_path)


@pytest.mark.parametrize("code,cls,words", [
    (errno.ENOSPC, DiskFullError, "no space left on the device"),
    (errno.EDQUOT, DiskFullError, "the disk quota is exhausted"),
    (errno.EROFS, StorageError, "the file system is read-only"),
    (errno.EACCES, StorageError, "permission denied"),
    (errno.EPERM, StorageError, "permission denied"),
    (errno.EIO, StorageError, os.strerror(errno.EIO)),
])
def test_os_errors_become_one_line_user_errors(code, cls, words):
  e = workdir_lib.os_error_to_user_error(OSError(code, os.strerror(code), "/w/f"), "writing /w/f")
  assert type(e) is cls  # pylint: disable=unidiomatic-typecheck
  assert _one_line(e).startswith(f"writing /w/f failed: {words}") and "Fix: " in str(e)


def test_find_os_error_reads_tensorstore_text():
  text = ('RESOURCE_EXHAUSTED: Error writing "l1/0.0" in OCDBT database: Failed writing: '
          '"/w/d/x" [OS error: No space left on device]')
  try:
    try:
      raise ValueError(text)
    except ValueError as inner:
      raise RuntimeError("wrapped") from inner
  except RuntimeError as outer:
    found = workdir_lib.find_os_error(outer)
  assert found.errno == errno.ENOSPC
  assert workdir_lib.find_os_error(ValueError("shape mismatch")) is None


# ---------------------------------------------------------------------------------------------
# Checkpoints: digests, corruption, one-line errors.


def _state(step: int, num_arrays: int = 24):
  rng = np.random.default_rng(step)  # random values: incompressible, so files have real sizes
  return {f"layer{i:02d}": {"w": rng.standard_normal((64, 64)).astype(np.float32),
                            "b": rng.standard_normal(64).astype(np.float32)}
          for i in range(num_arrays)}


def _abstract(num_arrays: int = 24):
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                _state(0, num_arrays))


def _tree_digest(directory) -> str:
  h = hashlib.sha256()
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, directory).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def saved_workdir(tmp_path_factory):
  """Steps 1, 2, 3 in checkpoints/ and step 2 in checkpoints_best/, all with manifests."""
  wd = str(tmp_path_factory.mktemp("ckpt"))
  with checkpointing.Checkpointer(wd, keep=3) as ckpt:
    for step in (1, 2, 3):
      best = {checkpointing.BEST_METRIC: 4.0} if step == 2 else None
      ckpt.save(step, _state(step), {"step": step}, best_metrics=best, force=True)
    ckpt.save(3, _state(99), {"step": 3}, force=True)  # an existing step is skipped
  return wd


def _copy(saved_workdir, tmp_path):
  dst = tmp_path / "wd"
  shutil.copytree(saved_workdir, dst)
  return str(dst)


def _largest_file(step_dir):
  files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns]
  return max(files, key=os.path.getsize)


def test_manifests_written_and_restores_exact(saved_workdir):
  for sub, step in (("checkpoints", 1), ("checkpoints", 2), ("checkpoints", 3),
                    ("checkpoints_best", 2)):
    step_dir = os.path.join(saved_workdir, sub, str(step))
    with open(os.path.join(step_dir, checkpoint_digests.MANIFEST_NAME)) as f:
      manifest = json.load(f)
    assert manifest["step"] == step
    assert set(manifest["files"]) == set(checkpoint_digests._files(step_dir))  # pylint: disable=protected-access
    assert any(name.startswith("state/") for name in manifest["files"])
    assert checkpoint_digests.check_step_dir(step_dir, step) == ("ok", "")
  assert not os.path.exists(os.path.join(saved_workdir, checkpointing.RESERVE_NAME))
  with checkpointing.Checkpointer(saved_workdir, read_only=True) as ckpt:
    for which, step in (("latest", 3), ("best", 2), (1, 1)):
      state, meta, _ = ckpt.restore(which, _abstract())
      assert meta["step"] == step
      np.testing.assert_array_equal(state["layer05"]["w"], _state(step)["layer05"]["w"])


def test_byte_flip_is_detected_and_intact_steps_listed(saved_workdir, tmp_path):
  wd = _copy(saved_workdir, tmp_path)
  target = _largest_file(os.path.join(wd, "checkpoints", "3"))
  size = os.path.getsize(target)
  assert size > 8192
  with open(target, "r+b") as f:  # 4 KB of garbage in the middle; the size does not change
    f.seek(size // 2 - 2048)
    f.write(np.random.default_rng(0).bytes(4096))
  before = _tree_digest(wd)
  with pytest.raises(checkpointing.CheckpointCorruptError) as info:
    checkpointing.Checkpointer(wd, read_only=True).restore("latest", _abstract())
  line = _one_line(info.value)
  assert f"{target} does not match its SHA-256 digest" in line
  assert "steps 1, 2 verify" in line and "--config.eval.checkpoint=2" in line
  assert "to resume training from step 2, move" in line and "Nothing was deleted" in line
  assert _tree_digest(wd) == before  # nothing deleted or rewritten
  with checkpointing.Checkpointer(wd, read_only=True) as ckpt:  # the earlier ones still restore
    assert ckpt.restore(2, _abstract())[1]["step"] == 2


def test_truncation_missing_manifest_and_legacy_checkpoints(saved_workdir, tmp_path, capsys):
  wd = _copy(saved_workdir, tmp_path)
  step3 = os.path.join(wd, "checkpoints", "3")
  target = _largest_file(step3)
  with open(target, "r+b") as f:
    f.truncate(1000)
  with pytest.raises(CheckpointError, match=r"has 1,000 bytes, expected [\d,]+ \(truncated"):
    checkpointing.Checkpointer(wd, read_only=True).restore("latest", _abstract())
  # Written with digests but the manifest is gone: unverifiable, refused.
  step2 = os.path.join(wd, "checkpoints", "2")
  os.remove(os.path.join(step2, checkpoint_digests.MANIFEST_NAME))
  with pytest.raises(CheckpointError, match=r"bdiff_digests\.json is missing although the "
                                            r"checkpoint was written with digests.*steps 1 verify"):
    checkpointing.Checkpointer(wd, read_only=True).restore(2, _abstract())
  # The newest step without its manifest (a kill between orbax's commit and the manifest, as a
  # peer lost right after a multi-process commit leaves it): restored unverified, warned; it
  # counts as intact for the older step's message above only as the newest.
  os.remove(os.path.join(step3, checkpoint_digests.MANIFEST_NAME))
  capsys.readouterr()
  with pytest.raises(CheckpointError, match=r"cannot be restored"):  # truncated: orbax refuses
    checkpointing.Checkpointer(wd, read_only=True).restore("latest", _abstract())
  assert "no digest manifest" in capsys.readouterr().err
  shutil.rmtree(step3)
  shutil.copytree(os.path.join(saved_workdir, "checkpoints", "3"), step3)
  os.remove(os.path.join(step3, checkpoint_digests.MANIFEST_NAME))
  with checkpointing.Checkpointer(wd, read_only=True) as ckpt:
    assert ckpt.restore("latest", _abstract())[1]["step"] == 3
  assert "checkpoints/3 has no digest manifest" in capsys.readouterr().err
  # A checkpoint from before digests existed (no marker in orbax's metadata): restored, warned.
  meta_path = os.path.join(step2, "_CHECKPOINT_METADATA")
  with open(meta_path) as f:
    meta = json.load(f)
  del meta["custom_metadata"][checkpoint_digests.MARKER_KEY]
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  capsys.readouterr()
  with checkpointing.Checkpointer(wd, read_only=True) as ckpt:
    state, _, _ = ckpt.restore(2, _abstract())
  np.testing.assert_array_equal(state["layer00"]["b"], _state(2)["layer00"]["b"])
  assert "has no digest manifest (it was written before checkpoint digests existed); restoring " \
         "it unverified" in capsys.readouterr().err


def test_disk_full_during_save_is_one_line_and_keeps_earlier_checkpoints(saved_workdir, tmp_path,
                                                                         monkeypatch):
  wd = _copy(saved_workdir, tmp_path)
  before = _tree_digest(os.path.join(wd, "checkpoints"))
  ckpt = checkpointing.Checkpointer(wd, keep=3)
  # What tensorstore raises when the disk fills up under orbax (ValueError, errno only as text).
  monkeypatch.setattr(ckpt.latest, "save", lambda *a, **kw: (_ for _ in ()).throw(ValueError(
      'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database [OS error: No space left on '
      'device]')))
  with pytest.raises(DiskFullError, match=r"^saving checkpoint 4 in .* failed: no space left on "
                                          r"the device\. Fix: free disk space"):
    ckpt.save(4, _state(4), {"step": 4}, force=True)
  ckpt.close()
  assert _tree_digest(os.path.join(wd, "checkpoints")) == before
  assert not os.path.exists(os.path.join(wd, checkpointing.RESERVE_NAME))



def test_what_orbax_logs_during_a_save_is_emitted_once_after_it(saved_workdir, tmp_path,
                                                                 monkeypatch):
  """A record orbax logs while a save runs (a multi-process save whose parameters span the
  processes logs in every save) is held during the save and emitted once when it ends; emitting
  it while still holding appended it to the list being emitted, forever (such runs hung)."""
  ckpt = checkpointing.Checkpointer(_copy(saved_workdir, tmp_path), keep=3)
  original = ckpt.latest.save

  def logging_save(*args, **kwargs):
    logging.getLogger("absl").warning("a note from orbax")
    return original(*args, **kwargs)

  monkeypatch.setattr(ckpt.latest, "save", logging_save)
  handled, emitted = [], []

  class Handled(logging.Filter):  # every time the logger handles the record, held or not

    def filter(self, record):
      handled.append(record.getMessage())
      if len(handled) > 10:
        raise RuntimeError("the held record was handled over and over")
      return True

  class Emitted(logging.Handler):

    def emit(self, record):
      emitted.append(record.getMessage())

  logger = logging.getLogger("absl")
  # (Without the mute an earlier failed save in this process left on for orbax's late threads.)
  monkeypatch.setattr(logger, "filters", [])
  counter, sink = Handled(), Emitted()
  logger.addFilter(counter)
  logger.addHandler(sink)
  try:
    ckpt.save(4, _state(4), {"step": 4}, force=True)
  finally:
    logger.removeFilter(counter)
    logger.removeHandler(sink)
    ckpt.close()
  assert handled == ["a note from orbax"] * 2  # held during the save, then emitted
  assert emitted == ["a note from orbax"]
  with checkpointing.Checkpointer(ckpt.workdir, read_only=True) as again:
    assert 4 in again.latest.all_steps()


def test_latest_and_best_managers_name_their_barriers_apart(tmp_path):
  """Both managers save step N at an evaluation step, and orbax names a save's multi-process
  barriers after the step: without a prefix of their own the processes of a run could meet at
  one barrier name for two different saves and deadlock (tests/test_multiprocess_modes.py runs
  such saves)."""
  with checkpointing.Checkpointer(str(tmp_path / "wd"), keep=3) as ckpt:
    prefixes = [m._options.multiprocessing_options.barrier_sync_key_prefix  # pylint: disable=protected-access
                for m in (ckpt.latest, ckpt.best)]
  assert all(prefixes) and len(set(prefixes)) == 2, prefixes


def test_loops_tolerate_closing_for_a_checkpointers_life_and_after_a_failure(saved_workdir,
                                                                             tmp_path,
                                                                             monkeypatch):
  """Orbax starts loops in its own threads at any time while a checkpointer lives (its commit
  threads can outlive a failed save): every loop created between a checkpointer's creation and its
  close drops callbacks posted after it was closed instead of printing a traceback; holds nest;
  the standard policy is back after the last close, unless a save failed."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  def closed_loop_from_a_thread():
    out = {}
    thread = threading.Thread(target=lambda: out.update(loop=asyncio.new_event_loop()))
    thread.start()
    thread.join()
    out["loop"].close()
    return out["loop"]

  def standard_policy():
    return type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy

  # A fresh count and the standard policy (an earlier failed save in this process keeps its hold).
  monkeypatch.setattr(orbax_failures, "TOLERANT_LOOPS", orbax_failures.TolerantLoops())
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(None)
  try:
    first = checkpointing.Checkpointer(saved_workdir, read_only=True)
    second = checkpointing.Checkpointer(saved_workdir, read_only=True)
    first.close()
    assert closed_loop_from_a_thread().call_soon_threadsafe(lambda: None) is None  # dropped
    second.close()
    assert standard_policy()
    with pytest.raises(RuntimeError, match="Event loop is closed"):  # the control
      closed_loop_from_a_thread().call_soon_threadsafe(lambda: None)

    ckpt = checkpointing.Checkpointer(_copy(saved_workdir, tmp_path), keep=3)
    monkeypatch.setattr(ckpt.latest, "save", lambda *a, **kw: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFullError):
      ckpt.save(4, _state(4), {"step": 4}, force=True)
    ckpt.close()
    assert not standard_policy()  # orbax's late threads may still start loops
    assert closed_loop_from_a_thread().call_soon_threadsafe(lambda: None) is None
  finally:
    asyncio.set_event_loop_policy(previous)


def test_a_closed_loop_drops_never_retrieved_task_exceptions(caplog):
  """The reads a failed restore abandoned: asyncio reports each task's exception, with a
  traceback, when the task is collected; once the loop is closed that report is dropped.
  Everything else still reaches asyncio's handler, and an open loop reports as usual."""
  never = {"message": "Task exception was never retrieved", "exception": ValueError("read")}
  other = {"message": "something else", "exception": ValueError("other")}
  loop = orbax_failures.ClosedTolerantLoop()
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    loop.call_exception_handler(never)  # open: reported
    loop.close()
    loop.call_exception_handler(never)  # closed: dropped
    loop.call_exception_handler(other)  # closed, another report: kept
  messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
  assert messages == ["Task exception was never retrieved", "something else"], messages


def test_corrupt_checkpoint_in_a_fresh_process_prints_exactly_one_line(saved_workdir, tmp_path):
  """A truncated checkpoint, with a manifest and without one (legacy: orbax itself fails), in a
  new process as main.py runs it: exactly one `error:` line each, no traceback."""
  wd = _copy(saved_workdir, tmp_path)
  with open(_largest_file(os.path.join(wd, "checkpoints", "3")), "r+b") as f:
    f.truncate(1000)
  legacy = os.path.join(wd, "checkpoints", "1")
  os.remove(os.path.join(legacy, checkpoint_digests.MANIFEST_NAME))
  with open(os.path.join(legacy, "_CHECKPOINT_METADATA")) as f:
    meta = json.load(f)
  meta["custom_metadata"] = {}
  with open(os.path.join(legacy, "_CHECKPOINT_METADATA"), "w") as f:
    json.dump(meta, f)
  for name in sorted(os.listdir(os.path.join(legacy, "state", "ocdbt.process_0", "d"))):
    with open(os.path.join(legacy, "state", "ocdbt.process_0", "d", name), "r+b") as f:
      f.truncate(100)
  script = textwrap.dedent(f"""
      import sys
      import jax
      import numpy as np
      from absl import logging
      logging.set_verbosity(logging.ERROR)
      from bdiff_jax.runtime import checkpointing
      from bdiff_jax.errors import UserError
      abstract = {{f"layer{{i:02d}}": {{"w": jax.ShapeDtypeStruct((64, 64), np.float32),
                                       "b": jax.ShapeDtypeStruct((64,), np.float32)}}
                  for i in range(24)}}
      for which in ("latest", 1):
        try:
          checkpointing.Checkpointer({wd!r}, keep=3).restore(which, abstract)
          print("restored", which)
        except UserError as e:
          print(f"error: {{e}}", file=sys.stderr, flush=True)
      # A process lives on after the error (main.py writes its files): when the collector
      # reaches the abandoned reads' tasks, asyncio would print "Task exception was never
      # retrieved" and a traceback (2 runs in 8 failed so before orbax_failures dropped it).
      import gc, time
      time.sleep(0.5)
      gc.collect()
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=_child_env(), cwd=REPO, timeout=300)
  lines = (proc.stdout + proc.stderr).strip().splitlines()
  warning = [l for l in lines if l.startswith("warning: ")]
  errors = [l for l in lines if l.startswith("error: ")]
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr
  assert len(errors) == 2 and len(warning) == 1 and len(lines) == 3, lines
  assert "is corrupt" in errors[0] and "cannot be restored" in errors[1]


# ---------------------------------------------------------------------------------------------
# Config compatibility.


def test_every_config_field_is_classified_once():
  fields = set(config_compat.flatten(configuration.base_config()))
  classes = (config_compat.ARCHITECTURE_FIELDS, config_compat.TRAINING_FIELDS,
             config_compat.RESUMABLE_FIELDS, config_compat.SCHEDULE_FIELDS)
  assert config_compat.unclassified_fields(configuration.base_config()) == []
  assert set().union(*classes) == fields  # no stale names either
  assert sum(len(c) for c in classes) == len(fields)  # disjoint
  assert config_compat.INCOMPATIBLE_FIELDS == classes[0] | classes[1]
  for f in ("model.emb_dim", "model.backbone", "data.seq_len", "diffusion.schedule"):
    assert f in config_compat.ARCHITECTURE_FIELDS
  for f in ("seed", "train.batch_size", "model.dtype"):
    assert f in config_compat.TRAINING_FIELDS
  for f in ("train.num_steps", "train.learning_rate"):  # allowed on resume, but reported
    assert f in config_compat.SCHEDULE_FIELDS
  for f in ("train.stop_at_step", "eval.seeds", "sample.prompt", "data.tfds_dir"):
    assert f in config_compat.RESUMABLE_FIELDS


def _saved(config) -> dict:
  return json.loads(config.to_json())


def test_check_compatible_lists_every_difference():
  base = configuration.base_config()
  saved = _saved(base)
  same = configuration.base_config()
  same.eval.seeds = (5,)  # resumable fields may change
  same.train.stop_at_step = 7
  same.data.tfds_dir = "/elsewhere"
  config_compat.check_compatible(saved, same)
  config_compat.check_compatible(saved, base)  # tuples vs JSON lists compare equal
  other = configuration.base_config()
  other.model.emb_dim = 128
  other.data.seq_len = 64
  other.seed = 3
  other.train.num_steps = 20  # a schedule field: allowed, reported by schedule_changes
  with pytest.raises(ConfigMismatchError) as info:
    config_compat.check_compatible(saved, other)
  line = _one_line(info.value)
  assert "data.seq_len: 128 -> 64, model.emb_dim: 256 -> 128, seed: 0 -> 3)" in line
  assert "--config.data.seq_len=128 --config.model.emb_dim=256 --config.seed=0," in line
  assert "num_steps" not in line and "new --workdir" in line
  assert config_compat.schedule_changes(saved, other) == [("train.num_steps", 10000, 20)]
  config_compat.check_compatible(saved, other, allowed={"model.emb_dim", "data.seq_len", "seed"})
  # A field that an older config.json lacks counts as its default.
  old = _saved(base)
  del old["model"]["candidate_k"]
  config_compat.check_compatible(old, base)
  changed = configuration.base_config()
  changed.model.candidate_k = 8
  with pytest.raises(ConfigMismatchError, match=r"model\.candidate_k: 0 -> 8"):
    config_compat.check_compatible(old, changed)


def test_config_for_restore_takes_the_saved_model():
  trained = configuration.base_config()
  trained.model.emb_dim, trained.model.num_layers, trained.data.seq_len = 64, 2, 32
  trained.train.learning_rate = 3e-3
  saved = _saved(trained)
  current = configuration.base_config()  # e.g. the default config file, not the smoke one
  current.eval.max_tokens = 512
  current.model.dtype = "bfloat16"
  current.lock()
  restored = config_compat.config_for_restore(current, saved, {"eval.max_tokens", "model.dtype"})
  assert (restored.model.emb_dim, restored.model.num_layers, restored.data.seq_len) == (64, 2, 32)
  assert restored.train.learning_rate == 3e-3
  assert restored.eval.max_tokens == 512 and restored.model.dtype == "bfloat16"  # explicit
  assert restored.is_locked and current.model.emb_dim == 256  # a copy
  configuration.validate(restored)
  with pytest.raises(ConfigMismatchError, match=r"--config\.model\.emb_dim=256 but the "
                                                r"checkpoint has 64"):
    config_compat.config_for_restore(current, saved, {"model.emb_dim"})
  assert config_compat.explicit_overrides_from_argv(
      ["main.py", "--config", "c.py", "--config.model.emb_dim=8", "--config.seed", "3",
       "--noconfig.train.progress_bar", "--prompt=a b"]) == {
           "model.emb_dim", "seed", "train.progress_bar", "sample.prompt"}


def test_write_config_atomically(tmp_path):
  c = configuration.base_config()
  c.model.emb_dim = 96
  path = config_compat.write_config_atomically(c, tmp_path)
  assert config_compat.load_saved_config(tmp_path)["model"]["emb_dim"] == 96
  assert os.listdir(tmp_path) == ["config.json"] and path == str(tmp_path / "config.json")
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserError, match=r"config\.json cannot be read"):
    config_compat.load_saved_config(tmp_path)
  assert config_compat.load_saved_config(tmp_path / "nowhere") is None


def _umask() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  return 0o022


# ---------------------------------------------------------------------------------------------
# Metrics log.


def test_metrics_truncate_after_and_dedupe(tmp_path):
  log = metrics_log.MetricsLog(str(tmp_path))
  for step in (10, 20, 30):
    log.write("train", step, loss=float(step))
  log.write("eval", 20, valid=1.0)
  log.write("eval", 30, valid=2.0)
  with open(log.path, "a") as f:
    f.write('{"kind": "train", "step": 4')  # torn by a crash
  os.chmod(log.path, 0o640)
  # Read without truncation: duplicates after a resume collapse to the last record.
  log2 = metrics_log.MetricsLog(str(tmp_path))
  log2.write("train", 30, loss=-30.0)
  recs = metrics_log.read(log.path)
  assert [(r["kind"], r["step"]) for r in recs] == [
      ("train", 10), ("train", 20), ("eval", 20), ("eval", 30), ("train", 30)]
  assert recs[-1]["loss"] == -30.0
  # Resume from step 20: later records and the torn line go, atomically, permissions kept.
  assert log.truncate_after(20) == 4  # train 30 (twice), eval 30 (torn line counted once)
  assert [(r["kind"], r["step"]) for r in log.read()] == [("train", 10), ("train", 20),
                                                          ("eval", 20)]
  assert os.stat(log.path).st_mode & 0o777 == 0o640
  assert log.truncate_after(20) == 0
  log.write("train", 30, loss=3.0)
  with open(log.path, "a") as f:
    f.write("garbage")  # a torn tail without its newline
  log.write("train", 40, loss=4.0)  # starts on a new line
  assert [(r["kind"], r["step"]) for r in metrics_log.read(log.path)] == [
      ("train", 10), ("train", 20), ("eval", 20), ("train", 30), ("train", 40)]
  assert log.truncate_after(30) == 2  # the garbage line and step 40


# ---------------------------------------------------------------------------------------------
# Graceful interruption.


def test_interrupt_sets_flag_then_aborts_and_restores_handlers():
  previous = signal.getsignal(signal.SIGINT)
  aborted, stream = [], io.StringIO()
  with interrupt.GracefulInterrupt(stream=stream, abort=aborted.append) as stop:
    assert stop.installed and not stop.stop_requested() and stop.exit_code == 0
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the handler runs in this thread at the next bytecode boundary
    assert stop.stop_requested() and stop.exit_code == interrupt.EXIT_SIGINT == 130
    assert aborted == []
    assert stop.message(40) == ("interrupted by SIGINT (Ctrl-C) at step 40; checkpoint saved; "
                                "rerun the same command to resume")
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert aborted == [130]
  lines = stream.getvalue().splitlines()
  assert len(lines) == 2 and "stopping after the current step" in lines[0]
  assert "aborting now without saving" in lines[1]
  assert signal.getsignal(signal.SIGINT) is previous
  with interrupt.GracefulInterrupt(stream=io.StringIO()) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert stop.exit_code == interrupt.EXIT_SIGTERM == 143


def test_second_sigint_exits_at_once_with_one_line():
  child = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent("""
          import time
          from bdiff_jax.runtime.interrupt import GracefulInterrupt
          with GracefulInterrupt() as stop:
            print("ready", flush=True)
            while True:  # a training loop that never reaches its check
              time.sleep(0.01)
      """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())
  assert child.stdout.readline().strip() == "ready"
  child.send_signal(signal.SIGINT)
  time.sleep(0.2)
  child.send_signal(signal.SIGINT)
  _, err = child.communicate(timeout=30)
  assert child.returncode == 130
  assert "Traceback" not in err and len(err.strip().splitlines()) == 2, err


# ---------------------------------------------------------------------------------------------
# Data preparation: shared cache, permissions, concurrency.


def _data_config(data_dir, tfds_dir=""):
  return ml_collections.ConfigDict({"name": "wikitext2", "variant": "v1",
                                    "data_dir": str(data_dir), "tfds_dir": str(tfds_dir),
                                    "seq_len": 16, "verify_counts": False})


def test_concurrent_preparation_into_an_empty_cache(tmp_path):
  src = wikitext2.write_synthetic_corpus(tmp_path / "src", num_train_lines=60)
  cache, go = tmp_path / "cache", tmp_path / "go"
  script = textwrap.dedent(f"""
      import hashlib, os, time
      os.umask(0o022)
      from bdiff_jax.data import pipeline
      print("ready", flush=True)
      while not os.path.exists({str(go)!r}):
        time.sleep(0.005)
      config = dict(variant="v1", data_dir={src!r}, tfds_dir="", verify_counts=False)
      splits = pipeline.load_wikitext2(config, {str(tmp_path)!r} + f"/w{{os.getpid()}}")
      print("train", hashlib.sha256(splits.train.tobytes()).hexdigest(), splits.prepared_dir)
  """)
  env = dict(_child_env(), BDIFF_CACHE_DIR=str(cache))
  procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
           for _ in range(2)]
  for p in procs:
    assert p.stdout.readline().strip() == "ready"
  go.touch()
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err
    assert "Traceback" not in err and "Downloading and preparing" not in out
  digests = {line.split()[1] for out, _ in outs for line in out.splitlines()
             if line.startswith("train ")}
  assert len(digests) == 1
  assert [n for n in os.listdir(cache) if not n.startswith("src-")] == []  # no temp dirs left
  (root,) = os.listdir(cache)
  for dirpath, dirs, files in os.walk(cache / root):
    assert os.stat(dirpath).st_mode & 0o777 == 0o755, dirpath
    for name in files:
      assert os.stat(os.path.join(dirpath, name)).st_mode & 0o777 == 0o644


def test_losing_the_publication_race_uses_the_winner(tmp_path, monkeypatch, capsys):
  """While this process builds, 'another' publishes the same root; the rename then fails and
  the winner's result is used. A second workdir reuses the cache without preparing anything."""
  src = wikitext2.write_synthetic_corpus(tmp_path / "src", num_train_lines=60)
  config = _data_config(src, tmp_path / "cache")
  real_write_cache = pipeline._write_cache  # pylint: disable=protected-access
  calls = []

  def racing_write_cache(*args):
    calls.append(args[0])
    if len(calls) == 1:  # the other process finishes first
      pipeline.load_wikitext2(config, None)
    return real_write_cache(*args)

  monkeypatch.setattr(pipeline, "_write_cache", racing_write_cache)
  splits = pipeline.load_wikitext2(config, tmp_path / "w1")
  assert len(calls) == 2
  assert os.listdir(tmp_path / "cache") == [os.path.basename(splits.prepared_dir)]
  out = capsys.readouterr().out
  assert out.count("preparing WikiText-2 (v1) from") == 2 and "Unknown size" not in out
  monkeypatch.setattr(pipeline, "_prepare", lambda *a: pytest.fail("prepared again"))
  again = pipeline.load_wikitext2(config, tmp_path / "w2")
  np.testing.assert_array_equal(again.train, splits.train)
  assert "preparing" not in capsys.readouterr().out


def test_default_cache_location(monkeypatch, tmp_path):
  monkeypatch.setenv("BDIFF_CACHE_DIR", str(tmp_path / "c"))
  assert pipeline.resolve_tfds_dir(_data_config("x")) == str(tmp_path / "c")
  assert pipeline.resolve_tfds_dir(_data_config("x", tmp_path / "t"), "w") == str(tmp_path / "t")
  monkeypatch.delenv("BDIFF_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert pipeline.resolve_tfds_dir(_data_config("x"), "w") == str(tmp_path / "xdg" / "bdiff_jax")


# ---------------------------------------------------------------------------------------------
# Checkpoint readers: a crafted pytorch_model.bin cannot make the reader allocate gigabytes.


def _torch_bin(path, *, size, stride, numel, storage_bytes, offset=0):
  """A zip-format `torch.save` file holding {"w": one float32 tensor}, written opcode by opcode
  (torch is not installed): the pickle claims `size`/`stride` over a storage of `numel`
  elements whose raw file holds `storage_bytes` bytes."""
  import struct  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top

  def text(s):
    return b"X" + struct.pack("<I", len(s)) + s.encode()

  def ints(values):
    return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"

  pkl = (b"\x80\x02}" + text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n(" +
         b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") +
         b"J" + struct.pack("<i", numel) + b"tQ" +
         b"J" + struct.pack("<i", offset) + ints(size) + ints(stride) + b"\x89" +
         b"ccollections\nOrderedDict\n)R" + b"tRs.")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/data/0", bytes(storage_bytes))
  return path


def test_pytorch_reader_refuses_a_tensor_larger_than_its_storage_before_allocating(tmp_path):
  import tracemalloc  # pylint: disable=g-import-not-at-top
  from bdiff_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top
  # 5e8 elements (2 GB as float32) claimed over a 4-float storage with stride 0.
  path = _torch_bin(str(tmp_path / "pytorch_model.bin"), size=(500_000_000,), stride=(0,),
                    numel=4, storage_bytes=16)
  assert os.path.getsize(path) < 1000
  tracemalloc.start()
  try:
    with pytest.raises(hf_checkpoint.HFCheckpointError,
                       match=r"claims 500,000,000 elements over a storage of 4\."):
      hf_checkpoint.read_pytorch_bin(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 10_000_000, peak
  # A storage record claiming more elements than its raw file holds.
  short = _torch_bin(str(tmp_path / "short.bin"), size=(4,), stride=(1,), numel=1_000_000,
                     storage_bytes=16)
  with pytest.raises(hf_checkpoint.HFCheckpointError, match=r"holds 16 bytes but claims 1000000"):
    hf_checkpoint.read_pytorch_bin(short)
  # Within the storage but larger than any tensor of the model (config.json's shapes).
  big = _torch_bin(str(tmp_path / "big.bin"), size=(64,), stride=(1,), numel=64,
                   storage_bytes=256)
  with pytest.raises(hf_checkpoint.HFCheckpointError, match=r"more than the largest tensor"):
    hf_checkpoint.read_pytorch_bin(big, max_elements=32)
  assert hf_checkpoint.read_pytorch_bin(big)["w"].shape == (64,)  # an honest tensor reads


# ---------------------------------------------------------------------------------------------
# Config files that cannot give a config: one line naming the file and the problem.


@pytest.mark.parametrize("source, words", [
    ("def get_config(:\n", r"SyntaxError at bad\.py line 1: invalid syntax"),
    ("import no_such_module_h7\n\ndef get_config():\n  return None\n",
     r"ModuleNotFoundError \(line 1\): No module named 'no_such_module_h7'"),
    ("def get_config():\n  raise RuntimeError('boom')\n", r"RuntimeError \(line 2\): boom"),
    ("def get_config():\n  raise ValueError('bad preset')\n", r"ValueError \(line 2\): bad preset"),
], ids=["syntax", "import", "raises", "value_error"])
def test_config_file_failures_are_one_line(tmp_path, source, words):
  import main  # pylint: disable=g-import-not-at-top
  path = tmp_path / "bad.py"
  path.write_text(source)
  with pytest.raises(main.ConfigFileError) as info:
    main._OneLineConfigParser("config").parse(str(path))  # pylint: disable=protected-access
  text = str(info.value)
  assert "\n" not in text and "Traceback" not in text
  assert re.search(rf"^config file {re.escape(str(path))} failed to load: {words}\. Fix: ", text)


def test_config_file_returning_none_or_missing_is_one_line(tmp_path, caplog):
  import main  # pylint: disable=g-import-not-at-top
  path = tmp_path / "none.py"
  path.write_text("def get_config():\n  return None\n")
  parser = main._OneLineConfigParser("config")  # pylint: disable=protected-access
  with pytest.raises(main.ConfigFileError, match=r"get_config\(\) of config file .*none\.py "
                                                 r"returned NoneType, not an ml_collections"):
    parser.parse(str(path))
  assert not [r for r in caplog.records if "returned None" in r.getMessage()]  # no 2nd line
  with pytest.raises(main.ConfigFileError, match=r"no such config file: .*nosuch\.py\. Fix"):
    parser.parse(str(tmp_path / "nosuch.py"))
  assert parser.parse(os.path.join(REPO, "configs", "wikitext2.py") + ":smoke").preset == "smoke"


def test_a_config_for_another_mode_is_refused_in_one_line():
  import main  # pylint: disable=g-import-not-at-top
  from bdiff_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  glue = main._OneLineConfigParser("config").parse(  # pylint: disable=protected-access
      os.path.join(REPO, "configs", "glue.py") + ":test")
  for mode in ("train", "eval", "sample"):
    with pytest.raises(ConfigError, match=rf"config configs/glue.py:test cannot serve "
                                          rf"--mode={mode}: it has no data, .* sections \(its "
                                          r"own section\(s\): glue"):
      launch.check_mode_fields(glue, mode, "configs/glue.py:test")
  launch.check_mode_fields(glue, "glue", "configs/glue.py:test")  # its own mode: not ours to check
  launch.check_mode_fields(configuration.base_config(), "train", "x.py")


def test_config_file_syntax_error_through_main_is_one_line(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("def get_config(:\n")
  proc = subprocess.run([sys.executable, "main.py", "--config", str(path), "--workdir",
                         str(tmp_path / "w")], cwd=REPO, env=_child_env(), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"error: config file {path} failed to load: "
                                                 "SyntaxError"), proc.stderr
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------
# Validation before anything is written; non-finite losses traced to their cause.


@pytest.mark.parametrize("field, value", [("sample.temperature", float("inf")),
                                          ("train.learning_rate", float("inf")),
                                          ("model.rope_theta", float("inf"))])
def test_validate_refuses_non_finite_values(field, value):
  c = configuration.base_config()
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=rf"config\.{re.escape(field)}=.* Fix: pass "):
    configuration.validate(c)


def _tiny_train_config(tmp_path, **train):
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.data.data_dir = str(wikitext2.write_synthetic_corpus(tmp_path / "src", num_train_lines=60))
  c.data.tfds_dir = str(tmp_path / "cache")
  c.data.verify_counts = False
  c.train.progress_bar = False
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.mark.parametrize("what", ["fsdp", "batch", "temperature"])
def test_train_refusals_happen_before_the_workdir_is_created(tmp_path, what):
  from bdiff_jax.modes import train  # pylint: disable=g-import-not-at-top
  from bdiff_jax.runtime.reporter import Reporter  # pylint: disable=g-import-not-at-top
  c = _tiny_train_config(tmp_path)
  if what == "fsdp":
    c.mesh.fsdp = len(jax.devices()) + 2  # does not divide the devices
  elif what == "batch":
    c.train.batch_size = 1_000_000  # more than the corpus holds
  else:
    c.sample.temperature = float("inf")  # used only after training, by the final samples
  workdir = tmp_path / "run"
  with pytest.raises(UserError) as info:
    train.run(c, str(workdir), Reporter(verbose=False))
  _one_line(info.value)
  assert not workdir.exists(), os.listdir(workdir)


def test_eval_and_sample_refusals_happen_before_the_lock(tmp_path):
  from bdiff_jax.modes import evaluate, sample  # pylint: disable=g-import-not-at-top
  from bdiff_jax.runtime.reporter import Reporter  # pylint: disable=g-import-not-at-top
  c = _tiny_train_config(tmp_path)
  c.sample.temperature = float("inf")
  workdir = tmp_path / "trained"
  workdir.mkdir()
  for mode in (evaluate, sample):
    with pytest.raises(ConfigError, match=r"config\.sample\.temperature=inf is not a finite"):
      mode.run(c, str(workdir), Reporter(verbose=False))
    assert os.listdir(workdir) == []  # no .lock, no vocab.json


def test_nonfinite_loss_messages_name_the_cause():
  from bdiff_jax.train import nonfinite  # pylint: disable=g-import-not-at-top
  rows = lambda: np.ones((2, 4), np.int32)
  problem, fix = nonfinite.nonfinite_message(7, float("inf"), start=0, good=None,
                                             checkpoints="/w/checkpoints", batch=rows, vocab_size=9)
  assert "None" not in problem + fix
  assert "no checkpoint was saved before it" in problem and "starts from step 0" in fix
  problem, fix = nonfinite.nonfinite_message(7, float("nan"), start=4, good=4,
                                             checkpoints="/w/checkpoints", batch=rows, vocab_size=9)
  assert "the last good checkpoint (step 4)" in problem and "resumes from step 4" in fix
  assert "learning_rate" in fix
  # The first step of a run: computed before any update, so not the learning rate.
  problem, fix = nonfinite.nonfinite_message(5, float("nan"), start=4, good=4,
                                             checkpoints="/c",
                                             batch=lambda: np.zeros((0, 4), np.int32), vocab_size=9)
  assert "the learning rate is not the cause; its batch is empty" in problem
  assert "learning_rate" not in fix
  problem, _ = nonfinite.nonfinite_message(1, float("nan"), start=0, good=None,
                                           checkpoints="/c",
                                           batch=lambda: np.full((2, 4), 12, np.int32), vocab_size=9)
  assert "token ids outside the vocabulary [0, 9) (12..12)" in problem


def test_non_finite_start_weights_are_refused_before_the_first_step():
  import types  # pylint: disable=g-import-not-at-top
  from bdiff_jax.train import nonfinite  # pylint: disable=g-import-not-at-top
  params = {"a": np.ones(3, np.float32), "b": {"w": np.array([1.0, np.nan], np.float32)}}
  assert nonfinite.nonfinite_leaves(params) == ["['b']['w']"]
  ckpt = types.SimpleNamespace(latest_dir="/w/checkpoints",
                               latest=types.SimpleNamespace(all_steps=lambda: [4, 8]))
  with pytest.raises(CheckpointError, match=r"checkpoint step 8 in /w/checkpoints holds "
                                            r"non-finite weights \(params\['b'\]\['w'\]\).* Fix: "
                                            r"move /w/checkpoints/8 out of .* from step 4"):
    nonfinite.check_finite_weights(params, start=8, ckpt=ckpt)
  with pytest.raises(CheckpointError, match=r"the initial weights hold non-finite values"):
    nonfinite.check_finite_weights(params, start=0, ckpt=ckpt)
  nonfinite.check_finite_weights({"a": np.ones(2)}, start=8, ckpt=ckpt)


# ---------------------------------------------------------------------------------------------
# Evaluation results: never overwritten by an evaluation with other settings; atomic writes.


def test_eval_with_other_settings_gets_its_own_file(tmp_path, monkeypatch):
  import types  # pylint: disable=g-import-not-at-top
  from bdiff_jax.modes import evaluate  # pylint: disable=g-import-not-at-top
  from bdiff_jax.runtime.reporter import Reporter  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(evaluate.baselines, "cached", lambda *a, **k: {"unigram": 1.0})
  monkeypatch.setattr(evaluate.baselines, "format_baselines", lambda r: "")

  def evaluate_with(seeds):
    config = configuration.base_config()
    config.eval.seeds = seeds
    evaluator = types.SimpleNamespace(
        evaluate=lambda params, splits, seeds, max_tokens: {"valid": {"seeds": list(seeds)}},
        format_results=lambda r: "")
    exp = types.SimpleNamespace(config=config, workdir=str(tmp_path), splits=None,
                                evaluator=evaluator)
    return evaluate.evaluate_params(exp, None, {"step": 8}, "best step 8",
                                    Reporter(verbose=False))

  evaluate_with((0, 1, 2))
  first = (tmp_path / "eval_best.json").read_bytes()
  evaluate_with((5,))  # other seeds: other numbers, another file
  assert (tmp_path / "eval_best.json").read_bytes() == first
  others = sorted(p.name for p in tmp_path.iterdir() if p.name != "eval_best.json")
  assert len(others) == 1 and re.fullmatch(r"eval_best_[0-9a-f]{8}\.json", others[0]), others
  assert json.loads((tmp_path / others[0]).read_text())["results"]["valid"]["seeds"] == [5]
  evaluate_with((0, 1, 2))  # the same settings again: the same file, the same numbers
  evaluate_with((5,))
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["eval_best.json", *others])
  assert (tmp_path / "eval_best.json").read_bytes() == first
  # A file written before results carried their settings is kept too.
  legacy = tmp_path / "eval_latest.json"
  legacy.write_text('{"results": {}}')
  settings = evaluate.eval_settings(configuration.base_config(), "latest step 8", 8)
  assert evaluate.results_path(str(tmp_path), "latest", settings) != str(legacy)


def test_eval_of_a_newer_step_keeps_the_older_results(tmp_path):
  # Training went on and 'best' moved from step 8 to 20: eval_best.json must hold the newer
  # step's numbers (what the run reports), and the step-8 numbers are kept beside it.
  from bdiff_jax.modes import evaluate  # pylint: disable=g-import-not-at-top
  config = configuration.base_config()
  old = evaluate.eval_settings(config, "best step 8", 8)
  evaluate.write_json_atomically(str(tmp_path / "eval_best.json"), {"step": 8, "settings": old})
  new = evaluate.eval_settings(config, "best step 20", 20)
  path = evaluate.results_path(str(tmp_path), "best", new)
  assert path == str(tmp_path / "eval_best.json")
  assert json.loads((tmp_path / "eval_best_step8.json").read_text())["step"] == 8
  assert not (tmp_path / "eval_best.json").exists()  # moved, to be written by the caller
  # Other evaluation settings of that newer step still get their own file.
  evaluate.write_json_atomically(path, {"step": 20, "settings": new})
  config.eval.seeds = (5,)
  other = evaluate.eval_settings(config, "best step 20", 20)
  assert re.fullmatch(r".*eval_best_[0-9a-f]{8}\.json",
                      evaluate.results_path(str(tmp_path), "best", other))


def test_eval_results_are_written_atomically(tmp_path, monkeypatch):
  from bdiff_jax.modes import evaluate  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "eval_best.json")
  evaluate.write_json_atomically(path, {"a": 1})

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(evaluate.json, "dump", full_disk)
  with pytest.raises(DiskFullError, match=r"writing eval_best\.json .*failed: no space left"):
    evaluate.write_json_atomically(path, {"a": 2})
  monkeypatch.undo()
  assert json.loads(open(path).read()) == {"a": 1}
  assert os.listdir(tmp_path) == ["eval_best.json"]  # no temporary file left


def _garble(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 2 - 2048)
    f.write(np.random.default_rng(1).bytes(4096))


def test_corrupt_latest_names_an_intact_best(saved_workdir, tmp_path):
  wd = _copy(saved_workdir, tmp_path)
  _garble(_largest_file(os.path.join(wd, "checkpoints", "3")))
  with pytest.raises(checkpointing.CheckpointCorruptError) as info:
    checkpointing.Checkpointer(wd, read_only=True).restore("latest", _abstract())
  line = _one_line(info.value)
  assert "--config.eval.checkpoint=2 (steps 1, 2 verify)" in line
  assert "or --config.eval.checkpoint=best (best step 2 verifies)" in line
  # Every latest step corrupt: the best one (a separate copy of step 2) is still named.
  for step in (1, 2):
    _garble(_largest_file(os.path.join(wd, "checkpoints", str(step))))
  with pytest.raises(checkpointing.CheckpointCorruptError) as info:
    checkpointing.Checkpointer(wd, read_only=True).restore("latest", _abstract())
  line = _one_line(info.value)
  assert "no other intact checkpoint" not in line
  assert "Fix: use an intact checkpoint for eval/sample: --config.eval.checkpoint=best" in line
  with checkpointing.Checkpointer(wd, read_only=True) as ckpt:
    assert ckpt.restore("best", _abstract())[1]["step"] == 2


def test_unfinished_save_folders_are_removed_at_the_next_start(saved_workdir, tmp_path, capsys):
  wd = _copy(saved_workdir, tmp_path)
  before = _tree_digest(os.path.join(wd, "checkpoints", "3"))
  left = [os.path.join(wd, "checkpoints", "4.orbax-checkpoint-tmp-1234"),
          os.path.join(wd, "checkpoints_best", "4.orbax-checkpoint-tmp-99")]
  for path in left:
    os.makedirs(os.path.join(path, "state"))
    with open(os.path.join(path, "state", "half"), "wb") as f:
      f.write(b"x" * 100)
  with checkpointing.Checkpointer(wd, read_only=True):  # eval/sample: never touches the workdir
    pass
  assert all(os.path.isdir(p) for p in left)
  capsys.readouterr()
  with checkpointing.Checkpointer(wd, keep=3) as ckpt:
    assert ckpt.latest.all_steps() == [1, 2, 3]
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("note: removed 2 unfinished checkpoint folder(s)")
  assert "checkpoints/4.orbax-checkpoint-tmp-1234" in err[0]
  assert not any(os.path.exists(p) for p in left)
  assert _tree_digest(os.path.join(wd, "checkpoints", "3")) == before


# ---------------------------------------------------------------------------------------------
# A lost peer of a multi-process run: one error line within a bounded time.


class _KeyValueStore:
  """The coordination service's key-value store, as the watchdog uses it."""

  def __init__(self):
    self.values, self.down = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
    assert allow_overwrite or key not in self.values
    self.values[key] = value

  def key_value_try_get(self, key):
    if self.down:
      raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
    if key not in self.values:
      raise RuntimeError(f"NOT_FOUND: Config key {key} not found.")
    return self.values[key]


def test_peer_watchdog_names_the_lost_process_after_the_timeout():
  from bdiff_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  store, now = _KeyValueStore(), [0.0]
  dogs = [distributed.PeerWatchdog(store, i, 3, 10.0, clock=lambda: now[0]) for i in range(3)]
  for t in (0.0, 2.0, 4.0):
    now[0] = t
    assert [d.check() for d in dogs] == [None, None, None]
  dogs[2].finish()  # a normal exit: never reported as lost
  for t in (6.0, 8.0, 10.0, 12.0, 14.0, 16.0):  # process 1 stops beating at t=4, which
    now[0] = t                                    # process 0 sees at its check at t=6
    assert dogs[0].check() is None
  now[0] = 16.5
  line = dogs[0].check()
  assert line.startswith("error: lost process 1 of this 3-process run: it has not answered for "
                         "10 s") and "Fix: restart all 3 processes" in line
  assert "\n" not in line
  # Process 0 (which hosts the store) gone: the store stays unreachable.
  store.down = True
  now[0] = 20.0
  assert dogs[1].check() is None
  now[0] = 30.0
  assert dogs[1].check() is None
  now[0] = 30.5
  assert dogs[1].check().startswith("error: lost process 0 (the coordinator) of this "
                                    "3-process run: the coordination service it hosts has been "
                                    "unreachable")
  with pytest.raises(ConfigError, match="BDIFF_PEER_TIMEOUT='0' is not a positive number"):
    distributed.peer_timeout({"BDIFF_PEER_TIMEOUT": "0"})
  assert distributed.peer_timeout({}) == distributed.DEFAULT_PEER_TIMEOUT


_PEERS = r"""
import os, sys, time
from bdiff_jax.runtime import distributed
distributed.initialize()
import jax
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices("up")
if jax.process_index() == 1:
  time.sleep(1)
  os.kill(os.getpid(), 9)  # process 1 dies without a word
time.sleep(120)  # process 0: busy with something else (not in a collective)
print("not stopped", flush=True)
"""


def test_a_killed_peer_stops_the_survivor_with_one_line(tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  t0 = time.time()
  for index in (0, 1):
    env = dict(_child_env(), JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(index), BDIFF_PEER_TIMEOUT="3")
    procs.append(subprocess.Popen([sys.executable, "-c", _PEERS], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    out, err = procs[0].communicate(timeout=90)
  finally:
    for p in procs:
      p.kill()
      p.wait()
  assert procs[0].returncode == 3, (out, err)
  assert time.time() - t0 < 60  # start-up, then about BDIFF_PEER_TIMEOUT + a beat
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines and lines[-1].startswith("error: lost process 1 of this 2-process run"), err
  assert "Traceback" not in err and "Check failure" not in err and not [
      l for l in lines if l.startswith("error:")][1:]


def test_pytorch_reader_refuses_a_storage_larger_than_the_model_before_reading_it(tmp_path):
  from bdiff_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top
  path = _torch_bin(str(tmp_path / "pytorch_model.bin"), size=(4,), stride=(1,), numel=4,
                    storage_bytes=4096)
  with pytest.raises(hf_checkpoint.HFCheckpointError,
                     match=r"holds 4,096 bytes, more than all the tensors config.json implies"):
    hf_checkpoint.read_pytorch_bin(path, max_storage_elements=100)
  assert hf_checkpoint.read_pytorch_bin(path, max_storage_elements=1024)["w"].shape == (4,)
  # The fixtures (real OPT layouts, config.json bounds) still load.
  for name in ("tiny_opt", "tiny_opt_350m_style"):
    directory = os.path.join(REPO, "tests", "fixtures", name)
    if os.path.exists(os.path.join(directory, "pytorch_model.bin")):
      config = hf_checkpoint.load_opt_config(directory)
      sizes = [int(np.prod(s)) for s in hf_checkpoint._expected_shapes(config).values()]  # pylint: disable=protected-access
      total = sum(sizes) + config.vocab_size * config.word_embed_proj_dim
      state = hf_checkpoint.read_pytorch_bin(os.path.join(directory, "pytorch_model.bin"),
                                             max_elements=max(sizes), max_storage_elements=total)
      assert state


def test_a_collective_failing_for_a_lost_peer_is_one_line(monkeypatch):
  from bdiff_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  gloo = ValueError("UNKNOWN: Gloo all-reduce failed: [pair.cc:547] Connection closed by peer "
                    "[127.0.0.1]:2944\nmore")
  assert distributed.lost_peer_line(gloo) is None  # one process: not a lost peer
  monkeypatch.setattr(distributed, "_coordination_client", lambda: object())
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed.jax, "process_index", lambda: 1)
  line = distributed.lost_peer_line(gloo)
  assert line.startswith("error: lost process 0 (the coordinator) of this 2-process run: "
                         "process 1's collective failed (UNKNOWN: Gloo all-reduce failed")
  assert "Fix: restart all 2 processes" in line and "\n" not in line
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 3)
  assert distributed.lost_peer_line(gloo).startswith(
      "error: lost one of the other 2 processes (the collective does not say which: see their "
      "output) of this 3-process run: process 1's collective failed")
  assert distributed.lost_peer_line(ValueError("shapes do not match")) is None
