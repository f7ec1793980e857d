"""Checkpoints with orbax's `CheckpointManager` (current `ocp.args` API), with integrity digests.

Two managers under the workdir:
  checkpoints/       the latest `keep` checkpoints, saved every `train.checkpoint_every` steps;
  checkpoints_best/  the single best checkpoint by the validation bound (lower is better).
Each checkpoint holds the `TrainState` pytree and a JSON `meta` item: the data position (epoch
and batch within it), the step, and any evaluation metrics, so that a resumed run continues on
exactly the batch an uninterrupted run would have seen.

Integrity (manifests: `checkpoint_digests`). `save` waits until orbax has committed the step
directory, then writes `<step_dir>/bdiff_digests.json`: the step, and the size and SHA-256 of
every other file of the directory (process 0 of a multi-process run writes it; orbax saves
collectively). The manifest lives inside the step directory, so orbax's step listing (directories
named by step) ignores it and orbax's garbage collection removes it together with its step; no
manifest can outlive its checkpoint. Every save also records `{"bdiff_digests": 1}` in orbax's
own step metadata, committed atomically with the checkpoint, so a step written by this code is
known to need a manifest.

`restore` verifies the step directory before orbax reads a byte of it:
  manifest present      every listed file must exist with its size and SHA-256, and no other file
                        may be there; otherwise `CheckpointCorruptError` names the first bad file.
  no manifest, marked   (the process died between orbax's commit and the manifest, or the
                        manifest was deleted): the newest step of its manager, the only one a
                        kill can leave so, is restored unverified with one warning line (orbax
                        publishes a step only whole: in a multi-process run a peer lost right
                        after the commit leaves process 0 no time for the manifest, and refusing
                        it would lose the whole run); any older step is a
                        `CheckpointCorruptError`, since a later save finished after it.
  no manifest, unmarked (written before digests existed): restored unverified, with one warning
                        line on stderr.
The error lists the other checkpoints that verify (`--config.eval.checkpoint=<step>`) and how to
resume from the newest of them (move the bad step directory aside). Nothing is ever deleted or
rewritten by a restore.

Failures print one line. A restore that orbax itself rejects raises `CheckpointError`; orbax's
tensorstore reads that were still in flight when it gave up are kept from printing "Event loop is
closed" tracebacks (see `orbax_failures.TolerantLoops`), and the managers are closed. A save that
fails with ENOSPC / EDQUOT / EROFS / EACCES raises the one-line `DiskFullError` / `StorageError`;
orbax writes into a temporary directory and deletes old steps only after a successful commit, so
earlier checkpoints stay byte-identical.
"""

import logging
import os
import shutil
import sys
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from bdiff_jax.errors import CheckpointError
from bdiff_jax.runtime import orbax_failures
from bdiff_jax.runtime.checkpoint_digests import (MANIFEST_FORMAT, MARKER_KEY, check_step_dir,
                                          write_manifest)
from bdiff_jax.runtime.workdir import find_os_error, os_error_to_user_error

BEST_METRIC = "valid_nll_per_token"
# Space set aside in the workdir while orbax writes, and freed just before the manifests are
# written, so that a disk filling up during a save cannot leave a committed step without its
# manifest (which would make it unverifiable). Manifests take ~150 bytes per file.
RESERVE_NAME = ".checkpoint_space_reserve"
RESERVE_BYTES = 1 << 20


def _reserve_name() -> str:
  """The reserve file of this process (processes of a multi-process run save together)."""
  index = jax.process_index()
  return RESERVE_NAME if index == 0 else f"{RESERVE_NAME}.{index}"


class CheckpointCorruptError(CheckpointError):
  """A checkpoint whose files do not match their digest manifest (or lack one they need)."""


# --------------------------------------------------------------------------------------------
# The checkpointer.


def _barriers(name: str) -> ocp.options.MultiprocessingOptions:
  """A manager's multi-process options: its barrier names start with `name`."""
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"bdiff_{name}")


