"""The comparison harness: reversible vs standard backbones as diffusion models, and an AR baseline.

`run_comparison(config, workdir)` (main.py --mode=compare, config from configs/compare.py):

  1. Plans every run (model x training seed) and validates all of them before anything trains:
     model names, seeds, the budget, per-model overrides and each run's full config. A bad value
     fails here, in seconds, with a `ConfigError`.
  2. Prints each model's parameter count (from shapes; nothing is computed).
  3. Trains and evaluates each run with `bdiff_jax.modes.train.run` in its own sub-workdir
     `runs/<model>_seed<seed>` (checkpoints, resume, metrics.jsonl, eval_latest.json as for any
     training run). Every model gets the same budget: the same number of tokens (or steps), or
     the same training wall-clock (`train.max_wall_seconds`; the clock includes the first step's
     compilation, as it does for every model). A finished run leaves `compare_run.json`; rerunning
     the comparison with an identical run config reuses it, an interrupted token/step run resumes
     from its checkpoint.
  4. Measures each model's peak train-step memory: the real train step
     (`train_step.make_train_step`: loss, backward, clipping, AdamW, EMA, donated state) compiled for
     the run's batch, read from XLA's compiled memory analysis (the quantities
     `bdiff_jax.benchmarks.memory` reports: total = temp + argument + output bytes; held =
     total - alias, what the step holds with its state donated). Then the memory-vs-depth sweep
     of the standard and reversible backbones (diffusion, the default block) over
     `compare.memory_depths`.
  5. Aggregates over training seeds (mean, sample std and the per-seed values) and writes
     compare.json, compare.md (printed) and compare.png (loss curves; memory vs depth).

Per model: parameters, train tokens/s (median over the log intervals of the run, the first one,
which includes compilation, left out), peak train-step memory, and valid/test word-level
perplexity: an UPPER BOUND (ELBO) for diffusion, EXACT for the autoregressive model, computed by
the same `Evaluator` (word perplexity = exp(total NLL / words incl. one <eos> per line)).

Failures: any exception in any run stops the comparison and propagates unchanged (after a line
naming the run); no table, JSON or PNG is written then, and outputs of an earlier comparison in
the same workdir are removed first so that they cannot be mistaken for this one's. There are no
placeholder numbers: a result that is missing or not finite is an error.
"""

import ast
import copy
import dataclasses
import json
import math
import os
import statistics
import time
from typing import Any

import ml_collections

from bdiff_jax import configuration
from bdiff_jax.errors import ConfigError
from bdiff_jax.objective import objective_class

