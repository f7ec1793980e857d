"""`--mode=glue`: the GLUE fine-tuning benchmark (rows x tasks x seeds), see configs/glue.py.

Per task and seed (`task_splits`): the dev split (at most `glue.eval_max` examples, the same for
every seed; MNLI: dev_matched and dev_mismatched, each reported) is the test set; a selection
slice of train (`glue.selection` examples, at most `glue.selection_fraction` of train when that
is > 0), class-balanced when `glue.selection_balanced` (`glue.sampling.holdout`), selects the
checkpoint; the train set is `glue.k_per_class` examples per class of the rest
(`glue.sampling.few_shot`), or with k_per_class=0 all of the rest, then at most
`glue.train_examples` of it (0 = no cap; `glue.sampling.subsample`).

Every row trains `glue.num_steps` steps of batch `glue.batch_size` through the one train step
(`train_step.make_train_step`) with its update rule. At step 0 and every `glue.eval_every` steps
(and the last) it measures the selection score (`glue.metrics.selection_score`: informedness,
which is 0 for any constant predictor, or Pearson for STS-B; the primary metric would let a
majority-class predictor win) and, with `glue.dev_curve`, the dev metric, and records them with
the forward passes and seconds so far (the record's `curve`). The params of the best selection
score (step 0 unless a later step is strictly better) are evaluated on dev. Each record holds the
step-0 (zero-shot) dev and selection scores, the selected step and the selected params' relative
change ||theta - theta_0|| / ||theta_0|| (float64, all leaves), so that an untrained model cannot
pass for a trained one. Zeroth-order rows with `glue.zo.learning_rates` first train each
candidate learning rate for `glue.zo.grid_steps` steps on the first seed and use the one with the
best selection score for every seed (the record's `lr_grid`). Beside each task: the majority
class and a bag-of-words model (`glue.baselines`) trained on each seed's train set. Any exception
fails the run (no row is skipped); the config is validated before anything runs (`validate`).

Reliability (`run`, docs/glue.md): the workdir is locked and proven writable first; every
finished (task, row, seed) record and learning-rate trial is a unit committed atomically to
<workdir>/glue_units/<unit>__<settings digest>.json and reused by the same command, so a run
killed (SIGKILL), interrupted (SIGINT) or preempted (SIGTERM: stop at the next step, one line,
exit 130/143) resumes; glue.* are written atomically and never replaced by a run with other
settings (those go to glue-<digest>.*); a NaN loss is traced to a non-finite start parameter or
an empty batch before the learning rate is blamed.
"""

import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax import models
from bdiff_jax.errors import DataError
from bdiff_jax.errors import UserError
from bdiff_jax.glue import baselines as glue_baselines
from bdiff_jax.glue import encoding as glue_encoding
from bdiff_jax.glue import metrics as glue_metrics
from bdiff_jax.glue import probe as glue_probe
from bdiff_jax.glue import report as glue_report
from bdiff_jax.glue import rows as glue_rows
from bdiff_jax.glue import tasks as glue_tasks
from bdiff_jax.glue.rows import RowPrograms
from bdiff_jax.glue.settings import (GlueSettings, dev_splits, row_settings, row_steps,
                                     task_seq_len, task_splits, uses_grid, validate, with_changes)
from bdiff_jax.glue.units import (UNITS_DIR, GlueInterrupt, GlueResult, Interrupted, Units,
                                  check_finite_params, check_stop, nonfinite_loss_error,
                                  settings_digest, unit_name)
from bdiff_jax.modes import glue_starts
from bdiff_jax.optim import update_rule
from bdiff_jax.runtime import workdir as workdir_lib
from bdiff_jax.runtime.platform_info import memory_stats
from bdiff_jax.runtime.reporter import Reporter
from bdiff_jax.train.train_state import create_train_state


def _take(arrays: dict, idx: np.ndarray) -> dict:
  return {k: v[idx] for k, v in arrays.items() if k != "labels"}


def predict(score_fn, params, arrays: dict, batch_size: int) -> np.ndarray:
  """Candidate scores float[N, C] of every example, in batches of a fixed size."""
  n = arrays["labels"].shape[0]
  out = []
  for start in range(0, n, batch_size):
    idx = np.minimum(np.arange(start, start + batch_size), n - 1)  # pad by repeating the last
    out.append(np.asarray(score_fn(params, _take(arrays, idx)))[:min(batch_size, n - start)])
  return np.concatenate(out)


