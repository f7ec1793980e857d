"""The comparison harness: reversible vs standard backbones as diffusion models, and an AR baseline.

`run(config, workdir, reporter)` (main.py --mode=compare, config from configs/compare.py) and
`run_comparison(config, workdir, reporter)`:

  1. plan (`plan.py`, the override language in `overrides.py`): every run (model x training
     seed) and the memory sweep, validated before anything trains; a bad value fails in seconds
     with a `ConfigError`.
  2. report each model's parameter count (`measure.py`; shapes only).
  3. execute (`execute.py`): train and evaluate each run with `bdiff_jax.modes.train.run` in its
     own sub-workdir `runs/<model>_seed<seed>`, at the same budget for every model; finished runs
     are reused, interrupted token/step runs resume.
  4. measure (`measure.py`, through `benchmarks.step_memory`): each model's peak train-step
     memory, then the memory-vs-depth sweep of the standard and reversible backbones.
  5. report (`report.py`): aggregate over training seeds and write compare.json, compare.md
     (also given to the reporter) and compare.png.

Per model: parameters, train tokens/s (median over the log intervals of the run, the first one,
which includes compilation, left out), peak train-step memory, and valid/test word-level
perplexity: an UPPER BOUND (ELBO) for diffusion, EXACT for the autoregressive model, computed by
the same `Evaluator` (word perplexity = exp(total NLL / words incl. one <eos> per line)).

Failures: any exception in any run stops the comparison and propagates unchanged (after a line
naming the run); no table, JSON or PNG is written then, and outputs of an earlier comparison in
the same workdir are removed first so that they cannot be mistaken for this one's. There are no
placeholder numbers: a result that is missing or not finite is an error.

All console output goes through the `Reporter` (default: `Reporter()`, lines to stdout).
"""

import os
import time
from typing import Any, Optional

import jax
import ml_collections

from bdiff_jax.benchmarks.compare import measure, report
from bdiff_jax.benchmarks.compare.execute import RUN_FILE, execute, train_throughput
from bdiff_jax.benchmarks.compare.measure import count_parameters, train_step_memory
from bdiff_jax.benchmarks.compare.overrides import parse_overrides
from bdiff_jax.benchmarks.compare.plan import (BUDGETS, LEVELS, MODEL_KINDS, ComparisonPlan,
                                               ModelEntry, RunPlan, parse_models, plan,
                                               plan_comparison, run_config)
from bdiff_jax.benchmarks.compare.report import (JSON_FILE, MARKDOWN_FILE, PLOT_FILE,
                                                 format_markdown, summarize)
from bdiff_jax.data import pipeline
from bdiff_jax.errors import ConfigError
from bdiff_jax.runtime.reporter import Reporter

__all__ = [
    "BUDGETS", "LEVELS", "MODEL_KINDS", "JSON_FILE", "MARKDOWN_FILE", "PLOT_FILE", "RUN_FILE",
    "ComparisonPlan", "ModelEntry", "RunPlan", "count_parameters", "execute", "format_markdown",
    "parse_models", "parse_overrides", "plan", "plan_comparison", "run", "run_comparison",
    "run_config", "summarize", "train_step_memory", "train_throughput",
]


def _device() -> str:
  return (f"{jax.device_count()} x {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), {os.cpu_count()} CPU cores")


def _vocab_size(the_plan: ComparisonPlan, config: ml_collections.ConfigDict,
                workdir: str) -> int:
  """The WikiText-2 vocabulary every run trains on (prepares the shared TFDS copy once)."""
  # The shared TFDS dir, the base data_dir.
  data = {**the_plan.runs[0].config.data.to_dict(), "data_dir": config.data.data_dir}
  return pipeline.load_wikitext2(data, workdir).tokenizer.vocab_size