# name -> (backbone, objective)
MODEL_KINDS = {
    "standard_diffusion": ("standard", "diffusion"),
    "reversible_diffusion": ("reversible", "diffusion"),
    "autoregressive": ("standard", "autoregressive"),
    "standard_autoregressive": ("standard", "autoregressive"),
    "reversible_autoregressive": ("reversible", "autoregressive"),
}
BUDGETS = ("tokens", "steps", "seconds")
LEVELS = ("test", "quick", "full")
JSON_FILE = "compare.json"
MARKDOWN_FILE = "compare.md"
PLOT_FILE = "compare.png"
RUN_FILE = "compare_run.json"
# Fields that define which model a run is: set by the model name, never by an override.
_IDENTITY_FIELDS = ("model.backbone", "model.objective", "model.block", "seed")
# Fields the budget sets (train.num_steps is the schedule length, free, with budget=seconds).
_BUDGET_FIELDS = ("train.num_steps", "train.max_wall_seconds", "train.stop_at_step")
_MIB = 1024.0 * 1024.0


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One model of the comparison, e.g. `reversible_diffusion:simple`."""
  label: str  # as written in compare.models
  name: str  # the part before ':'
  backbone: str
  objective: str
  block: str

  @property
  def upper_bound(self) -> bool:
    return objective_class(self.objective).is_upper_bound


@dataclasses.dataclass
class RunPlan:
  """One training run: a model at one seed, with its full config and sub-workdir."""
  entry: ModelEntry
  seed: int
  config: ml_collections.ConfigDict
  workdir: str

  @property
  def tokens_per_step(self) -> int:
    return int(self.config.train.batch_size) * int(self.config.data.seq_len)


# ---------------------------------------------------------------------------- planning


def parse_models(text: str, default_block: str) -> list[ModelEntry]:
  """'standard_diffusion,reversible_diffusion:simple,...' -> entries (order kept)."""
  entries, seen = [], set()
  for item in (s.strip() for s in str(text).split(",")):
    if not item:
      continue
    name, _, block = item.partition(":")
    if name not in MODEL_KINDS:
      raise ConfigError(f"config.compare.models: unknown model {name!r}.",
                        f"use names from {', '.join(MODEL_KINDS)}, each optionally with "
                        f":{' or :'.join(configuration.BLOCKS)}.")
    block = block or default_block
    if block not in configuration.BLOCKS:
      raise ConfigError(f"config.compare.models: unknown block {block!r} in {item!r}.",
                        f"use one of {', '.join(configuration.BLOCKS)}.")
    if item in seen:
      raise ConfigError(f"config.compare.models lists {item!r} twice.", "list each model once.")
    seen.add(item)
    backbone, objective = MODEL_KINDS[name]
    entries.append(ModelEntry(item, name, backbone, objective, block))
  if not entries:
    raise ConfigError("config.compare.models is empty.",
                      "list models, e.g. standard_diffusion,reversible_diffusion,autoregressive.")
  return entries


def parse_overrides(text: str, entries: list[ModelEntry],
                    budget: str = "tokens") -> list[tuple[str, str, str]]:
  """'MODEL:field.path=value;...' -> [(target, path, raw value)]; MODEL may be * (all models),
  a label from compare.models, or a name (all its block variants)."""
  known = {"*"} | {e.label for e in entries} | {e.name for e in entries}
  out = []
  for item in (s.strip() for s in str(text).split(";")):
    if not item:
      continue
    lhs, eq, value = item.partition("=")
    target, colon, path = lhs.strip().rpartition(":")
    if not eq or not colon or not path.strip():
      raise ConfigError(f"config.compare.overrides: cannot parse {item!r}.",
                        "write MODEL:field.path=value, separated by ';' (MODEL may be *).")
    target, path = target.strip(), path.strip()
    if target not in known:
      raise ConfigError(f"config.compare.overrides: {item!r} names model {target!r}, which is "
                        "not in config.compare.models.",
                        f"use * or one of {', '.join(sorted(known - {'*'}))}.")
    if path in _IDENTITY_FIELDS or path.startswith("compare."):
      raise ConfigError(f"config.compare.overrides: {item!r} changes {path}, which the model "
                        "name and the comparison settings define.",
                        "choose the model by its name (and :simple/:qwen3 suffix) instead.")
    if path in _BUDGET_FIELDS and not (budget == "seconds" and path == "train.num_steps"):
      raise ConfigError(f"config.compare.overrides: {item!r} changes {path}, which the equal "
                        f"budget (config.compare.budget={budget!r}) sets for every model.",
                        "set config.compare.budget and budget_amount instead.")
    out.append((target, path, value.strip()))
  return out


def _coerce(raw: str, current: Any, path: str) -> Any:
  """The override text as a value of the field's current type."""
  try:
    if isinstance(current, bool):
      if raw.lower() not in ("true", "false", "1", "0"):
        raise ValueError("not a boolean")
      return raw.lower() in ("true", "1")
    if isinstance(current, int):
      value = ast.literal_eval(raw)
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("not an integer")
      return value
    if isinstance(current, float):
      return float(raw)
    if isinstance(current, str):
      return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(raw)
      value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
      return value
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f"config.compare.overrides: {path}={raw!r} is not a valid "
                      f"{type(current).__name__} ({e}).",
                      f"give {path} a value of type {type(current).__name__}.") from e


