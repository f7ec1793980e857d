"""The GLUE benchmark's settings as plain values (`GlueSettings`, made once from `config.glue`,
configs/glue.py, by the glue mode): checked before anything runs (`validate`: one line naming the
field), and what they decide per task and row: the encoded length of a task, a row's own settings
(`row_settings`: a LoRA zeroth-order row's `glue.lora_zo`), a row's steps, whether a row chooses
its learning rate on a grid, and a task's train, selection and dev sets for a seed
(`task_splits`)."""

import copy
import dataclasses
import math
import os
from typing import Any, Optional

import numpy as np

from bdiff_jax.errors import ConfigError
from bdiff_jax.glue import readers as glue_readers
from bdiff_jax.glue import rows as glue_rows
from bdiff_jax.glue import sampling as glue_sampling
from bdiff_jax.glue import tasks as glue_tasks
from bdiff_jax.optim.zeroth_order import check_noise


class _Section:
  """A section's fields also by name (`"eps" in zo`, `zo["eps"]`), as `train.builder` reads a
  config section (`builder.update_rule_from_sections`)."""

  def __contains__(self, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(self)}

  def __getitem__(self, name: str):
    if name not in self:
      raise KeyError(name)
    return getattr(self, name)


@dataclasses.dataclass(frozen=True)
class GlueZO(_Section):
  """`glue.zo`: the zeroth-order rows' rule (MeZO's fields, the freeze choice), their learning-rate
  grid (`learning_rates`, `grid_steps`) and steps (`num_steps`, 0 = glue.num_steps)."""
  learning_rate: float
  schedule: str
  eps: float
  num_perturbations: int
  weight_decay: float
  freeze: str
  learning_rates: tuple
  num_steps: int
  grid_steps: int
  noise: str = "gaussian"  # z's distribution: "gaussian" (MeZO's) | "rademacher" (±1)


@dataclasses.dataclass(frozen=True)
class GlueDiZO(_Section):
  """`glue.dizo`: DiZO's projection settings."""
  interval: int
  iterations: int
  eps_p: float
  step_size: float
  tau: float
  fresh_batches: bool


@dataclasses.dataclass(frozen=True)
class GlueLoraZO:
  """`glue.lora_zo`: what a zeroth-order LoRA row uses instead of glue.zo's (0 / () = keep)."""
  eps: float
  learning_rate: float
  learning_rates: tuple


@dataclasses.dataclass(frozen=True)
class GlueSettings:
  """`config.glue` in plain values, field for field (configs/glue.py says what each does).

  `bdiff` and `adamw` are whole train configs as plain dicts (`ConfigDict.to_dict()`): the shape
  and objective of the from-scratch bdiff rows, and the first-order rows' AdamW. The fields
  that default to None are settings a config may lack (an older config file); `to_dict` leaves
  them out then, so that it gives back exactly the dict the settings came from, and the digests
  of the settings (`glue.units`) stay those of `config.glue.to_dict()`. Values are kept as given
  (`validate` checks them), never converted.
  """
  level: str
  description: str
  tasks: str
  rows: str
  seeds: tuple
  glue_dir: str
  superglue_dir: str
  k_per_class: int
  train_examples: int
  selection: int
  selection_fraction: float
  selection_balanced: bool
  eval_max: int
  seq_len: int
  batch_size: int
  eval_batch_size: int
  num_steps: int
  eval_every: int
  dev_curve: bool
  opt_dir: str
  init_workdir: str
  init_checkpoint: str
  starts_dir: str
  starts_budget_seconds: float
  lora_rank: int
  lora_alpha: float
  bdiff: dict
  adamw: dict
  zo: GlueZO
  dizo: GlueDiZO
  seq_len_by_task: Optional[str] = None
  init_workdir_reversible: Optional[str] = None
  init_workdir_standard: Optional[str] = None
  lora_zo: Optional[GlueLoraZO] = None

  @classmethod
  def from_dict(cls, d: dict) -> "GlueSettings":
    """The settings of `config.glue.to_dict()`; raises a one-line ConfigError on a field that is
    missing or not a GLUE setting."""
    values = _fields(cls, d, "glue")
    sections = {"zo": GlueZO, "dizo": GlueDiZO, "lora_zo": GlueLoraZO}
    for name, section in sections.items():
      if name in values:
        values[name] = section(**_fields(section, values[name], f"glue.{name}"))
    return cls(**values)

  def to_dict(self) -> dict:
    """The dict these settings were made from (`from_dict`), with any changes made since."""
    return _as_dict(self)


