"""Wiring test of the memory benchmark (tiny sizes; the numbers themselves are not tested)."""

import json

import pytest

from bdiff_jax.benchmarks import memory
from tests import helpers


def _benchmark_config(preset: str):
  return helpers.load_config("configs/benchmark.py", preset)


def test_presets_and_case_config():
  default = _benchmark_config("")
  assert tuple(default.benchmark.depths) == (4, 8, 16, 24)
  assert tuple(default.benchmark.seq_lens) == (128, 512, 1024)
  assert tuple(default.benchmark.backbones) == memory.BACKBONES
  c = memory.case_config(default, "reversible/autodiff", 16, 512)
  assert (c.model.backbone, c.model.reversible_backward) == ("reversible", "autodiff")
  assert (c.model.num_layers, c.data.seq_len, c.model.emb_dim) == (16, 512, 64)
  assert c.model.num_heads * c.model.head_dim == c.model.emb_dim
  assert memory.case_config(default, "standard", 4, 128).model.backbone == "standard"
  assert default.model.num_layers == 4  # case_config does not modify its input
  with pytest.raises(ValueError, match="unknown preset"):
    _benchmark_config("nope")


def test_check_targets_pass_and_fail():
  def row(backbone, depth, total, temp, time_s):
    return {"backbone": backbone, "depth": depth, "seq_len": 8, "total_bytes": total,
            "temp_bytes": temp, "step_time_s": time_s}
  results = [row("standard", 4, 100, 80, 1.0), row("standard", 24, 500, 400, 5.0),
             row("reversible/recompute", 4, 40, 20, 1.3), row("reversible/recompute", 24, 60, 21, 8.0)]
  checks = {(c["target"], c["metric"]): c for c in memory.check_targets(results, [4, 24], [8])}
  assert checks[("depth", "total_bytes")]["status"] == "FAIL"  # 60 / 40 = 1.5 > 1.25
  assert checks[("depth", "temp_bytes")]["status"] == "PASS"  # 21 / 20
  assert checks[("memory", "total_bytes")]["value"] == pytest.approx(0.12)
  assert checks[("memory", "total_bytes")]["status"] == "PASS"
  assert checks[("time", "step_time_s")]["status"] == "FAIL"  # 8 / 5 = 1.6 > 1.4
  missing = memory.check_targets(results[:2], [4, 24], [8])
  assert {c["status"] for c in missing} == {"MISSING"}


@pytest.mark.slow
def test_run_memory_benchmark_writes_results(tmp_path, monkeypatch, capsys):
  # The workers compile fast (helpers.tiny_compile_env): this test checks wiring, not speed.
  for name, value in helpers.tiny_compile_env().items():
    monkeypatch.setenv(name, value)
  config = _benchmark_config("test")
  config.benchmark.backbones = ("standard", "reversible/recompute")
  out = memory.run_memory_benchmark(config, str(tmp_path))
  printed = capsys.readouterr().out
  with open(tmp_path / memory.RESULTS_FILE, encoding="utf-8") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(out))
  assert (tmp_path / memory.PLOT_FILE).stat().st_size > 10_000
  results = saved["results"]
  assert len(results) == 2 * 1 * 2  # depths x seq_lens x backbones
  for r in results:
    assert "error" not in r, r
    assert r["all_finite"]
    assert r["temp_bytes"] > 0 and r["argument_bytes"] > 0 and r["output_bytes"] > 0
    assert r["total_bytes"] == r["temp_bytes"] + r["argument_bytes"] + r["output_bytes"]
    assert r["rss_peak_mb"] > r["rss_baseline_mb"] > 0
    assert r["step_time_s"] > 0 and len(r["step_times_s"]) == 2
  by = {(r["backbone"], r["depth"]): r for r in results}
  # Same parameter count; parameters (hence argument bytes) grow with depth.
  assert by[("standard", 2)]["num_params"] == by[("reversible/recompute", 2)]["num_params"]
  assert by[("standard", 2)]["argument_bytes"] > by[("standard", 1)]["argument_bytes"]
  # The recompute backward keeps fewer activations than the standard backbone at depth 2.
  assert by[("reversible/recompute", 2)]["temp_bytes"] < by[("standard", 2)]["temp_bytes"]
  statuses = {(c["target"], c["metric"]): c["status"] for c in saved["targets"]}
  assert set(statuses) == {("depth", "total_bytes"), ("memory", "total_bytes"),
                           ("depth", "temp_bytes"), ("memory", "temp_bytes"),
                           ("time", "step_time_s")}
  assert set(statuses.values()) <= {"PASS", "FAIL"}
  assert "reversible/recompute" in printed and ("PASS" in printed or "FAIL" in printed)
  # Only the reporter's lines: the workers' protocol lines stay between the processes.
  assert memory.WORKER_RESULT_PREFIX not in printed
