"""Per-model config overrides of the comparison: `config.compare.overrides`.

The text is `MODEL:field.path=value;MODEL:field.path=value;...`, where MODEL is `*` (every model),
a label from `config.compare.models` (e.g. `reversible_diffusion:simple`) or a model name (all its
block variants). Each value is read exactly as `--config.field.path=value` on the command line
reads it: ml_collections' config_flags parses it with the parser of the field's type (int, float,
bool, str, tuple; one pair of outer quotes is removed first, as a shell removes them from a flag)
into a flattened dict `{field.path: value}`, and `ConfigDict.update_from_flattened_dict` applies
that dict to a run's config, locked so that no field can be added.

Refused with a one-line `ConfigError` naming the field, before anything trains: an unparseable
item, an unknown model, an unknown field, a whole section, a value of the wrong type, the fields
a model's name defines (backbone, objective, block, seed) and the fields the equal budget sets.
"""

import copy
import dataclasses
import re
from typing import Any, Iterable

from absl import flags
import ml_collections
from ml_collections import config_flags

from bdiff_jax.errors import ConfigError

ALL_MODELS = "*"
# Fields that define which model a run is: set by the model name, never by an override.
IDENTITY_FIELDS = ("model.backbone", "model.objective", "model.block", "seed")
# Fields the budget sets (train.num_steps is the schedule length, free, with budget=seconds).
BUDGET_FIELDS = ("train.num_steps", "train.max_wall_seconds", "train.stop_at_step")
_SETTING = "config.compare.overrides"
_FLAG = "override"  # the name of the throw-away config flag the values are parsed with
_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # section.field, no indexing


@dataclasses.dataclass(frozen=True)
class Override:
  """One `MODEL:field.path=value` item, its value already of the field's type."""
  target: str  # "*", a model label or a model name
  path: str  # e.g. "train.learning_rate"
  value: Any
  text: str  # the item as written

  def applies_to(self, label: str, name: str) -> bool:
    return self.target in (ALL_MODELS, label, name)


def _one_line(error: Exception) -> str:
  return " ".join(str(error).replace("\\n", " ").split())


def _unquoted(raw: str) -> str:
  """raw without one pair of matching outer quotes, as a shell would give it to a flag."""
  if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
    return raw[1:-1]
  return raw


def _is_section(template: ml_collections.ConfigDict, path: str) -> bool:
  node = template
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return isinstance(node, ml_collections.ConfigDict)


def parse_value(template: ml_collections.ConfigDict, path: str, raw: str, item: str) -> Any:
  """`raw` as a value of `template`'s field `path`, as `--config.<path>=<raw>` would give it.

  Uses config_flags on a throw-away flag registry (and a copy of `template`): the result is the
  entry of `get_override_values`, the flattened dict the command line itself produces.
  """
  if _is_section(template, path):
    raise ConfigError(f"{_SETTING}: {path!r} (in {item!r}) is a section, not a field.",
                      "override one field of it, e.g. model.num_layers=2.")
  registry = flags.FlagValues()
  argv = ["compare", f"--{_FLAG}.{path}={raw}"]
  try:
    holder = config_flags.DEFINE_config_dict(_FLAG, copy.deepcopy(template), flag_values=registry,
                                             lock_config=True, sys_argv=argv)
    registry(argv)
  except (AttributeError, KeyError, IndexError) as e:
    suggestion = re.search(r'Did you mean "(\w+)"', str(e))
    section = path.rpartition(".")[0]
    raise ConfigError(
        f"{_SETTING}: config has no field {path!r} (in {item!r}).",
        f"did you mean {section}.{suggestion.group(1)}?" if suggestion else
        "use a field that exists in bdiff_jax/config/configuration.py.") from e
  except flags.Error as e:
    reason = _one_line(e).removeprefix(f"flag {argv[1]}: ")  # absl names the throw-away flag
    raise ConfigError(f"{_SETTING}: {item!r} does not give {path} a value of its type "
                      f"({reason}).",
                      f"write {path}=<value> as for --config.{path} on the command line.") from e
  return config_flags.get_override_values(registry[holder.name])[path]


def parse_overrides(text: str, known_models: Iterable[str], template: ml_collections.ConfigDict,
                    budget: str) -> list[Override]:
  """The items of `text` in order, each checked and its value parsed against `template`.

  `known_models` are the labels and names of the compared models; `budget` is
  `config.compare.budget` (with "seconds", train.num_steps stays free: it is the schedule length).
  """
  known = {ALL_MODELS, *known_models}
  out = []
  for item in (s.strip() for s in str(text).split(";")):
    if not item:
      continue
    lhs, eq, raw = item.partition("=")
    target, colon, path = lhs.strip().rpartition(":")
    target, path = target.strip(), path.strip()
    if not eq or not colon or not path:
      raise ConfigError(f"{_SETTING}: cannot parse {item!r}.",
                        "write MODEL:field.path=value, separated by ';' (MODEL may be *).")
    if target not in known:
      raise ConfigError(f"{_SETTING}: {item!r} names model {target!r}, which is not in "
                        "config.compare.models.",
                        f"use * or one of {', '.join(sorted(known - {ALL_MODELS}))}.")
    if not _PATH.fullmatch(path):
      raise ConfigError(f"{_SETTING}: {path!r} (in {item!r}) is not a field path.",
                        "name one field as section.field, e.g. train.learning_rate.")
    if path in IDENTITY_FIELDS or path.startswith("compare."):
      raise ConfigError(f"{_SETTING}: {item!r} changes {path}, which the model name and the "
                        "comparison settings define.",
                        "choose the model by its name (and :simple/:qwen3 suffix) instead.")
    if path in BUDGET_FIELDS and not (budget == "seconds" and path == "train.num_steps"):
      raise ConfigError(f"{_SETTING}: {item!r} changes {path}, which the equal budget "
                        f"(config.compare.budget={budget!r}) sets for every model.",
                        "set config.compare.budget and budget_amount instead.")
    value = parse_value(template, path, _unquoted(raw.strip()), item)
    out.append(Override(target, path, value, item))
  return out


def flattened(overrides: Iterable[Override], label: str, name: str) -> dict[str, Any]:
  """{field.path: value} of the overrides that apply to a model; a later item wins."""
  flat = {}
  for o in overrides:
    if o.applies_to(label, name):
      flat[o.path] = o.value
  return flat


def apply(config: ml_collections.ConfigDict, flat: dict[str, Any]) -> None:
  """Updates `config` in place from `flat` (existing fields only; ConfigDict's type checks)."""
  was_locked = config.is_locked
  config.lock()
  try:
    config.update_from_flattened_dict(flat)
  except (AttributeError, KeyError, TypeError) as e:
    raise ConfigError(f"{_SETTING}: cannot apply {sorted(flat)} ({_one_line(e)}).",
                      "use fields that exist in bdiff_jax/config/configuration.py with values of "
                      "their type.") from e
  finally:
    if not was_locked:
      config.unlock()
