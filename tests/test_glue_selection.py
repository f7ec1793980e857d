"""Model selection and baselines of the GLUE benchmark: the balanced selection slice
(glue_sampling.holdout(balanced=True)) and the bag-of-words baseline (glue_baselines)."""

import numpy as np
import pytest

from bdiff_jax import glue_baselines, glue_metrics
from bdiff_jax.data import glue, glue_sampling
from bdiff_jax.errors import ConfigError


def _split(texts, labels, task="SST-2"):
  spec = glue.TASKS[task]
  labels = np.asarray(labels)
  if len(spec.segment_names) == 1:
    texts = (tuple(texts),)
  return glue.GlueSplit(task=task, split="train", texts=texts,
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
