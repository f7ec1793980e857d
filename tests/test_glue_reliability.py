"""The reliability contract of `--mode=glue` (docs/reliability.md, docs/glue.md): resumable units,
the workdir lock and writability check, results never torn nor replaced by other settings,
SIGINT/SIGTERM stopping with one line of what was kept, and NaN losses traced to their cause.

Most tests replace `run_seed` (one unit of real training) by a fake that returns a record at once
and counts its calls: a kill is an exception raised from it after k units.
"""

import errno
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.errors import (CheckpointError, ConfigError, DataError, DiskFullError,
                              NonFiniteLossError, StorageError, WorkdirBusyError)
from bdiff_jax.glue import rows as glue_rows
from bdiff_jax.modes import glue as glue_mode
from bdiff_jax.runtime import workdir as workdir_lib
from bdiff_jax.runtime.reporter import QUIET
from tests import helpers
from tests.test_glue_classification import _config, write_sst2
from tests.test_reliability import Paused

ROWS = "opt:adamw,opt:mezo"  # 2 seeds each; mezo with a 2-rate grid: 2 + 2 + 2 = 6 units


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
  return write_sst2(str(tmp_path_factory.mktemp("glue")))


def _grid_config(sst2, **over):
  c = _config(sst2, ROWS, **over)
  c.glue.zo.learning_rates = (1e-4, 1e-3)
  c.glue.zo.grid_steps = 2
  return c


def _record(spec, task, g, seed):
  """A record shaped like run_seed's (what aggregate, markdown and the plots read)."""
  acc = 0.5 + 0.01 * seed + 1000 * float(g.zo.learning_rate)
  sel = 0.1 * seed + float(g.zo.learning_rate)
  return {"task": task, "row": spec.name, "seed": seed, "dev": {"accuracy": acc},
          "dev_splits": {"dev": {"accuracy": acc}}, "dev_standard_error": {"dev": 0.1},
          "zero_shot": {"selection": 0.0, "dev": {"dev": {"accuracy": 0.5}}},
          "selection_best": sel, "selected_step": 2, "relative_param_change": 0.01,
          "curve": [{"step": 0, "forward": 0, "selection": 0.0, "dev": 0.5},
                    {"step": 2, "forward": 4, "selection": sel, "dev": acc}],
          "prediction_distribution": [0.5, 0.5], "train_seconds": 1.0,
          "steps": int(g.num_steps), "forward_passes": {"forward": 4, "backward": 0},
          "step_memory_bytes": 1000, "params": 10, "trainable_params": 10, "init": "fake",
          "scoring": "causal", "rule": spec.rule, "oov_rate": None,
          "learning_rate": float(g.zo.learning_rate)}


class FakeRunSeed:
  """Stands in for run_seed: records each call; `kill_at` k raises on the k-th call (a kill
  before that unit finished); `on_call` runs inside the k-th call (e.g. sends a signal)."""

  def __init__(self, kill_at=None, on_call=None):
    self.calls, self.kill_at, self.on_call = [], kill_at, on_call or {}

  def __call__(self, spec, task, g, seed, reporter, programs, probe=True):
    self.calls.append((task, spec.name, seed, float(g.zo.learning_rate), int(g.num_steps)))
    if self.kill_at is not None and len(self.calls) == self.kill_at:
      raise RuntimeError("killed")
    if len(self.calls) in self.on_call:
      self.on_call[len(self.calls)]()
    return _record(spec, task, g, seed)


def _run(monkeypatch, c, workdir, fake):
  monkeypatch.setattr(glue_mode, "run_seed", fake)
  return glue_mode.run(c, str(workdir), QUIET)


def _units(workdir):
  return sorted(os.listdir(os.path.join(workdir, glue_mode.UNITS_DIR)))


def _snapshot(directory):
  return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))
          if os.path.isfile(os.path.join(directory, n)) and n != ".lock"}


