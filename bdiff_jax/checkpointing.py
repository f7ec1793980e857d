"""Checkpoints with orbax's `CheckpointManager` (current `ocp.args` API).

Two managers under the workdir:
  checkpoints/       the latest `keep` checkpoints, saved every `train.checkpoint_every` steps;
  checkpoints_best/  the single best checkpoint by the validation bound (lower is better).
Each checkpoint holds the `TrainState` pytree and a JSON `meta` item: the data position (epoch
and batch within it), the step, and any evaluation metrics, so that a resumed run continues on
exactly the batch an uninterrupted run would have seen.

Restoring never deletes or rewrites anything; a checkpoint that cannot be read raises
`CheckpointError` naming the directory and what to do.
"""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from bdiff_jax.errors import CheckpointError

BEST_METRIC = "valid_nll_per_token"


class Checkpointer:
  """Latest-K and best-1 checkpoints of one workdir."""

  def __init__(self, workdir: str, *, keep: int = 3, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.latest_dir = os.path.join(self.workdir, "checkpoints")
    self.best_dir = os.path.join(self.workdir, "checkpoints_best")
    self._read_only = read_only
    names = ("state", "meta")
    self.latest = ocp.CheckpointManager(
        self.latest_dir, item_names=names,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                             read_only=read_only))
    self.best = ocp.CheckpointManager(
        self.best_dir, item_names=names,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=not read_only, read_only=read_only,
            best_fn=lambda m: m[BEST_METRIC], best_mode="min",
            keep_checkpoints_without_metrics=False))

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def best_step(self) -> Optional[int]:
    return self.best.latest_step()

  @staticmethod
  def _args(state, meta):
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta))

  def save(self, step: int, state, meta: dict, *, best_metrics: Optional[dict] = None,
           force: bool = False) -> None:
    """Saves to the latest manager, and to the best manager when `best_metrics` is given."""
    state = jax.device_get(state)
    self.latest.save(step, args=self._args(state, meta), force=force)
    if best_metrics is not None:
      self.best.save(step, args=self._args(state, dict(meta, **best_metrics)),
                     metrics=best_metrics, force=True)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()

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

  def restore(self, which: Any, abstract_state) -> tuple[Any, dict, str]:
    """Restores (state, meta, description). `abstract_state` gives structure, shapes, dtypes."""
    manager, step, desc = self.resolve(which)
    path = os.path.join(manager.directory, str(step))
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"checkpoint {path} cannot be restored ({type(e).__name__}: {detail}).",
          "it is corrupt or was written with a different model config. Use the config it was "
          "trained with, restore another step (--config.eval.checkpoint=<step>), or train in a "
          "new --workdir; nothing was deleted.") from e
    return restored["state"], dict(restored["meta"]), desc


def directory_has_checkpoints(workdir: str) -> bool:
  path = epath.Path(workdir) / "checkpoints"
  return path.exists() and any(p.name.isdigit() for p in path.iterdir())
