"""GLUE / SuperGLUE evaluation metrics, as the benchmarks define them (our own implementation).

| task                         | metrics (keys of `task_metrics`)   | primary      |
|------------------------------|------------------------------------|--------------|
| CoLA                         | mcc, accuracy                      | mcc          |
| SST-2, QNLI, RTE, WNLI, MNLI | accuracy                           | accuracy     |
| MRPC, QQP                    | f1 (of class 1), accuracy          | f1           |
| STS-B                        | pearson, spearman                  | pearson      |
| BoolQ, COPA, WiC, SuperGLUE-RTE | accuracy                        | accuracy     |
| WSC                          | accuracy                           | accuracy     |
| CB                           | accuracy, macro_f1                 | accuracy     |
| MultiRC                      | f1a, em, accuracy (needs groups)   | f1a          |

MultiRC is scored per answer-option (`multirc_metrics`): F1a is the F1 of class 1 ("correct")
over all answer-options, EM the fraction of questions all of whose answer-options are classified
right; both need each example's question (`GlueSplit.groups`), passed as `groups`.

MNLI is scored on each dev split separately (`mnli_metrics` gives accuracy_matched and
accuracy_mismatched). Primary metrics follow LM-BFF/MeZO (F1 for MRPC/QQP, Pearson for STS-B,
MCC for CoLA, accuracy elsewhere, including CB, where SuperGLUE also reports macro-F1).

Undefined values: MCC is 0 when a row or column of the confusion matrix is empty (e.g. a constant
predictor), as in GLUE's scorer; F1 is 0 when there are no true positives; Pearson and Spearman
are NaN when either input is constant (a correlation with a constant does not exist; we do not
invent 0). `prediction_distribution` and `majority_baseline` exist so that a constant predictor
is recognised as one: report them next to every result.
"""

import math
from typing import Sequence

import numpy as np

from bdiff_jax.errors import ConfigError
from bdiff_jax.glue.tasks import task_spec

ArrayLike = Sequence[float] | np.ndarray

_PRIMARY = {"CoLA": "mcc", "MRPC": "f1", "QQP": "f1", "STS-B": "pearson", "MultiRC": "f1a"}


def _pair(predictions: ArrayLike, labels: ArrayLike, dtype) -> tuple[np.ndarray, np.ndarray]:
  p = np.asarray(predictions, dtype=dtype).reshape(-1)
  y = np.asarray(labels, dtype=dtype).reshape(-1)
  if p.shape != y.shape:
    raise ConfigError(f"{p.size} predictions for {y.size} labels.",
                      "pass one prediction per evaluated example.")
  if p.size == 0:
    raise ConfigError("no predictions to score.", "evaluate on a non-empty split.")
  return p, y


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
  """Fraction of examples whose predicted class equals the label."""
  p, y = _pair(predictions, labels, np.int64)
  return float(np.mean(p == y))


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
  """Matthews correlation coefficient (multi-class form of Gorodkin 2004; binary = usual MCC).

  With s examples, c correct, p_k predictions and t_k labels of class k:
  MCC = (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2)); 0 when the
  denominator is 0 (all predictions or all labels one class).
  """
  p, y = _pair(predictions, labels, np.int64)
  k = int(max(p.max(), y.max())) + 1
  pc = np.bincount(p, minlength=k).astype(np.float64)
  tc = np.bincount(y, minlength=k).astype(np.float64)
  s, c = float(p.size), float(np.sum(p == y))
  den = (s * s - pc @ pc) * (s * s - tc @ tc)
  if den <= 0:
    return 0.0
  return float((c * s - pc @ tc) / math.sqrt(den))


