"""The start probe: what a linear readout of the start model's own features gives.

A prompt row whose candidates are read at one position (the label slot of a causal prompt, the
[MASK] of a cloze prompt: every one-token-candidate task) scores them from the start model's
final hidden state h there. An L2-regularised logistic regression (ridge for STS-B) trained on h
of the row's training examples (at most `PROBE_EXAMPLES` of them, drawn by the seed),
standardised on them, and scored on the dev sets with the task's metrics, is what any method
that only re-weights those features can reach: a zeroth-order row far below a first-order one
but near this probe has learned a readout, not new features. (SST-2, an OPT start of the `cpu`
level: 0.58-0.59 over 3 seeds, while AdamW reaches 0.79-0.81 by changing the features;
docs/glue.md.)

Same fit as the bag-of-words baseline (`baselines.fit_linear`, L-BFGS from zero, float64:
deterministic); the rows record it as `start_probe` (modes/glue.py).
"""

import numpy as np

from bdiff_jax.errors import ConfigError
from bdiff_jax.glue import metrics as glue_metrics
from bdiff_jax.glue.baselines import fit_linear

PROBE_EXAMPLES = 4000  # training examples the probe fits at most (a forward pass each)


def probe_indices(n: int, seed: int, cap: int = PROBE_EXAMPLES) -> np.ndarray:
  """Sorted indices of at most `cap` of `n` training examples, drawn by `seed`."""
  if n <= cap:
    return np.arange(n)
  return np.sort(np.random.default_rng([seed, 7]).permutation(n)[:cap])


def start_probe(task: str, features: np.ndarray, labels: np.ndarray, evals: dict, *,
                regression: bool, num_labels: int, l2: float = 1e-3,
                iterations: int = 300) -> dict:
  """Fits the probe on `features` [N, D] / `labels` [N]; returns {name: task metrics} of each
  `evals` entry, name -> (features [M, D], labels [M], groups or None)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or not len(features):
    raise ConfigError(f"the start probe got features of shape {features.shape}.",
                      "give it [N, D] hidden states of the row's training examples.")
  mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
  design = lambda f: np.hstack([(np.asarray(f, np.float64) - mean) / std,
                                np.ones((len(f), 1))])
  if regression:
    targets = np.asarray(labels, np.float64)
  else:
    targets = np.eye(num_labels)[np.asarray(labels, np.int64)]
  w = fit_linear(design(features), targets, regression, l2, iterations)
  out = {}
  for name, (f, y, groups) in evals.items():
    z = design(f) @ w
    preds = z[:, 0] if regression else np.argmax(z, axis=1)
    out[name] = glue_metrics.task_metrics(task, preds, y, groups=groups)
  return out