def set_field(config: ml_collections.ConfigDict, path: str, raw: str) -> None:
  """Sets an existing config field from override text; unknown fields are a ConfigError."""
  node = config
  parts = path.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"config.compare.overrides: config has no field "
                        f"{'.'.join(parts[:i + 1])!r} (in {path!r}).",
                        "use a field that exists in bdiff_jax/configuration.py.")
    if i < len(parts) - 1:
      node = node[part]
  current = node[parts[-1]]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"config.compare.overrides: {path!r} is a section, not a field.",
                      "override one field of it, e.g. model.num_layers=2.")
  try:
    node[parts[-1]] = _coerce(raw, current, path)
  except TypeError as e:
    raise ConfigError(f"config.compare.overrides: cannot set {path}={raw!r} ({e}).",
                      f"give {path} a value of type {type(current).__name__}.") from e


def _without_compare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  d = config.to_dict()
  d.pop("compare", None)
  return ml_collections.ConfigDict(d)


def run_config(config: ml_collections.ConfigDict, entry: ModelEntry, seed: int,
               overrides: list[tuple[str, str, str]], tfds_dir: str
               ) -> ml_collections.ConfigDict:
  """The full training config of one run (validated)."""
  cmp = config.compare
  c = _without_compare(config)
  c.seed = int(seed)
  c.model.backbone = entry.backbone
  c.model.objective = entry.objective
  c.model.block = entry.block
  kind = objective_class(entry.objective)
  c.model.time_conditioning = cmp.diffusion_time_conditioning if kind.uses_time else "none"
  if not kind.is_upper_bound:
    # An exact likelihood: evaluation seeds change nothing, so one is enough.
    c.eval.seeds = tuple(c.eval.seeds)[:1]
  c.data.tfds_dir = tfds_dir
  c.train.stop_at_step = 0
  for target, path, raw in overrides:
    if target in ("*", entry.label, entry.name):
      set_field(c, path, raw)
  tokens_per_step = int(c.train.batch_size) * int(c.data.seq_len)
  amount = float(cmp.budget_amount)
  if cmp.budget == "steps":
    c.train.num_steps = int(amount)
    c.train.max_wall_seconds = 0.0
  elif cmp.budget == "tokens":
    c.train.num_steps = int(math.ceil(amount / tokens_per_step))
    c.train.max_wall_seconds = 0.0
  else:  # seconds: train.num_steps stays the schedule length
    c.train.max_wall_seconds = amount
  configuration.validate(c)
  return c


def _check_compare_section(config) -> None:
  if "compare" not in config:
    raise ConfigError("this config has no `compare` section.",
                      "run --mode=compare with --config configs/compare.py:LEVEL[,scale=SCALE].")
  cmp = config.compare
  if cmp.level not in LEVELS:
    raise ConfigError(f"config.compare.level={cmp.level!r} is not one of {LEVELS}.",
                      "choose the level in the preset string, e.g. configs/compare.py:quick.")
  if cmp.scale != cmp.scale_applied:
    raise ConfigError(
        f"config.compare.scale={cmp.scale!r} but config.model has the {cmp.scale_applied!r} "
        "shape: overriding compare.scale alone does not change the model.",
        f"choose the scale in the preset string: configs/compare.py:{cmp.level},"
        f"scale={cmp.scale}.")
  if cmp.budget not in BUDGETS:
    raise ConfigError(f"config.compare.budget={cmp.budget!r} is not one of {BUDGETS}.",
                      "pass --config.compare.budget=tokens, steps or seconds.")
  amount = float(cmp.budget_amount)
  if not amount > 0 or not math.isfinite(amount):
    raise ConfigError(f"config.compare.budget_amount={cmp.budget_amount!r} must be > 0.",
                      f"pass --config.compare.budget_amount=<{cmp.budget} per model>.")
  if cmp.budget == "steps" and amount != int(amount):
    raise ConfigError(f"config.compare.budget_amount={amount} is not a whole number of steps.",
                      "pass an integer number of steps.")
  seeds = tuple(cmp.seeds)
  if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
    raise ConfigError(f"config.compare.seeds={seeds!r} must be distinct integers, at least one.",
                      'pass e.g. --config.compare.seeds="(0, 1, 2)".')
  depths = tuple(cmp.memory_depths)
  if not all(isinstance(d, int) and d > 0 for d in depths):
    raise ConfigError(f"config.compare.memory_depths={depths!r} must be positive integers.",
                      'pass e.g. --config.compare.memory_depths="(2, 4, 8)" or "()".')
  configuration._choice("compare.diffusion_time_conditioning",  # pylint: disable=protected-access
                        cmp.diffusion_time_conditioning, configuration.TIME_CONDITIONING)


