"""Model selection and baselines of the GLUE benchmark: the balanced selection slice
(glue_sampling.holdout(balanced=True)) and the bag-of-words baseline (glue_baselines)."""

import json

import numpy as np
import pytest

from bdiff_jax.errors import ConfigError
from bdiff_jax.glue import baselines as glue_baselines
from bdiff_jax.glue import metrics as glue_metrics
from bdiff_jax.glue import sampling as glue_sampling
from bdiff_jax.glue import tasks as glue_tasks


def _split(texts, labels, task="SST-2"):
  spec = glue_tasks.TASKS[task]
  labels = np.asarray(labels)
  if len(spec.segment_names) == 1:
    texts = (tuple(texts),)
  return glue_tasks.GlueSplit(task=task, split="train", texts=texts,
                        labels=labels.astype(np.float32 if spec.is_regression else np.int64),
                        label_names=spec.label_names, segment_names=spec.segment_names,
                        source_rows=np.arange(len(labels)), path="toy")


def test_balanced_holdout_stratifies_an_imbalanced_split():
  labels = np.array([1] * 90 + [0] * 10)  # 90% class 1
  split = _split([f"w{i}" for i in range(100)], labels)
  rest, sel = glue_sampling.holdout(split, 16, seed=3, balanced=True)
  assert np.bincount(sel.labels).tolist() == [8, 8]
  assert sorted(np.concatenate([rest.source_rows, sel.source_rows])) == list(range(100))
  again = glue_sampling.holdout(split, 16, seed=3, balanced=True)[1]
  np.testing.assert_array_equal(sel.source_rows, again.source_rows)
  assert not np.array_equal(sel.source_rows,
                            glue_sampling.holdout(split, 16, 4, balanced=True)[1].source_rows)
  _, odd = glue_sampling.holdout(split, 0.05, seed=0, balanced=True)  # 5: remainder to class 0
  assert np.bincount(odd.labels).tolist() == [3, 2]
  with pytest.raises(ConfigError, match="needs 10 of class 0"):
    glue_sampling.holdout(split, 20, seed=0, balanced=True)  # would leave no class 0 to train
  scores = np.linspace(0.0, 5.0, 40)
  stsb = _split((tuple(f"a{i}" for i in range(40)), tuple(f"b{i}" for i in range(40))), scores,
                task="STS-B")
  _, sel = glue_sampling.holdout(stsb, 10, seed=0, balanced=True)
  assert int(np.sum(sel.labels >= glue_sampling.STSB_THRESHOLD)) == 5


def _separable(n, seed):
  rng = np.random.default_rng(seed)
  good, bad = ["great", "wonderful", "fine"], ["awful", "dull", "bad"]
  filler = ["the", "movie", "a", "plot", "was", "and", "film"]
  texts, labels = [], []
  for i in range(n):
    y = int(rng.integers(0, 2))
    words = list(rng.choice(filler, 4)) + [str(rng.choice(good if y else bad))]
    rng.shuffle(words)
    texts.append(" ".join(words))
    labels.append(y)
  return _split(texts, labels)


def test_bow_baseline_learns_a_separable_task_and_is_deterministic():
  train, dev = _separable(80, 0), _separable(60, 1)
  got = glue_baselines.bow_baseline("SST-2", train, {"dev": dev, "train": train})
  majority = glue_metrics.majority_baseline("SST-2", train.labels, dev.labels)
  assert got["dev"]["accuracy"] >= 0.95 > majority["accuracy"] + 0.2
  assert got == glue_baselines.bow_baseline("SST-2", train, {"dev": dev, "train": train})
  # Labels that the words do not determine: no better than chance on dev.
  noise = _split(list(train.texts[0]), np.random.default_rng(5).integers(0, 2, 80))
  assert glue_baselines.bow_baseline("SST-2", noise, {"dev": dev})["dev"]["accuracy"] < 0.75


def test_bow_ridge_baseline_gives_pearson_for_sts_b():
  rng = np.random.default_rng(0)
  n = 120
  k = rng.integers(0, 6, n)  # score = number of "same" words in sentence 2
  a = tuple("the cat sat" for _ in range(n))
  b = tuple(" ".join(["same"] * int(j) + ["other"] * (5 - int(j))) for j in k)
  split = _split((a, b), k.astype(np.float32), task="STS-B")
  train, dev = split.select(np.arange(80)), split.select(np.arange(80, n))
  got = glue_baselines.bow_baseline("STS-B", train, {"dev": dev})["dev"]
  assert got["pearson"] > 0.9 and set(got) == {"pearson", "spearman"}


