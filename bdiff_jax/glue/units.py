"""What makes a GLUE run resumable and its failures explicable: finished units committed to the
workdir (`Units`), the settings digest that keeps runs with other settings apart, SIGINT/SIGTERM
handling (`GlueInterrupt`, `Interrupted`, `GlueResult`), and the causes of a non-finite loss.
(See docs/glue.md, "Reliability".)"""

import hashlib
import json
import os
import signal

import numpy as np

from bdiff_jax.errors import CheckpointError, DataError, NonFiniteLossError
from bdiff_jax.glue.settings import row_settings, uses_grid
from bdiff_jax.runtime import interrupt
from bdiff_jax.runtime import workdir as workdir_lib
from bdiff_jax.runtime.reporter import Reporter
from bdiff_jax.train import nonfinite


UNITS_DIR = "glue_units"
# Fields of `config.glue` that say which units a run has or only label it, not what a unit
# computes: left out of a unit's digest, so that a run with more seeds, tasks or rows reuses the
# units it shares with an earlier one.
UNIT_EXCLUDED = ("seeds", "tasks", "rows", "level", "description")
# The update-rule sections a row's rule never reads, by rule: left out of its units' digests
# too, so that changing the zeroth-order rows' settings does not recompute the first-order
# rows' units, nor the other way round.
UNREAD_SECTIONS = {"adamw": ("zo", "dizo"), "mezo": ("adamw", "dizo"), "dizo": ("adamw",)}
# Likewise the start models a row's model does not start from (`glue.rows.build_row`).
UNREAD_STARTS = {"reversible_qwen3": ("opt_dir", "init_workdir_standard"),
                 "standard_qwen3": ("opt_dir", "init_workdir_reversible"),
                 "opt": ("init_workdir", "init_workdir_reversible", "init_workdir_standard")}