def f1_score(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
  """F1 of class `positive`: 2TP / (2TP + FP + FN); 0 when TP = 0 (incl. nothing predicted)."""
  p, y = _pair(predictions, labels, np.int64)
  tp = float(np.sum((p == positive) & (y == positive)))
  fp = float(np.sum((p == positive) & (y != positive)))
  fn = float(np.sum((p != positive) & (y == positive)))
  return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def macro_f1(predictions: ArrayLike, labels: ArrayLike, num_labels: int) -> float:
  """Unweighted mean over classes 0..num_labels-1 of each class's F1 (SuperGLUE's CB F1)."""
  return float(np.mean([f1_score(predictions, labels, k) for k in range(num_labels)]))


def balanced_accuracy(predictions: ArrayLike, labels: ArrayLike, num_labels: int) -> float:
  """Mean over the classes present in `labels` of that class's recall."""
  p, y = _pair(predictions, labels, np.int64)
  return float(np.mean([np.mean(p[y == k] == k) for k in range(num_labels) if np.any(y == k)]))


def informedness(predictions: ArrayLike, labels: ArrayLike, num_labels: int) -> float:
  """Chance-corrected balanced accuracy: (BA - 1/C) / (1 - 1/C), C = classes present in labels.

  0 for any constant (or label-independent) predictor, whatever the class balance; 1 for a
  perfect one; binary: Youden's J = TPR - FPR. Model selection (`selection_score`) uses it.
  """
  c = len(np.unique(np.asarray(labels, np.int64)))
  if c < 2:
    return math.nan
  return (balanced_accuracy(predictions, labels, num_labels) - 1.0 / c) / (1.0 - 1.0 / c)


def selection_score(task: str, predictions: ArrayLike, labels: ArrayLike) -> float:
  """The model-selection score: `informedness` for classification, Pearson for regression.

  The primary metric is not used to select a checkpoint: accuracy rewards a constant predictor
  of the majority class and MRPC's F1 a constant predictor of class 1; informedness gives any
  constant predictor 0. Regression: Pearson (NaN for a constant predictor; `_better` in
  modes/glue.py ranks NaN below every number).
  """
  spec = task_spec(task)
  if spec.is_regression:
    return pearson(predictions, labels)
  return informedness(predictions, labels, spec.num_labels)


def standard_error(task: str, predictions: ArrayLike, labels: ArrayLike,
                   resamples: int = 200, groups: ArrayLike | None = None) -> float:
  """The standard error of the task's primary metric on this evaluation set.

  Accuracy: sqrt(p (1 - p) / n). Other metrics (F1, MCC, Pearson, MultiRC's F1a): the standard
  deviation over `resamples` bootstrap resamples of the examples (deterministic: seed 0; NaN
  resamples dropped). `groups`: MultiRC's question ids (resampled with their examples).
  """
  p = np.asarray(predictions).reshape(-1)
  y = np.asarray(labels).reshape(-1)
  g = None if groups is None else np.asarray(groups).reshape(-1)
  primary = primary_metric(task)
  if primary == "accuracy":
    acc = task_metrics(task, p, y, groups=g)["accuracy"]
    return math.sqrt(acc * (1.0 - acc) / y.size)
  rng = np.random.default_rng(0)
  values = []
  for _ in range(resamples):
    idx = rng.integers(0, y.size, y.size)
    values.append(task_metrics(task, p[idx], y[idx],
                               groups=None if g is None else g[idx])[primary])
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(np.std(values)) if values.size > 1 else math.nan


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
  """Pearson correlation; NaN when either input is constant."""
  p, y = _pair(predictions, labels, np.float64)
  if np.all(p == p[0]) or np.all(y == y[0]):
    return math.nan  # exactly: rounding can leave a constant's deviations at +-1e-16
  p, y = p - p.mean(), y - y.mean()
  den = math.sqrt(float(p @ p) * float(y @ y))
  return float(p @ y) / den if den > 0 else math.nan


def average_ranks(x: ArrayLike) -> np.ndarray:
  """1-based ranks of x; tied values share the mean of the ranks they span."""
  x = np.asarray(x, dtype=np.float64).reshape(-1)
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  # Runs of equal values: [start, end) in sorted order.
  boundaries = np.flatnonzero(np.diff(sorted_x) != 0) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [x.size]])
  run_rank = (starts + ends + 1) / 2.0          # mean of ranks start+1 .. end
  ranks = np.empty(x.size)
  ranks[order] = np.repeat(run_rank, ends - starts)
  return ranks


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
  """Spearman rank correlation: Pearson of average ranks; NaN when either input is constant."""
  p, y = _pair(predictions, labels, np.float64)
  return pearson(average_ranks(p), average_ranks(y))


def primary_metric(task: str) -> str:
  """The key of `task_metrics(task, ...)` that is the task's headline number."""
  return _PRIMARY.get(task_spec(task).name, "accuracy")


