"""Tests of the GLUE metrics against values worked out by hand (and scipy where it exists)."""

import math

import numpy as np
import pytest

from bdiff_jax.errors import ConfigError
from bdiff_jax.glue import metrics as gm

# A binary example used throughout:
#   pred   1 1 0 0 1 0 1 1
#   label  1 0 0 0 1 1 1 0
# TP = 3 (positions 0, 4, 6), FP = 2 (1, 7), TN = 2 (2, 3), FN = 1 (5).
PRED = [1, 1, 0, 0, 1, 0, 1, 1]
LABEL = [1, 0, 0, 0, 1, 1, 1, 0]


def test_binary_metrics_by_hand():
  assert gm.accuracy(PRED, LABEL) == 5 / 8
  # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 2) / sqrt(5*4*4*3)
  assert gm.matthews_corrcoef(PRED, LABEL) == pytest.approx(4 / math.sqrt(240))
  # F1 = 2TP / (2TP + FP + FN) = 6 / 9
  assert gm.f1_score(PRED, LABEL) == pytest.approx(2 / 3)
  # F1 of class 0: TP = 2, FP = 1, FN = 2 -> 4 / 7
  assert gm.f1_score(PRED, LABEL, positive=0) == pytest.approx(4 / 7)


def test_multiclass_mcc_by_hand():
  # s = 6, c = 3, p_k = t_k = (2, 2, 2): (3*6 - 12) / sqrt((36 - 12)(36 - 12)) = 6 / 24
  assert gm.matthews_corrcoef([0, 1, 2, 0, 1, 2], [0, 1, 2, 1, 2, 0]) == pytest.approx(0.25)
  assert gm.matthews_corrcoef([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)


def test_degenerate_cases():
  assert gm.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0     # constant predictor
  assert gm.matthews_corrcoef([1, 0, 1, 0], [0, 0, 0, 0]) == 0.0     # constant labels
  assert gm.f1_score([0, 0, 0], [1, 0, 1]) == 0.0                     # no positive predicted
  assert gm.f1_score([0, 0], [0, 0]) == 0.0                           # no positives at all
  assert gm.f1_score([1, 0], [1, 0]) == 1.0
  assert math.isnan(gm.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
  assert math.isnan(gm.spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))


def test_correlations_by_hand():
  # x - 2.5 = (-1.5, -0.5, 0.5, 1.5); y - 5 = (-3, -1, 0, 4): r = 11 / sqrt(5 * 26)
  assert gm.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
  # Ties get average ranks: x -> (1, 2.5, 2.5, 4), y -> (1, 3, 2, 4): rho = 4.5 / sqrt(4.5 * 5)
  np.testing.assert_array_equal(gm.average_ranks([1, 2, 2, 3]), [1, 2.5, 2.5, 4])
  np.testing.assert_array_equal(gm.average_ranks([5, 1, 5, 5, 0]), [4, 2, 4, 4, 1])
  assert gm.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
  assert gm.spearman([1, 2, 3], [10, 20, 1000]) == pytest.approx(1.0)


def test_against_scipy_on_random_data():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  x = rng.integers(0, 6, 200).astype(float)                # many ties
  y = x + rng.normal(0, 2, 200)
  assert gm.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], rel=1e-10)
  assert gm.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], rel=1e-10)


def test_macro_f1_by_hand():
  # pred 0 1 2 2 / label 0 1 1 2: F1 per class = 1, 2/3 (TP1 FN1), 2/3 (TP1 FP1) -> mean 7/9
  assert gm.macro_f1([0, 1, 2, 2], [0, 1, 1, 2], 3) == pytest.approx(7 / 9)


