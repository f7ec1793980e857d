"""The training-curve plot draws what a reader compares the run with."""

import json
import os

import matplotlib.pyplot as plt
import pytest

from bdiff_jax.evaluation import plotting
from bdiff_jax.runtime import metrics_log


def _workdir(path, evals, final=None):
  os.makedirs(path, exist_ok=True)
  log = metrics_log.MetricsLog(str(path))
  for step, ppl in evals:
    log.write("train", step, loss=6.0)
    log.write("eval", step, valid_word_ppl=ppl, valid_tokens=8192)
  if final:
    with open(os.path.join(path, "eval_best.json"), "w", encoding="utf-8") as f:
      json.dump({"step": final[0], "results": {"valid": {"word_ppl": final[1]}}}, f)
  return str(path)


@pytest.fixture
def captured(monkeypatch):
  """The figure the plot saves, kept open for inspection."""
  figs = []
  monkeypatch.setattr(plt, "close", figs.append)
  return figs


def test_plot_draws_baselines_final_and_twin(tmp_path, captured):
  run = _workdir(tmp_path / "run", [(100, 900.0), (200, 500.0)], final=(200, 520.0))
  twin = _workdir(tmp_path / "twin", [(100, 600.0), (200, 250.0)], final=(200, 240.0))
  base = {"unigram": {"valid": {"word_ppl": 968.0}}, "bigram": {"valid": {"word_ppl": 328.4}}}
  path = plotting.plot_training_curves(run, baselines=base, twin_workdir=twin)
  assert os.path.getsize(path) > 0
  ax = captured[0].axes[1]
  labels = ax.get_legend_handles_labels()[1]
  assert any("8,192 tokens spread over valid" in s for s in labels)
  assert any("full valid split: 520.0" in s for s in labels)
  assert any(s.startswith("autoregressive twin, periodic") for s in labels)
  assert any("autoregressive twin, full valid split: 240.0" in s for s in labels)
  assert any(s.startswith("bigram") and "328.4" in s for s in labels)
  assert any(s.startswith("unigram") and "968.0" in s for s in labels)
  lo, hi = ax.get_ylim()
  assert lo < 240.0 and hi > 968.0  # every line is inside the panel
  assert ax.get_yscale() == "log"


def test_plot_without_extras(tmp_path, captured):
  run = _workdir(tmp_path / "run", [(100, 900.0)])
  plotting.plot_training_curves(run, twin_workdir=str(tmp_path / "missing"), upper_bound=False)
  labels = captured[0].axes[1].get_legend_handles_labels()[1]
  assert labels == ["this run, periodic (exact; 8,192 tokens spread over valid)"]