class Checkpointer:
  """Latest-K and best-1 checkpoints of one workdir, with digest manifests.

  Use it as a context manager (or call `close()`); after a failed `restore` it is closed.
  """

  def __init__(self, workdir: str, *, keep: int = 3, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.latest_dir = os.path.join(self.workdir, "checkpoints")
    self.best_dir = os.path.join(self.workdir, "checkpoints_best")
    self._read_only = read_only
    self._closed = False
    # A save failed with a reported OS error (see _after_failed_save), or orbax failed a restore.
    self._failed = False
    self._muted: Optional[orbax_failures.HoldRecords] = None
    if not read_only and jax.process_index() == 0:
      removed = [os.path.relpath(p, self.workdir) for d in (self.latest_dir, self.best_dir)
                 for p in remove_unfinished_saves(d)]
      if removed:
        print(f"note: removed {len(removed)} unfinished checkpoint folder(s) left by a failed "
              f"or interrupted save: {', '.join(removed)} (committed checkpoints are "
              "untouched).", file=sys.stderr, flush=True)
    self._holds_loops = orbax_failures.TOLERANT_LOOPS.acquire()  # before orbax can create a loop
    names = ("state", "meta")
    try:
      # Each manager names its own multi-process barriers: both save step N at an evaluation
      # step, and orbax names a save's barriers after the step alone, so two managers would
      # meet at one barrier name (which orbax requires unique) and a 2-process save whose
      # arrays span the processes deadlocked whenever their writes finished in another order.
      self.latest = ocp.CheckpointManager(
          self.latest_dir, item_names=names,
          options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                               read_only=read_only,
                                               multiprocessing_options=_barriers("latest")))
      self.best = ocp.CheckpointManager(
          self.best_dir, item_names=names,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=not read_only, read_only=read_only,
              best_fn=lambda m: m[BEST_METRIC], best_mode="min",
              keep_checkpoints_without_metrics=False,
              multiprocessing_options=_barriers("best")))
    except OSError as e:
      self._release_loops()
      raise os_error_to_user_error(e, f"opening the checkpoints of {self.workdir}") from None

  def _release_loops(self) -> None:
    if self._holds_loops:
      self._holds_loops = False
      orbax_failures.TOLERANT_LOOPS.release()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def best_step(self) -> Optional[int]:
    return self.best.latest_step()

  @staticmethod
  def _args(state, meta):
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta))

  @staticmethod
  def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(os.fspath(manager.directory), str(step))

  def save(self, step: int, state, meta: dict, *, best_metrics: Optional[dict] = None,
           force: bool = False) -> None:
    """Saves to the latest manager (and the best one with `best_metrics`); returns once committed.

    A step the manager already holds is skipped (e.g. a save on interruption right after a
    periodic one), so calling this twice for one step is harmless. When this returns, the step
    directories are final and carry their digest manifests.

    Raises:
      DiskFullError / StorageError: writing failed (disk full, quota, read-only, permission);
        earlier checkpoints are untouched.
    """
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree_util.tree_leaves(state)):
      state = jax.device_get(state)
    # else: a multi-process run; orbax writes each process's shards (a collective save).
    step = int(step)
    written = []
    marker = {MARKER_KEY: MANIFEST_FORMAT}
    reserve = os.path.join(self.workdir, _reserve_name())
    with orbax_failures.held_absl_logs() as held:
      try:
        try:
          with open(reserve, "wb") as f:  # fails early, before orbax, on a full disk
            f.write(bytes(RESERVE_BYTES))
            f.flush()
            os.fsync(f.fileno())
          if step not in self.latest.all_steps():
            if self.latest.save(step, args=self._args(state, meta), force=force,
                                custom_metadata=marker):
              written.append(self.latest)
          if best_metrics is not None and step not in self.best.all_steps():
            if self.best.save(step, args=self._args(state, dict(meta, **best_metrics)),
                              metrics=best_metrics, force=True, custom_metadata=marker):
              written.append(self.best)
          self.latest.wait_until_finished()
          self.best.wait_until_finished()
        finally:
          if os.path.exists(reserve):
            os.unlink(reserve)
        for manager in written if jax.process_index() == 0 else ():
          # The best manager may already have dropped a step no better than its best.
          if step in manager.all_steps() and os.path.isdir(self.step_dir(manager, step)):
            write_manifest(self.step_dir(manager, step), step)
      except Exception as e:  # pylint: disable=broad-except
        os_error = find_os_error(e)
        if os_error is None:
          raise  # what orbax logged is emitted as the block ends
        self._after_failed_save(step)
        held.drop()
        raise os_error_to_user_error(
            os_error, f"saving checkpoint {step} in {self.workdir}") from None

  def _after_failed_save(self, step: int) -> None:
    """After a save failed with an OS error reported as one line: the managers keep that error
    and raise (and log) it again from every later wait/close, so orbax's logs stay muted until
    `close` and `wait`/`close` swallow it. A manager that did commit the step (the other one
    failed) still gets its manifest, so that the step is not refused as unverifiable later."""
    self._failed = True
    if self._muted is None:
      self._muted = orbax_failures.HoldRecords()
      logging.getLogger("absl").addFilter(self._muted)
    self.wait()
    for manager in (self.latest, self.best) if jax.process_index() == 0 else ():
      step_dir = self.step_dir(manager, step)
      if step in manager.all_steps() and os.path.isdir(step_dir):
        try:
          write_manifest(step_dir, step)
        except OSError:
          pass  # the step stays unverifiable (and is refused at restore as such)

  def wait(self) -> None:
    """Waits for pending saves (after a reported failed save, without raising again)."""
    for manager in (self.latest, self.best):
      try:
        manager.wait_until_finished()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise

  def close(self) -> None:
    """Waits for pending work and closes both managers (idempotent)."""
    if self._closed:
      return
    self._closed = True
    try:
      for manager in (self.latest, self.best):
        try:
          manager.close()
        except Exception:  # pylint: disable=broad-except
          if not self._failed:
            raise
    finally:  # after a failed save or restore orbax's threads may still log it or start loops
      if not self._failed:
        self._release_loops()
        if self._muted is not None:
          logging.getLogger("absl").removeFilter(self._muted)
          self._muted = None

  def all_checkpoints(self) -> list[tuple[ocp.CheckpointManager, int]]:
    """Every (manager, step) of the workdir, latest manager first."""
    return ([(self.latest, s) for s in sorted(self.latest.all_steps())] +
            [(self.best, s) for s in sorted(self.best.all_steps())])

  def resolve(self, which: Any) -> tuple[ocp.CheckpointManager, int, str]:
    """Maps 'latest' | 'best' | a step number to (manager, step, description)."""
    which = str(which)
    if which == "best":
      step = self.best_step()
      if step is None:  # runs too short to have evaluated fall back on the latest checkpoint
        step = self.latest_step()
        if step is None:
          raise CheckpointError(f"no checkpoint in {self.workdir}.",
                                "train first (--mode=train) or pass the right --workdir.")
        return self.latest, step, f"latest (no best yet) step {step}"
      return self.best, step, f"best step {step}"
    if which == "latest":
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint in {self.latest_dir}.",
                              "train first (--mode=train) or pass the right --workdir.")
      return self.latest, step, f"latest step {step}"
    step = int(which)
    for manager in (self.latest, self.best):
      if step in manager.all_steps():
        return manager, step, f"step {step}"
    raise CheckpointError(
        f"no checkpoint for step {step} in {self.workdir} (have: "
        f"{sorted(set(self.latest.all_steps()) | set(self.best.all_steps()))}).",
        "pass --config.eval.checkpoint=best, latest or one of those steps.")

  def intact_alternatives(self, bad_manager: ocp.CheckpointManager, bad_step: int) -> list[int]:
    """Steps other than the bad one whose `--config.eval.checkpoint=<step>` verifies."""
    good = set()
    for step in sorted(set(self.latest.all_steps()) | set(self.best.all_steps())):
      manager, _, _ = self.resolve(step)
      if manager is bad_manager and step == bad_step:
        continue
      if self._status(manager, step)[0] in ("ok", "unverified"):
        good.add(step)
    return sorted(good)

  def _status(self, manager: ocp.CheckpointManager, step: int) -> tuple[str, str]:
    """`check_step_dir`'s verdict, with a missing manifest of the manager's newest step (a kill
    between orbax's commit and the manifest) taken as unverified and any older one as corrupt."""
    status, detail = check_step_dir(self.step_dir(manager, step), step)
    if status == "unfinished":
      newest = step == max(manager.all_steps(), default=None)
      status = "unverified" if newest else "corrupt"
    return status, detail

  def verify(self, manager: ocp.CheckpointManager, step: int) -> str:
    """Checks one checkpoint's digests; returns "ok" or "unverified" (warned on stderr).

    Raises:
      CheckpointCorruptError: naming the bad file and the intact checkpoints to use instead.
    """
    step_dir = self.step_dir(manager, step)
    status, detail = self._status(manager, step)
    if status == "unverified":
      print(f"warning: checkpoint {step_dir} has no digest manifest ({detail}); restoring it "
            "unverified.", file=sys.stderr, flush=True)
    if status != "corrupt":
      return status
    good = self.intact_alternatives(manager, step)
    best = self.best_step()
    best_ok = (best is not None and not (manager is self.best and step == best) and
               self._status(self.best, best)[0] in ("ok", "unverified"))
    if good or best_ok:
      uses = []
      if good:
        uses.append(f"--config.eval.checkpoint={max(good)} (steps "
                    f"{', '.join(map(str, good))} verify)")
      if best_ok:
        uses.append(f"--config.eval.checkpoint=best (best step {best} verifies)")
      fix = f"use an intact checkpoint for eval/sample: {' or '.join(uses)}"
      older = [s for s in self.latest.all_steps() if s < step and s in good]
      if manager is self.latest and step == self.latest_step() and older:
        fix += (f"; to resume training from step {max(older)}, move {step_dir} out of "
                f"{self.latest_dir}")
      fix += ". Nothing was deleted."
    else:
      fix = ("no other intact checkpoint is left in this workdir: train in a new --workdir. "
             "Nothing was deleted.")
    raise CheckpointCorruptError(f"checkpoint {step_dir} is corrupt: {detail}.", fix)

  def restore(self, which: Any, abstract_state) -> tuple[Any, dict, str]:
    """Restores (state, meta, description). `abstract_state` gives structure, shapes, dtypes.

    The step directory is verified first (see the module docstring). On any error the managers
    are closed and one `CheckpointError` is raised.
    """
    try:
      manager, step, desc = self.resolve(which)
      self.verify(manager, step)
      path = self.step_dir(manager, step)
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        # Its in-flight reads may outlive this call (see orbax_failures.TolerantLoops).
        self._failed = True
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        detail = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be restored ({detail}).",
            "it is corrupt or was written with a different model config. Use the config it was "
            "trained with, restore another step (--config.eval.checkpoint=<step>), or train in "
            "a new --workdir; nothing was deleted.") from e
    except CheckpointError:
      self.close()
      raise
    return restored["state"], dict(restored["meta"]), desc


def remove_unfinished_saves(directory: str) -> list[str]:
  """Removes orbax's temporary folders (`<step>.orbax-checkpoint-tmp-<n>`) in `directory`: a
  save that failed (disk full) or was killed leaves them, and orbax neither uses nor removes
  them. Only names with that suffix are touched: committed steps never carry it. Call with the
  workdir locked, before any save starts. Returns the removed paths."""
  try:
    names = sorted(os.listdir(directory))
  except OSError:
    return []
  removed = []
  for name in names:
    path = os.path.join(directory, name)
    if ".orbax-checkpoint-tmp" in name:
      shutil.rmtree(path, ignore_errors=True)
      if not os.path.exists(path):
        removed.append(path)
  return removed


def directory_has_checkpoints(workdir: str) -> bool:
  path = epath.Path(workdir) / "checkpoints"
  return path.exists() and any(p.name.isdigit() for p in path.iterdir())