def test_task_metrics_and_primary():
  assert gm.task_metrics("SST-2", PRED, LABEL) == {"accuracy": 5 / 8}
  cola = gm.task_metrics("cola", PRED, LABEL)
  assert cola["mcc"] == pytest.approx(4 / math.sqrt(240)) and cola["accuracy"] == 5 / 8
  assert gm.task_metrics("MRPC", PRED, LABEL)["f1"] == pytest.approx(2 / 3)
  assert set(gm.task_metrics("QQP", PRED, LABEL)) == {"accuracy", "f1"}
  stsb = gm.task_metrics("STS-B", [1, 2, 3, 4], [2, 4, 5, 9])
  assert stsb["pearson"] == pytest.approx(11 / math.sqrt(130)) and stsb["spearman"] == 1.0
  assert gm.task_metrics("CB", [0, 1, 2, 2], [0, 1, 1, 2])["macro_f1"] == pytest.approx(7 / 9)
  assert [gm.primary_metric(t) for t in ("CoLA", "MRPC", "QQP", "STS-B", "SST-2", "MNLI", "CB")
          ] == ["mcc", "f1", "f1", "pearson", "accuracy", "accuracy", "accuracy"]
  assert gm.mnli_metrics([0, 1], [0, 1], [0, 2, 2], [1, 2, 2]) == {
      "accuracy_matched": 1.0, "accuracy_mismatched": 2 / 3}


def test_task_metrics_rejects_bad_inputs():
  with pytest.raises(ConfigError, match="3 predictions for 2 labels"):
    gm.task_metrics("RTE", [0, 1, 0], [0, 1])
  with pytest.raises(ConfigError, match="RTE predictions must be class ids in 0..1"):
    gm.task_metrics("RTE", [0, 2], [0, 1])
  with pytest.raises(ConfigError, match="class ids"):
    gm.task_metrics("SST-2", [0.3, 0.9], [0, 1])
  with pytest.raises(ConfigError, match="no predictions"):
    gm.accuracy([], [])


def test_prediction_distribution():
  assert gm.prediction_distribution([0, 0, 2, 0], 3) == [0.75, 0.0, 0.25]
  assert gm.prediction_distribution(np.ones(5, np.int64), 2) == [0.0, 1.0]
  with pytest.raises(ConfigError, match="class ids in 0..1"):
    gm.prediction_distribution([0, 3], 2)


def test_majority_baseline():
  # Train majority is 1; eval labels (1, 0, 0, 0).
  sst2 = gm.majority_baseline("SST-2", [1, 1, 0], [1, 0, 0, 0])
  assert sst2 == {"accuracy": 0.25, "prediction": 1.0}
  assert gm.majority_baseline("CoLA", [1, 1, 0], [1, 0, 0, 0])["mcc"] == 0.0
  # MRPC: always 1 -> TP 1, FP 3, FN 0 -> F1 = 2 / 5.
  assert gm.majority_baseline("MRPC", [1, 1, 0], [1, 0, 0, 0])["f1"] == pytest.approx(0.4)
  assert gm.majority_baseline("RTE", [0, 1], [1, 1])["prediction"] == 0.0   # tie -> smallest id
  # F1 of class 1 as the headline: the constant is class 1 even where 0 is the majority (as
  # in MultiRC's and MRPC-like data with few positives); the majority's F1 would be 0.
  mrpc = gm.majority_baseline("MRPC", [0, 0, 1], [1, 0, 0, 0])
  assert mrpc["prediction"] == 1.0 and mrpc["f1"] == pytest.approx(0.4)
  stsb = gm.majority_baseline("STS-B", [1.0, 2.0, 3.0], [0.5, 4.0])
  assert stsb["prediction"] == 2.0
  assert math.isnan(stsb["pearson"]) and math.isnan(stsb["spearman"])


