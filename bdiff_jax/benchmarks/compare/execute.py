"""Executing one planned run: train and evaluate it through `modes.train.run`, or reuse it.

`execute(run, reporter)` trains `run.config` in `run.workdir` (checkpoints, resume, metrics.jsonl
and eval_latest.json as for any training run) and returns its result record: steps, tokens seen,
train tokens/s, wall-clock, the loss curve and valid/test perplexities. A finished run leaves
`compare_run.json` (its config and result); executing an identical run config again returns that
record without training. An interrupted token/step run resumes from its checkpoint; checkpoints
of another config, or of an interrupted wall-clock run (its clock would restart), are refused.

A result that is missing or not finite is an error: there are no placeholder numbers.
"""

import json
import math
import os
import statistics
import time
from typing import Any, Optional

import jax

from bdiff_jax.benchmarks.compare.measure import MEMORY_FIELDS
from bdiff_jax.benchmarks.compare.plan import RunPlan
from bdiff_jax.errors import ConfigError
from bdiff_jax.modes import train
from bdiff_jax.runtime import checkpointing
from bdiff_jax.runtime import metrics_log
from bdiff_jax.runtime.reporter import Reporter

RUN_FILE = "compare_run.json"


def train_throughput(records: list[dict]) -> float:
  """Median tokens/s over the training log intervals, the first (compilation) left out."""
  rates = [r["tokens_per_sec"] for r in records if r.get("kind") == "train"][1:]
  rates = [float(x) for x in rates if isinstance(x, (int, float))]
  if not rates:
    raise RuntimeError("fewer than two training log records: cannot measure train tokens/s. "
                       "Lower train.log_every so that a run logs at least twice.")
  return float(statistics.median(rates))


def _finite(name: str, value: Any) -> float:
  value = float(value)
  if not math.isfinite(value):
    raise RuntimeError(f"{name} is {value}: not a number the comparison can report.")
  return value


def _read_json(path: str) -> Optional[Any]:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _check_resumable(run: RunPlan) -> None:
  """Refuses checkpoints in run.workdir that resuming could not turn into this run."""
  if not checkpointing.directory_has_checkpoints(run.workdir):
    return
  if run.config.train.max_wall_seconds > 0:
    raise ConfigError(
        f"{run.workdir} holds an unfinished run, and a wall-clock budget cannot be resumed "
        "fairly (its clock would restart).", "delete that directory or use a new --workdir.")
  if _read_json(os.path.join(run.workdir, "config.json")) != json.loads(run.config.to_json()):
    # E.g. another budget: resuming would mix two learning-rate schedules.
    raise ConfigError(
        f"{run.workdir} holds checkpoints of a run with another config than this "
        "comparison's; resuming it would not give this comparison's run.",
        "delete that directory or use a new --workdir.")


def _split_record(run: RunPlan, split: str, r: dict) -> dict[str, Any]:
  """The comparison's record of one evaluated split (checked, finite)."""
  label = run.entry.label
  if bool(r["upper_bound"]) != run.entry.upper_bound:
    raise RuntimeError(f"{label}: evaluation says upper_bound={r['upper_bound']}.")
  return {
      "word_ppl": _finite(f"{label} {split} word perplexity", r["word_ppl"]),
      "word_ppl_eval_seed_std": float(r["word_ppl_std"]),
      "nll_per_token": _finite(f"{label} {split} NLL", r["nll_per_token"]),
      "num_tokens": int(r["num_tokens"]), "num_words": int(r["num_words"]),
      "full_split": bool(r["full_split"]), "eval_seeds": list(r["seeds"]),
      "num_time_samples": int(r["num_time_samples"]),
      "upper_bound": bool(r["upper_bound"]),
  }


def execute(run: RunPlan, reporter: Optional[Reporter] = None) -> dict[str, Any]:
  """Trains and evaluates one run (or reuses its finished record); returns its result record.

  `reporter` (default: a console `Reporter`) gets the harness's lines and the training's own.
  """
  reporter = reporter or Reporter()
  record_path = os.path.join(run.workdir, RUN_FILE)
  config_json = run.config.to_json(sort_keys=True)
  saved = _read_json(record_path)
  if saved is not None and saved.get("config") == config_json:
    reporter.info(f"compare: {run.entry.label} seed {run.seed}: reusing the finished run in "
                  f"{run.workdir}")
    return saved["result"]
  _check_resumable(run)
  reporter.info(f"compare: training {run.entry.label} seed {run.seed} in {run.workdir}")
  t0 = time.time()
  trained = train.run(run.config, run.workdir, reporter)
  wall = time.time() - t0
  out = trained.evaluation
  if out is None or "results" not in out:
    raise RuntimeError(f"training returned no evaluation for {run.workdir} "
                       f"(status {trained.status}).")
  records = metrics_log.read(os.path.join(run.workdir, "metrics.jsonl"))
  steps = int(out["step"])
  if run.config.train.max_wall_seconds <= 0 and steps != int(run.config.train.num_steps):
    raise RuntimeError(f"{run.entry.label} seed {run.seed} stopped at step {steps}, not at its "
                       f"budget of {run.config.train.num_steps} steps.")
  result = {
      "model": run.entry.label, "seed": run.seed, "workdir": run.workdir,
      "checkpoint": out["checkpoint"], "steps": steps,
      "tokens_seen": steps * run.tokens_per_step,
      "train_tokens_per_sec": _finite("train tokens/s", train_throughput(records)),
      "run_wall_seconds": wall,
      "curve": [{"step": r["step"], "loss": r["loss"], "time": r["time"]} for r in records
                if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float))],
  }
  for split in ("valid", "test"):
    result[split] = _split_record(run, split, out["results"][split])
  if trained.step_memory is not None and jax.device_count() == 1:
    # The step it compiled is the one the harness measures (one device, the whole batch).
    result["train_step_memory"] = {k: int(trained.step_memory[k]) for k in MEMORY_FIELDS}
  with open(record_path, "w", encoding="utf-8") as f:
    json.dump({"config": config_json, "result": result}, f, indent=2)
  return result
