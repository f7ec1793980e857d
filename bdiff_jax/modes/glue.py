"""`--mode=glue`: the GLUE fine-tuning benchmark (rows x tasks x seeds), see configs/glue.py.

Per task and seed (`task_splits`): the dev split (at most `glue.eval_max` examples, the same for
every seed; MNLI: dev_matched and dev_mismatched, each reported) is the test set; a selection
slice of train (`glue.selection` examples, at most `glue.selection_fraction` of train when that
is > 0), class-balanced when `glue.selection_balanced` (`glue_sampling.holdout`), selects the
checkpoint; the train set is `glue.k_per_class` examples per class of the rest
(`glue_sampling.few_shot`), or with k_per_class=0 all of the rest, then at most
`glue.train_examples` of it (0 = no cap; `glue_sampling.subsample`).

Every row trains `glue.num_steps` steps of batch `glue.batch_size` through the one train step
(`train_step.make_train_step`) with its update rule. At step 0 and every `glue.eval_every` steps
(and the last) it measures the selection score (`glue_metrics.selection_score`: informedness,
which is 0 for any constant predictor, or Pearson for STS-B; the primary metric would let a
majority-class predictor win) and, with `glue.dev_curve`, the dev metric, and records them with
the forward passes and seconds so far (the record's `curve`). The params of the best selection
score (step 0 unless a later step is strictly better) are evaluated on dev. Each record holds the
step-0 (zero-shot) dev and selection scores, the selected step and the selected params' relative
change ||theta - theta_0|| / ||theta_0|| (float64, all leaves), so that an untrained model cannot
pass for a trained one. Zeroth-order rows with `glue.zo.learning_rates` first train each
candidate learning rate for `glue.zo.grid_steps` steps on the first seed and use the one with the
best selection score for every seed (the record's `lr_grid`). Beside each task: the majority
class and a bag-of-words model (`glue_baselines`) trained on each seed's train set. Any exception
fails the run (no row is skipped); the config is validated before anything runs (`validate`).

Reliability (`run`, docs/glue.md): the workdir is locked and proven writable first; every
finished (task, row, seed) record and learning-rate trial is a unit committed atomically to
<workdir>/glue_units/<unit>__<settings digest>.json and reused by the same command, so a run
killed (SIGKILL), interrupted (SIGINT) or preempted (SIGTERM: stop at the next step, one line,
exit 130/143) resumes; glue.* are written atomically and never replaced by a run with other
settings (those go to glue-<digest>.*); a NaN loss is traced to a non-finite start parameter or
an empty batch before the learning rate is blamed.
"""

import hashlib
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bdiff_jax import glue_baselines, glue_metrics, glue_models, glue_report, glue_starts
from bdiff_jax import interrupt, models, update_rule
from bdiff_jax import workdir as workdir_lib
from bdiff_jax.platform_info import memory_stats
from bdiff_jax.data import glue, glue_encoding, glue_sampling
from bdiff_jax.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from bdiff_jax.errors import UserError
from bdiff_jax.reporter import Reporter
from bdiff_jax.train_state import create_train_state
from bdiff_jax.train_step import make_train_step


def _positive_int(g, key: str, minimum: int = 1, prefix: str = "glue") -> None:
  v = g[key]
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
    raise ConfigError(f"{prefix}.{key}={v!r} must be an integer >= {minimum}.",
                      f"set --config.{prefix}.{key} to an integer >= {minimum}.")