def settings_digest(settings: dict) -> str:
  """12 hex digits of the SHA-256 of `settings` (a JSON-able dict, keys sorted)."""
  text = json.dumps(settings, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def unit_settings(g, spec) -> dict:
  """What a unit of row `spec` depends on: the settings (`GlueSettings.to_dict()`, the dict of
  `config.glue`) minus `UNIT_EXCLUDED` and the rule sections and start models it does not read
  (`UNREAD_SECTIONS`, `UNREAD_STARTS`), plus the seed of the learning-rate grid (the first seed)
  for a row with a grid, whose choice every seed uses. The row's own settings (`row_settings`:
  a LoRA zeroth-order row's `glue.lora_zo` applied)."""
  g = row_settings(g, spec)
  unread = UNIT_EXCLUDED + UNREAD_SECTIONS[spec.rule] + UNREAD_STARTS[spec.model]
  out = {k: v for k, v in g.to_dict().items() if k not in unread}
  if uses_grid(spec, g):
    out["lr_grid_seed"] = int(g.seeds[0])
  return out


def unit_name(task: str, row: str, seed: int, lr: float | None = None) -> str:
  """`<task>__<row>__seed<k>`, or a learning-rate trial's `<task>__<row>__grid-lr<lr>__seed<k>`."""
  return f"{task}__{row}__" + ("" if lr is None else f"grid-lr{float(lr)!r}__") + f"seed{seed}"


class Units:
  """The finished units of a GLUE run: one file per (task, row, seed) record and per learning-rate
  trial, `<dir>/<unit name>__<digest>.json`, written atomically as soon as the unit finishes.

  The digest (`settings_digest(unit_settings(g, spec))`) is part of the file name and is stored
  in the file with the settings: a run with other settings never reads (or replaces) a unit of
  another, it computes its own under a new name. Every unit of the run is known up front
  (`names`), so `finished()` counts the kept ones at any time.
  """

  def __init__(self, directory: str, g, specs, tasks):
    self.directory = directory
    self._settings = {s.name: unit_settings(g, s) for s in specs}
    self._digests = {k: settings_digest(v) for k, v in self._settings.items()}
    self.names = []
    for task in tasks:
      for spec in specs:
        g_row = row_settings(g, spec)
        if uses_grid(spec, g_row):
          self.names += [(unit_name(task, spec.name, int(g.seeds[0]), lr=float(lr)), spec.name)
                         for lr in g_row.zo.learning_rates]
        self.names += [(unit_name(task, spec.name, int(s)), spec.name) for s in g.seeds]
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as e:
      raise workdir_lib.os_error_to_user_error(e, f"creating {directory}") from None

  @property
  def total(self) -> int:
    return len(self.names)

  def path(self, name: str, row: str) -> str:
    return os.path.join(self.directory, f"{name}__{self._digests[row]}.json")

  def finished(self) -> int:
    """How many of this run's units are kept in the directory."""
    return sum(os.path.exists(self.path(n, r)) for n, r in self.names)

  def load(self, name: str, spec, reporter: Reporter | None = None):
    """The result of a finished unit, or None when it has not finished (with these settings).

    Raises:
      DataError: its file exists but cannot be read, or is not that unit's.
    """
    path = self.path(name, spec.name)
    if not os.path.exists(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
      if data["unit"] != name or data["digest"] != self._digests[spec.name]:
        raise ValueError(f"it holds unit {data['unit']!r} with digest {data['digest']!r}")
      result = data["result"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(f"the finished GLUE unit {path} cannot be used ({e}).",
                      "move that file away (the unit is then computed again) and rerun the same "
                      "command.") from None
    if reporter is not None:
      reporter.info(f"{name}: finished before, reused ({os.path.basename(path)})")
    return result

  def save(self, name: str, spec, result):
    """Commits a finished unit (atomically); returns `result` as it reads back from the file
    (JSON types), so that a resumed run computes exactly what an uninterrupted one does."""
    text = json.dumps({"unit": name, "digest": self._digests[spec.name],
                       "settings": self._settings[spec.name], "result": result}, indent=1)
    workdir_lib.write_text_atomically(self.path(name, spec.name), text,
                                      f"the finished GLUE unit {name}")
    return json.loads(text)["result"]


class Interrupted(Exception):
  """A SIGINT/SIGTERM stopped the run at a step or unit boundary; `where` says where."""

  def __init__(self, where: str):
    super().__init__(where)
    self.where = where


def check_stop(stop, where: str) -> None:
  if stop is not None and stop.stop_requested():
    raise Interrupted(where)


class GlueInterrupt(interrupt.GracefulInterrupt):
  """`GracefulInterrupt` whose notices say what a GLUE run does: the first signal stops it at the
  next step (finished units are already kept; the unit in flight is dropped), a second one
  aborts at once (`abort`, exit 128 + signal number)."""

  def first_notice(self, signum: int) -> str:
    return (f"received {signal.Signals(signum).name}: stopping after the current step; finished "
            "GLUE units are kept (send it again to abort at once)")

  def again_notice(self, signum: int) -> str:
    return (f"received {signal.Signals(signum).name} again: aborting now (exit {128 + signum}); "
            "the finished GLUE units are intact; rerun the same command to resume")


class GlueResult(dict):
  """What `run` returns (a dict: rows, records, baselines, paths; or, after an interruption,
  interrupted, message, units_finished, units_total, units_dir), with `exit_code` for main.py:
  0, or 130 / 143 after SIGINT / SIGTERM."""

  exit_code = 0


def check_finite_params(params, what: str) -> None:
  """Raises CheckpointError naming the leaves of `params` that hold NaN or inf."""
  bad = nonfinite.nonfinite_leaves(params)
  if bad:
    raise CheckpointError(
        f"{what} hold non-finite value(s) (NaN/inf) in {bad[0]}"
        f"{f' and {len(bad) - 1} more leaves' if len(bad) > 1 else ''}, before any training.",
        "repair or replace that start model (glue.init_workdir* / glue.opt_dir / "
        "glue.init_checkpoint, e.g. an earlier checkpoint); a learning rate cannot fix it.")


def nonfinite_loss_error(what: str, loss: float, step: int, batch: dict) -> NonFiniteLossError:
  """The error for a NaN/inf loss at `step` on `batch`, naming the cause it can tell: examples
  with no tokens in the batch, or, at step 0 (the loss of the untrained start parameters, which
  `check_finite_params` found finite, before any update), the batch rather than the learning
  rate."""
  padding = batch.get("padding")
  n = int(np.prod(np.shape(batch["inputs"])[:-1])) if "inputs" in batch else 0
  empty = 0 if padding is None else int(np.sum(np.asarray(padding).sum(axis=-1) == 0))
  if n == 0 or empty:
    return NonFiniteLossError(
        f"{what}: the loss became {loss} at step {step}: {empty or 'all'} of the {n} examples "
        "of the batch have no tokens (an empty batch or empty texts), not the learning rate.",
        "check the task's training texts (empty sentences) and glue.seq_len / glue.batch_size.")
  if step == 0:
    return NonFiniteLossError(
        f"{what}: the loss is {loss} at step 0, on the finite start parameters before any "
        f"update (so not the learning rate): the first batch of {n} examples gives it.",
        "check the task's training data and the start model's scoring of it (glue.seq_len, "
        "the prompt); rerunning with another learning rate will not help.")
  return NonFiniteLossError(f"{what}: the loss became {loss} at step {step}.",
                            "lower the row's learning rate.")