def test_flags_of_a_row_that_cannot_be_told_from_an_untrained_one():
  from bdiff_jax.glue import report as glue_report  # pylint: disable=g-import-not-at-top
  ok = glue_report.flags([0.8, 0.8], 0.5, [[0.5, 0.5]] * 2, selected_steps=[10, 20],
                         changes=[1e-2, 2e-2], standard_error=0.05)
  assert ok == []
  near = glue_report.flags([0.59], 0.5, [[0.5, 0.5]], standard_error=0.05)  # 0.59 < 0.5 + 0.1
  assert near == ["within 2 standard errors of the majority"]
  assert glue_report.flags([0.61], 0.5, [[0.5, 0.5]], standard_error=0.05) == []
  still = glue_report.flags([0.8, 0.8], 0.5, [[0.5, 0.5]] * 2, selected_steps=[0, 20],
                            changes=[0.0, 1e-9])
  assert still == ["selected step 0 (1/2 seeds)", "parameters did not move (2/2 seeds)"]
  # STS-B: the majority's Pearson is NaN and counts as 0.
  assert glue_report.flags([0.05], float("nan"), [None], standard_error=0.05) == [
      "within 2 standard errors of the majority"]


def _record(row, forwards, devs, seed=0, task="SST-2"):
  curve = [{"step": i, "forward": f, "selection": d, "dev": d}
           for i, (f, d) in enumerate(zip(forwards, devs))]
  return {"task": task, "row": row, "seed": seed, "curve": curve}


def test_dizo_and_mezo_are_compared_at_equal_forward_passes():
  from bdiff_jax.glue import report as glue_report  # pylint: disable=g-import-not-at-top
  records = [_record("mezo_opt", [0, 10, 20, 30], [0.5, 0.6, 0.7, 0.8]),
             _record("mezo_opt", [0, 10, 20, 30], [0.5, 0.6, 0.9, 0.8], seed=1),
             _record("dizo_opt", [0, 14, 28], [0.5, 0.7, 0.75]),
             _record("dizo_opt", [0, 14, 28], [0.5, 0.7, 0.85], seed=1),
             _record("adamw_opt", [0, 10], [0.5, 0.9])]
  (e,) = glue_report.equal_forward(records)
  assert e["forward"] == 28 and e["model"] == "opt"
  assert e["mezo"]["step"] == 2 and e["mezo"]["dev"] == pytest.approx(0.8)  # at 20 <= 28
  assert e["dizo"]["step"] == 2 and e["dizo"]["dev"] == pytest.approx(0.8)


def test_learning_rate_grid_picks_the_best_selection_score(monkeypatch):
  from bdiff_jax.glue import rows as glue_rows  # pylint: disable=g-import-not-at-top
  from bdiff_jax.modes import glue as glue_mode  # pylint: disable=g-import-not-at-top
  from bdiff_jax.runtime.reporter import QUIET  # pylint: disable=g-import-not-at-top
  from configs import glue as glue_config  # pylint: disable=g-import-not-at-top
  c = glue_config.get_config("test")
  c.glue.zo.learning_rates = (1e-4, 1e-3, 1e-2)
  c.glue.zo.grid_steps = 7
  c.glue.zo.learning_rate = 5e-5
  g = glue_mode.glue_settings(c)
  seen = []
  best = {1e-4: 0.1, 1e-3: 0.6, 1e-2: float("nan")}

  def fake_run_seed(spec, task, trial, seed, reporter, programs, probe=True):
    assert not probe  # a learning-rate trial fits no start probe
    seen.append((trial.zo.learning_rate, trial.zo.num_steps, seed))
    score = best[trial.zo.learning_rate]
    return {"selection_best": score, "selected_step": 7, "relative_param_change": 0.1,
            "curve": [{"selection": score}]}

  monkeypatch.setattr(glue_mode, "run_seed", fake_run_seed)
  chosen, grid = glue_mode.choose_learning_rate(glue_rows.RowSpec("opt", "mezo", False),
                                                "SST-2", g, QUIET)
  assert chosen.zo.learning_rate == 1e-3 and g.zo.learning_rate == 5e-5  # g is not changed
  assert seen == [(1e-4, 7, 0), (1e-3, 7, 0), (1e-2, 7, 0)]
  assert [c["learning_rate"] for c in grid] == [1e-4, 1e-3, 1e-2]
  assert chosen.num_steps == g.num_steps and chosen.zo.num_steps == g.zo.num_steps
  same, none = glue_mode.choose_learning_rate(glue_rows.RowSpec("opt", "adamw", False),
                                              "SST-2", g, QUIET)
  assert same is g and none is None


def test_the_table_is_regenerated_from_glue_json(tmp_path, capsys):
  from bdiff_jax.glue import report as glue_report  # pylint: disable=g-import-not-at-top
  meta = {"level": "cpu", "description": "d"}
  path = tmp_path / "glue.json"
  path.write_text(json.dumps({"meta": meta, "rows": [], "records": []}))
  assert glue_report.main(["glue_report", str(path)]) == 0
  assert capsys.readouterr().out.startswith("# GLUE fine-tuning (cpu)")
  assert glue_report.main(["glue_report", str(tmp_path / "missing.json")]) == 1
  assert capsys.readouterr().err.startswith("error: ")