def validate(g) -> None:
  """Checks `config.glue` before anything is loaded or trained; raises a one-line ConfigError."""
  for key in ("num_steps", "eval_every", "batch_size", "eval_batch_size", "eval_max",
              "seq_len", "selection"):
    _positive_int(g, key)
  _check_seq_len_by_task(g)
  for key in ("k_per_class", "train_examples"):
    _positive_int(g, key, 0)
  seeds = tuple(g.seeds)
  if not seeds or len(set(seeds)) != len(seeds) or not all(
      isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds):
    raise ConfigError(f"glue.seeds={seeds!r} must be distinct integers, at least one.",
                      "set e.g. --config.glue.seeds='(0,1,2)'.")
  if not [t for t in str(g.tasks).split(",") if t.strip()]:
    raise ConfigError("glue.tasks is empty.", "list tasks, e.g. --config.glue.tasks=SST-2,RTE.")
  for t in str(g.tasks).split(","):
    if t.strip():
      glue.task_spec(t.strip())
  if not 0.0 <= float(g.selection_fraction) < 1.0:
    raise ConfigError(f"glue.selection_fraction={g.selection_fraction} must be in [0, 1).",
                      "set it to e.g. 0.1, or 0 for no cap.")
  lrs = tuple(g.zo.learning_rates)
  if any(not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 for lr in lrs):
    raise ConfigError(f"glue.zo.learning_rates={lrs!r} must be positive numbers.",
                      "set e.g. --config.glue.zo.learning_rates='(1e-7,1e-6,1e-5)', or () for "
                      "glue.zo.learning_rate alone.")
  if lrs:
    _positive_int(g.zo, "grid_steps", prefix="glue.zo")
  _positive_int(g.zo, "num_steps", 0, prefix="glue.zo")
  _positive_int(g.zo, "num_perturbations", prefix="glue.zo")
  _positive_int(g.dizo, "interval", prefix="glue.dizo")
  _positive_int(g.dizo, "iterations", 0, prefix="glue.dizo")
  for key, minimum in (("adamw.learning_rate", None), ("zo.learning_rate", None),
                       ("zo.eps", None), ("dizo.eps_p", None), ("dizo.step_size", None),
                       ("zo.weight_decay", 0.0), ("adamw.weight_decay", 0.0)):
    node, field = key.split(".")
    v = g[node][field]
    ok = (isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
          and math.isfinite(v) and (v > 0 if minimum is None else v >= minimum))
    if not ok:
      want = "a finite number > 0" if minimum is None else f"a finite number >= {minimum:g}"
      raise ConfigError(f"glue.{key}={v!r} must be {want}.",
                        f"set --config.glue.{key} to {want}.")
  _positive_int(g, "lora_rank")
  if not float(g.lora_alpha) > 0:
    raise ConfigError(f"glue.lora_alpha={g.lora_alpha} must be > 0.", "set e.g. 16.")
  if str(g.starts_dir) and not float(g.starts_budget_seconds) > 0:
    raise ConfigError(f"glue.starts_budget_seconds={g.starts_budget_seconds} must be > 0.",
                      "set e.g. 1800 (the main command's 30 minutes).")
  specs = glue_models.parse_rows(g.rows)
  if any(s.model == "opt" for s in specs) and not str(g.starts_dir):
    where = str(g.opt_dir)
    if not where or not os.path.isdir(where):
      raise ConfigError(f"an opt row needs glue.opt_dir, and {where!r} is "
                        f"{'not given' if not where else 'not a directory'}.",
                        "set --config.glue.opt_dir to an OPT checkpoint or a configs/wikitext2.py"
                        ":cpu_opt workdir, or drop the opt rows from glue.rows.")


def task_seq_len(g, task: str) -> int:
  """The encoded length of `task`'s examples: its entry in `glue.seq_len_by_task`
  ("SST-2:64,RTE:128"; at most glue.seq_len) or glue.seq_len. Short-sentence tasks need not pay
  for the longest task's padding."""
  for item in str(g.get("seq_len_by_task", "")).split(","):
    name, _, value = item.partition(":")
    if name.strip() and glue.task_spec(name.strip()).name == glue.task_spec(task).name:
      return int(value)
  return int(g.seq_len)


