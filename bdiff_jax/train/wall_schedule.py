"""Fits the length of the learning-rate schedule to the wall-clock budget.

With `train.max_wall_seconds` a run stops when its time is spent. On a machine slower than the
one a preset was sized on, that cuts the cosine schedule before its learning rate has decayed,
and the last, most useful part of the schedule is never trained. With
`train.fit_steps_to_wall=true` the trainer instead times the run's first steps and chooses
`train.num_steps`: the largest value, at most the configured one, whose steps, periodic
evaluations and checkpoints, and one recompilation of the step fit in the budget.

Exactness. The timed steps all lie inside the linear warmup, whose learning rates do not depend
on the schedule's length, so the fitted run is step for step the run that
`--config.train.num_steps=N` makes. The choice is written to `<workdir>/schedule_fit.json` (with
what it was measured from) and to config.json, and a resume with the same config adopts it, so
an interrupted run continues on the same schedule (`adopt`).

The measurement at the decision step: the wall time per step over the last two thirds of the
calibration window (the first steps are slower: dispatch and allocator warm-up), one periodic evaluation after its compilation (the trainer
runs the step's evaluation twice and times the second) plus one checkpoint save, and the train
step's compile time from the start of the run.

Limits, measured on 2 shared CPU cores (docs/results_log.md, ‖): the window is short (20 steps),
so a machine whose speed drifts leaves part of the budget unused or has the last steps cut; and a schedule
decayed within a short budget is not always better than a longer one cut before its end (the
`cpu` preset keeps the latter, which measured better).
"""

import copy
import dataclasses
import json
import os
from typing import Any, Callable, Optional

from bdiff_jax.config import compat as config_compat

RECORD_FILE = "schedule_fit.json"
CALIBRATION_STEPS = 30  # the decision is taken at min(this, warmup_steps)
SAFETY = 0.98  # plan for this fraction of the remaining budget (step times drift)


@dataclasses.dataclass(frozen=True)
class Timing:
  """What a fit is computed from (seconds)."""
  step: float  # one train step (wall time, logging included)
  event: float  # one periodic evaluation + checkpoint save
  compile: float  # compiling the train step once more, for the fitted schedule


def calibration(start: int, warmup_steps: int) -> Optional[tuple[int, int]]:
  """(first timed step, decision step): the steps after `first` up to `decision` are timed,
  and the fit is decided after step `decision`; None when this run cannot fit its schedule.

  Every timed step is inside the warmup, and the first third of the window (at least the run's
  first step, which carries dispatch warm-up) is not timed: on 2 CPU cores the first ~10 steps
  of the cpu preset ran at 60% of the later speed (allocator warm-up). A run resumed past the
  window (interrupted before a fit was recorded) keeps its configured schedule."""
  d = min(CALIBRATION_STEPS, int(warmup_steps))
  first = start + max(1, (d - start) // 3)
  return (first, d) if d > first else None


def events_between(after: int, upto: int, *, eval_every: int, checkpoint_every: int) -> int:
  """Periodic evaluations or checkpoints at steps s with after < s <= upto (the last step, at
  which the trainer always evaluates, counted once)."""
  if upto <= after:
    return 0

  def multiples(every):  # multiples of `every` in (after, upto]
    return upto // every - after // every

  both = eval_every * checkpoint_every // _gcd(eval_every, checkpoint_every)
  n = multiples(eval_every) + multiples(checkpoint_every) - multiples(both)
  if upto % eval_every and upto % checkpoint_every:
    n += 1  # the final step
  return n


def _gcd(a: int, b: int) -> int:
  while b:
    a, b = b, a % b
  return a


def planned_seconds(num_steps: int, at_step: int, timing: Timing, *, eval_every: int,
                    checkpoint_every: int, recompile: bool) -> float:
  """Predicted wall time from `at_step` to the end of a `num_steps` schedule."""
  events = events_between(at_step, num_steps, eval_every=eval_every,
                          checkpoint_every=checkpoint_every)
  return ((num_steps - at_step) * timing.step + events * timing.event +
          (timing.compile if recompile else 0.0))


def fit_num_steps(*, cap: int, at_step: int, remaining_seconds: float, timing: Timing,
                  eval_every: int, checkpoint_every: int, min_steps: int) -> int:
  """The largest num_steps in [min_steps, cap] whose rest fits SAFETY * remaining_seconds
  (min_steps when none does: max_wall_seconds then stops the run as it would have anyway).

  The cost is monotone in num_steps, so this is a bisection. `cap` itself needs no
  recompilation (its step is the compiled one); every other length does."""
  budget = SAFETY * remaining_seconds

  def fits(n):
    return planned_seconds(n, at_step, timing, eval_every=eval_every,
                           checkpoint_every=checkpoint_every, recompile=n != cap) <= budget

  lo = max(int(min_steps), at_step + 1)
  if cap <= lo or fits(cap):
    return cap
  if not fits(lo):
    return lo
  hi = cap  # fits(lo) and not fits(hi)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def record(*, num_steps: int, configured: int, at_step: int, timing: Timing,
           max_wall_seconds: float, remaining_seconds: float, eval_every: int,
           checkpoint_every: int) -> dict:
  """The JSON record of a fit (what it chose and what it was measured from)."""
  return {
      "num_steps": int(num_steps),
      "configured_num_steps": int(configured),
      "decided_at_step": int(at_step),
      "step_seconds": timing.step,
      "event_seconds": timing.event,
      "compile_seconds": timing.compile,
      "max_wall_seconds": float(max_wall_seconds),
      "remaining_seconds": float(remaining_seconds),
      "planned_seconds": planned_seconds(num_steps, at_step, timing, eval_every=eval_every,
                                         checkpoint_every=checkpoint_every,
                                         recompile=num_steps != configured),
  }