def _train_and_measure(the_plan: ComparisonPlan, num_params: dict, memory: measure.StepMemory,
                       reporter: Reporter) -> tuple[dict, dict]:
  """Executes every run in order; measures each model's train-step memory after its first run.

  Training comes first so that a failing run stops everything as early as possible.
  """
  results: dict[ModelEntry, list[dict]] = {e: [] for e in the_plan.entries}
  model_memory = {}
  for run_plan in the_plan.runs:
    entry = run_plan.entry
    try:
      result = execute(run_plan, reporter)
      results[entry].append(result)
      if "train_step_memory" in result:
        memory.record(run_plan.config, result["train_step_memory"], num_params[entry])
      if entry not in model_memory:
        mem = memory(run_plan.config)
        if mem["num_params"] != num_params[entry]:
          raise RuntimeError(f"{entry.label}: parameter counts disagree "
                             f"({mem['num_params']} vs {num_params[entry]}).")
        model_memory[entry] = mem
        reporter.info(f"compare: {entry.label}: peak train-step memory "
                      f"{mem['held_bytes'] / report.MIB:,.1f} MiB")
    except BaseException:
      reporter.info(f"compare: {entry.label} seed {run_plan.seed} FAILED; the comparison stops "
                    "(no table is written).")
      raise
  return results, model_memory


def _memory_sweep(the_plan: ComparisonPlan, memory: measure.StepMemory,
                  reporter: Reporter) -> list[dict]:
  sweep = []
  for point in the_plan.sweep:
    mem = memory(point.config)
    sweep.append(dict(mem, backbone=point.backbone, depth=point.depth))
    reporter.info(f"compare: memory {point.backbone:10s} {point.depth:3d} layers: held "
                  f"{mem['held_bytes'] / report.MIB:,.1f} MiB, temp "
                  f"{mem['temp_bytes'] / report.MIB:,.1f} MiB")
  return sweep


def run_comparison(config: ml_collections.ConfigDict, workdir: str,
                   reporter: Optional[Reporter] = None) -> dict[str, Any]:
  """Plans, trains, evaluates and measures every run; writes compare.{json,md,png}; returns the
  JSON content. Raises on any failure (see the module docstring)."""
  reporter = reporter or Reporter()
  the_plan = plan_comparison(config, workdir)  # everything validated before any work
  os.makedirs(workdir, exist_ok=True)
  report.remove_outputs(workdir)
  cmp = config.compare
  t_start = time.time()
  vocab_size = _vocab_size(the_plan, config, workdir)
  device = _device()
  reporter.info(f"compare: {cmp.level} level, {cmp.scale} scale, {len(the_plan.runs)} runs on "
                f"{device}")
  num_params = {}
  for entry in the_plan.entries:
    c = the_plan.first_run(entry).config
    num_params[entry] = count_parameters(c, vocab_size)
    reporter.info(f"compare: {entry.label}: {num_params[entry]:,} parameters "
                  f"({report.shape_text(c.model)}, {entry.block} block, {entry.objective})")

  memory = measure.StepMemory(vocab_size)
  results, model_memory = _train_and_measure(the_plan, num_params, memory, reporter)
  sweep = _memory_sweep(the_plan, memory, reporter)

  c0 = the_plan.runs[0].config
  summary = {
      "level": cmp.level, "scale": cmp.scale, "models_requested": cmp.models,
      "seeds": list(cmp.seeds),
      "budget": {"kind": cmp.budget, "amount": float(cmp.budget_amount),
                 "batch_size": int(c0.train.batch_size), "seq_len": int(c0.data.seq_len)},
      "device": device, "memory_block": the_plan.memory_block,
      "models": [report.model_summary(e, the_plan.first_run(e).config.model, num_params[e],
                                      model_memory[e], results[e])
                 for e in the_plan.entries],
      "memory_vs_depth": sweep, "wall_seconds": time.time() - t_start,
  }
  markdown = report.write_outputs(workdir, summary,
                                  {e.label: results[e] for e in the_plan.entries})
  reporter.info(markdown)
  reporter.info(f"compare: wrote {JSON_FILE}, {MARKDOWN_FILE} and {PLOT_FILE} to {workdir} "
                f"({summary['wall_seconds']:.0f} s)")
  return summary


def run(config: ml_collections.ConfigDict, workdir: str, reporter: Reporter) -> dict[str, Any]:
  """`main.py --mode=compare`."""
  if "compare" not in config:
    raise ConfigError("--mode=compare needs a comparison config (a `compare` section).",
                      "pass --config configs/compare.py[:test|:quick|:full].")
  return run_comparison(config, workdir, reporter)
