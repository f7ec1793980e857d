"""`--mode=glue`: the GLUE fine-tuning benchmark (rows x tasks x seeds), see configs/glue.py.

Per task and seed: the dev split (at most `glue.eval_max` examples, the same for every seed) is
the test set; `glue.selection` examples held out of train (`glue_sampling.holdout`) select the
checkpoint; the few-shot train set is `glue.k_per_class` examples per class of the rest
(`glue_sampling.few_shot`). Every row trains `glue.num_steps` steps of batch `glue.batch_size`
through the one train step (`train_step.make_train_step`) with its update rule; every
`glue.eval_every` steps (and at step 0) the selection metric is measured and the best params are
kept; dev is evaluated once, with those. Any exception fails the run (no row is skipped).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax import glue_metrics, glue_models, glue_report, models
from bdiff_jax.platform_info import memory_stats
from bdiff_jax.data import glue, glue_encoding, glue_sampling
from bdiff_jax.errors import ConfigError, NonFiniteLossError
from bdiff_jax.reporter import Reporter
from bdiff_jax.train_state import create_train_state
from bdiff_jax.train_step import make_train_step


def task_splits(task: str, g, seed: int):
  """(train, selection, dev, full train) of `task` for `seed` (see the module docstring)."""
  spec = glue.task_spec(task)
  full = glue.load_split(spec.name, "train", g.glue_dir or None)
  dev = glue.load_split(spec.name, spec.splits[1], g.glue_dir or None)
  dev = glue_sampling.subsample(dev, g.eval_max, seed=0)
  rest, selection = glue_sampling.holdout(full, int(g.selection), seed=seed)
  train = glue_sampling.few_shot(rest, int(g.k_per_class), seed=seed)
  return train, selection, dev, full


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


def evaluate(row, score_fn, params, arrays, task, batch_size):
  scores = predict(score_fn, params, arrays, batch_size)
  preds = row.objective.predict(scores)
  labels = arrays["labels"]
  metrics = glue_metrics.task_metrics(task, preds, labels)
  spec = glue.task_spec(task)
  dist = (None if spec.is_regression else
          glue_metrics.prediction_distribution(preds, spec.num_labels))
  return metrics, dist


def _better(a: float, b: float) -> bool:
  return not np.isnan(a) and (np.isnan(b) or a > b)


def run_seed(spec, task: str, g, seed: int, reporter: Reporter, programs: dict) -> dict:
  """Trains and evaluates one row on one task with one seed; returns its record.

  `programs` carries the row's compiled step and scorer from one seed to the next (the seeds
  change the parameters and the data, not the program), so each row compiles once per task.
  """
  train, selection, dev, full = task_splits(task, g, seed)
  steps = int(g.num_steps)
  row = glue_models.build_row(spec, g, full, seed=seed, total_steps=steps)
  # The first seed's network, objective and rule (not its parameters, which would stay in
  # memory for the task's remaining seeds): the same program.
  if "parts" in programs:
    row.network, row.objective, row.rule = programs["parts"]
  else:
    programs["parts"] = (row.network, row.objective, row.rule)
  enc = lambda split: glue_encoding.encode_split(split, row.encoder, scoring=row.scoring,
                                                 seq_len=int(g.seq_len),
                                                 time_of_fraction=row.time_of_fraction)
  arrays = {"train": enc(train), "selection": enc(selection), "dev": enc(dev)}
  stats = getattr(row.encoder, "stats", None)
  oov = None if stats is None else stats.oov_rate
  primary = glue_metrics.primary_metric(task)
  state = create_train_state(row.params, row.rule, jax.random.PRNGKey(seed))
  if "score_fn" not in programs:
    network, objective = row.network, row.objective
    programs["step_fn"] = make_train_step(objective, network, row.rule, ema_decay=0.0)
    programs["score_fn"] = jax.jit(
        lambda p, b: objective.scores(models.bind(network, p, train=False), b))
  step_fn, score_fn = programs["step_fn"], programs["score_fn"]
  bs = int(g.batch_size)
  rng = np.random.default_rng(seed)
  order = np.zeros(0, np.int64)

  def next_batch():
    nonlocal order
    while order.size < bs:
      order = np.concatenate([order, rng.permutation(len(train))])
    idx, order = order[:bs], order[bs:]
    return jax.tree_util.tree_map(jnp.asarray, _take(arrays["train"], idx))

  batch = next_batch()
  if "compiled" not in programs:
    programs["compiled"] = step_fn.lower(state, batch).compile()
  compiled = programs["compiled"]
  mem = memory_stats(compiled)
  best, best_params = float("nan"), row.params
  best_step, seconds = 0, 0.0
  for step in range(steps + 1):
    if step % int(g.eval_every) == 0 or step == steps:
      params = state.params
      sel, _ = evaluate(row, score_fn, params, arrays["selection"], task, int(g.eval_batch_size))
      if _better(sel[primary], best) or step == 0:
        best, best_step = sel[primary], step
        best_params = jax.tree_util.tree_map(jnp.copy, params)
    if step == steps:
      break
    t0 = time.time()
    state, metrics = compiled(state, batch)
    loss = float(metrics["loss"])
    seconds += time.time() - t0
    if not np.isfinite(loss):
      raise NonFiniteLossError(f"{spec.name} on {task} (seed {seed}): the loss became {loss} "
                               f"at step {step}.", "lower the row's learning rate.")
    batch = next_batch()
  dev_metrics, dist = evaluate(row, score_fn, best_params, arrays["dev"], task,
                               int(g.eval_batch_size))
  reporter.info(f"{task} {spec.name} seed {seed}: dev {primary} {dev_metrics[primary]:.4f} "
                f"(selected step {best_step}, selection {best:.4f}); {seconds:.1f}s")
  return {"task": task, "row": spec.name, "seed": seed, "dev": dev_metrics,
          "selection_best": best, "selected_step": best_step,
          "prediction_distribution": dist, "train_seconds": seconds, "steps": steps,
          "forward_passes": glue_models.forward_passes(row.rule, steps),
          "step_memory_bytes": int(mem["held_bytes"]), "params": models.count_params(row.params),
          "init": row.init, "scoring": row.scoring, "rule": spec.rule, "oov_rate": oov,
          "sizes": {"train": len(train), "selection": len(selection), "dev": len(dev)}}


def run(config, workdir: str, reporter: Reporter) -> dict:
  """Runs every task x row x seed of `config.glue`; writes glue.{json,md,png} to `workdir`."""
  g = config.glue
  specs = glue_models.parse_rows(g.rows)
  tasks = [t.strip() for t in str(g.tasks).split(",") if t.strip()]
  if not tasks or not tuple(g.seeds):
    raise ConfigError("glue.tasks and glue.seeds must be non-empty.", "set both.")
  rows, records = [], []
  for task in tasks:
    spec = glue.task_spec(task)
    for row_spec in specs:
      programs = {}
      recs = [run_seed(row_spec, spec.name, g, int(s), reporter, programs) for s in g.seeds]
      records += recs
      _, _, dev, full = task_splits(spec.name, g, int(g.seeds[0]))
      majority = glue_metrics.majority_baseline(spec.name, full.labels, dev.labels)
      rows.append(glue_report.aggregate(spec.name, row_spec.name, recs, majority,
                                        glue_metrics.primary_metric(spec.name)))
  meta = {"level": str(g.level), "description": str(g.description),
          "backend": jax.default_backend(), "config": g.to_dict()}
  paths = glue_report.write(workdir, rows, records, meta)
  reporter.info(glue_report.markdown(rows, meta))
  reporter.info(f"written: {', '.join(paths.values())}")
  return {"rows": rows, "records": records, "paths": paths}
