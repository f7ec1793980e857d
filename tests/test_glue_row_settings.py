"""Per-row settings of the GLUE benchmark: a LoRA zeroth-order row takes `glue.lora_zo`, every
other row `glue.zo`, and the units of the other rows keep their digests; the rules are built from
the plain settings' sections."""

import pytest

from bdiff_jax.errors import ConfigError
from bdiff_jax.glue import rows as glue_rows
from bdiff_jax.glue.settings import GlueSettings, row_settings, uses_grid, validate, with_changes
from bdiff_jax.glue.units import Units, settings_digest, unit_settings
from bdiff_jax.optim import update_rule
from configs import glue as glue_config


def _g(level="cpu"):
  return GlueSettings.from_dict(glue_config.get_config(level).glue.to_dict())


def _spec(text):
  return glue_rows.parse_rows(text)[0]


def test_lora_row_takes_lora_zo_and_others_keep_zo():
  g = _g()
  lora = row_settings(g, _spec("opt:mezo:lora"))
  full = row_settings(g, _spec("opt:mezo"))
  adamw = row_settings(g, _spec("opt:adamw:lora"))
  assert lora.zo.eps == 1e-2 and tuple(lora.zo.learning_rates) == (1e-3, 1e-2, 1e-1)
  assert full.zo.eps == g.zo.eps == 1e-3
  assert tuple(full.zo.learning_rates) == tuple(g.zo.learning_rates)
  assert adamw.zo.eps == g.zo.eps  # a first-order LoRA row has no zeroth-order settings to take
  for out in (lora, full, adamw):
    assert out.lora_zo is None and "lora_zo" not in out.to_dict()
  # Zero fields inherit: the single learning rate was not set for LoRA.
  assert lora.zo.learning_rate == g.zo.learning_rate


def test_units_of_other_rows_keep_their_digests():
  g = _g()
  spec = _spec("opt:mezo")
  without = g.to_dict()
  del without["lora_zo"]
  before = {k: v for k, v in without.items() if k not in ("seeds", "tasks", "rows", "level",
                                                          "description", "adamw", "dizo",
                                                          "init_workdir", "init_workdir_reversible",
                                                          "init_workdir_standard")}
  before["lr_grid_seed"] = 0
  assert settings_digest(unit_settings(g, spec)) == settings_digest(before)
  g = with_changes(g, **{"lora_zo.eps": 5e-2})
  assert settings_digest(unit_settings(g, spec)) == settings_digest(before)
  lora = _spec("opt:mezo:lora")
  d1 = settings_digest(unit_settings(g, lora))
  g = with_changes(g, **{"lora_zo.eps": 1e-2})
  assert settings_digest(unit_settings(g, lora)) != d1


def test_a_units_digest_covers_only_its_own_rules_settings():
  g = _g()
  rows = {r: _spec(f"opt:{r}") for r in ("adamw", "mezo", "dizo")}
  digests = lambda g: {r: settings_digest(unit_settings(g, s)) for r, s in rows.items()}
  before = digests(g)
  # (changed section, the rows whose units change)
  for change, changed in ((("zo.eps", 5e-3), {"mezo", "dizo"}),
                          (("zo.num_steps", 123), {"mezo", "dizo"}),
                          (("dizo.interval", 7), {"dizo"}),
                          (("adamw.learning_rate", 0.5), {"adamw"}),
                          (("num_steps", 99), {"adamw", "mezo", "dizo"})):
    after = digests(with_changes(g, **dict([change])))
    assert {r for r in rows if after[r] != before[r]} == changed, change
  # Each model's units depend on its own start model only.
  models = {m: _spec(f"{m}:adamw") for m in glue_rows.MODELS}
  digests = lambda g: {m: settings_digest(unit_settings(g, s)) for m, s in models.items()}
  before = digests(g)
  for change, changed in ((("opt_dir", "/a/opt"), {"opt"}),
                          (("init_workdir_reversible", "/a/rev"), {"reversible_qwen3"}),
                          (("init_workdir_standard", "/a/std"), {"standard_qwen3"}),
                          (("init_workdir", "/a/both"), {"reversible_qwen3", "standard_qwen3"}),
                          (("init_checkpoint", "latest"), set(glue_rows.MODELS))):
    after = digests(with_changes(g, **dict([change])))
    assert {m for m in models if after[m] != before[m]} == changed, change


def test_units_list_the_lora_rows_own_grid(tmp_path):
  g = _g()
  specs = glue_rows.parse_rows("opt:mezo,opt:mezo:lora")
  units = Units(str(tmp_path / "u"), g, specs, ["SST-2"])
  lora_trials = [n for n, row in units.names if row == "mezo_opt_lora" and "grid-lr" in n]
  full_trials = [n for n, row in units.names if row == "mezo_opt" and "grid-lr" in n]
  assert len(lora_trials) == 3 and any("grid-lr0.1__" in n for n in lora_trials)
  assert len(full_trials) == len(g.zo.learning_rates)
  assert uses_grid(specs[1], row_settings(g, specs[1]))


@pytest.mark.parametrize("field,value", [("eps", -1.0), ("learning_rate", float("nan")),
                                         ("learning_rates", (1e-3, 0.0))])
def test_bad_lora_zo_is_one_config_error(field, value):
  g = with_changes(_g(), **{f"lora_zo.{field}": value})
  with pytest.raises(ConfigError, match=f"glue.lora_zo.{field}"):
    validate(g)


def test_rules_are_built_from_the_plain_sections():
  g = with_changes(_g("test"), **{"zo.freeze": "embeddings", "dizo.fresh_batches": False})
  assert g.zo["freeze"] == "embeddings" and "freeze" in g.zo and "nope" not in g.zo
  mezo = glue_rows.build_rule("mezo", g, 10)
  assert not mezo.trainable(("embed", "embedding")) and mezo.trainable(("head", "kernel"))
  assert update_rule.batches_per_step(glue_rows.build_rule("dizo", g, 10)) == 1
  lora = glue_rows.build_rule("adamw", g, 10, peft="lora")
  assert lora.trainable(("lora", "q", "a")) and not lora.trainable(("base", "q", "kernel"))