def test_multirc_metrics_by_hand():
  # Questions 7 (3 answers), 3 (2 answers), 9 (1 answer); groups need not be sorted or dense.
  groups = [7, 7, 7, 3, 3, 9]
  labels = [1, 0, 1, 0, 0, 1]
  preds = [1, 0, 1, 1, 0, 0]
  # TP = 2, FP = 1 (index 3), FN = 1 (index 5): F1a = 4 / 6; only question 7 is all right.
  got = gm.multirc_metrics(preds, labels, groups)
  assert got["f1a"] == pytest.approx(2 / 3) and got["em"] == pytest.approx(1 / 3)
  assert gm.multirc_metrics(labels, labels, groups) == {"f1a": 1.0, "em": 1.0}
  both = gm.task_metrics("MultiRC", preds, labels, groups=np.asarray(groups))
  assert both == {"accuracy": 4 / 6, "f1a": got["f1a"], "em": got["em"]}
  assert gm.primary_metric("MultiRC") == "f1a" and gm.primary_metric("WSC") == "accuracy"
  with pytest.raises(ConfigError, match="need each example's question"):
    gm.task_metrics("MultiRC", preds, labels)
  with pytest.raises(ConfigError, match="5 groups for 6 predictions"):
    gm.multirc_metrics(preds, labels, groups[:5])


def test_multirc_majority_baseline():
  # Train majority 0 (all "incorrect"), whose F1a would be 0: the baseline answers 1 ("correct")
  # everywhere: TP 1, FP 3 -> F1a 2/5; no question has all its options right -> EM 0.
  base = gm.majority_baseline("MultiRC", [0, 0, 1], [1, 0, 0, 0], eval_groups=[0, 0, 1, 1])
  assert base == {"accuracy": 0.25, "f1a": pytest.approx(0.4), "em": 0.0, "prediction": 1.0}
  assert gm.majority_baseline("WSC", [1, 0, 0], [1, 0]) == {"accuracy": 0.5, "prediction": 0.0}


def test_selection_score_gives_every_constant_predictor_zero():
  # Imbalanced labels (3 of class 1, 1 of class 0): the constant majority predictor has
  # accuracy 0.75 (and MRPC F1 6/7) but informedness 0; a predictor right on every class has 1.
  labels = [1, 1, 1, 0]
  assert gm.accuracy([1, 1, 1, 1], labels) == 0.75
  for task in ("SST-2", "MRPC", "RTE"):
    assert gm.selection_score(task, [1, 1, 1, 1], labels) == 0.0
    assert gm.selection_score(task, [0, 0, 0, 0], labels) == 0.0
    assert gm.selection_score(task, labels, labels) == 1.0
  # Binary informedness = TPR - FPR: TPR 2/3, FPR 0 -> 2/3; balanced accuracy (2/3 + 1) / 2.
  assert gm.balanced_accuracy([1, 1, 0, 0], labels, 2) == pytest.approx(5 / 6)
  assert gm.selection_score("SST-2", [1, 1, 0, 0], labels) == pytest.approx(2 / 3)
  # Three classes, recalls (1, 1/2, 0): BA 1/2, chance 1/3 -> (1/2 - 1/3) / (2/3) = 1/4.
  assert gm.informedness([0, 1, 0, 0, 0], [0, 1, 1, 2, 2], 3) == pytest.approx(0.25)
  assert gm.selection_score("STS-B", [1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(
      11 / math.sqrt(130))
  assert math.isnan(gm.selection_score("STS-B", [2.5] * 4, [2, 4, 5, 9]))


def test_standard_error_of_the_primary_metric():
  # Accuracy 0.75 on 4 examples: sqrt(0.75 * 0.25 / 4).
  assert gm.standard_error("SST-2", [1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(
      math.sqrt(0.75 * 0.25 / 4))
  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, 400)
  p = np.where(rng.random(400) < 0.8, y, 1 - y)
  se = gm.standard_error("MRPC", p, y)  # bootstrap; F1 ~ 0.8 on 400 -> roughly 0.02
  assert 0.005 < se < 0.05 and se == gm.standard_error("MRPC", p, y)  # deterministic
  # The majority predictor's Pearson is NaN, not a rounding error of 1e-16.
  assert math.isnan(gm.majority_baseline("STS-B", [1.0, 2.7, 3.0], [0.5, 4.0, 1.0])["pearson"])