def _fields(cls, d: dict, where: str) -> dict:
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(d) - set(names))
  if unknown:
    raise ConfigError(f"{where}.{unknown[0]} is not a GLUE setting.",
                      f"remove it; configs/glue.py lists the settings of {where}.")
  missing = [f.name for f in dataclasses.fields(cls)
             if f.name not in d and f.default is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"{where}.{missing[0]} is missing.",
                      "start from configs/glue.py, which sets every GLUE setting.")
  return {k: copy.deepcopy(d[k]) for k in names if k in d}


def _as_dict(settings) -> dict:
  out = {}
  for f in dataclasses.fields(settings):
    v = getattr(settings, f.name)
    if v is None and f.default is None:
      continue  # a setting the config did not have
    out[f.name] = _as_dict(v) if dataclasses.is_dataclass(v) else copy.deepcopy(v)
  return out


def _value(g, dotted: str) -> Any:
  """The setting `dotted` ("zo.eps", "adamw.learning_rate") of `g`."""
  for part in dotted.split("."):
    g = g[part] if isinstance(g, dict) else getattr(g, part)
  return g


def _positive_int(g, key: str, minimum: int = 1, prefix: str = "glue") -> None:
  v = _value(g, key)
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
    raise ConfigError(f"{prefix}.{key}={v!r} must be an integer >= {minimum}.",
                      f"set --config.{prefix}.{key} to an integer >= {minimum}.")


def validate(g) -> None:
  """Checks the settings before anything is loaded or trained; raises a one-line ConfigError."""
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
      glue_tasks.task_spec(t.strip())
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
  check_noise(g.zo.noise, "glue.zo.noise")
  _positive_int(g.dizo, "interval", prefix="glue.dizo")
  _positive_int(g.dizo, "iterations", 0, prefix="glue.dizo")
  for key, minimum in (("adamw.learning_rate", None), ("zo.learning_rate", None),
                       ("zo.eps", None), ("dizo.eps_p", None), ("dizo.step_size", None),
                       ("zo.weight_decay", 0.0), ("adamw.weight_decay", 0.0)):
    v = _value(g, key)
    ok = (isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
          and math.isfinite(v) and (v > 0 if minimum is None else v >= minimum))
    if not ok:
      want = "a finite number > 0" if minimum is None else f"a finite number >= {minimum:g}"
      raise ConfigError(f"glue.{key}={v!r} must be {want}.",
                        f"set --config.glue.{key} to {want}.")
  _check_lora_zo(g)
  _positive_int(g, "lora_rank")
  if not float(g.lora_alpha) > 0:
    raise ConfigError(f"glue.lora_alpha={g.lora_alpha} must be > 0.", "set e.g. 16.")
  if str(g.starts_dir) and not float(g.starts_budget_seconds) > 0:
    raise ConfigError(f"glue.starts_budget_seconds={g.starts_budget_seconds} must be > 0.",
                      "set e.g. 1800 (the main command's 30 minutes).")
  specs = glue_rows.parse_rows(g.rows)
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
  for item in str(g.seq_len_by_task or "").split(","):
    name, _, value = item.partition(":")
    if name.strip() and glue_tasks.task_spec(name.strip()).name == glue_tasks.task_spec(task).name:
      return int(value)
  return int(g.seq_len)


def _check_seq_len_by_task(g) -> None:
  for item in [i for i in str(g.seq_len_by_task or "").split(",") if i.strip()]:
    name, _, value = item.partition(":")
    try:
      glue_tasks.task_spec(name.strip())
      ok = 1 <= int(value) <= int(g.seq_len)
    except ValueError:
      ok = False
    if not ok:
      raise ConfigError(f"glue.seq_len_by_task entry {item!r} is not TASK:LENGTH with "
                        f"1 <= LENGTH <= glue.seq_len ({g.seq_len}).",
                        "write e.g. --config.glue.seq_len_by_task=SST-2:64,RTE:128.")