def evaluate(row, score_fn, params, arrays, task, batch_size, groups=None):
  """(task metrics, prediction distribution, predictions) of `params` on one encoded split;
  `groups`: the split's MultiRC question ids (GlueSplit.groups)."""
  scores = predict(score_fn, params, arrays, batch_size)
  preds = row.objective.predict(scores)
  labels = arrays["labels"]
  metrics = glue_metrics.task_metrics(task, preds, labels, groups=groups)
  spec = glue_tasks.task_spec(task)
  dist = (None if spec.is_regression else
          glue_metrics.prediction_distribution(preds, spec.num_labels))
  return metrics, dist, preds


def start_probe(task: str, programs, params, train: dict, devs: dict, groups: dict, seed: int,
                batch_size: int):
  """The start probe (glue/probe.py) of a row at step 0: {"dev_splits": {name: metrics},
  "train_examples": n}, or None where the row reads no single position (several-token
  candidates, a pooled head)."""
  idx = glue_probe.probe_indices(train["labels"].shape[0], seed)
  sub = {k: v[idx] for k, v in train.items()}
  if programs.readout(params, _take(sub, np.zeros(batch_size, np.int64))) is None:
    return None
  features = lambda a: predict(programs.readout, params, a, batch_size)
  spec = glue_tasks.task_spec(task)
  evals = {name: (features(a), a["labels"], groups[name]) for name, a in devs.items()}
  metrics = glue_probe.start_probe(task, features(sub), sub["labels"], evals,
                                   regression=spec.is_regression, num_labels=spec.num_labels)
  return {"dev_splits": metrics, "train_examples": int(len(idx))}


def _better(a: float, b: float) -> bool:
  return not np.isnan(a) and (np.isnan(b) or a > b)


def relative_change(params, initial) -> float:
  """||params - initial|| / ||initial|| over all leaves, in float64 (inf: initial is all zero)."""
  num = den = 0.0
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(initial)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num += float(np.sum(np.square(a - b)))
    den += float(np.sum(np.square(b)))
  if den == 0.0:
    return 0.0 if num == 0.0 else math.inf
  return math.sqrt(num) / math.sqrt(den)


