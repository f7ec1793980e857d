"""Bag-of-words baselines of the GLUE benchmark: what the row's training examples alone give.

`bow_baseline` trains, on exactly the examples a benchmark row trains on, an L2-regularised
linear model on unigram + bigram features of the text, and scores it on the same dev set with the
same metrics (`glue.metrics.task_metrics`):

- classification: multinomial logistic regression (softmax cross-entropy);
- regression (STS-B): ridge regression (squared error), reported as Pearson / Spearman.

Features: lower-cased word and punctuation tokens of each segment, their unigrams and bigrams
prefixed by the segment's index (so "premise: not" and "hypothesis: not" differ), counted,
log(1 + count) scaled, kept when seen in train (at most `max_features`, the most frequent, ties
by name). The objective is minimised by L-BFGS (scipy.optimize, float64) from zero weights: the
result is deterministic. It is the data ceiling of the row's protocol for a model that sees
words but not their meaning (k=16 per class: near chance; the full train split: SST-2 ~0.8).
"""

import collections
import re

import numpy as np
import scipy.optimize
import scipy.sparse

from bdiff_jax.errors import ConfigError
from bdiff_jax.glue import metrics as glue_metrics
from bdiff_jax.glue.tasks import GlueSplit

_TOKEN = re.compile(r"\w+|[^\w\s]")


def _ngrams(texts: tuple[str, ...]) -> list[str]:
  out = []
  for s, text in enumerate(texts):
    words = _TOKEN.findall(text.lower())
    out += [f"{s}:{w}" for w in words]
    out += [f"{s}:{a} {b}" for a, b in zip(words, words[1:])]
  return out


class BagOfWords:
  """Unigram + bigram features with a vocabulary fitted on train."""

  def __init__(self, train: GlueSplit, max_features: int = 50_000):
    counts = collections.Counter()
    for i in range(len(train)):
      counts.update(set(_ngrams(train[i].texts)))
    kept = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_features]
    self.index = {name: j for j, name in enumerate(sorted(n for n, _ in kept))}

  def features(self, split: GlueSplit) -> scipy.sparse.csr_matrix:
    """float64 [N, F + 1]: log(1 + count) of each kept n-gram, then a constant 1 (the bias)."""
    rows, cols, vals = [], [], []
    f = len(self.index)
    for i in range(len(split)):
      c = collections.Counter(self.index[g] for g in _ngrams(split[i].texts) if g in self.index)
      c[f] = 1
      for j, v in c.items():
        rows.append(i)
        cols.append(j)
        vals.append(np.log1p(v) if j < f else 1.0)
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(len(split), f + 1),
                                   dtype=np.float64)


def fit_linear(x, targets: np.ndarray, regression: bool, l2: float,
               iterations: int) -> np.ndarray:
  """Weights [F + 1, C] minimising the mean loss + l2/2 ||W||^2 (the bias not penalised): x
  [N, F + 1] (dense or sparse) ends with a constant-1 bias column; softmax cross-entropy
  against `targets` [N, C] (distributions), or squared error against float `targets` [N]."""
  n, d = x.shape
  c = 1 if regression else targets.shape[1]
  penalty = np.ones((d, c))
  penalty[-1] = 0.0  # the bias column

  def objective(w_flat):
    w = w_flat.reshape(d, c)
    z = x @ w
    if regression:
      r = z[:, 0] - targets
      loss, dz = 0.5 * float(r @ r) / n, r[:, None] / n
    else:
      z = z - z.max(axis=1, keepdims=True)
      logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
      loss = -float(np.sum(targets * logp)) / n
      dz = (np.exp(logp) - targets) / n
    reg = penalty * w
    grad = x.T @ dz + l2 * reg
    return loss + 0.5 * l2 * float(np.sum(reg * w)), np.asarray(grad).reshape(-1)

  w0 = np.zeros(d * c)
  if regression:
    w0[-1] = float(np.mean(targets))  # start at the mean score (the bias is the last row)
  res = scipy.optimize.minimize(objective, w0, jac=True, method="L-BFGS-B",
                                options={"maxiter": iterations})
  return res.x.reshape(d, c)


def bow_baseline(task: str, train: GlueSplit, evals: dict[str, GlueSplit], *,
                 l2: float = 1e-3, iterations: int = 300,
                 max_features: int = 50_000) -> dict[str, dict]:
  """Fits the bag-of-words model on `train`; returns {name: task_metrics} of each eval split.

  Args:
    task: the GLUE task (its metrics and whether it is a regression).
    train: the examples to fit (the benchmark row's exact train set).
    evals: name -> split to score (e.g. {"dev": dev}).
    l2: the L2 penalty on the (non-bias) weights, relative to the mean loss.
    iterations: L-BFGS iterations at most.
    max_features: the most frequent train n-grams kept.
  """
  if len(train) == 0:
    raise ConfigError("the bag-of-words baseline got no training examples.",
                      "give it the row's train split.")
  bow = BagOfWords(train, max_features)
  x = bow.features(train)
  if train.is_regression:
    targets = train.labels.astype(np.float64)
  else:
    targets = np.eye(train.num_labels)[train.labels.astype(np.int64)]
  w = fit_linear(x, targets, train.is_regression, l2, iterations)
  out = {}
  for name, split in evals.items():
    z = bow.features(split) @ w
    preds = z[:, 0] if train.is_regression else np.argmax(z, axis=1)
    out[name] = glue_metrics.task_metrics(task, preds, split.labels, groups=split.groups)
  return out
