"""`--mode=eval`: restore a checkpoint and evaluate it on the canonical splits."""

import json
import os

from bdiff_jax import baselines, configuration, experiment
from bdiff_jax import workdir as workdir_lib
from bdiff_jax.reporter import Reporter


def evaluate_checkpoint(exp: experiment.Experiment, reporter: Reporter) -> dict:
  """Evaluates the checkpoint named by config.eval.checkpoint and writes eval_<which>.json.

  Returns {"checkpoint": description, "step": step, "results": per-split metrics}; training's
  final evaluation and `--mode=eval` in a new process both come here, so they agree exactly.
  """
  params, meta, desc = experiment.restore_params(exp)
  return evaluate_params(exp, params, meta, desc, reporter)


def evaluate_params(exp: experiment.Experiment, params, meta: dict, desc: str,
                    reporter: Reporter) -> dict:
  """Evaluates restored `params` (see `evaluate_checkpoint`) and writes eval_<which>.json."""
  config = exp.config
  results = exp.evaluator.evaluate(params, exp.splits, seeds=config.eval.seeds,
                                   max_tokens=config.eval.max_tokens)
  reference = baselines.cached(exp.splits, exp.workdir, seq_len=config.data.seq_len,
                               max_tokens=config.eval.max_tokens)
  reporter.info(f"checkpoint: {desc}\n{exp.evaluator.format_results(results)}\n"
                f"{baselines.format_baselines(reference)}")
  out = {"checkpoint": desc, "step": meta.get("step"), "results": results,
         "baselines": reference}
  name = f"eval_{str(config.eval.checkpoint)}.json"
  with open(os.path.join(exp.workdir, name), "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  return out


def open_trained(config, workdir: str, reporter: Reporter, explicit_overrides=()):
  """(workdir, config) for eval/sample: the workdir must exist (nothing is created for a
  mistyped one), and the model comes from its config.json. Every config field is validated
  here, before the caller locks the workdir or writes anything."""
  configuration.validate(config)
  workdir = workdir_lib.require_existing_workdir(workdir)
  config, taken = experiment.config_for_workdir(config, workdir, explicit_overrides)
  configuration.validate(config)  # with the workdir's model fields
  if taken:
    reporter.info("using the workdir's config.json for " + ", ".join(
        f"{f}={saved!r}" for f, _, saved in taken))
  return workdir, config


def run(config, workdir: str, reporter: Reporter, explicit_overrides=(), **unused) -> dict:
  del unused
  workdir, config = open_trained(config, workdir, reporter, explicit_overrides)
  with workdir_lib.WorkdirLock(workdir):
    return evaluate_checkpoint(experiment.build(config, workdir), reporter)