def run_seed(spec, task: str, g: GlueSettings, seed: int, reporter: Reporter,
             programs: RowPrograms, *, probe: bool = True) -> dict:
  """Trains and evaluates one row on one task with one seed; returns its record (with the start
  probe of glue/probe.py unless `probe` is False: the learning-rate trials).

  `programs` carries the row's compiled step and scorer from one seed to the next
  (`RowPrograms`), so each row compiles once per task; its `stop` is checked after every train
  step: once a signal came, `Interrupted` is raised there.

  Raises:
    CheckpointError: a start parameter holds NaN/inf (checked before training).
    NonFiniteLossError: the loss became NaN/inf (`nonfinite_loss_error` names the cause).
  """
  stop = programs.stop
  where = f"{task} {spec.name} seed {seed}"
  check_stop(stop, f"before {where}")
  train, selection, devs, full = task_splits(task, g, seed)
  if not len(train):
    raise DataError(f"{where}: the train set is empty (train split {len(full)} examples, "
                    f"{len(selection)} of them held out for selection).",
                    "lower glue.selection / glue.selection_fraction, or use a task with more "
                    "training examples.")
  steps = row_steps(spec, g)
  row = glue_rows.build_row(spec, g, full, seed=seed, total_steps=steps)
  check_finite_params(row.params, f"{spec.name} on {task}: the start parameters ({row.init})")
  programs.adopt(row)
  enc = lambda split: glue_encoding.encode_split(split, row.encoder, scoring=row.scoring,
                                                 seq_len=task_seq_len(g, task),
                                                 time_of_fraction=row.time_of_fraction)
  arrays = {"train": enc(train), "selection": enc(selection)}
  dev_arrays = {name: enc(split) for name, split in devs.items()}
  groups = {"selection": selection.groups, **{name: d.groups for name, d in devs.items()}}
  first_dev = next(iter(dev_arrays))
  stats = getattr(row.encoder, "stats", None)
  oov = None if stats is None else stats.oov_rate
  primary = glue_metrics.primary_metric(task)
  # A host copy of the initial network parameters (the train step donates and deletes its
  # input's); a LoRA row's are the merged base + factors.
  effective = getattr(row.network, "effective_params", lambda p: p)
  initial = jax.tree_util.tree_map(np.array, effective(row.params))
  sizes = {"params": models.count_params(initial),
           "trainable_params": update_rule.trainable_count(row.rule, row.params)}
  state = create_train_state(row.params, row.rule, jax.random.PRNGKey(seed))
  bs, ebs = int(g.batch_size), int(g.eval_batch_size)
  rng = np.random.default_rng(seed)
  order = np.zeros(0, np.int64)
  # A rule that reads several batches per step (DiZO with a fresh batch per γ iteration) gets
  # them stacked on a leading axis: [0] is the step's own, [1 + i] γ iteration i's.
  per_step = update_rule.batches_per_step(row.rule)

  def draw():
    nonlocal order
    while order.size < bs:
      order = np.concatenate([order, rng.permutation(len(train))])
    idx, order = order[:bs], order[bs:]
    return _take(arrays["train"], idx)

  def next_batch():
    if per_step == 1:
      return jax.tree_util.tree_map(jnp.asarray, draw())
    draws = [draw() for _ in range(per_step)]
    return {k: jnp.asarray(np.stack([d[k] for d in draws])) for k in draws[0]}

  def measure(params, split_arrays, split_groups=None):
    metrics, _, preds = evaluate(row, programs.scores, params, split_arrays, task, ebs,
                                 split_groups)
    return metrics, glue_metrics.selection_score(task, preds, split_arrays["labels"])

  batch = next_batch()
  programs.compile(state, batch)
  mem = memory_stats(programs.step)
  best, best_params = float("nan"), None
  best_step, seconds, start, curve = 0, 0.0, time.time(), []
  zero_shot = {}
  for step in range(steps + 1):
    if step % int(g.eval_every) == 0 or step == steps:
      params = state.ema_params if programs.ema_decay > 0 else state.params
      sel, score = measure(params, arrays["selection"], groups["selection"])
      point = {"step": step, "forward": glue_rows.forward_passes(row.rule, step)["forward"],
               "train_seconds": seconds, "wall_seconds": time.time() - start,
               "selection": score, "selection_metric": sel[primary]}
      if step == 0:
        zero_shot = {"selection": score, "selection_metric": sel[primary],
                     "dev": {name: measure(params, a, groups[name])[0]
                             for name, a in dev_arrays.items()}}
        probe_record = (start_probe(task, programs, params, arrays["train"], dev_arrays, groups,
                                    seed, ebs) if probe else None)
        point["dev"] = zero_shot["dev"][first_dev][primary]
      elif bool(g.dev_curve):
        point["dev"] = measure(params, dev_arrays[first_dev], groups[first_dev])[0][primary]
      curve.append(point)
      eta = (steps - step) * seconds / step if step else math.nan
      reporter.info(f"{where} step {step}/{steps}: selection {score:.4f}"
                    + (f", dev {primary} {point['dev']:.4f}" if "dev" in point else "")
                    + f" | {seconds:.0f}s of training, ETA {eta:.0f}s")
      if step == 0 or _better(score, best):
        best, best_step = score, step
        best_params = jax.tree_util.tree_map(jnp.copy, params)
    if step == steps:
      break
    t0 = time.time()
    state, metrics = programs.step(state, batch)
    loss = float(metrics["loss"])
    seconds += time.time() - t0
    if not np.isfinite(loss):
      raise nonfinite_loss_error(f"{spec.name} on {task} (seed {seed})", loss, step, batch)
    check_stop(stop, f"in {where} after step {step + 1} of {steps}")
    batch = next_batch()
  dev_metrics, dev_se, dist = {}, {}, None
  for name, a in dev_arrays.items():
    dev_metrics[name], d, preds = evaluate(row, programs.scores, best_params, a, task, ebs,
                                           groups[name])
    dev_se[name] = glue_metrics.standard_error(task, preds, a["labels"], groups=groups[name])
    dist = d if dist is None else dist
  change = relative_change(effective(best_params), initial)
  reporter.info(f"{task} {spec.name} seed {seed}: dev {primary} "
                f"{dev_metrics[first_dev][primary]:.4f} (step 0: "
                f"{zero_shot['dev'][first_dev][primary]:.4f}); selected step {best_step} "
                f"(selection {best:.4f}, step 0: {zero_shot['selection']:.4f}); relative "
                f"parameter change {change:.2e}; {seconds:.1f}s")
  return {"task": task, "row": spec.name, "seed": seed, "dev": dev_metrics[first_dev],
          "dev_splits": dev_metrics, "dev_standard_error": dev_se, "zero_shot": zero_shot,
          "start_probe": probe_record, "selection_best": best, "selected_step": best_step,
          "relative_param_change": change, "curve": curve,
          "prediction_distribution": dist, "train_seconds": seconds, "steps": steps,
          "forward_passes": glue_rows.forward_passes(row.rule, steps),
          "step_memory_bytes": int(mem["held_bytes"]),
          **sizes,
          "init": row.init, "scoring": row.scoring, "rule": spec.rule, "oov_rate": oov,
          "learning_rate": float(g.zo.learning_rate if spec.rule != "adamw"
                                 else g.adamw["learning_rate"]),
          "sizes": {"train": len(train), "selection": len(selection),
                    **{name: len(d) for name, d in devs.items()}}}