def _check_seq_len_by_task(g) -> None:
  for item in [i for i in str(g.get("seq_len_by_task", "")).split(",") if i.strip()]:
    name, _, value = item.partition(":")
    try:
      glue.task_spec(name.strip())
      ok = 1 <= int(value) <= int(g.seq_len)
    except ValueError:
      ok = False
    if not ok:
      raise ConfigError(f"glue.seq_len_by_task entry {item!r} is not TASK:LENGTH with "
                        f"1 <= LENGTH <= glue.seq_len ({g.seq_len}).",
                        "write e.g. --config.glue.seq_len_by_task=SST-2:64,RTE:128.")


def _data_dir(spec, g) -> str | None:
  root = g.superglue_dir if spec.benchmark == "superglue" else g.glue_dir
  return str(root) or None


def dev_splits(task: str) -> tuple[str, ...]:
  """The task's evaluation splits: ("dev",), or MNLI's ("dev_matched", "dev_mismatched")."""
  return glue.task_spec(task).splits[1:]


def task_splits(task: str, g, seed: int):
  """(train, selection, {dev split: dev}, full train) of `task` for `seed` (module docstring)."""
  spec = glue.task_spec(task)
  root = _data_dir(spec, g)
  full = glue.load_split(spec.name, "train", root)
  devs = {name: glue_sampling.subsample(glue.load_split(spec.name, name, root),
                                        int(g.eval_max), seed=0) for name in dev_splits(task)}
  n = int(g.selection)
  if float(g.selection_fraction) > 0:
    n = min(n, max(1, int(round(float(g.selection_fraction) * len(full)))))
  rest, selection = glue_sampling.holdout(full, n, seed=seed,
                                          balanced=bool(g.selection_balanced))
  train = rest  # k_per_class=0: the full train split minus the selection set
  if int(g.k_per_class) > 0:
    train = glue_sampling.few_shot(rest, int(g.k_per_class), seed=seed)
  if int(g.train_examples) > 0:
    train = glue_sampling.subsample(train, int(g.train_examples), seed=seed)
  return train, selection, devs, full


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
  spec = glue.task_spec(task)
  dist = (None if spec.is_regression else
          glue_metrics.prediction_distribution(preds, spec.num_labels))
  return metrics, dist, preds


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


def row_steps(spec, g) -> int:
  """The row's train steps: `glue.zo.num_steps` for zeroth-order rows when > 0, else
  `glue.num_steps`."""
  if spec.rule != "adamw" and int(g.zo.num_steps) > 0:
    return int(g.zo.num_steps)
  return int(g.num_steps)


