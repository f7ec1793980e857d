"""The comparison harness (bdiff_jax/benchmarks/compare/) with configs/compare.py.

  * planning (fast): model names, budgets (tokens / steps / seconds), per-model overrides parsed
    as command-line values and their validation, all before anything trains (no JAX compilation
    involved);
  * the `test` level end to end (slow), in-process on the real WikiText-2: compare.md /
    compare.json / compare.png exist, every model has finite numbers, AR rows say exact and
    diffusion rows say upper bound, every model saw the same tokens, the output went to the
    reporter;
  * failures (slow): a run whose loss blows up fails the comparison with its own error and leaves
    no table, JSON or PNG (not even an older one); an invalid override (fast) fails before
    anything is written.
"""

import io
import json
import math
import os

import pytest

from bdiff_jax.benchmarks import compare
from bdiff_jax.benchmarks.compare import measure
from bdiff_jax.errors import ConfigError, NonFiniteLossError
from bdiff_jax.runtime.reporter import QUIET, Reporter
from tests import helpers

OUTPUTS = (compare.JSON_FILE, compare.MARKDOWN_FILE, compare.PLOT_FILE)


def _get_config(preset="test", **compare_overrides):
  c = helpers.load_config("configs/compare.py", preset)
  for k, v in compare_overrides.items():
    c.compare[k] = v
  return c


def _data_config(data_dir, tfds_dir, **compare_overrides):
  c = _get_config("test", **compare_overrides)
  c.data.data_dir, c.data.tfds_dir = str(data_dir), str(tfds_dir)
  return c


# ------------------------------------------------------------------------------ planning


