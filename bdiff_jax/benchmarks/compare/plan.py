"""The comparison's plan: every run and memory measurement, validated before anything trains.

`plan_comparison(config, workdir)` reads `config.compare` (configs/compare.py) and returns a
`ComparisonPlan`: one `RunPlan` per model x training seed, each with its full training config and
sub-workdir `runs/<model>_seed<seed>`, and the configs of the memory-vs-depth sweep. Every setting
(model names, seeds, the budget, per-model overrides, each run's config) is checked here, so that a
bad value fails in seconds with a `ConfigError` and nothing is trained or written.

The budget is equal for every model: the same number of training tokens (rounded up to whole
steps of batch_size x seq_len), the same number of steps, or the same training wall-clock
(`train.max_wall_seconds`; `train.num_steps` then stays the learning-rate schedule's length).
"""

import copy
import dataclasses
import math
import os

import ml_collections

from bdiff_jax.benchmarks.compare import overrides as overrides_lib
from bdiff_jax.config import configuration
from bdiff_jax.errors import ConfigError
from bdiff_jax.objectives import objective_class

# name -> (backbone, objective)
MODEL_KINDS = {
    "standard_diffusion": ("standard", "diffusion"),
    "reversible_diffusion": ("reversible", "diffusion"),
    "autoregressive": ("standard", "autoregressive"),
    "standard_autoregressive": ("standard", "autoregressive"),
    "reversible_autoregressive": ("reversible", "autoregressive"),
}
# The models of the memory-vs-depth sweep, always measured at the config's default block.
SWEEP_MODELS = ("standard_diffusion", "reversible_diffusion")
BUDGETS = ("tokens", "steps", "seconds")
LEVELS = ("test", "quick", "full")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One model of the comparison, e.g. `reversible_diffusion:simple`."""
  label: str  # as written in compare.models
  name: str  # the part before ':'
  backbone: str
  objective: str
  block: str

  @classmethod
  def from_name(cls, name: str, block: str, label: str = "") -> "ModelEntry":
    backbone, objective = MODEL_KINDS[name]
    return cls(label or name, name, backbone, objective, block)

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


@dataclasses.dataclass
class SweepPoint:
  """One configuration of the memory-vs-depth sweep (measured, never trained)."""
  backbone: str
  depth: int
  config: ml_collections.ConfigDict


@dataclasses.dataclass
class ComparisonPlan:
  runs: list[RunPlan]
  sweep: list[SweepPoint]
  memory_block: str  # the block of the sweep's models

  @property
  def entries(self) -> list[ModelEntry]:
    """The compared models in the order of config.compare.models."""
    return list(dict.fromkeys(r.entry for r in self.runs))

  def first_run(self, entry: ModelEntry) -> RunPlan:
    return next(r for r in self.runs if r.entry == entry)


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
    entries.append(ModelEntry.from_name(name, block, label=item))
  if not entries:
    raise ConfigError("config.compare.models is empty.",
                      "list models, e.g. standard_diffusion,reversible_diffusion,autoregressive.")
  return entries


def check_compare_section(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a missing or invalid `config.compare`."""
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


def without_compare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked copy of `config` without its `compare` section: a training config."""
  d = config.to_dict()
  d.pop("compare", None)
  return ml_collections.ConfigDict(d)


def run_config(config: ml_collections.ConfigDict, entry: ModelEntry, seed: int,
               overrides: list[overrides_lib.Override], tfds_dir: str
               ) -> ml_collections.ConfigDict:
  """The full training config of one run of `entry` at `seed` (validated)."""
  cmp = config.compare
  c = without_compare(config)
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
  overrides_lib.apply(c, overrides_lib.flattened(overrides, entry.label, entry.name))
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


def plan_comparison(config: ml_collections.ConfigDict, workdir: str) -> ComparisonPlan:
  """Every run and sweep point of the comparison, validated. Raises ConfigError on any invalid
  setting; reads and writes nothing."""
  check_compare_section(config)
  cmp = config.compare
  entries = parse_models(cmp.models, config.model.block)
  known = [e.label for e in entries] + [e.name for e in entries]
  overrides = overrides_lib.parse_overrides(cmp.overrides, known, without_compare(config),
                                            cmp.budget)
  tfds_dir = config.data.tfds_dir or os.path.join(os.path.abspath(workdir), "tfds")
  runs = []
  for entry in entries:
    for seed in cmp.seeds:
      c = run_config(config, entry, seed, overrides, tfds_dir)
      sub = os.path.join(workdir, "runs", f"{entry.label.replace(':', '-')}_seed{seed}")
      runs.append(RunPlan(entry, int(seed), c, sub))
  memory_block = config.model.block
  sweep = []
  if tuple(cmp.memory_depths):
    for name in SWEEP_MODELS:
      entry = ModelEntry.from_name(name, memory_block)
      base = run_config(config, entry, int(tuple(cmp.seeds)[0]), overrides, tfds_dir)
      for depth in cmp.memory_depths:
        c = copy.deepcopy(base)
        c.model.num_layers = int(depth)
        configuration.validate(c)
        sweep.append(SweepPoint(entry.backbone, int(depth), c))
  return ComparisonPlan(runs=runs, sweep=sweep, memory_block=memory_block)


def plan(config: ml_collections.ConfigDict, workdir: str) -> list[RunPlan]:
  """The training runs of the comparison (model x seed, in order), validated."""
  return plan_comparison(config, workdir).runs
