"""A NaN or infinite loss traced to its cause: non-finite start weights (a damaged checkpoint, a
bad initialisation) are refused before the first step, and a non-finite loss on a run's first
step (computed before any update) is blamed on the batch or the forward pass, not on the
learning rate."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax.errors import CheckpointError
from bdiff_jax.runtime import checkpointing


def nonfinite_leaves(params) -> list[str]:
  """The paths of the leaves of `params` holding a NaN or an infinity."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in leaves])
  return [jax.tree_util.keystr(path) for (path, _), ok in zip(leaves, finite) if not bool(ok)]


def check_finite_weights(params, *, start: int, ckpt: checkpointing.Checkpointer) -> None:
  """Refuses, before the first step, start weights that hold a NaN or an infinity (a damaged
  or diverged checkpoint, a bad initialisation): the loss would be non-finite at once, and the
  learning rate would be blamed.

  Raises:
    CheckpointError: naming the leaf, the checkpoint, and how to resume from an earlier one.
  """
  bad = nonfinite_leaves(params)
  if not bad:
    return
  leaves = f"{bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
  if start == 0:
    raise CheckpointError(
        f"the initial weights hold non-finite values (params{leaves}); training cannot start.",
        "check the model config (e.g. --config.model.dtype=float32, "
        "--config.model.head_bias_init=zeros) and rerun.")
  older = [s for s in ckpt.latest.all_steps() if s < start]
  raise CheckpointError(
      f"checkpoint step {start} in {ckpt.latest_dir} holds non-finite weights "
      f"(params{leaves}); training would produce a NaN loss at once.",
      (f"move {os.path.join(ckpt.latest_dir, str(start))} out of {ckpt.latest_dir} to resume "
       f"from step {max(older)}" if older else "train in a new --workdir") +
      "; nothing was deleted.")


def nonfinite_message(step: int, loss, *, start: int, good, checkpoints: str, batch,
                      vocab_size: int) -> tuple[str, str]:
  """(problem, fix) of a loss that became `loss` at `step` in a run that started at `start`.

  `good` is the latest checkpoint (None: none was saved); `batch()` gives the step's batch
  (host int array). The loss of a run's first step is computed from the start weights before
  any update, so the learning rate cannot be its cause: then the batch is checked instead."""
  if good is None:
    kept = ("no checkpoint was saved before it, so a rerun starts again from step 0")
    resume = "rerun (it starts from step 0)"
  else:
    kept = f"the last good checkpoint (step {good}) in {checkpoints} is untouched"
    resume = f"rerun; training resumes from step {good}"
  if step == start + 1:
    rows = np.asarray(batch())
    if rows.size == 0:
      cause = "its batch is empty"
    elif rows.min() < 0 or rows.max() >= vocab_size:
      cause = (f"its batch holds token ids outside the vocabulary [0, {vocab_size}) "
               f"({int(rows.min())}..{int(rows.max())})")
    else:
      cause = ("the start weights are finite and the batch is valid, so the model's forward "
               "pass overflows")
    return (f"the training loss was already {loss} at step {step}, the first step of this run: "
            f"it is computed from the start weights before any update, so the learning rate is "
            f"not the cause; {cause}. The run stopped; {kept}.",
            "check the data and the model config (e.g. --config.model.dtype=float32), then "
            f"{resume}.")
  return (f"the training loss became {loss} at step {step}; the run stopped; {kept}.",
          "lower --config.train.learning_rate (or raise warmup_steps / enable grad_clip) and "
          f"{resume}.")