def task_metrics(task: str, predictions: ArrayLike, labels: ArrayLike,
                 groups: ArrayLike | None = None) -> dict[str, float]:
  """The task's metrics (see module table) of predictions against labels.

  Args:
    task: a GLUE/SuperGLUE task name.
    predictions: (n,) predicted class ids, or scores for STS-B.
    labels: (n,) gold class ids, or gold scores for STS-B.
    groups: MultiRC only (required there): (n,) each example's question id
      (`GlueSplit.groups`).
  """
  spec = task_spec(task)
  if spec.is_regression:
    return {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels)}
  p, y = _pair(predictions, labels, np.float64)
  for name, v in (("predictions", p), ("labels", y)):
    if np.any(v != np.round(v)) or v.min() < 0 or v.max() >= spec.num_labels:
      raise ConfigError(f"{spec.name} {name} must be class ids in 0..{spec.num_labels - 1}.",
                        "pass argmax class ids, not scores or label names.")
  out = {"accuracy": accuracy(p, y)}
  if spec.name == "CoLA":
    out["mcc"] = matthews_corrcoef(p, y)
  elif spec.name in ("MRPC", "QQP"):
    out["f1"] = f1_score(p, y, positive=1)
  elif spec.name == "CB":
    out["macro_f1"] = macro_f1(p, y, spec.num_labels)
  elif spec.name == "MultiRC":
    if groups is None:
      raise ConfigError("MultiRC metrics need each example's question (groups).",
                        "pass groups=split.groups of the evaluated split.")
    out.update(multirc_metrics(p, y, groups))
  return out


def multirc_metrics(predictions: ArrayLike, labels: ArrayLike,
                    groups: ArrayLike) -> dict[str, float]:
  """MultiRC's metrics over answer-options grouped by question: {"f1a", "em"}.

  f1a: F1 of class 1 (a correct answer) over all answer-options; 0 when no true positive.
  em: fraction of questions (distinct `groups` values) whose answer-options are all predicted
    right.
  """
  p, y = _pair(predictions, labels, np.int64)
  g = np.asarray(groups).reshape(-1)
  if g.shape != p.shape:
    raise ConfigError(f"{g.size} groups for {p.size} predictions.",
                      "pass one question id per evaluated example (GlueSplit.groups).")
  _, question = np.unique(g, return_inverse=True)
  wrong = np.bincount(question.reshape(-1), weights=(p != y).astype(np.float64))
  return {"f1a": f1_score(p, y, positive=1), "em": float(np.mean(wrong == 0))}


def mnli_metrics(pred_matched: ArrayLike, labels_matched: ArrayLike,
                 pred_mismatched: ArrayLike, labels_mismatched: ArrayLike) -> dict[str, float]:
  """MNLI's two dev accuracies: {"accuracy_matched", "accuracy_mismatched"}."""
  return {"accuracy_matched": accuracy(pred_matched, labels_matched),
          "accuracy_mismatched": accuracy(pred_mismatched, labels_mismatched)}


def prediction_distribution(predictions: ArrayLike, num_labels: int) -> list[float]:
  """Fraction of predictions per class 0..num_labels-1 (sums to 1); [1, 0, ...] = constant."""
  p = np.asarray(predictions).reshape(-1)
  if p.size == 0:
    raise ConfigError("no predictions to count.", "evaluate on a non-empty split.")
  if np.any(p != np.round(p)) or p.min() < 0 or p.max() >= num_labels:
    raise ConfigError(f"predictions must be class ids in 0..{num_labels - 1}.",
                      "pass argmax class ids.")
  counts = np.bincount(p.astype(np.int64), minlength=num_labels)
  return [float(c) / p.size for c in counts]


# Headline metrics that are the F1 of class 1: predicting class 0 always scores 0 on them.
POSITIVE_F1 = ("f1", "f1a")


def majority_baseline(task: str, train_labels: ArrayLike, eval_labels: ArrayLike,
                      eval_groups: ArrayLike | None = None) -> dict[str, float]:
  """The metrics of always predicting the train split's majority class (STS-B: its mean score),
  or, where the headline is the F1 of class 1 (MRPC, QQP: `f1`; MultiRC: `f1a`), class 1: the
  one constant whose F1 is not 0 (MultiRC's dev: 57% negative, so the majority class has F1a 0
  and "always a correct answer" 0.60), the bar a trained row must clear.

  `eval_groups`: MultiRC's question ids of the evaluated examples (required for MultiRC).

  Ties between classes go to the smallest class id. The result also holds "prediction": the
  constant predicted (class id, or the mean score). For STS-B, Pearson and Spearman of a constant
  are undefined and come back as NaN: that baseline has no correlation to report.
  """
  spec = task_spec(task)
  train = np.asarray(train_labels).reshape(-1)
  n = np.asarray(eval_labels).reshape(-1).size
  if train.size == 0:
    raise ConfigError("majority_baseline needs train labels.", "pass the train split's labels.")
  if spec.is_regression:
    constant = float(np.mean(train.astype(np.float64)))
  elif primary_metric(spec.name) in POSITIVE_F1:
    constant = 1
  else:
    constant = int(np.argmax(np.bincount(train.astype(np.int64), minlength=spec.num_labels)))
  out = task_metrics(spec.name, np.full(n, constant), eval_labels, groups=eval_groups)
  out["prediction"] = float(constant)
  return out