def choose_learning_rate(spec, task: str, g, reporter: Reporter, *, units=None, stop=None):
  """(config with the chosen zo.learning_rate, grid results) for a zeroth-order row.

  Each of `glue.zo.learning_rates` trains `glue.zo.grid_steps` steps on the first seed; the best
  selection score wins (ties: the better final selection score, then the earlier candidate).
  No grid (or a first-order row): `g` unchanged and None. With `units` (a `Units`), each trial
  is a unit: reused when finished before, committed as soon as it finishes.
  """
  lrs = tuple(g.zo.learning_rates)
  if not uses_grid(spec, g):
    return g, None
  steps = int(g.zo.grid_steps)
  seed = int(g.seeds[0])
  grid = []
  for lr in lrs:
    name = unit_name(task, spec.name, seed, lr=float(lr))
    entry = units.load(name, spec, reporter) if units is not None else None
    if entry is None:
      check_stop(stop, f"before {task} {spec.name} learning-rate trial {float(lr):g} (seed "
                  f"{seed})")
      trial = with_changes(g, **{"zo.learning_rate": float(lr), "zo.num_steps": steps,
                          "eval_every": min(int(g.eval_every), steps), "dev_curve": False})
      rec = run_seed(spec, task, trial, seed, reporter, RowPrograms(stop=stop), probe=False)
      entry = {"learning_rate": float(lr), "selection_best": rec["selection_best"],
               "selection_final": rec["curve"][-1]["selection"],
               "selected_step": rec["selected_step"], "steps": steps,
               "relative_param_change": rec["relative_param_change"]}
      if units is not None:
        entry = units.save(name, spec, entry)
    grid.append(entry)
  key = lambda r: tuple(-math.inf if np.isnan(v) else v
                        for v in (r["selection_best"], r["selection_final"]))
  chosen = max(grid, key=key)  # max keeps the first of equal keys
  reporter.info(f"{task} {spec.name}: learning rate {chosen['learning_rate']:g} chosen from "
                f"{[r['learning_rate'] for r in grid]} on the selection set")
  return with_changes(g, **{"zo.learning_rate": chosen["learning_rate"]}), grid


def glue_settings(config) -> GlueSettings:
  """`config.glue` as plain values: the one read of the config; everything below takes these."""
  return GlueSettings.from_dict(config.glue.to_dict())


