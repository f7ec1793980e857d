"""Classification objectives for GLUE fine-tuning: candidate scores -> cross-entropy.

Three ways to turn a network into a classifier, as objects with one interface:

    scores(apply, batch) -> float32[B, C]       one score per candidate (class) per example
    loss(apply, batch, key) -> (loss, aux)       cross-entropy of softmax(scores) against
                                                 batch["target"] (a distribution over C)
    predict(scores) -> int class ids [B] (or float scores for a regression head)

`batch` is a dict of fixed-shape arrays built by `bdiff_jax.data.glue_encoding` (one compilation
per shape); `apply(tokens, t=None, *, padding_mask=None)` is the network with its parameters
bound, as for the LM objectives (`models.bind`), so the ONE train step
(`train_step.make_train_step`) trains these objectives with any update rule.

CausalPrompt   (MeZO / LM-BFF protocol for causal LMs: OPT, an autoregressive bdiff model)
  batch: inputs int32[B, C, L], targets int32[B, C, L], score_mask float32[B, C, L],
  padding bool[B, C, L], target float32[B, C]. Row (b, c) is the prompt filled with candidate c;
  logits at position i predict targets[.., i]. score[b, c] = mean over positions with
  score_mask = 1 of log p(targets | inputs up to i): the mean log-probability of the candidate's
  label tokens after the prompt context.
ClozePrompt    (masked-diffusion LM; the label slot is a [MASK])
  batch: inputs int32[B, L] (the mask id at the slot), padding bool[B, L], mask_pos int32[B],
  candidate_ids int32[B, C], t float32[B] (the diffusion time the network is told, when it is
  time-conditioned), target float32[B, C]. score[b, c] = log_softmax(logits[b, mask_pos[b]])
  [candidate_ids[b, c]]: the denoiser's log-probability of candidate c at the mask.
PooledHead     (the non-prompt baseline: a classification / regression head on pooled states)
  batch: inputs int32[B, L], padding bool[B, L], t float32[B], target float32[B, C].
  `apply` returns float32[B, C] directly (`models.classifier.PooledClassifier`). Classification:
  cross-entropy; regression (`regression=True`, C = 1): mean squared error on the score.

STS-B with a prompt (LM-BFF): two candidates (No, Yes), target (1 - y/5, y/5); the prediction
is 5 p(Yes) from the softmax of the two scores.
"""

import abc

import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax.data.glue_prompts import STSB_MAX


def soft_cross_entropy(scores: jax.Array, target: jax.Array) -> jax.Array:
  """Mean over the batch of -sum_c target[b, c] log softmax(scores[b])[c]; scores [B, C]."""
  logp = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(target * logp, axis=-1))


class ClassificationObjective(abc.ABC):
  """Scores candidates and trains them with cross-entropy (see the module docstring)."""

  name: str = ""
  causal: bool = False  # the network attends only to earlier positions
  uses_time: bool = False

  def __init__(self, *, regression: bool = False):
    self.regression = bool(regression)

  @abc.abstractmethod
  def scores(self, apply, batch: dict) -> jax.Array:
    """float32[B, C] candidate scores (higher = more likely)."""

  def loss(self, apply, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
    del key  # deterministic given the batch (dropout has its own key inside `apply`)
    s = self.scores(apply, batch)
    loss = soft_cross_entropy(s, batch["target"])
    correct = jnp.argmax(s, axis=-1) == jnp.argmax(batch["target"], axis=-1)
    return loss, {"train_accuracy": jnp.mean(correct.astype(jnp.float32))}

  def predict(self, scores: np.ndarray) -> np.ndarray:
    """Class ids int64[B]; for regression (STS-B) float scores in [0, 5]."""
    scores = np.asarray(scores, np.float64)
    if self.regression:
      p = np.exp(scores - scores.max(axis=-1, keepdims=True))
      return STSB_MAX * p[:, 1] / p.sum(axis=-1)
    return np.argmax(scores, axis=-1)


class CausalPrompt(ClassificationObjective):
  """Mean log-probability of each candidate's label tokens after the prompt (causal LM)."""

  name = "causal_prompt"
  causal = True

  def scores(self, apply, batch):
    inputs = batch["inputs"]
    b, c, length = inputs.shape
    flat = lambda x: x.reshape(b * c, length)
    logits = apply(flat(inputs), padding_mask=flat(batch["padding"])).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_lp = jnp.take_along_axis(logp, flat(batch["targets"])[..., None], axis=-1)[..., 0]
    mask = flat(batch["score_mask"]).astype(jnp.float32)
    mean_lp = jnp.sum(token_lp * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return mean_lp.reshape(b, c)


class ClozePrompt(ClassificationObjective):
  """The denoiser's log-probability of each candidate at the [MASK] of the template."""

  name = "cloze_prompt"
  causal = False

  def __init__(self, *, time_conditioned: bool, regression: bool = False):
    super().__init__(regression=regression)
    self.uses_time = bool(time_conditioned)

  def scores(self, apply, batch):
    t = batch["t"] if self.uses_time else None
    logits = apply(batch["inputs"], t, padding_mask=batch["padding"]).astype(jnp.float32)
    at_mask = jnp.take_along_axis(logits, batch["mask_pos"][:, None, None], axis=1)[:, 0]
    logp = jax.nn.log_softmax(at_mask, axis=-1)  # [B, V]
    return jnp.take_along_axis(logp, batch["candidate_ids"], axis=-1)


class PooledHead(ClassificationObjective):
  """A head on pooled hidden states: cross-entropy over classes, or MSE for regression."""

  name = "pooled_head"

  def __init__(self, *, causal: bool, time_conditioned: bool, regression: bool = False):
    super().__init__(regression=regression)
    self.causal = bool(causal)
    self.uses_time = bool(time_conditioned)

  def scores(self, apply, batch):
    t = batch["t"] if self.uses_time else None
    return apply(batch["inputs"], t, padding_mask=batch["padding"]).astype(jnp.float32)

  def loss(self, apply, batch, key):
    if not self.regression:
      return super().loss(apply, batch, key)
    del key
    pred = self.scores(apply, batch)[:, 0]
    loss = jnp.mean(jnp.square(pred - batch["target"][:, 0]))
    return loss, {"train_mse": loss}

  def predict(self, scores):
    scores = np.asarray(scores, np.float64)
    return scores[:, 0] if self.regression else np.argmax(scores, axis=-1)