def fit_and_record(config: Any, workdir: str, *, at_step: int, timed_from: int, timing: Timing,
                   remaining_seconds: float, log, reporter, write: bool = True,
                   agree: Optional[Callable[[int], int]] = None) -> Optional[Any]:
  """Fits num_steps at step `at_step`; records it (`RECORD_FILE`, config.json, a
  "schedule_fit" metrics record, one line to the user) and returns the config of the fitted
  schedule, or None when the configured num_steps stands.

  write: whether this process writes files (process 0 of a multi-process run); agree: maps this
  process's choice to process 0's (every process must follow the same schedule)."""
  t = config.train
  cap = int(t.num_steps)
  n = fit_num_steps(cap=cap, at_step=at_step, remaining_seconds=remaining_seconds,
                    timing=timing, eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
                    min_steps=t.warmup_steps + 1)
  if agree is not None:
    n = agree(n)
  rec = record(num_steps=n, configured=cap, at_step=at_step, timing=timing,
               max_wall_seconds=t.max_wall_seconds, remaining_seconds=remaining_seconds,
               eval_every=t.eval_every, checkpoint_every=t.checkpoint_every)
  fitted = config
  if n != cap:
    fitted = copy.deepcopy(config)
    fitted.train.num_steps = n
  if write:
    write_record(workdir, rec)
    config_compat.write_config_atomically(fitted, workdir)
  log.write("schedule_fit", at_step, **rec)
  reporter.info(
      f"schedule: train.num_steps={n:,} (at most {cap:,}) ends within "
      f"train.max_wall_seconds={t.max_wall_seconds:g}: {timing.step:.3f} s/step over steps "
      f"{timed_from}..{at_step}, {timing.event:.1f} s per evaluation + checkpoint (recorded in "
      f"{RECORD_FILE})")
  return fitted if n != cap else None


def write_record(workdir: str, rec: dict) -> str:
  return config_compat.write_config_atomically(rec, workdir, filename=RECORD_FILE)


def load_record(workdir: str) -> Optional[dict]:
  """The workdir's fit record, or None (none, or not a readable record: then a resume keeps
  the configured schedule, which the trainer reports as a schedule change)."""
  try:
    with open(os.path.join(workdir, RECORD_FILE), encoding="utf-8") as f:
      rec = json.load(f)
  except (OSError, ValueError):
    return None
  ok = (isinstance(rec, dict) and isinstance(rec.get("num_steps"), int) and
        isinstance(rec.get("configured_num_steps"), int))
  return rec if ok else None


def adopt(config: Any, rec: Optional[dict]) -> tuple[Any, bool]:
  """(config, adopted): for a resume, `config` with the recorded num_steps when it fits its
  schedule to the wall clock and asks for the same cap the fit was made from; otherwise
  `config` unchanged (an explicitly different num_steps is the user's, and is reported as a
  schedule change)."""
  t = config.train
  if (rec is None or not t.fit_steps_to_wall or
      int(t.num_steps) != rec["configured_num_steps"]):
    return config, False
  config = copy.deepcopy(config)
  config.train.num_steps = rec["num_steps"]
  return config, True