def plan(config: ml_collections.ConfigDict, workdir: str) -> list[RunPlan]:
  """Every run of the comparison, validated. Raises ConfigError on any invalid setting."""
  _check_compare_section(config)
  cmp = config.compare
  entries = parse_models(cmp.models, config.model.block)
  overrides = parse_overrides(cmp.overrides, entries, cmp.budget)
  tfds_dir = config.data.tfds_dir or os.path.join(os.path.abspath(workdir), "tfds")
  runs = []
  for entry in entries:
    for seed in cmp.seeds:
      c = run_config(config, entry, seed, overrides, tfds_dir)
      sub = os.path.join(workdir, "runs", f"{entry.label.replace(':', '-')}_seed{seed}")
      runs.append(RunPlan(entry, int(seed), c, sub))
  return runs


# ---------------------------------------------------------------------------- measuring


def train_step_memory(config: ml_collections.ConfigDict, vocab_size: int) -> dict[str, Any]:
  """Compiled memory analysis of the real train step for config's model and batch (no run).

  The same quantities as `bdiff_jax.benchmarks.memory` (which fixes kv heads = heads and derives
  head_dim/mlp_dim from a width, so it cannot describe these models): temp (activations and
  scratch), argument (state + batch), output (new state + metrics) and alias (outputs written
  into the donated state) bytes; total = temp + argument + output, held = total - alias.
  """
  from bdiff_jax.benchmarks import step_memory  # pylint: disable=g-import-not-at-top

  built = step_memory.compile_train_step(config, vocab_size)
  return {**{k: built.stats[k] for k in ("temp_bytes", "argument_bytes", "output_bytes",
                                         "alias_bytes", "total_bytes", "held_bytes")},
          "num_params": built.num_params}


def count_parameters(config: ml_collections.ConfigDict, vocab_size: int) -> int:
  """Parameters of config's model (shapes only, nothing is computed)."""
  from bdiff_jax import models, train_state, update_rule  # pylint: disable=g-import-not-at-top
  from bdiff_jax.objective import build_objective  # pylint: disable=g-import-not-at-top

  seq_len = int(config.data.seq_len)
  network = models.build_network(
      config.model, vocab_size=vocab_size, max_len=seq_len,
      causal=build_objective(config, mask_id=vocab_size).causal)
  state = train_state.abstract_train_state(network, update_rule.build_update_rule(config.train),
                                           seq_len=seq_len)
  return models.count_params(state.params)


def _memory_key(config) -> str:
  c = copy.deepcopy(config)
  c.seed = 0
  return c.to_json(sort_keys=True)


def _load_metrics(workdir: str) -> list[dict]:
  from bdiff_jax import metrics_log  # pylint: disable=g-import-not-at-top
  return metrics_log.read(os.path.join(workdir, "metrics.jsonl"))


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


def _config_json(config) -> str:
  return config.to_json(sort_keys=True)