def test_killed_run_resumes_and_skips_finished_units(sst2, tmp_path, monkeypatch):
  c, w = _grid_config(sst2), tmp_path / "w"
  with pytest.raises(RuntimeError, match="killed"):
    _run(monkeypatch, c, w, FakeRunSeed(kill_at=4))  # 3 units finished, the 4th in flight
  assert len(_units(w)) == 3 and not os.path.exists(w / "glue.json")
  kept = _snapshot(w / glue_mode.UNITS_DIR)
  again = FakeRunSeed()
  out = _run(monkeypatch, c, w, again)
  # adamw seeds 0, 1 and the first mezo trial (lr 1e-4, seed 0) were not computed again.
  assert again.calls == [("SST-2", "mezo_opt", 0, 1e-3, 3), ("SST-2", "mezo_opt", 0, 1e-3, 3),
                         ("SST-2", "mezo_opt", 1, 1e-3, 3)]
  assert out.exit_code == 0 and len(_units(w)) == 6
  assert all(_snapshot(w / glue_mode.UNITS_DIR)[n] == b for n, b in kept.items())
  # The resumed results are those of an uninterrupted run.
  fresh = _run(monkeypatch, c, tmp_path / "fresh", FakeRunSeed())
  assert out["rows"] == fresh["rows"] and out["records"] == fresh["records"]
  # A third run computes nothing and writes the same glue.json.
  third = FakeRunSeed()
  before = (w / "glue.json").read_text()
  _run(monkeypatch, c, w, third)
  assert third.calls == [] and (w / "glue.json").read_text() == before


def test_units_of_other_settings_are_not_reused_nor_replaced(sst2, tmp_path, monkeypatch):
  c, w = _grid_config(sst2), tmp_path / "w"
  _run(monkeypatch, c, w, FakeRunSeed())
  first = _snapshot(w / glue_mode.UNITS_DIR)
  results = _snapshot(w)
  # Other steps change what every unit computes: all 6 are computed again, under new names.
  other = FakeRunSeed()
  out = _run(monkeypatch, _grid_config(sst2, num_steps=2), w, other)
  assert len(other.calls) == 6 and {s for *_, s in other.calls} == {2}
  assert len(_units(w)) == 12
  assert {n: b for n, b in _snapshot(w / glue_mode.UNITS_DIR).items() if n in first} == first
  # ... and its results do not replace glue.*: they go to glue-<digest>.*.
  digest = out["paths"]["json"].rsplit("glue-", 1)[1][:-len(".json")]
  assert {n: b for n, b in _snapshot(w).items() if n in results} == results
  for name in ("json", "md", "png"):
    assert os.path.getsize(w / f"glue-{digest}.{name}") > 0
  assert os.path.getsize(w / f"glue-{digest}_curves_SST-2.png") > 0
  # One more seed reuses every unit it shares (the grid stays on seed 0): only seed 2 runs.
  more = FakeRunSeed()
  _run(monkeypatch, _grid_config(sst2, seeds=(0, 1, 2)), w, more)
  assert [(row, seed) for _, row, seed, *_ in more.calls] == [("adamw_opt", 2), ("mezo_opt", 2)]
  assert {n: b for n, b in _snapshot(w).items() if n in results} == results


def test_a_unit_file_that_cannot_be_read_is_one_line(sst2, tmp_path, monkeypatch):
  c, w = _grid_config(sst2), tmp_path / "w"
  _run(monkeypatch, c, w, FakeRunSeed())
  path = w / glue_mode.UNITS_DIR / _units(w)[0]
  path.write_text('{"unit": ')
  with pytest.raises(DataError, match="cannot be used") as e:
    _run(monkeypatch, c, w, FakeRunSeed())
  assert "\n" not in str(e.value) and path.read_text() == '{"unit": '


def test_second_run_on_the_workdir_is_refused(sst2, tmp_path, monkeypatch):
  w = tmp_path / "w"
  w.mkdir()
  fake = FakeRunSeed()
  with workdir_lib.WorkdirLock(w):
    with pytest.raises(WorkdirBusyError, match=f"PID {os.getpid()}") as e:
      _run(monkeypatch, _grid_config(sst2), w, fake)
  assert fake.calls == [] and "\n" not in str(e.value)
  assert not os.path.exists(w / glue_mode.UNITS_DIR)


