"""Classification objectives for GLUE fine-tuning: candidate scores -> cross-entropy.

Three ways to turn a network into a classifier, as objects with one interface:

    scores(apply, batch) -> float32[B, C]       one score per candidate (class) per example
    scores_and_readout(apply, batch)             the scores and, where all candidates are read
                                                 at one position (one-token candidates of a
                                                 prompt), the final hidden state there
                                                 float32[B, D] (else None): the features a
                                                 readout of the start model sees (glue/probe.py)
    loss(apply, batch, key) -> (loss, aux)       cross-entropy of softmax(scores) against
                                                 batch["target"] (a distribution over C)
    predict(scores) -> int class ids [B] (or float scores for a regression head)

`batch` is a dict of fixed-shape arrays built by `bdiff_jax.glue.encoding` (one compilation
per shape); `apply(tokens, t=None, *, padding_mask=None)` is the network with its parameters
bound, as for the LM objectives (`models.bind`), so the ONE train step
(`train_step.make_train_step`) trains these objectives with any update rule.

CausalPrompt   (MeZO / LM-BFF protocol for causal LMs: OPT, an autoregressive bdiff model)
  batch: inputs int32[B, C, L], targets int32[B, C, L], score_mask float32[B, C, L],
  padding bool[B, C, L], target float32[B, C]. Row (b, c) is the prompt filled with candidate c;
  logits at position i predict targets[.., i]. score[b, c] = mean over positions with
  score_mask = 1 of log p(targets | inputs up to i): the mean log-probability of the candidate's
  label tokens after the prompt context. When every candidate is one token, the C rows would
  share their inputs, so the batch has one row per example instead: inputs int32[B, L],
  padding bool[B, L], label_pos int32[B], candidate_ids int32[B, C]; score[b, c] =
  log_softmax(logits[b, label_pos[b]])[candidate_ids[b, c]] (the same number, C times less work).
ClozePrompt    (masked-diffusion LM; the label slot is a [MASK])
  batch: inputs int32[B, L] (the mask id at the slot), padding bool[B, L], mask_pos int32[B],
  candidate_ids int32[B, C], t float32[B] (the diffusion time the network is told, when it is
  time-conditioned), target float32[B, C]. score[b, c] = log_softmax(logits[b, mask_pos[b]])
  [candidate_ids[b, c]]: the denoiser's log-probability of candidate c at the mask.
  When a candidate has several tokens, a span batch instead: inputs int32[B, C, L] (row (b, c)
  the prompt with one mask per token of candidate c), targets int32[B, C, L] (the candidate's
  tokens at those masks), score_mask float32[B, C, L], padding bool[B, C, L], t float32[B, C]
  (the masked fraction's time). score[b, c] = the mean over the candidate's tokens of their
  log-probabilities with every token of the candidate masked (all read in one pass).
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

from bdiff_jax.errors import ConfigError
from bdiff_jax.glue.prompts import STSB_MAX


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

  def scores_and_readout(self, apply, batch: dict):
    """(scores float32[B, C], hidden float32[B, D] at the position the candidates are read, or
    None where they are not read at one position: several-token candidates, a pooled head)."""
    return self.scores(apply, batch), None

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


DEFAULT_LABEL_TOKENS = 8  # scored (label) tokens per causal row gathered for the output head


def scored_tokens(score_mask) -> int:
  """The most scored (label) tokens of any row of a causal batch: score_mask [..., L] -> int. A
  `CausalPrompt(max_label_tokens=...)` of at least this runs the head on no other position."""
  mask = np.asarray(score_mask)
  return int((mask > 0).sum(axis=-1).max(initial=0))


def _gathers_rows(apply) -> bool:
  """Whether `apply` can return hidden states and score rows of them (`models.BoundNetwork`)."""
  return callable(getattr(apply, "hidden", None)) and callable(getattr(apply, "token_nll", None))


class CausalPrompt(ClassificationObjective):
  """Mean log-probability of each candidate's label tokens after the prompt (causal LM).

  With an `apply` from `models.bind` the output head (a [D, V] product and a softmax over V per
  position) runs only at the scored positions: the network returns its final hidden states,
  the first `max_label_tokens` positions of each row with score_mask = 1 are gathered (a fixed
  number, so shapes stay static) and `apply.token_nll` scores the label tokens there (the
  adaptive head's exact NLL without its tail clusters where the label is not in them). A batch
  with a row of more scored tokens than that takes an exact fallback (`lax.cond`) that runs the
  head at every position, `max_label_tokens` positions at a time (a `lax.scan`: the compiled
  step holds one chunk's head activations, not the [B*C, L, V] of the whole sequence); a plain
  `apply` (logits only) computes the logits at every position. The scores equal the
  full-logits computation up to the order of floating-point additions.
  """

  name = "causal_prompt"
  causal = True

  def __init__(self, *, regression: bool = False, max_label_tokens: int = DEFAULT_LABEL_TOKENS):
    super().__init__(regression=regression)
    if int(max_label_tokens) < 1:
      raise ConfigError(f"max_label_tokens={max_label_tokens} must be >= 1.",
                        "pass the most label tokens of a row (classification.scored_tokens).")
    self.max_label_tokens = int(max_label_tokens)

  def scores(self, apply, batch):
    if "candidate_ids" in batch:  # one-token candidates: one row per example (encoding.py)
      return _candidate_logp_at(apply, batch, batch["label_pos"], None)
    return _candidate_mean_logp(apply, batch, self.max_label_tokens)

  def scores_and_readout(self, apply, batch):
    if "candidate_ids" in batch and _gathers_rows(apply):
      return _candidate_logp_and_hidden(apply, batch, batch["label_pos"], None)
    return super().scores_and_readout(apply, batch)


def _candidate_logp_at(apply, batch, pos, t):
  """float32[B, C]: log p(candidate_ids[b, c]) from the logits at position pos[b] of row b
  (inputs [B, L]); `t` [B] the diffusion time of a time-conditioned network, else None. With a
  `models.bind` apply the head runs at that position only."""
  if _gathers_rows(apply):
    return _candidate_logp_and_hidden(apply, batch, pos, t)[0]
  cands = batch["candidate_ids"]
  logits = apply(batch["inputs"], t, padding_mask=batch["padding"]).astype(jnp.float32)
  at_pos = jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0]
  logp = jax.nn.log_softmax(at_pos, axis=-1)  # [B, V]
  return jnp.take_along_axis(logp, cands, axis=-1)


def _candidate_logp_and_hidden(apply, batch, pos, t):
  """(`_candidate_logp_at`'s scores float32[B, C], the final hidden state at pos float32[B, D])
  for a `models.bind` apply: the head runs at pos only."""
  cands = batch["candidate_ids"]
  h = apply.hidden(batch["inputs"], t, padding_mask=batch["padding"],
                   positions=pos[:, None])  # [B, 1, D]
  wide = jnp.broadcast_to(h, (cands.shape[0], cands.shape[1], h.shape[-1]))
  return -apply.token_nll(wide, cands).astype(jnp.float32), h[:, 0].astype(jnp.float32)


def _candidate_mean_logp(apply, batch, max_label_tokens: int, t=None):
  """float32[B, C]: for each row (b, c) of inputs [B, C, L], the mean log-probability of
  `targets` at the positions with score_mask = 1 (causal: targets are the next tokens; cloze
  spans: the candidate's tokens under its masks). `t` [B, C]: the diffusion time of each row
  for a time-conditioned network, else None. See CausalPrompt for how the head is run."""
  inputs = batch["inputs"]
  b, c, length = inputs.shape
  flat = lambda x: x.reshape(b * c, length)
  tokens, padding, targets = flat(inputs), flat(batch["padding"]), flat(batch["targets"])
  mask = flat(batch["score_mask"]).astype(jnp.float32)
  time = () if t is None else (jnp.reshape(t, (b * c,)),)
  if not _gathers_rows(apply):
    logits = apply(tokens, *time, padding_mask=padding).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    sum_lp = jnp.sum(token_lp * mask, axis=-1)
  else:
    h = apply.hidden(tokens, *time, padding_mask=padding)  # [B*C, L, D], final-normed
    k = min(max_label_tokens, length)
    pos = jnp.arange(length, dtype=jnp.int32)[None, :]
    # The scored positions first, in order; then the others (weight 0).
    order = jnp.argsort(jnp.where(mask > 0, pos, pos + length), axis=-1)

    def logp_at(idx, weight):  # idx int[B*C, K]: the weighted sum of the log-probs there
      rows = jnp.take_along_axis(h, idx[..., None], axis=1)  # [B*C, K, D]
      lp = -apply.token_nll(rows, jnp.take_along_axis(targets, idx, axis=-1))
      return jnp.sum(lp.astype(jnp.float32) * weight, axis=-1)

    def chunk_logp(idx):
      return logp_at(idx, jnp.take_along_axis(mask, idx, axis=-1))

    def every_position():
      # A batch with a row of more than k scored tokens: all positions, k at a time (a scan,
      # so that the program holds one chunk's head activations, not [B*C, L, V]).
      n = -(-length // k)
      padded = jnp.pad(order, ((0, 0), (0, n * k - length)), constant_values=length)
      chunks = jnp.moveaxis(padded.reshape(b * c, n, k), 1, 0)  # [n, B*C, K]

      def body(total, idx):
        real = idx < length  # the last chunk's padding reads position 0 with weight 0
        safe = jnp.where(real, idx, 0)
        weight = jnp.where(real, jnp.take_along_axis(mask, safe, axis=-1), 0.0)
        return total + logp_at(safe, weight), None

      return jax.lax.scan(body, jnp.zeros((b * c,), jnp.float32), chunks)[0]

    if k == length:
      sum_lp = chunk_logp(order)
    else:
      fits = jnp.max(jnp.sum((mask > 0).astype(jnp.int32), axis=-1)) <= k
      sum_lp = jax.lax.cond(fits, lambda: chunk_logp(order[:, :k]), every_position)
  mean_lp = sum_lp / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return mean_lp.reshape(b, c)


class ClozePrompt(ClassificationObjective):
  """The denoiser's log-probability of each candidate at the [MASK] of the template.

  With an `apply` from `models.bind` the output head runs only at the mask (the network's
  `logit_positions`) and scores the C candidates there with `apply.token_nll`; a plain `apply`
  (logits only) computes the logits at every position and reads the mask's row.
  Candidates of several tokens (COPA's choices) come as span batches (module docstring): the
  mean over the candidate's tokens of their log-probabilities with all of them masked.
  """

  name = "cloze_prompt"
  causal = False

  def __init__(self, *, time_conditioned: bool, regression: bool = False):
    super().__init__(regression=regression)
    self.uses_time = bool(time_conditioned)

  def scores(self, apply, batch):
    t = batch["t"] if self.uses_time else None
    if "score_mask" in batch:  # multi-token candidates: one row per candidate, masks at its span
      return _candidate_mean_logp(apply, batch, DEFAULT_LABEL_TOKENS, t)
    return _candidate_logp_at(apply, batch, batch["mask_pos"], t)

  def scores_and_readout(self, apply, batch):
    if "candidate_ids" in batch and _gathers_rows(apply):
      t = batch["t"] if self.uses_time else None
      return _candidate_logp_and_hidden(apply, batch, batch["mask_pos"], t)
    return super().scores_and_readout(apply, batch)


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