def run(config, workdir: str, reporter: Reporter) -> GlueResult:
  """Runs every task x row x seed of `config.glue`; writes glue.{json,md,png} to `workdir`.

  Before anything runs: the config is validated, the workdir created and proven writable, and
  locked (`workdir.WorkdirLock`: a second run on it is refused). Every finished unit (a seed's
  record, a learning-rate trial) is committed under <workdir>/glue_units at once (`Units`), and
  the same command reuses them: a run stopped by SIGKILL, SIGINT or SIGTERM resumes. SIGINT /
  SIGTERM stop it at the next train step with one line saying what was kept and exit 130 / 143
  (`GlueResult.exit_code`). The results go to glue.* unless glue.json holds another settings'
  results: then to glue-<digest>.* (`glue.report.results_stem`).
  """
  g = glue_settings(config)
  validate(g)
  specs = glue_rows.parse_rows(g.rows)
  tasks = [glue_tasks.task_spec(t.strip()).name for t in str(g.tasks).split(",") if t.strip()]
  workdir = workdir_lib.prepare_writable_workdir(workdir)
  with workdir_lib.WorkdirLock(workdir), GlueInterrupt() as stop:
    # Both digests of the settings as given, before use_starts fills in the start models' dirs.
    digest = settings_digest(g.to_dict())
    units = Units(os.path.join(workdir, UNITS_DIR), g, specs, tasks)
    done = units.finished()
    if done:
      reporter.info(f"{done} of {units.total} GLUE units finished before (in {units.directory}):"
                    " reused")
    try:
      return _run(g, specs, tasks, workdir, reporter, units, stop, digest)
    except Interrupted as e:
      name = signal.Signals(stop.signal_number).name if stop.signal_number else "a signal"
      line = (f"interrupted by {name} {e.where}; {units.finished()} of {units.total} GLUE units "
              f"finished and kept in {units.directory}; rerun the same command to resume")
      reporter.info(line)
      result = GlueResult(interrupted=True, message=line, units_finished=units.finished(),
                          units_total=units.total, units_dir=units.directory)
      result.exit_code = stop.exit_code or 1
      return result


def _run(g, specs, tasks, workdir, reporter, units, stop, digest) -> GlueResult:
  if str(g.starts_dir):
    try:
      g = glue_starts.use_starts(g, specs, reporter, should_stop=stop.stop_requested)
    except UserError:
      # A signal reached the start model's training child too: it checkpointed and stopped.
      check_stop(stop, "while pretraining the start models (their checkpoints are kept in "
                  f"{g.starts_dir})")
      raise
  rows, records, baselines = [], [], []
  for task in tasks:
    primary = glue_metrics.primary_metric(task)
    check_stop(stop, f"before the {task} baselines")
    base = task_baselines(task, g)
    baselines.append(base)
    for row_spec in specs:
      g_row, grid = choose_learning_rate(row_spec, task, row_settings(g, row_spec), reporter,
                                         units=units, stop=stop)
      programs = RowPrograms(stop=stop)
      recs = []
      for s in g.seeds:
        name = unit_name(task, row_spec.name, int(s))
        rec = units.load(name, row_spec, reporter)
        if rec is None:
          check_stop(stop, f"before {task} {row_spec.name} seed {int(s)}")
          rec = units.save(name, row_spec,
                           run_seed(row_spec, task, g_row, int(s), reporter, programs))
        recs.append(rec)
      for r in recs:
        r["lr_grid"] = grid
      records += recs
      for split in dev_splits(task):
        rows.append(glue_report.aggregate(task, row_spec.name, recs, base, primary, split=split))
  check_stop(stop, "before writing the results")
  meta = {"level": str(g.level), "description": str(g.description),
          "backend": jax.default_backend(), "config": g.to_dict(), "settings_digest": digest,
          "units_dir": units.directory}
  stem = glue_report.results_stem(workdir, digest)
  if stem != "glue":
    reporter.info(f"{os.path.join(workdir, 'glue.json')} holds the results of other settings "
                  f"(kept): this run's go to {stem}.*")
  paths = glue_report.write(workdir, rows, records, meta, baselines, stem=stem)
  reporter.info(glue_report.markdown(rows, meta, records))
  reporter.info(f"written: {', '.join(paths.values())}")
  return GlueResult(rows=rows, records=records, baselines=baselines, paths=paths)


def task_baselines(task: str, g) -> dict:
  """The majority class (of the full train split) and the bag-of-words model (trained on each
  seed's train set) on each dev split: {"task", "majority": {split: metrics},
  "bow": {split: [metrics per seed]}}."""
  majority, bow = {}, {}
  for seed in g.seeds:
    train, _, devs, full = task_splits(task, g, int(seed))
    for name, dev in devs.items():
      majority[name] = glue_metrics.majority_baseline(task, full.labels, dev.labels,
                                                      eval_groups=dev.groups)
    for name, metrics in glue_baselines.bow_baseline(task, train, devs).items():
      bow.setdefault(name, []).append(metrics)
  return {"task": task, "majority": majority, "bow": bow}