def test_presets_and_scales():
  for preset, layers, width, heads in (("test", 2, 64, 4), ("quick", 4, 256, 4),
                                       ("full", 6, 512, 8), ("full,scale=medium", 12, 768, 12),
                                       ("quick,scale=large", 24, 1024, 16)):
    m = _get_config(preset).model
    assert (m.num_layers, m.emb_dim, m.num_heads, m.num_kv_heads) == (
        layers, width, heads, heads // 2), preset
    assert m.head_dim == 64 or preset == "test"
    assert m.block == "qwen3"
  with pytest.raises(ValueError, match="unknown scale"):
    _get_config("quick,scale=huge")
  with pytest.raises(ValueError, match="unknown level"):
    _get_config("slow")


def test_plan_models_budgets_and_overrides(tmp_path):
  c = _get_config("test", models="standard_diffusion,reversible_diffusion:simple,autoregressive",
                  seeds=(3, 4), budget="tokens", budget_amount=1000.0,
                  overrides="autoregressive:train.learning_rate=0.01;*:train.warmup_steps=1")
  runs = compare.plan(c, str(tmp_path))
  assert [(r.entry.label, r.seed) for r in runs] == [
      ("standard_diffusion", 3), ("standard_diffusion", 4), ("reversible_diffusion:simple", 3),
      ("reversible_diffusion:simple", 4), ("autoregressive", 3), ("autoregressive", 4)]
  by = {(r.entry.label, r.seed): r.config for r in runs}
  sd, rd, ar = (by[("standard_diffusion", 3)], by[("reversible_diffusion:simple", 4)],
                by[("autoregressive", 3)])
  assert (sd.model.backbone, sd.model.objective, sd.model.block) == (
      "standard", "diffusion", "qwen3")
  assert (rd.model.backbone, rd.model.block, rd.seed) == ("reversible", "simple", 4)
  assert (ar.model.objective, ar.model.time_conditioning) == ("autoregressive", "none")
  assert tuple(ar.eval.seeds) == (0,) and len(tuple(sd.eval.seeds)) == 2  # AR is exact
  # Same tokens for every model: ceil(1000 / (8 x 32)) = 4 steps.
  assert {r.config.train.num_steps for r in runs} == {4}
  assert ar.train.learning_rate == 0.01 and sd.train.learning_rate == 3e-3
  assert {r.config.train.warmup_steps for r in runs} == {1}
  assert len({r.workdir for r in runs}) == 6
  # Wall-clock budget: the schedule keeps train.num_steps, each run stops when its time is up.
  c = _get_config("test", budget="seconds", budget_amount=30.0)
  for r in compare.plan(c, str(tmp_path)):
    assert r.config.train.max_wall_seconds == 30.0 and r.config.train.num_steps == 6


def test_override_values_are_typed_like_command_line_values(tmp_path):
  c = _get_config("test", overrides="*:train.learning_rate=1;*:train.progress_bar=true;"
                                    "autoregressive:eval.seeds=(5, 6);"
                                    "standard_diffusion:data.variant='raw';"
                                    "*:train.learning_rate=2e-3;*:eval.max_tokens=128")
  the_plan = compare.plan_comparison(c, str(tmp_path))
  by = {r.entry.label: r.config for r in the_plan.runs}
  for label, rc in by.items():
    assert rc.train.learning_rate == 2e-3 and isinstance(rc.train.learning_rate, float), label
    assert rc.train.progress_bar is True and rc.eval.max_tokens == 128
    assert not rc.is_locked  # locked only while the overrides are applied
  assert tuple(by["autoregressive"].eval.seeds) == (5, 6)
  assert tuple(by["standard_diffusion"].eval.seeds) == (0, 1)
  assert by["standard_diffusion"].data.variant == "raw"  # outer quotes removed, as by a shell
  assert by["reversible_diffusion"].data.variant == "v1"
  # The memory sweep is planned (and validated) with the same overrides, per depth.
  assert [(p.backbone, p.depth) for p in the_plan.sweep] == [
      ("standard", 1), ("standard", 2), ("reversible", 1), ("reversible", 2)]
  for p in the_plan.sweep:
    assert p.config.model.num_layers == p.depth and p.config.model.block == "qwen3"
    assert p.config.data.variant == ("raw" if p.backbone == "standard" else "v1")


@pytest.mark.parametrize("field,value,needle", [
    ("overrides", "reversible_diffusion:model.num_kv_heads=3", "num_kv_heads"),
    ("overrides", "autoregressive:train.learning_rat=1", "learning_rat"),
    ("overrides", "autoregressive:model.objective=diffusion", "model.objective"),
    ("overrides", "nonexistent_model:train.num_steps=3", "nonexistent_model"),
    ("overrides", "autoregressive:train.batch_size=many", "train.batch_size"),
    ("overrides", "*:train.num_steps=3", "budget"),
    ("overrides", "autoregressive", "cannot parse"),
    ("overrides", "*:train=1", "section"),
    ("overrides", "*:train.progress_bar=maybe", "train.progress_bar"),
    ("overrides", "*:train.batch_size=3.0", "train.batch_size"),
    ("overrides", "*:eval.seeds[0]=1", "eval.seeds"),
    ("overrides", "*:seed=3", "seed"),
    ("overrides", "*:compare.budget=steps", "compare.budget"),
    ("models", "standard_diffusion,transformer_xl", "transformer_xl"),
    ("models", "standard_diffusion:fancy", "fancy"),
    ("budget", "epochs", "budget"),
    ("budget_amount", 0.0, "budget_amount"),
    ("seeds", (), "seeds"),
    ("scale", "large", "scale"),  # the model shape was set for "tiny" by the preset
])
def test_invalid_settings_fail_before_training(tmp_path, field, value, needle):
  c = _get_config("test", **{field: value})
  with pytest.raises(ConfigError, match=needle) as raised:
    compare.run_comparison(c, str(tmp_path), QUIET)
  assert "\n" not in str(raised.value)  # one line for main.py's `error: ...`
  assert not os.listdir(tmp_path)  # nothing was trained or written


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def test_level(tmp_path_factory, real_data_dir, shared_tfds_dir):
  workdir = tmp_path_factory.mktemp("compare")
  console = io.StringIO()
  summary = compare.run_comparison(_data_config(real_data_dir, shared_tfds_dir), str(workdir),
                                   Reporter(stream=console))
  return workdir, summary, console.getvalue(), (real_data_dir, shared_tfds_dir)


@pytest.mark.slow
def test_test_level_outputs(test_level):
  workdir, summary, console, data_dirs = test_level
  for name in OUTPUTS:
    assert os.path.getsize(os.path.join(workdir, name)) > 100, name
  with open(os.path.join(workdir, compare.PLOT_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(workdir, compare.JSON_FILE)) as f:
    data = json.load(f)
  assert data == json.loads(json.dumps(summary))
  names = [m["model"] for m in data["models"]]
  assert names == ["standard_diffusion", "reversible_diffusion", "autoregressive"]
  for m in data["models"]:
    for key in ("train_tokens_per_sec", "valid_word_ppl", "test_word_ppl", "tokens_seen"):
      assert m[key]["n"] == 1 and math.isfinite(m[key]["mean"]) and m[key]["mean"] > 0, key
    assert 1.0 < m["valid_word_ppl"]["mean"] < 1e7 and 1.0 < m["test_word_ppl"]["mean"] < 1e7
    assert m["num_params"] > 0 and m["memory"]["held_bytes"] > 0
    assert m["tokens_seen"]["mean"] == 6 * 8 * 32  # the same budget for every model
    assert m["ppl_kind"] == ("exact" if m["objective"] == "autoregressive" else "upper bound")
    assert m["model_config"]["block"] == "qwen3"
    assert os.path.exists(os.path.join(m["runs"][0]["workdir"], "eval_latest.json"))
  # Each model's memory is that of the step its training compiled (recorded, not compiled
  # again): the same numbers as compiling its train step afresh, which the memory sweep did at
  # the model's own depth (the same config, `plan_comparison`).
  sd_run = next(r for r in compare.plan(_data_config(*data_dirs), str(workdir))
                if r.entry.label == "standard_diffusion")
  fresh = next(r for r in data["memory_vs_depth"]
               if (r["backbone"], r["depth"]) == ("standard", sd_run.config.model.num_layers))
  sd = next(m for m in data["models"] if m["model"] == "standard_diffusion")
  assert {k: sd["memory"][k] for k in measure.MEMORY_FIELDS} == {
      k: fresh[k] for k in measure.MEMORY_FIELDS}
  assert sd["runs"][0]["train_step_memory"] == {k: fresh[k] for k in measure.MEMORY_FIELDS}
  # The reversible backbone has the standard one's parameters, the AR model too (no adaLN).
  assert len({m["num_params"] for m in data["models"]}) == 1
  depths = sorted((r["backbone"], r["depth"]) for r in data["memory_vs_depth"])
  assert depths == [("reversible", 1), ("reversible", 2), ("standard", 1), ("standard", 2)]
  assert all(r["held_bytes"] > 0 for r in data["memory_vs_depth"])
  with open(os.path.join(workdir, compare.MARKDOWN_FILE)) as f:
    table = f.read()
  rows = {line.split("|")[1].strip(): line for line in table.splitlines()
          if line.startswith("| ") and line.split("|")[1].strip() in names}
  assert sorted(rows) == sorted(names)
  assert rows["autoregressive"].rstrip().endswith("| exact |")
  for name in ("standard_diffusion", "reversible_diffusion"):
    assert rows[name].rstrip().endswith("| upper bound |")
    assert "nan" not in rows[name].lower() and "inf" not in rows[name].lower()
  assert "UPPER BOUND" in table and "EXACT" in table and "SUBSET" in table
  # Everything the harness says goes to its reporter: per-model lines, the table, the files.
  assert table in console and f"wrote {compare.JSON_FILE}" in console
  for name in names:
    assert f"compare: {name}: peak train-step memory" in console
    assert f"compare: training {name} seed 0" in console


@pytest.mark.slow
def test_failure_inside_one_model_fails_the_run(tmp_path, real_data_dir, shared_tfds_dir):
  with open(tmp_path / compare.JSON_FILE, "w") as f:  # an older comparison's output
    f.write("{}")
  c = _data_config(real_data_dir, shared_tfds_dir, models="autoregressive,standard_diffusion",
                   memory_depths=(),
                   overrides="autoregressive:train.learning_rate=1e30;"
                             "autoregressive:train.grad_clip=0.0;"
                             "autoregressive:train.warmup_steps=0")
  with pytest.raises(NonFiniteLossError, match="loss became"):
    compare.run_comparison(c, str(tmp_path), QUIET)
  for name in OUTPUTS:
    assert not os.path.exists(tmp_path / name), name
  assert os.listdir(tmp_path / "runs") == ["autoregressive_seed0"]  # nothing ran after it


@pytest.mark.slow
def test_finished_runs_are_reused_and_foreign_checkpoints_refused(test_level, real_data_dir,
                                                                  shared_tfds_dir):
  workdir, summary, _, _ = test_level
  runs = compare.plan(_data_config(real_data_dir, shared_tfds_dir), str(workdir))
  ar = next(r for r in runs if r.entry.label == "autoregressive")
  console = io.StringIO()
  reused = compare.execute(ar, Reporter(stream=console))  # the same config: no training
  assert "reusing the finished run" in console.getvalue()
  row = next(m for m in summary["models"] if m["model"] == "autoregressive")
  assert reused["valid"]["word_ppl"] == row["valid_word_ppl"]["mean"]
  # Another budget in the same workdir: resuming would mix two schedules, so it is refused.
  other = compare.plan(_data_config(real_data_dir, shared_tfds_dir, budget_amount=8.0),
                       str(workdir))
  with pytest.raises(ConfigError, match="another config"):
    compare.execute(next(r for r in other if r.entry.label == "autoregressive"), QUIET)