def test_unwritable_workdir_is_refused_before_anything_runs(sst2, tmp_path, monkeypatch):

  def read_only(directory):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr(workdir_lib, "_probe_write", read_only)
  fake = FakeRunSeed()
  with pytest.raises(StorageError, match="read-only") as e:
    _run(monkeypatch, _grid_config(sst2), tmp_path / "w", fake)
  assert fake.calls == [] and "\n" not in str(e.value)


def test_disk_full_while_writing_results_keeps_the_previous_ones(sst2, tmp_path, monkeypatch):
  c, w = _grid_config(sst2), tmp_path / "w"
  _run(monkeypatch, c, w, FakeRunSeed())
  before = _snapshot(w)

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(DiskFullError, match="no space left") as e:
    _run(monkeypatch, c, w, FakeRunSeed())
  assert "\n" not in str(e.value)
  assert _snapshot(w) == before  # byte-identical, and no temporary file left behind


def test_sigterm_stops_after_the_unit_and_says_what_was_kept(sst2, tmp_path, monkeypatch):
  c, w = _grid_config(sst2), tmp_path / "w"
  previous = signal.getsignal(signal.SIGTERM)
  fake = FakeRunSeed(on_call={2: lambda: signal.raise_signal(signal.SIGTERM)})
  out = _run(monkeypatch, c, w, fake)
  assert len(fake.calls) == 2 and out.exit_code == 143 and out["interrupted"]
  units = os.path.join(os.path.abspath(w), glue_mode.UNITS_DIR)
  assert out["message"] == (
      "interrupted by SIGTERM before SST-2 mezo_opt learning-rate trial 0.0001 (seed 0); 2 of 6 "
      f"GLUE units finished and kept in {units}; rerun the same command to resume")
  assert len(_units(w)) == 2 and not os.path.exists(w / "glue.json")
  assert signal.getsignal(signal.SIGTERM) == previous
  again = FakeRunSeed()
  assert _run(monkeypatch, c, w, again).exit_code == 0 and len(again.calls) == 4


def test_run_seed_stops_at_the_step_boundary(sst2):
  g = glue_mode.glue_settings(_config(sst2, "opt:adamw:head"))

  class StopAfterFirstStep:
    checks = 0
    signal_number = signal.SIGINT

    def stop_requested(self):
      self.checks += 1
      return self.checks > 1  # the check before the unit says no; the one after step 1, yes

  spec = glue_rows.parse_rows(g.rows)[0]
  with pytest.raises(glue_mode.Interrupted) as e:
    glue_mode.run_seed(spec, "SST-2", g, 0, QUIET,
                       glue_rows.RowPrograms(stop=StopAfterFirstStep()))
  assert e.value.where == "in SST-2 adamw_opt_head seed 0 after step 1 of 3"


def test_nonfinite_start_parameter_is_named_before_training(sst2, monkeypatch):
  g = glue_mode.glue_settings(_config(sst2, "opt:adamw:head"))
  build = glue_rows.build_row

  def poisoned(*args, **kwargs):
    row = build(*args, **kwargs)
    leaves, tree = jax.tree_util.tree_flatten(row.params)
    leaves[0] = jnp.full_like(leaves[0], jnp.nan)
    row.params = jax.tree_util.tree_unflatten(tree, leaves)
    return row

  monkeypatch.setattr(glue_rows, "build_row", poisoned)
  spec = glue_rows.parse_rows(g.rows)[0]
  with pytest.raises(CheckpointError, match=r"non-finite value\(s\).*before any training") as e:
    glue_mode.run_seed(spec, "SST-2", g, 0, QUIET, glue_rows.RowPrograms())
  path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(
      build(spec, g, glue_mode.task_splits("SST-2", g, 0)[3], seed=0,
            total_steps=3).params)[0][0][0])
  assert path in str(e.value) and "learning rate cannot fix" in str(e.value)
  assert "\n" not in str(e.value)


