"""Training objectives as objects, built once from the config by `train.builder.build_objective`.

An `Objective` owns everything that depends on what the model is trained to do: the training loss,
the per-sequence negative log-likelihood used for evaluation (exact or an upper bound), the
sampler, and the network flags the objective implies (causal attention, time conditioning). The
rest of the project asks the objective instead of comparing names: `objective_class` is the only
place that looks a name up. Objectives take plain values (`DiffusionSettings`, numbers), never a
config.

A network enters as `apply(tokens, t=None, *, padding_mask=None) -> logits [B, L, V]`, the network
with its parameters (and dropout key) bound; `V` real tokens, no `[MASK]` column.

masked diffusion  absorbing masked diffusion; loss = continuous-time ELBO; evaluation gives an
                  *upper bound* on -log p(x) (Monte Carlo over diffusion times, or over the
                  number of masked tokens: `config.diffusion.estimator`, see `diffusion`).
autoregressive    causal next-token model; the input is the block shifted right behind a BOS
                  token (the `[MASK]` id, which is no word), so *every* token of a block is scored
                  and -log p(x) is exact — the same quantity the diffusion bound bounds.

The autoregressive sampler (a key/value cache, left to right) is `objectives.ar_sampling`; the
diffusion sampler is `diffusion.sampling`.

The `[MASK]` id (which doubles as the AR model's BOS) has one source: the tokenizer
(`Tokenizer.mask_id == vocab_size`), handed to the objective here as `mask_id`.
"""

import abc
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax import models
from bdiff_jax.diffusion import corruption
from bdiff_jax.diffusion import elbo
from bdiff_jax.diffusion import sampling
from bdiff_jax.diffusion import schedules
from bdiff_jax.errors import ConfigError
from bdiff_jax.objectives import ar_sampling

