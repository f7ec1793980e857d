"""Few-shot and subsampled GLUE splits, as MeZO samples them, deterministic given a seed.

Two protocols from MeZO (Malladi et al. 2023):
- RoBERTa-large ("medium") experiments use LM-BFF's k-shot data (Gao et al. 2021): shuffle train
  with the seed, take the first k examples of each class as train and the *next* k of each class
  as the model-selection ("dev") set; the original GLUE dev split (at most 1,000 examples of it,
  sampled once) is the test set. STS-B is stratified like LM-BFF does it, by score < 2.5 vs >= 2.5
  (`STSB_THRESHOLD`), k per half. -> `few_shot`, `few_shot_with_selection`, `subsample`.
- OPT ("large") experiments sample 1,000 train examples at random, hold out 500 of train for
  model selection, and evaluate on 1,000 sampled dev examples. -> `subsample`, `holdout`.
  `holdout(..., balanced=True)` stratifies the held-out slice per class (what `--mode=glue`
  uses), so that a constant predictor cannot win model selection on an imbalanced task.

Model selection always uses a slice of *train*, never dev: dev is the reported test set.

Every function draws from `numpy.random.default_rng(seed)` alone (no global state), returns
examples in file order (`source_rows` ascending) and raises ConfigError for a request the split
cannot satisfy.
"""

import numpy as np

from bdiff_jax.errors import ConfigError
from bdiff_jax.glue.tasks import GlueSplit

# LM-BFF's bins for stratifying STS-B (a regression task): class 0 = score < 2.5, 1 = >= 2.5.
STSB_THRESHOLD = 2.5


def strata(split: GlueSplit) -> np.ndarray:
  """The class each example is stratified by: its label, or for regression its score bin."""
  if split.is_regression:
    return (split.labels >= STSB_THRESHOLD).astype(np.int64)
  return split.labels.astype(np.int64)


def _per_class_order(split: GlueSplit, seed: int) -> list[np.ndarray]:
  """For each class (regression: score half), its positions in one seeded permutation."""
  perm = np.random.default_rng(seed).permutation(len(split))
  cls = strata(split)[perm]
  num_strata = 2 if split.is_regression else split.num_labels
  return [perm[cls == c] for c in range(num_strata)]


def _check_k(k: int, name: str) -> None:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
    raise ConfigError(f"{name}={k!r} must be a positive integer.", f"pass {name} >= 1.")


def _take(split: GlueSplit, per_class: list[np.ndarray], start: int, k: int,
          what: str) -> GlueSplit:
  short = [(len(p), c) for c, p in enumerate(per_class) if len(p) < start + k]
  if short:
    count, c = min(short)
    raise ConfigError(
        f"{split.task} {split.split} has only {count} examples of class {c}, fewer than the "
        f"{start + k} per class that {what} needs.", "lower k_per_class.")
  return split.select(np.sort(np.concatenate([p[start:start + k] for p in per_class])))


def few_shot(split: GlueSplit, k_per_class: int = 16, seed: int = 0) -> GlueSplit:
  """k examples of each class (STS-B: of each score half), chosen by `seed` (LM-BFF k-shot)."""
  _check_k(k_per_class, "k_per_class")
  return _take(split, _per_class_order(split, seed), 0, k_per_class, "few_shot")


def few_shot_with_selection(split: GlueSplit, k_per_class: int = 16,
                            seed: int = 0) -> tuple[GlueSplit, GlueSplit]:
  """(train, selection): k per class each, disjoint, from one permutation (LM-BFF train/dev).

  `train` is exactly `few_shot(split, k_per_class, seed)`; `selection` is the next k of each
  class in the same permutation, for model selection.
  """
  _check_k(k_per_class, "k_per_class")
  order = _per_class_order(split, seed)
  return (_take(split, order, 0, k_per_class, "few_shot_with_selection"),
          _take(split, order, k_per_class, k_per_class, "few_shot_with_selection"))


def subsample(split: GlueSplit, n: int = 1000, seed: int = 0) -> GlueSplit:
  """n examples drawn without replacement by `seed`; the whole split when it has <= n."""
  _check_k(n, "n")
  if n >= len(split):
    return split
  idx = np.random.default_rng(seed).permutation(len(split))[:n]
  return split.select(np.sort(idx))


def _balanced_counts(n: int, c: int) -> list[int]:
  """n split over c strata as evenly as possible (the first strata take the remainder)."""
  return [n // c + (1 if i < n % c else 0) for i in range(c)]


def holdout(train: GlueSplit, n_or_fraction: int | float, seed: int = 0, *,
            balanced: bool = False) -> tuple[GlueSplit, GlueSplit]:
  """(rest, selection): a random held-out slice of train for model selection, and the rest.

  Args:
    train: the split to divide (normally the (few-shot) train split).
    n_or_fraction: an int number of examples (1 <= n < len(train)), or a float fraction in
      (0, 1), rounded to the nearest count and clipped to [1, len(train) - 1].
    seed: the permutation's seed.
    balanced: stratify the selection slice: n // C examples of each of the C classes (STS-B:
      of each score half, `strata`), the remainder one each to the lowest classes, each class's
      share drawn from one seeded permutation. A plain random slice of an imbalanced split lets
      a constant predictor of the majority class win model selection; a balanced one does not.

  Returns:
    Disjoint splits whose union is `train`; `selection` has the requested size.
  """
  size = len(train)
  if isinstance(n_or_fraction, float):
    if not 0.0 < n_or_fraction < 1.0:
      raise ConfigError(f"holdout fraction {n_or_fraction} must be in (0, 1).",
                        "pass e.g. 0.1, or an integer count.")
    n = min(max(int(round(n_or_fraction * size)), 1), size - 1)
  else:
    _check_k(n_or_fraction, "n")
    n = int(n_or_fraction)
  if size < 2 or not 1 <= n < size:
    raise ConfigError(f"cannot hold out {n} of {size} {train.task} examples.",
                      "hold out at least 1 and leave at least 1 for training.")
  if not balanced:
    perm = np.random.default_rng(seed).permutation(size)
    return train.select(np.sort(perm[n:])), train.select(np.sort(perm[:n]))
  per_class = _per_class_order(train, seed)
  counts = _balanced_counts(n, len(per_class))
  short = [(len(p), c, k) for c, (p, k) in enumerate(zip(per_class, counts)) if len(p) <= k]
  if short:
    have, c, k = min(short)
    raise ConfigError(f"a balanced selection of {n} {train.task} examples needs {k} of class "
                      f"{c} and at least one left to train on; there are {have}.",
                      "lower glue.selection or set glue.selection_balanced=False.")
  chosen = np.concatenate([p[:k] for p, k in zip(per_class, counts)])
  mask = np.zeros(size, bool)
  mask[chosen] = True
  return train.select(np.flatnonzero(~mask)), train.select(np.flatnonzero(mask))