def run_seed(spec, task: str, g, seed: int, reporter: Reporter, programs: dict) -> dict:
  """Trains and evaluates one row on one task with one seed; returns its record.

  `programs` carries the row's compiled step and scorer from one seed to the next (the seeds
  change the parameters and the data, not the program), so each row compiles once per task;
  its "stop" (a `GracefulInterrupt`, optional) is checked after every train step: once a
  signal came, `Interrupted` is raised there.

  Raises:
    CheckpointError: a start parameter holds NaN/inf (checked before training).
    NonFiniteLossError: the loss became NaN/inf (`nonfinite_loss_error` names the cause).
  """
  stop = programs.get("stop")
  where = f"{task} {spec.name} seed {seed}"
  _check_stop(stop, f"before {where}")
  train, selection, devs, full = task_splits(task, g, seed)
  if not len(train):
    raise DataError(f"{where}: the train set is empty (train split {len(full)} examples, "
                    f"{len(selection)} of them held out for selection).",
                    "lower glue.selection / glue.selection_fraction, or use a task with more "
                    "training examples.")
  steps = row_steps(spec, g)
  row = glue_models.build_row(spec, g, full, seed=seed, total_steps=steps)
  check_finite_params(row.params, f"{spec.name} on {task}: the start parameters ({row.init})")
  # The first seed's network, objective and rule (not its parameters, which would stay in
  # memory for the task's remaining seeds): the same program.
  if "parts" in programs:
    row.network, row.objective, row.rule = programs["parts"]
  else:
    programs["parts"] = (row.network, row.objective, row.rule)
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
  if "score_fn" not in programs:
    network, objective = row.network, row.objective
    programs["step_fn"] = make_train_step(objective, network, row.rule, ema_decay=0.0)
    programs["score_fn"] = jax.jit(
        lambda p, b: objective.scores(models.bind(network, p, train=False), b))
  step_fn, score_fn = programs["step_fn"], programs["score_fn"]
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
    metrics, _, preds = evaluate(row, score_fn, params, split_arrays, task, ebs, split_groups)
    return metrics, glue_metrics.selection_score(task, preds, split_arrays["labels"])

  batch = next_batch()
  if "compiled" not in programs:
    programs["compiled"] = step_fn.lower(state, batch).compile()
  compiled = programs["compiled"]
  mem = memory_stats(compiled)
  best, best_params = float("nan"), None
  best_step, seconds, start, curve = 0, 0.0, time.time(), []
  zero_shot = {}
  for step in range(steps + 1):
    if step % int(g.eval_every) == 0 or step == steps:
      params = state.params
      sel, score = measure(params, arrays["selection"], groups["selection"])
      point = {"step": step, "forward": glue_models.forward_passes(row.rule, step)["forward"],
               "train_seconds": seconds, "wall_seconds": time.time() - start,
               "selection": score, "selection_metric": sel[primary]}
      if step == 0:
        zero_shot = {"selection": score, "selection_metric": sel[primary],
                     "dev": {name: measure(params, a, groups[name])[0]
                             for name, a in dev_arrays.items()}}
        point["dev"] = zero_shot["dev"][first_dev][primary]
      elif bool(g.dev_curve):
        point["dev"] = measure(params, dev_arrays[first_dev], groups[first_dev])[0][primary]
      curve.append(point)
      if step == 0 or _better(score, best):
        best, best_step = score, step
        best_params = jax.tree_util.tree_map(jnp.copy, params)
    if step == steps:
      break
    t0 = time.time()
    state, metrics = compiled(state, batch)
    loss = float(metrics["loss"])
    seconds += time.time() - t0
    if not np.isfinite(loss):
      raise nonfinite_loss_error(f"{spec.name} on {task} (seed {seed})", loss, step, batch)
    _check_stop(stop, f"in {where} after step {step + 1} of {steps}")
    batch = next_batch()
  dev_metrics, dev_se, dist = {}, {}, None
  for name, a in dev_arrays.items():
    dev_metrics[name], d, preds = evaluate(row, score_fn, best_params, a, task, ebs,
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
          "selection_best": best, "selected_step": best_step,
          "relative_param_change": change, "curve": curve,
          "prediction_distribution": dist, "train_seconds": seconds, "steps": steps,
          "forward_passes": glue_models.forward_passes(row.rule, steps),
          "step_memory_bytes": int(mem["held_bytes"]),
          **sizes,
          "init": row.init, "scoring": row.scoring, "rule": spec.rule, "oov_rate": oov,
          "learning_rate": float(g.zo.learning_rate if spec.rule != "adamw"
                                 else g.adamw.learning_rate),
          "sizes": {"train": len(train), "selection": len(selection),
                    **{name: len(d) for name, d in devs.items()}}}


def _with(g, **changes):
  """A copy of `config.glue` with `changes` ("zo.learning_rate": ...) applied."""
  out = ml_collections.ConfigDict(g.to_dict())
  for key, value in changes.items():
    node, *rest = key.split(".")
    if rest:
      out[node][rest[0]] = value
    else:
      out[key] = value
  return out


def _uses_grid(spec, g) -> bool:
  return spec.rule != "adamw" and bool(tuple(g.zo.learning_rates))