# `glue.lora_zo` fields that replace `glue.zo`'s for zeroth-order rows with the `lora` option;
# 0 / () = keep glue.zo's.
LORA_ZO_FIELDS = ("eps", "learning_rate", "learning_rates")


def _check_lora_zo(g) -> None:
  if g.lora_zo is None:
    return
  for key in ("eps", "learning_rate"):
    v = getattr(g.lora_zo, key)
    if (isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v)
        or v < 0):
      raise ConfigError(f"glue.lora_zo.{key}={v!r} must be a finite number >= 0 (0: glue.zo's).",
                        f"set --config.glue.lora_zo.{key} to e.g. 1e-2, or 0.")
  lrs = tuple(g.lora_zo.learning_rates)
  if any(not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 for lr in lrs):
    raise ConfigError(f"glue.lora_zo.learning_rates={lrs!r} must be positive numbers.",
                      "set e.g. --config.glue.lora_zo.learning_rates='(1e-3,1e-2,1e-1)', or () "
                      "for glue.zo.learning_rates.")


def row_settings(g: GlueSettings, spec) -> GlueSettings:
  """The settings as row `spec` uses them: for a zeroth-order row with the `lora` option,
  `glue.zo` with the non-zero fields of `glue.lora_zo` in place (LoRA factors start at zero and
  need a larger perturbation and rate than full weights to move: docs/glue.md); every other row,
  `g` as it is. Without `lora_zo`, so that a unit's settings say what it ran with (and the units
  of every other row keep the digests they had before `lora_zo` existed)."""
  if g.lora_zo is None:
    return g
  changes = {}
  if spec.rule != "adamw" and spec.peft == "lora":
    for key in LORA_ZO_FIELDS:
      v = getattr(g.lora_zo, key)
      v = tuple(v) if key == "learning_rates" else float(v)
      if v:
        changes[f"zo.{key}"] = v
  return dataclasses.replace(with_changes(g, **changes), lora_zo=None)


def with_changes(g: GlueSettings, **changes) -> GlueSettings:
  """A copy of the settings with `changes` ("zo.learning_rate": ..., "eval_every": ...)."""
  top, sections = {}, {}
  for key, value in changes.items():
    node, _, field = key.partition(".")
    if field:
      sections.setdefault(node, {})[field] = value
    else:
      top[key] = value
  for node, fields in sections.items():
    section = getattr(g, node)
    top[node] = ({**section, **fields} if isinstance(section, dict)
                 else dataclasses.replace(section, **fields))
  return dataclasses.replace(g, **top)


def row_steps(spec, g) -> int:
  """The row's train steps: `glue.zo.num_steps` for zeroth-order rows when > 0, else
  `glue.num_steps`."""
  if spec.rule != "adamw" and int(g.zo.num_steps) > 0:
    return int(g.zo.num_steps)
  return int(g.num_steps)


def uses_grid(spec, g) -> bool:
  """Whether row `spec` chooses its learning rate on a grid (zeroth order with
  `glue.zo.learning_rates`)."""
  return spec.rule != "adamw" and bool(tuple(g.zo.learning_rates))


def _data_dir(spec, g) -> str | None:
  root = g.superglue_dir if spec.benchmark == "superglue" else g.glue_dir
  return str(root) or None


def dev_splits(task: str) -> tuple[str, ...]:
  """The task's evaluation splits: ("dev",), or MNLI's ("dev_matched", "dev_mismatched")."""
  return glue_tasks.task_spec(task).splits[1:]


def task_splits(task: str, g, seed: int):
  """(train, selection, {dev split: dev}, full train) of `task` for `seed` (module docstring)."""
  spec = glue_tasks.task_spec(task)
  root = _data_dir(spec, g)
  full = glue_readers.load_split(spec.name, "train", root)
  devs = {name: glue_sampling.subsample(glue_readers.load_split(spec.name, name, root),
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