def execute(run: RunPlan) -> dict[str, Any]:
  """Trains and evaluates one run via modes.train.run; returns its result record."""
  from bdiff_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from bdiff_jax.modes import train  # pylint: disable=g-import-not-at-top
  from bdiff_jax.reporter import Reporter  # pylint: disable=g-import-not-at-top

  record_path = os.path.join(run.workdir, RUN_FILE)
  config_json = _config_json(run.config)
  if os.path.exists(record_path):
    with open(record_path, encoding="utf-8") as f:
      saved = json.load(f)
    if saved.get("config") == config_json:
      print(f"compare: {run.entry.label} seed {run.seed}: reusing the finished run in "
            f"{run.workdir}", flush=True)
      return saved["result"]
  if checkpointing.directory_has_checkpoints(run.workdir):
    if run.config.train.max_wall_seconds > 0:
      raise ConfigError(
          f"{run.workdir} holds an unfinished run, and a wall-clock budget cannot be resumed "
          "fairly (its clock would restart).", "delete that directory or use a new --workdir.")
    saved_path = os.path.join(run.workdir, "config.json")
    saved = None
    if os.path.exists(saved_path):
      with open(saved_path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved != json.loads(run.config.to_json()):
      # E.g. another budget: resuming would mix two learning-rate schedules.
      raise ConfigError(
          f"{run.workdir} holds checkpoints of a run with another config than this "
          "comparison's; resuming it would not give this comparison's run.",
          "delete that directory or use a new --workdir.")
  print(f"compare: training {run.entry.label} seed {run.seed} in {run.workdir}", flush=True)
  t0 = time.time()
  trained = train.run(run.config, run.workdir, Reporter())
  wall = time.time() - t0
  out = trained.evaluation
  if out is None or "results" not in out:
    raise RuntimeError(f"training returned no evaluation for {run.workdir} "
                       f"(status {trained.status}).")
  records = _load_metrics(run.workdir)
  train_records = [r for r in records if r.get("kind") == "train"]
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
      "curve": [{"step": r["step"], "loss": r["loss"], "time": r["time"]}
                for r in train_records if isinstance(r.get("loss"), (int, float))],
  }
  for split in ("valid", "test"):
    r = out["results"][split]
    if bool(r["upper_bound"]) != run.entry.upper_bound:
      raise RuntimeError(f"{run.entry.label}: evaluation says upper_bound={r['upper_bound']}.")
    result[split] = {
        "word_ppl": _finite(f"{run.entry.label} {split} word perplexity", r["word_ppl"]),
        "word_ppl_eval_seed_std": float(r["word_ppl_std"]),
        "nll_per_token": _finite(f"{run.entry.label} {split} NLL", r["nll_per_token"]),
        "num_tokens": int(r["num_tokens"]), "num_words": int(r["num_words"]),
        "full_split": bool(r["full_split"]), "eval_seeds": list(r["seeds"]),
        "num_time_samples": int(r["num_time_samples"]),
        "upper_bound": bool(r["upper_bound"]),
    }
  with open(record_path, "w", encoding="utf-8") as f:
    json.dump({"config": config_json, "result": result}, f, indent=2)
  return result


def summarize(values: list[float]) -> dict[str, Any]:
  """Mean, sample std (0 for one value) and the values."""
  values = [float(v) for v in values]
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


# ---------------------------------------------------------------------------- reporting


def _pm(s: dict, fmt: str) -> str:
  text = format(s["mean"], fmt)
  return text + (f" ± {format(s['std'], fmt)}" if s["n"] > 1 else "")


def _shape(model_config) -> str:
  m = model_config
  return (f"{m['num_layers']}x{m['emb_dim']}, {m['num_heads']}/{m['num_kv_heads']} heads, "
          f"hd {m['head_dim']}, mlp {m['mlp_dim']}")