def choose_learning_rate(spec, task: str, g, reporter: Reporter, *, units=None, stop=None):
  """(config with the chosen zo.learning_rate, grid results) for a zeroth-order row.

  Each of `glue.zo.learning_rates` trains `glue.zo.grid_steps` steps on the first seed; the best
  selection score wins (ties: the better final selection score, then the earlier candidate).
  No grid (or a first-order row): `g` unchanged and None. With `units` (a `Units`), each trial
  is a unit: reused when finished before, committed as soon as it finishes.
  """
  lrs = tuple(g.zo.learning_rates)
  if not _uses_grid(spec, g):
    return g, None
  steps = int(g.zo.grid_steps)
  seed = int(g.seeds[0])
  grid = []
  for lr in lrs:
    name = unit_name(task, spec.name, seed, lr=float(lr))
    entry = units.load(name, spec, reporter) if units is not None else None
    if entry is None:
      _check_stop(stop, f"before {task} {spec.name} learning-rate trial {float(lr):g} (seed "
                  f"{seed})")
      trial = _with(g, **{"zo.learning_rate": float(lr), "zo.num_steps": steps,
                          "eval_every": min(int(g.eval_every), steps), "dev_curve": False})
      rec = run_seed(spec, task, trial, seed, reporter, {} if stop is None else {"stop": stop})
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
  return _with(g, **{"zo.learning_rate": chosen["learning_rate"]}), grid


# --- Resumable units, interruption, the results' settings digest ---------------------------------

UNITS_DIR = "glue_units"
# Fields of `config.glue` that say which units a run has or only label it, not what a unit
# computes: left out of a unit's digest, so that a run with more seeds, tasks or rows reuses the
# units it shares with an earlier one.
UNIT_EXCLUDED = ("seeds", "tasks", "rows", "level", "description")


