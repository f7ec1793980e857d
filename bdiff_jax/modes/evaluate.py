"""`--mode=eval`: restore a checkpoint and evaluate it on the canonical splits.

Results go to `<workdir>/eval_<which>.json` (which = config.eval.checkpoint). A file holds one
evaluation and its `settings` (checkpoint, step, evaluation settings); an evaluation with other
settings never replaces it but goes to `eval_<which>_<digest>.json`, the digest being the first
8 hex digits of the settings' SHA-256. Every file is written atomically (a temporary file, then
`os.replace`), so a crash leaves the previous content or the new one, never a mix.

Multi-process (`bdiff_jax/runtime/distributed.py`): every process restores the checkpoint and evaluates
over the global mesh (`experiment.inference_mesh`); process 0 alone holds the workdir lock,
reports and writes the results and the baselines' cache.
"""

import contextlib
import hashlib
import json
import os

from bdiff_jax.config import configuration
from bdiff_jax.evaluation import baselines
from bdiff_jax.runtime import distributed
from bdiff_jax.runtime import workdir as workdir_lib
from bdiff_jax.runtime.reporter import Reporter
from bdiff_jax.train import experiment


def evaluate_checkpoint(exp: experiment.Experiment, reporter: Reporter) -> dict:
  """Evaluates the checkpoint named by config.eval.checkpoint and writes eval_<which>.json.

  Returns {"checkpoint": description, "step": step, "results": per-split metrics}; training's
  final evaluation and `--mode=eval` in a new process both come here, so they agree exactly.
  """
  params, meta, desc = experiment.restore_params(exp)
  return evaluate_params(exp, params, meta, desc, reporter)


def evaluate_params(exp: experiment.Experiment, params, meta: dict, desc: str,
                    reporter: Reporter) -> dict:
  """Evaluates restored `params` (see `evaluate_checkpoint`) and writes eval_<which>.json.

  In a multi-process run every process evaluates (one program over the mesh) and returns the
  results; process 0 alone computes the baselines (the other processes' "baselines" is None),
  reports and writes."""
  config = exp.config
  results = exp.evaluator.evaluate(params, exp.splits, seeds=config.eval.seeds,
                                   max_tokens=config.eval.max_tokens)
  settings = eval_settings(config, desc, meta.get("step"))
  if not distributed.is_main_process():
    return {"checkpoint": desc, "step": meta.get("step"), "results": results,
            "baselines": None, "settings": settings}
  reference = baselines.cached(exp.splits, exp.workdir, seq_len=config.data.seq_len,
                               max_tokens=config.eval.max_tokens)
  reporter.info(f"checkpoint: {desc}\n{exp.evaluator.format_results(results)}\n"
                f"{baselines.format_baselines(reference)}")
  out = {"checkpoint": desc, "step": meta.get("step"), "results": results,
         "baselines": reference, "settings": settings}
  path = results_path(exp.workdir, str(config.eval.checkpoint), settings)
  write_json_atomically(path, out)
  reporter.info(f"results written to {path}")
  return out


def eval_settings(config, desc: str, step) -> dict:
  """What decides an evaluation's numbers besides the model: the checkpoint and step, the
  evaluation settings and the block length."""
  settings = {k: v for k, v in json.loads(config.eval.to_json()).items()
              if k not in ("checkpoint", "during_training_max_tokens")}
  return {"checkpoint": desc, "step": step, "seq_len": config.data.seq_len, "eval": settings}


def settings_digest(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def _same_but_step(a, b) -> bool:
  """Two evaluations' settings that differ only in the checkpoint they read (training went on
  and 'best' or 'latest' moved to another step)."""
  strip = lambda s: {k: v for k, v in s.items() if k not in ("checkpoint", "step")}
  return isinstance(a, dict) and isinstance(b, dict) and strip(a) == strip(b)


def results_path(workdir: str, which: str, settings: dict) -> str:
  """Where this evaluation's results go; nothing is ever overwritten with other numbers:

  - `eval_<which>.json` when it is free or holds an evaluation with the same `settings`;
  - also when it holds the same evaluation of another step (training went on): the older file
    is first moved to `eval_<which>_step<N>.json`, so `eval_<which>.json` is always the newest
    checkpoint's and the older numbers are kept;
  - otherwise (other evaluation settings) `eval_<which>_<digest of settings>.json`.
  """
  path = os.path.join(workdir, f"eval_{which}.json")
  if not os.path.exists(path):
    return path
  theirs = _settings_of(path)
  if theirs == settings:
    return path
  if _same_but_step(theirs, settings) and theirs.get("step") != settings.get("step"):
    older = os.path.join(workdir, f"eval_{which}_step{theirs.get('step')}.json")
    if not os.path.exists(older):
      try:
        os.replace(path, older)
      except OSError as e:
        raise workdir_lib.os_error_to_user_error(e, f"moving {path} to {older}") from None
      return path
  return os.path.join(workdir, f"eval_{which}_{settings_digest(settings)}.json")


def _settings_of(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f).get("settings")
  except (OSError, ValueError, AttributeError):
    return None  # unreadable or older: treated as other settings (kept)


def write_json_atomically(path: str, data) -> None:
  """Writes `data` as JSON to `path` through `workdir.write_atomically` (a temporary file, then a
  rename: a full disk or a kill leaves the previous file as it was).

  Raises:
    StorageError / DiskFullError: the write failed (`path` is unchanged).
  """

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(data, f, indent=2)

  workdir_lib.write_atomically(path, write, os.path.basename(path))


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


def main_process_lock(workdir: str):
  """The workdir lock, held by process 0 alone (the only writer) in a multi-process run."""
  if distributed.is_main_process():
    return workdir_lib.WorkdirLock(workdir)
  return contextlib.nullcontext()


def run(config, workdir: str, reporter: Reporter, explicit_overrides=(), **unused) -> dict:
  del unused
  if not distributed.is_main_process():
    reporter = Reporter(verbose=False)
  workdir, config = open_trained(config, workdir, reporter, explicit_overrides)
  mesh = experiment.inference_mesh(config)
  with main_process_lock(workdir):
    return evaluate_checkpoint(experiment.build(config, workdir, mesh=mesh), reporter)