# apply(tokens int32[B, L], t float32[B] | None, *, padding_mask bool[B, L] | None) -> [B, L, V]
Apply = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
  """The masked-diffusion objective's settings (the fields of `config.diffusion`)."""
  schedule: str
  schedule_exponent: float
  antithetic: bool
  corruption: str
  uniform_fraction: float
  estimator: str
  masked_head: bool
  head_chunk_rows: int
  train_positions_per_seq: int


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How to draw samples (the fields of `config.sample` a sampler uses; `modes/sample.py`
  builds them)."""
  num_samples: int
  length: int
  num_steps: int  # masked diffusion's sampler steps (autoregressive: one per token)
  grid: str = "cosine"  # masked diffusion's time grid: "cosine" | "uniform"
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0


class Objective(abc.ABC):
  """What the model is trained to do. Immutable; built once per experiment."""

  name: str = ""
  causal: bool = False  # the network attends only to earlier positions
  uses_time: bool = False  # the objective has a time a network may be conditioned on
  is_upper_bound: bool = False  # sequence_nll is an upper bound (True) or exact (False)
  metric_kind: str = ""  # how evaluation results are described to readers

  def __init__(self, *, mask_id: int, time_conditioned: bool,
               diffusion: Optional[DiffusionSettings] = None):
    """`time_conditioned`: the network takes a time input (config.model.time_conditioning is
    not "none"); `diffusion`: the diffusion settings (used by objectives with a time)."""
    del diffusion
    self.mask_id = int(mask_id)
    self.time_conditioned = bool(time_conditioned)

  @abc.abstractmethod
  def loss(self, apply: Apply, tokens: jax.Array, key: jax.Array) -> tuple[jax.Array, dict]:
    """(loss in nats per token, aux metrics) of one batch int32[B, L]; `key` is consumed."""

  @abc.abstractmethod
  def sequence_nll(self, apply: Apply, tokens: jax.Array, valid: jax.Array, key: jax.Array,
                   *, num_samples: int) -> jax.Array:
    """-log p(tokens[b, valid[b]]) in nats per row, float32[B] (exact or an upper bound).

    `valid` bool[B, L] marks real tokens; positions after the last valid one are padding and
    neither enter the sum nor influence the valid ones. A row with no valid token gives 0.
    """

  @abc.abstractmethod
  def sample(self, network, params, key: jax.Array, *, settings: SampleSettings, max_len: int,
             prompt_ids: Optional[np.ndarray] = None) -> jax.Array:
    """int32[num_samples, length] token ids (never `[MASK]`) drawn with `settings` from
    `network` with `params` (jittable with the settings and prompt static)."""

  def describe(self) -> str:
    return self.metric_kind


class MaskedDiffusion(Objective):
  """Absorbing masked diffusion with the continuous-time ELBO (MD4 / MDLM)."""

  name = "diffusion"
  causal = False
  uses_time = True
  is_upper_bound = True
  metric_kind = "diffusion NLL upper bound (ELBO)"

  def __init__(self, *, mask_id: int, time_conditioned: bool,
               diffusion: Optional[DiffusionSettings] = None):
    super().__init__(mask_id=mask_id, time_conditioned=time_conditioned)
    d = diffusion
    self.schedule = schedules.get_schedule(d.schedule, d.schedule_exponent)
    self.antithetic = bool(d.antithetic)
    self.corruption = str(d.corruption)
    self.uniform_fraction = float(d.uniform_fraction)
    # "time" or "count" (`corruption.ESTIMATORS`). With "count" the network's time input is the
    # masked fraction of its input, in training, evaluation and sampling alike.
    self.estimator = str(d.estimator)
    corruption.check_estimator(self.estimator, self.corruption)
    # The output head and cross-entropy only at masked positions (a fixed-size gather with an
    # exact fallback to the full head); the loss and bound equal the full computation's.
    self.masked_head = bool(d.masked_head)
    self.head_chunk_rows = int(d.head_chunk_rows) or None
    # Training scores a random subset of at most this many masked positions per sequence
    # (an unbiased estimate of the same loss; 0 = all); evaluation scores all of them.
    self.train_positions_per_seq = int(d.train_positions_per_seq)

  def time_of_masked_fraction(self) -> Callable[[float], float]:
    """f -> the time the network is told when a fraction f of its input is [MASK] (cloze
    scoring): f itself under the count estimator, else the t with mask_prob(t) = f."""
    if self.estimator == "count":
      return float
    grid = np.linspace(1e-5, 1.0, 20001)
    probs = np.asarray(self.schedule.mask_prob(jnp.asarray(grid)), np.float64)
    return lambda f: float(np.interp(f, probs, grid))

  def describe(self) -> str:
    how = ("exact counts of masked tokens, k ~ U{1..L}" if self.estimator == "count"
           else "diffusion times t ~ U(0, 1]")
    return f"{self.metric_kind}, Monte Carlo over {how}"

  def _logits_fn(self, apply: Apply, padding_mask=None):
    return lambda z, t: apply(z, t, padding_mask=padding_mask)

  def _hidden_and_nll(self, apply: Apply, padding_mask=None):
    return (lambda z, t: apply(z, t, padding_mask=padding_mask, return_hidden=True),
            lambda rows, targets: apply(rows, targets, method="token_nll"))

  def loss(self, apply, tokens, key):
    kw = dict(schedule=self.schedule, mask_id=self.mask_id, antithetic=self.antithetic,
              corruption=self.corruption, uniform_fraction=self.uniform_fraction,
              estimator=self.estimator)
    if self.masked_head:
      return elbo.diffusion_loss_gathered(
          *self._hidden_and_nll(apply), tokens, key, chunk_rows=self.head_chunk_rows,
          positions_per_row=self.train_positions_per_seq, **kw)
    return elbo.diffusion_loss(self._logits_fn(apply), tokens, key, **kw)

  def sequence_nll(self, apply, tokens, valid, key, *, num_samples):
    kw = dict(schedule=self.schedule, mask_id=self.mask_id, num_samples=num_samples,
              valid=valid, estimator=self.estimator)
    if self.masked_head:
      return elbo.nll_bound_gathered(*self._hidden_and_nll(apply, padding_mask=valid),
                                          tokens, key, chunk_rows=self.head_chunk_rows, **kw)
    return elbo.nll_bound(self._logits_fn(apply, padding_mask=valid), tokens, key, **kw)

  def sample(self, network, params, key, *, settings, max_len, prompt_ids=None):
    """The exact event-driven ancestral sampler (`sampling.sample`): the network is called only
    at steps that reveal something, its head only at the positions being revealed."""
    c = settings
    apply = models.bind(network, params, train=False)
    if self.estimator == "count":  # the network was trained on t = the masked fraction
      bound_apply = apply

      def apply(z, t, **kw):
        del t
        return bound_apply(z, jnp.mean((z == self.mask_id).astype(jnp.float32), axis=-1), **kw)
    return sampling.sample(
        apply, key, length=c.length, num_steps=c.num_steps,
        mask_id=self.mask_id, batch_size=c.num_samples,
        prompt=None if prompt_ids is None else jnp.asarray(prompt_ids),
        temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, schedule=self.schedule,
        grid=c.grid, logits_at_fn=lambda z, t, pos: apply(z, t, logit_positions=pos))


class Autoregressive(Objective):
  """Causal next-token prediction behind a BOS token: exact likelihood."""

  name = "autoregressive"
  causal = True
  is_upper_bound = False
  metric_kind = "autoregressive NLL (exact)"

  def __init__(self, *, mask_id: int, time_conditioned: bool,
               diffusion: Optional[DiffusionSettings] = None):
    super().__init__(mask_id=mask_id, time_conditioned=time_conditioned)
    if self.time_conditioned and not self.uses_time:
      raise ConfigError(
          "config.model.time_conditioning must be 'none' for the autoregressive objective "
          "(there is no diffusion time).",
          "pass --config.model.time_conditioning=none.")

  def inputs(self, tokens: jax.Array) -> jax.Array:
    """The model's input: the block shifted right behind a BOS token (the `[MASK]` id)."""
    bos = jnp.full((tokens.shape[0], 1), self.mask_id, tokens.dtype)
    return jnp.concatenate([bos, tokens[:, :-1]], axis=1)

  def token_nll(self, apply: Apply, tokens: jax.Array) -> jax.Array:
    """-log p(x_i | x_<i) for every position, float32[B, L] (float64 for float64 runs)."""
    hidden = apply(self.inputs(tokens), return_hidden=True)
    # The network's own row NLL (`Network.token_nll`): for a full head, -log_softmax(logits)
    # [token] through `cross_entropy.token_nll`, whose backward is one elementwise pass instead
    # of a scatter into a zero-filled [B, L, V] array (autodiff of the gather: 1,670 instead of
    # 1,250 tokens/s at the cpu preset's shape); an adaptive head skips the tail clusters'
    # logits where the target is not in them.
    return apply(hidden, jnp.asarray(tokens, jnp.int32), method="token_nll")

  def loss(self, apply, tokens, key):
    del key  # deterministic given the batch (dropout has its own key inside `apply`)
    loss = jnp.mean(self.token_nll(apply, tokens))
    return loss, {"nll_per_token": loss}

  def sequence_nll(self, apply, tokens, valid, key, *, num_samples):
    del key, num_samples  # exact: no Monte Carlo
    # Causal: padding after the valid prefix cannot influence it; it is only excluded.
    return jnp.sum(jnp.where(valid, self.token_nll(apply, tokens), 0.0), axis=-1)

  def sample(self, network, params, key, *, settings, max_len, prompt_ids=None):
    """Left-to-right sampling with a key/value cache (`ar_sampling`): one token per network
    call; position i draws with fold_in(key, i)."""
    del max_len  # ar_sampling checks the length against the network's learned positions
    c = settings
    return ar_sampling.sample_autoregressive(
        network, params, key, length=c.length, num_samples=c.num_samples, bos_id=self.mask_id,
        prompt_ids=prompt_ids, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)


_OBJECTIVES: dict[str, type[Objective]] = {
    MaskedDiffusion.name: MaskedDiffusion,
    Autoregressive.name: Autoregressive,
}
NAMES = tuple(_OBJECTIVES)


def objective_class(name: str) -> type[Objective]:
  """The class registered under `name` (for its flags, before a config exists)."""
  if name not in _OBJECTIVES:
    raise ConfigError(f"config.model.objective={name!r} is not one of "
                      f"{', '.join(map(repr, NAMES))}.",
                      "set --config.model.objective to one of those values.")
  return _OBJECTIVES[name]
