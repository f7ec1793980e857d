"""The one place the config becomes objects: the objective (`build_objective`), the network
(`model_spec`, `build_network`) and the update rule here (`experiment.build` adds the data and
the evaluator). Below it, `objectives`, `diffusion`, `models` and `optim` take plain values:
`DiffusionSettings`, a `ModelSpec`, settings dataclasses
(`update_rule.AdamWSettings`, `ZOSettings`, `DiZOSettings`), the freeze choice and the
parameter-efficient variant as strings.

The LM train mode reads `config.train` (AdamW's fields, `train.zo`, `train.dizo`); a GLUE row
reads `glue.adamw`, `glue.zo`, `glue.dizo` (`glue.rows.build_rule`): both go through
`update_rule_from_sections`, so both freeze the same leaves for the same choice.
"""

import dataclasses
from typing import Any, Optional

from bdiff_jax import models
from bdiff_jax.config import rule_settings
from bdiff_jax.errors import ConfigError
from bdiff_jax.objectives import DiffusionSettings, Objective, objective_class
from bdiff_jax.optim import update_rule as rules


def build_objective(config, *, mask_id: int) -> Objective:
  """The objective of `config.model.objective` with the settings of `config.diffusion`
  (`config`: a ConfigDict or its plain dict, e.g. a GLUE row's `glue.bdiff`: read by item)."""
  model = config["model"]
  return objective_class(model["objective"])(
      mask_id=mask_id, time_conditioned=model["time_conditioning"] != "none",
      diffusion=settings(DiffusionSettings, config["diffusion"]))


def build_model(config, *, vocab_size: int, mask_id: Optional[int] = None,
                max_len: Optional[int] = None) -> tuple[Objective, Any]:
  """(objective, network) of `config`: the network with the flags its objective implies.
  mask_id: the `[MASK]` id (None: `vocab_size`, the tokenizer's); max_len: the learned
  positions (None: config.data.seq_len). `config`: a ConfigDict or its plain dict."""
  objective = build_objective(config, mask_id=vocab_size if mask_id is None else mask_id)
  network = build_network(config["model"], vocab_size=vocab_size,
                          max_len=config["data"]["seq_len"] if max_len is None else max_len,
                          causal=objective.causal)
  return objective, network


def model_spec(model_config, *, vocab_size: int, max_len: int, causal: bool) -> models.ModelSpec:
  """The spec of `config.model`; `causal` comes from the objective (`Objective.causal`)."""
  fields = ({f.name for f in dataclasses.fields(models.ModelSpec)} -
            {"vocab_size", "max_len", "causal"})
  # A field missing from `model_config` keeps its default: the config.json of a workdir trained
  # before that field existed (e.g. model.remat) still describes its network.
  values = {k: model_config[k] for k in fields if k in model_config}
  if "adaptive_cutoffs" in values:  # a list in a saved config.json; the spec must be hashable
    values["adaptive_cutoffs"] = tuple(int(c) for c in values["adaptive_cutoffs"])
  return models.ModelSpec(vocab_size=int(vocab_size), max_len=int(max_len), causal=bool(causal),
                          **values)


def build_network(model_config, *, vocab_size: int, max_len: int, causal: bool):
  """The network of `config.model` (a `Network`, or an `OPTNetwork` for backbone "opt");
  `causal` comes from the objective (`Objective.causal`)."""
  return models.build_network(model_spec(model_config, vocab_size=vocab_size, max_len=max_len,
                                         causal=causal))


def settings(cls, section):
  """The settings dataclass `cls` of a config section's fields of the same names (other fields
  of the section are ignored; a field the section lacks takes its default, and a field without
  a default must be there)."""
  return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)
                if f.name in section or f.default is dataclasses.MISSING})


def freeze_choice(zo_config) -> str:
  """The freeze choice of a config section: its `freeze` ("none" | "embeddings") when it has
  one, else the older boolean `freeze_embeddings` (True -> "embeddings"); neither: "none"."""
  if "freeze" in zo_config:
    return str(zo_config.freeze)
  return "embeddings" if zo_config.get("freeze_embeddings", False) else "none"


def update_rule_from_sections(name: str, total_steps: int, *, adamw=None, zo=None, dizo=None,
                              peft: str = "none") -> rules.UpdateRule:
  """The update rule `name` for `total_steps` steps from its config sections: `adamw` (AdamW's
  fields) for "adamw"; `zo` (MeZO's, and the freeze choice) and `dizo` for "mezo" / "dizo".
  AdamW trains every parameter (or only LoRA factors with peft="lora")."""
  if name == "adamw":
    return rules.make_rule("adamw", total_steps, peft=peft,
                           adamw=settings(rules.AdamWSettings, adamw))
  return rules.make_rule(name, total_steps, zo=settings(rules.ZOSettings, zo),
                         dizo_settings=settings(rules.DiZOSettings, dizo),
                         freeze=freeze_choice(zo), peft=peft)


def zeroth_order_rule(train_config, total_steps: int, name: str) -> rules.UpdateRule:
  """MeZO or DiZO ("mezo" | "dizo") from config.train.zo / config.train.dizo."""
  if name not in ("mezo", "dizo"):
    raise ConfigError(f"unknown zeroth-order update rule {name!r}.", "use 'mezo' or 'dizo'.")
  rule_settings.validate(train_config)
  return update_rule_from_sections(name, total_steps, zo=train_config.zo,
                                   dizo=train_config.dizo)


def build_update_rule(train_config) -> rules.UpdateRule:
  """The update rule of `config.train.update_rule`: AdamW (first order), MeZO or DiZO."""
  name = train_config.update_rule
  if name not in rules.RULES:
    raise ConfigError(f"config.train.update_rule={name!r} is not one of "
                      f"{', '.join(map(repr, rules.RULES))}.", "pass one of those values.")
  if name in ("mezo", "dizo"):
    return zeroth_order_rule(train_config, train_config.num_steps, name)
  return update_rule_from_sections("adamw", train_config.num_steps, adamw=train_config)