def settings_digest(settings: dict) -> str:
  """12 hex digits of the SHA-256 of `settings` (a JSON-able dict, keys sorted)."""
  text = json.dumps(settings, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def unit_settings(g, spec) -> dict:
  """What a unit of row `spec` depends on: `config.glue` minus `UNIT_EXCLUDED`, plus the seed of
  the learning-rate grid (the first seed) for a row with a grid, whose choice every seed uses."""
  out = {k: v for k, v in g.to_dict().items() if k not in UNIT_EXCLUDED}
  if _uses_grid(spec, g):
    out["lr_grid_seed"] = int(g.seeds[0])
  return out


def unit_name(task: str, row: str, seed: int, lr: float | None = None) -> str:
  """`<task>__<row>__seed<k>`, or a learning-rate trial's `<task>__<row>__grid-lr<lr>__seed<k>`."""
  return f"{task}__{row}__" + ("" if lr is None else f"grid-lr{float(lr)!r}__") + f"seed{seed}"


class Units:
  """The finished units of a GLUE run: one file per (task, row, seed) record and per learning-rate
  trial, `<dir>/<unit name>__<digest>.json`, written atomically as soon as the unit finishes.

  The digest (`settings_digest(unit_settings(g, spec))`) is part of the file name and is stored
  in the file with the settings: a run with other settings never reads (or replaces) a unit of
  another, it computes its own under a new name. Every unit of the run is known up front
  (`names`), so `finished()` counts the kept ones at any time.
  """

  def __init__(self, directory: str, g, specs, tasks):
    self.directory = directory
    self._settings = {s.name: unit_settings(g, s) for s in specs}
    self._digests = {k: settings_digest(v) for k, v in self._settings.items()}
    self.names = []
    for task in tasks:
      for spec in specs:
        if _uses_grid(spec, g):
          self.names += [(unit_name(task, spec.name, int(g.seeds[0]), lr=float(lr)), spec.name)
                         for lr in g.zo.learning_rates]
        self.names += [(unit_name(task, spec.name, int(s)), spec.name) for s in g.seeds]
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as e:
      raise workdir_lib.os_error_to_user_error(e, f"creating {directory}") from None

  @property
  def total(self) -> int:
    return len(self.names)

  def path(self, name: str, row: str) -> str:
    return os.path.join(self.directory, f"{name}__{self._digests[row]}.json")

  def finished(self) -> int:
    """How many of this run's units are kept in the directory."""
    return sum(os.path.exists(self.path(n, r)) for n, r in self.names)

  def load(self, name: str, spec, reporter: Reporter | None = None):
    """The result of a finished unit, or None when it has not finished (with these settings).

    Raises:
      DataError: its file exists but cannot be read, or is not that unit's.
    """
    path = self.path(name, spec.name)
    if not os.path.exists(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
      if data["unit"] != name or data["digest"] != self._digests[spec.name]:
        raise ValueError(f"it holds unit {data['unit']!r} with digest {data['digest']!r}")
      result = data["result"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(f"the finished GLUE unit {path} cannot be used ({e}).",
                      "move that file away (the unit is then computed again) and rerun the same "
                      "command.") from None
    if reporter is not None:
      reporter.info(f"{name}: finished before, reused ({os.path.basename(path)})")
    return result

  def save(self, name: str, spec, result):
    """Commits a finished unit (atomically); returns `result` as it reads back from the file
    (JSON types), so that a resumed run computes exactly what an uninterrupted one does."""
    text = json.dumps({"unit": name, "digest": self._digests[spec.name],
                       "settings": self._settings[spec.name], "result": result}, indent=1)
    workdir_lib.write_text_atomically(self.path(name, spec.name), text,
                                      f"the finished GLUE unit {name}")
    return json.loads(text)["result"]


class Interrupted(Exception):
  """A SIGINT/SIGTERM stopped the run at a step or unit boundary; `where` says where."""

  def __init__(self, where: str):
    super().__init__(where)
    self.where = where


def _check_stop(stop, where: str) -> None:
  if stop is not None and stop.stop_requested():
    raise Interrupted(where)


class GlueInterrupt(interrupt.GracefulInterrupt):
  """`GracefulInterrupt` whose notices say what a GLUE run does: the first signal stops it at the
  next step (finished units are already kept; the unit in flight is dropped), a second one
  aborts at once (`abort`, exit 128 + signal number)."""

  def _handle(self, signum: int, frame) -> None:  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self._signum is None:
      self._signum = signum
      self._write(f"received {name}: stopping after the current step; finished GLUE units are "
                  "kept (send it again to abort at once)")
      return
    self._write(f"received {name} again: aborting now (exit {128 + signum}); the finished GLUE "
                "units are intact; rerun the same command to resume")
    self._abort(128 + signum)


class GlueResult(dict):
  """What `run` returns (a dict: rows, records, baselines, paths; or, after an interruption,
  interrupted, message, units_finished, units_total, units_dir), with `exit_code` for main.py:
  0, or 130 / 143 after SIGINT / SIGTERM."""

  exit_code = 0


def check_finite_params(params, what: str) -> None:
  """Raises CheckpointError naming the first leaf of `params` that holds NaN or inf."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    bad = int(jnp.size(leaf) - jnp.sum(jnp.isfinite(leaf)))
    if bad:
      raise CheckpointError(
          f"{what} hold {bad} non-finite value(s) (NaN/inf) of {int(jnp.size(leaf))} in "
          f"{jax.tree_util.keystr(path)}, before any training.",
          "repair or replace that start model (glue.init_workdir* / glue.opt_dir / "
          "glue.init_checkpoint, e.g. an earlier checkpoint); a learning rate cannot fix it.")


def nonfinite_loss_error(what: str, loss: float, step: int, batch: dict) -> NonFiniteLossError:
  """The error for a NaN/inf loss at `step` on `batch`, naming the cause it can tell: examples
  with no tokens in the batch, or, at step 0 (the loss of the untrained start parameters, which
  `check_finite_params` found finite, before any update), the batch rather than the learning
  rate."""
  padding = batch.get("padding")
  n = int(np.prod(np.shape(batch["inputs"])[:-1])) if "inputs" in batch else 0
  empty = 0 if padding is None else int(np.sum(np.asarray(padding).sum(axis=-1) == 0))
  if n == 0 or empty:
    return NonFiniteLossError(
        f"{what}: the loss became {loss} at step {step}: {empty or 'all'} of the {n} examples "
        "of the batch have no tokens (an empty batch or empty texts), not the learning rate.",
        "check the task's training texts (empty sentences) and glue.seq_len / glue.batch_size.")
  if step == 0:
    return NonFiniteLossError(
        f"{what}: the loss is {loss} at step 0, on the finite start parameters before any "
        f"update (so not the learning rate): the first batch of {n} examples gives it.",
        "check the task's training data and the start model's scoring of it (glue.seq_len, "
        "the prompt); rerunning with another learning rate will not help.")
  return NonFiniteLossError(f"{what}: the loss became {loss} at step {step}.",
                            "lower the row's learning rate.")


def run(config, workdir: str, reporter: Reporter) -> GlueResult:
  """Runs every task x row x seed of `config.glue`; writes glue.{json,md,png} to `workdir`.

  Before anything runs: the config is validated, the workdir created and proven writable, and
  locked (`workdir.WorkdirLock`: a second run on it is refused). Every finished unit (a seed's
  record, a learning-rate trial) is committed under <workdir>/glue_units at once (`Units`), and
  the same command reuses them: a run stopped by SIGKILL, SIGINT or SIGTERM resumes. SIGINT /
  SIGTERM stop it at the next train step with one line saying what was kept and exit 130 / 143
  (`GlueResult.exit_code`). The results go to glue.* unless glue.json holds another settings'
  results: then to glue-<digest>.* (`glue_report.results_stem`).
  """
  g = config.glue
  validate(g)
  specs = glue_models.parse_rows(g.rows)
  tasks = [glue.task_spec(t.strip()).name for t in str(g.tasks).split(",") if t.strip()]
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
      use_starts(g, specs, reporter)
    except UserError:
      # A signal reached the start model's training child too: it checkpointed and stopped.
      _check_stop(stop, "while pretraining the start models (their checkpoints are kept in "
                  f"{g.starts_dir})")
      raise
  rows, records, baselines = [], [], []
  for task in tasks:
    primary = glue_metrics.primary_metric(task)
    _check_stop(stop, f"before the {task} baselines")
    base = task_baselines(task, g)
    baselines.append(base)
    for row_spec in specs:
      g_row, grid = choose_learning_rate(row_spec, task, g, reporter, units=units, stop=stop)
      programs = {"stop": stop}
      recs = []
      for s in g.seeds:
        name = unit_name(task, row_spec.name, int(s))
        rec = units.load(name, row_spec, reporter)
        if rec is None:
          _check_stop(stop, f"before {task} {row_spec.name} seed {int(s)}")
          rec = units.save(name, row_spec,
                           run_seed(row_spec, task, g_row, int(s), reporter, programs))
        recs.append(rec)
      for r in recs:
        r["lr_grid"] = grid
      records += recs
      for split in dev_splits(task):
        rows.append(glue_report.aggregate(task, row_spec.name, recs, base, primary, split=split))
  _check_stop(stop, "before writing the results")
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


def use_starts(g, specs, reporter: Reporter) -> None:
  """Pretrains (or reuses, or resumes) the WikiText-2 start models of the rows in `specs` under
  `glue.starts_dir` (`glue_starts.ensure_starts`, `glue.starts_budget_seconds` each) and points
  the rows at them: glue.init_workdir_reversible / init_workdir_standard / opt_dir."""
  needed = tuple(n for n in glue_starts.NAMES if n in {s.model for s in specs})
  if not needed:
    return
  dirs = glue_starts.ensure_starts(str(g.starts_dir), reporter=reporter,
                                   budget_seconds=float(g.starts_budget_seconds),
                                   data_dir=os.environ.get("BDIFF_DATA_DIR", ""), which=needed)
  with g.unlocked():
    for field, workdir in glue_starts.glue_fields(dirs).items():
      g[field] = workdir
  reporter.info("start models: " + ", ".join(f"{k} {v}" for k, v in dirs.items()))


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