def test_nonfinite_loss_names_empty_examples_and_step_zero():
  ok = np.ones((4, 6), bool)
  empty = ok.copy()
  empty[1:3] = False
  e = glue_mode.nonfinite_loss_error("r", float("nan"), 0, {"inputs": ok, "padding": empty})
  assert "2 of the 4 examples of the batch have no tokens" in str(e)
  assert "lower" not in str(e).lower() or "learning rate" not in e.fix
  e = glue_mode.nonfinite_loss_error("r", float("nan"), 0, {"inputs": np.zeros((0, 6)),
                                                             "padding": np.zeros((0, 6), bool)})
  assert "all of the 0 examples" in str(e)
  e = glue_mode.nonfinite_loss_error("r", float("nan"), 0, {"inputs": ok, "padding": ok})
  assert "at step 0, on the finite start parameters before any update" in str(e)
  assert "lower" not in e.fix
  e = glue_mode.nonfinite_loss_error("r", float("inf"), 5, {"inputs": ok, "padding": ok})
  assert isinstance(e, NonFiniteLossError) and "lower the row's learning rate" in e.fix


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_compile_children")
def test_sigint_in_a_real_glue_run_keeps_the_finished_units(sst2, tmp_path):
  """A child runs the test level through main.py and is held in its second seed, at the check
  for a stop request after step 2 (test_reliability.Paused); Ctrl-C there: it stops at that
  step boundary, says what was kept in one line and exits 130 with the first seed's unit kept
  (resuming from kept units is tested in-process above)."""
  w = tmp_path / "w"
  argv = ["--config=" + os.path.join(helpers.REPO, "configs", "glue.py") + ":test",
          f"--workdir={w}", "--mode=glue", f"--config.glue.glue_dir={sst2}",
          "--config.glue.rows=opt:adamw:head", "--config.glue.num_steps=4",
          "--config.glue.eval_every=4"]
  run = Paused(argv, None, tmp_path / "ctl", pause_in={
      "function": "bdiff_jax.modes.glue:check_stop", "when": "seed 1 after step 2 of 4"})
  units = w / glue_mode.UNITS_DIR
  assert len(os.listdir(units)) == 1  # the first seed's unit is committed, the second trains
  run.signal(signal.SIGINT)
  assert run.release() == 130, run.stdout + run.stderr
  out, err = run.stdout, run.stderr
  assert "Traceback" not in err + out
  lines = [l for l in (out + err).splitlines() if l.startswith("interrupted by SIGINT")]
  assert len(lines) == 1 and "in SST-2 adamw_opt_head seed 1 after step 2 of 4" in lines[0]
  assert lines[0].endswith(f"1 of 2 GLUE units finished and kept in {units}; rerun the same "
                           "command to resume")
  assert len(os.listdir(units)) == 1 and not (w / "glue.json").exists()


@pytest.mark.parametrize("key,value", [
    ("zo.num_perturbations", 0), ("dizo.interval", 0), ("dizo.iterations", -1),
    ("zo.learning_rate", float("nan")), ("adamw.learning_rate", 0.0), ("zo.eps", -1e-3),
    ("dizo.eps_p", float("inf")), ("zo.weight_decay", -0.1), ("zo.noise", "uniform")])
def test_rule_settings_are_validated_up_front(sst2, tmp_path, key, value):
  c = _config(sst2, "opt:dizo,opt:adamw")
  node, field = key.split(".")
  c.glue[node][field] = value
  with pytest.raises(ConfigError, match=f"glue.{key}=") as e:
    glue_mode.run(c, str(tmp_path / "w"), QUIET)
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "w")


def test_a_second_signal_aborts_at_once(capsys):
  aborted = []
  previous = signal.getsignal(signal.SIGINT)
  with glue_mode.GlueInterrupt(stream=sys.stderr, abort=aborted.append) as stop:
    signal.raise_signal(signal.SIGINT)
    assert stop.stop_requested() and not aborted
    signal.raise_signal(signal.SIGINT)
  assert aborted == [130] and signal.getsignal(signal.SIGINT) == previous
  err = capsys.readouterr().err.splitlines()
  assert err == ["received SIGINT: stopping after the current step; finished GLUE units are kept "
                 "(send it again to abort at once)",
                 "received SIGINT again: aborting now (exit 130); the finished GLUE units are "
                 "intact; rerun the same command to resume"]


def test_an_unknown_full_scale_is_refused_by_the_config():
  # configs/glue.py:full,scale=3 ended in an IndexError traceback inside get_config.
  from configs import glue as glue_config
  with pytest.raises(ValueError, match="unknown glue scale 3"):
    glue_config.get_config("full,scale=3")