def format_markdown(summary: dict) -> str:
  """The Markdown report: the model table, the memory-vs-depth table and notes."""
  b = summary["budget"]
  lines = [f"# Comparison ({summary['level']} level, {summary['scale']} scale)", ""]
  budget = {"tokens": f"{b['amount']:,.0f} training tokens per model",
            "steps": f"{b['amount']:,.0f} training steps per model",
            "seconds": f"{b['amount']:,.0f} s of training wall-clock per model"}[b["kind"]]
  lines += [f"Equal budget: {budget} (batch {b['batch_size']} x seq_len {b['seq_len']}); "
            f"training seeds {summary['seeds']}; {summary['device']}.", ""]
  lines += ["| model | shape | params | tokens seen | train tok/s | peak train-step memory "
            "(MiB) | valid word ppl | test word ppl | perplexity is |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]
  for m in summary["models"]:
    lines.append(
        f"| {m['model']} | {_shape(m['model_config'])} | {m['num_params']:,} | "
        f"{_pm(m['tokens_seen'], ',.0f')} | {_pm(m['train_tokens_per_sec'], ',.0f')} | "
        f"{m['memory']['held_bytes'] / _MIB:,.1f} | {_pm(m['valid_word_ppl'], ',.2f')} | "
        f"{_pm(m['test_word_ppl'], ',.2f')} | {m['ppl_kind']} |")
  first = summary["models"][0]
  ev = first["eval"]
  subset = ("full valid and test splits" if ev["full_split"] else
            f"the first {ev['num_tokens']:,} tokens of valid and of test (a SUBSET)")
  lines += ["", "Notes:",
            f"- Perplexities on {subset}, blocks of {b['seq_len']} tokens scored independently;"
            " word perplexity = exp(total NLL / words, one <eos> per line).",
            "- Diffusion: UPPER BOUND from the ELBO (mean over evaluation seeds, "
            f"K={ev['num_time_samples']} time samples); autoregressive: EXACT likelihood.",
            "- ± is the sample std over training seeds (shown with two or more seeds); "
            "per-seed values are in compare.json.",
            "- train tok/s: median over the run's log intervals, compilation left out. Memory: "
            "XLA compiled memory analysis of the full train step (temp + argument + output - "
            "alias bytes; state donated).",
            "- Wall-clock per run (training + evaluation): " + ", ".join(
                f"{m['model']} {_pm(m['run_wall_seconds'], ',.0f')} s"
                for m in summary["models"]) + "."]
  if summary["memory_vs_depth"]:
    depths = sorted({r["depth"] for r in summary["memory_vs_depth"]})
    lines += ["", f"## Train-step memory vs depth ({summary['memory_block']} block, diffusion, "
              f"batch {b['batch_size']} x seq_len {b['seq_len']})", "",
              "| layers | standard held MiB | reversible held MiB | reversible / standard | "
              "standard temp MiB | reversible temp MiB |", "|---:|---:|---:|---:|---:|---:|"]
    by = {(r["backbone"], r["depth"]): r for r in summary["memory_vs_depth"]}
    for d in depths:
      s, r = by[("standard", d)], by[("reversible", d)]
      lines.append(f"| {d} | {s['held_bytes'] / _MIB:,.1f} | {r['held_bytes'] / _MIB:,.1f} | "
                   f"{r['held_bytes'] / s['held_bytes']:.3f} | {s['temp_bytes'] / _MIB:,.1f} | "
                   f"{r['temp_bytes'] / _MIB:,.1f} |")
    lines += ["", "held = temp + argument + output - alias bytes (the state, incl. AdamW "
              "moments and EMA, grows with depth for both); temp = activations and scratch."]
  return "\n".join(lines) + "\n"


def plot(summary: dict, runs_by_model: dict, path: str) -> None:
  """Training loss against tokens and against wall-clock, and memory against depth."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  tokens_per_step = summary["budget"]["batch_size"] * summary["budget"]["seq_len"]
  for label, results in runs_by_model.items():
    for i, r in enumerate(results):
      curve = r["curve"]
      if not curve:
        continue
      t0 = curve[0]["time"]
      kw = {"label": label if i == 0 else None, "alpha": 0.9 if i == 0 else 0.5}
      color = axes[0].plot([c["step"] * tokens_per_step for c in curve],
                           [c["loss"] for c in curve], **kw)[0].get_color()
      axes[1].plot([c["time"] - t0 for c in curve], [c["loss"] for c in curve], color=color,
                   **kw)
  axes[0].set_xlabel("training tokens")
  axes[1].set_xlabel("seconds since the first log record")
  for ax in axes[:2]:
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("loss (diffusion: ELBO bound; AR: exact NLL)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  mem = summary["memory_vs_depth"]
  for backbone, marker, color in (("standard", "o", "tab:blue"), ("reversible", "s", "tab:red")):
    rows = sorted((r for r in mem if r["backbone"] == backbone), key=lambda r: r["depth"])
    if rows:
      depths = [r["depth"] for r in rows]
      axes[2].plot(depths, [r["held_bytes"] / _MIB for r in rows], marker + "-", color=color,
                   label=f"{backbone}: held")
      axes[2].plot(depths, [r["temp_bytes"] / _MIB for r in rows], marker + "--", color=color,
                   alpha=0.6, label=f"{backbone}: temp (activations)")
      axes[2].set_xticks(depths)
  axes[2].set_xlabel("layers")
  axes[2].set_ylabel("MiB (compiled memory analysis)")
  axes[2].set_title("train-step memory vs depth", fontsize=9)
  axes[2].grid(alpha=0.3)
  if mem:
    axes[2].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ---------------------------------------------------------------------------- entry point


def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Plans, measures, trains and evaluates every run; writes compare.{json,md,png}; returns the
  JSON content. Raises on any failure (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top

  from bdiff_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  runs = plan(config, workdir)  # everything validated before any work
  os.makedirs(workdir, exist_ok=True)
  for name in (JSON_FILE, MARKDOWN_FILE, PLOT_FILE):  # never leave an older comparison's output
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      os.remove(path)
  cmp = config.compare
  t_start = time.time()
  base_data = copy.deepcopy(runs[0].config.data)  # the shared TFDS dir, the base data_dir
  base_data.data_dir = config.data.data_dir
  splits = pipeline.load_wikitext2(base_data, workdir)
  vocab_size = splits.tokenizer.vocab_size
  device = (f"{jax.device_count()} x {jax.devices()[0].device_kind} "
            f"({jax.default_backend()}), {os.cpu_count()} CPU cores")
  print(f"compare: {cmp.level} level, {cmp.scale} scale, {len(runs)} runs on {device}",
        flush=True)
  entries = list(dict.fromkeys(r.entry for r in runs))
  first_run = {e: next(r for r in runs if r.entry == e) for e in entries}
  num_params = {}
  for entry in entries:
    num_params[entry] = count_parameters(first_run[entry].config, vocab_size)
    print(f"compare: {entry.label}: {num_params[entry]:,} parameters "
          f"({_shape(first_run[entry].config.model)}, {entry.block} block, {entry.objective})",
          flush=True)

  memory_cache: dict[str, dict] = {}

  def memory_of(c) -> dict:
    key = _memory_key(c)
    if key not in memory_cache:
      memory_cache[key] = train_step_memory(c, vocab_size)
    return memory_cache[key]

  # Training first (a failing run stops everything as early as possible), then memory.
  results: dict[ModelEntry, list[dict]] = {e: [] for e in entries}
  model_memory = {}
  for run in runs:
    try:
      results[run.entry].append(execute(run))
      if run.entry not in model_memory:
        mem = memory_of(run.config)
        if mem["num_params"] != num_params[run.entry]:
          raise RuntimeError(f"{run.entry.label}: parameter counts disagree "
                             f"({mem['num_params']} vs {num_params[run.entry]}).")
        model_memory[run.entry] = mem
        print(f"compare: {run.entry.label}: peak train-step memory "
              f"{mem['held_bytes'] / _MIB:,.1f} MiB", flush=True)
    except BaseException:
      print(f"compare: {run.entry.label} seed {run.seed} FAILED; the comparison stops "
            "(no table is written).", flush=True)
      raise

  memory_block = config.model.block
  sweep = []
  if tuple(cmp.memory_depths):
    for backbone in ("standard", "reversible"):
      entry = ModelEntry(f"{backbone}_diffusion", f"{backbone}_diffusion", backbone, "diffusion",
                         memory_block)
      base = run_config(config, entry, int(tuple(cmp.seeds)[0]),
                        parse_overrides(cmp.overrides, entries + [entry], cmp.budget),
                        runs[0].config.data.tfds_dir)
      for depth in cmp.memory_depths:
        c = copy.deepcopy(base)
        c.model.num_layers = int(depth)
        mem = memory_of(c)
        sweep.append(dict(mem, backbone=backbone, depth=int(depth)))
        print(f"compare: memory {backbone:10s} {depth:3d} layers: held "
              f"{mem['held_bytes'] / _MIB:,.1f} MiB, temp {mem['temp_bytes'] / _MIB:,.1f} MiB",
              flush=True)

  models_out = []
  for entry in entries:
    rs = results[entry]
    first = next(r for r in runs if r.entry == entry)
    models_out.append({
        "model": entry.label, "backbone": entry.backbone, "objective": entry.objective,
        "block": entry.block, "model_config": first.config.model.to_dict(),
        "num_params": num_params[entry],
        "memory": model_memory[entry],
        "ppl_kind": "upper bound" if entry.upper_bound else "exact",
        "upper_bound": entry.upper_bound,
        "tokens_seen": summarize([r["tokens_seen"] for r in rs]),
        "steps": summarize([r["steps"] for r in rs]),
        "train_tokens_per_sec": summarize([r["train_tokens_per_sec"] for r in rs]),
        "run_wall_seconds": summarize([r["run_wall_seconds"] for r in rs]),
        "valid_word_ppl": summarize([r["valid"]["word_ppl"] for r in rs]),
        "test_word_ppl": summarize([r["test"]["word_ppl"] for r in rs]),
        "valid_nll_per_token": summarize([r["valid"]["nll_per_token"] for r in rs]),
        "test_nll_per_token": summarize([r["test"]["nll_per_token"] for r in rs]),
        "eval": {k: rs[0]["valid"][k] for k in ("num_tokens", "full_split", "eval_seeds",
                                                "num_time_samples")},
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in rs],
    })
  c0 = runs[0].config
  summary = {
      "level": cmp.level, "scale": cmp.scale, "models_requested": cmp.models,
      "seeds": list(cmp.seeds),
      "budget": {"kind": cmp.budget, "amount": float(cmp.budget_amount),
                 "batch_size": int(c0.train.batch_size), "seq_len": int(c0.data.seq_len)},
      "device": device, "memory_block": memory_block, "models": models_out,
      "memory_vs_depth": sweep, "wall_seconds": time.time() - t_start,
  }
  markdown = format_markdown(summary)
  plot(summary, {e.label: results[e] for e in entries}, os.path.join(workdir, PLOT_FILE))
  with open(os.path.join(workdir, MARKDOWN_FILE), "w", encoding="utf-8") as f:
    f.write(markdown)
  with open(os.path.join(workdir, JSON_FILE), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  print(markdown, flush=True)
  print(f"compare: wrote {JSON_FILE}, {MARKDOWN_FILE} and {PLOT_FILE} to {workdir} "
        f"({summary['wall_seconds']:.0f} s)", flush=True)
  return summary


def run(config: ml_collections.ConfigDict, workdir: str, reporter) -> dict[str, Any]:
  """`main.py --mode=compare`."""
  del reporter  # the harness prints its progress and table itself
  if "compare" not in config:
    raise ConfigError("--mode=compare needs a comparison config (a `compare` section).",
                      "pass --config configs/compare.py[:test|:quick|:full].")
  return run_comparison(config, workdir)
