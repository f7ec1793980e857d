"""Update rules: how one train step turns a loss function into new parameters.

The train step hands every rule the same things and asks for the same things back:

    rule.init(params) -> rule_state                       (a pytree, checkpointed)
    rule.update(loss_fn, params, rule_state, key, step) -> (params, rule_state, metrics)

`loss_fn(params) -> (loss, aux)` has the batch and the objective's randomness already bound, so
evaluating it twice sees the same masks and dropout. A first-order rule differentiates it; a
zeroth-order rule (MeZO/DiZO, `bdiff_jax/optim/zeroth_order.py`) evaluates it at perturbed
parameters and keeps no gradient buffer. `key` is this step's own key for the rule's randomness
(perturbation directions); `step` the 0-based step being taken (traced). Everything runs inside
one jitted step with the state donated.

Rules may also declare (read with getattr; the defaults are those of AdamW):

    rule.deterministic: bool     the loss is evaluated with the network in eval mode (no
                                 dropout): MeZO/DiZO, as in MeZO's reference code. Default False.
    rule.batches_per_step: int   n > 1: the train step's batch is n batches stacked on a leading
                                 axis, and `loss_fn(params, i=0)` is the loss of batch i (traced i
                                 allowed); batch 0 is the step's own. DiZO with fresh batches:
                                 1 + its γ iterations. Default 1 (`loss_fn(params)`).
    rule.trainable(path_names) -> bool   the leaves the rule perturbs and updates (None: all).

`make_rule` is the one factory; it takes plain values: settings dataclasses, the freeze choice
("none" | "embeddings") and the parameter-efficient variant ("none" | "lora",
`bdiff_jax/optim/lora.py`). The config's sections become those values in `train.builder` (LM
training and GLUE rows alike).
"""

import dataclasses
from typing import Any, Callable, Optional, Protocol

import jax
import optax

from bdiff_jax.errors import ConfigError
from bdiff_jax.optim import dizo
from bdiff_jax.optim import lora
from bdiff_jax.optim import zeroth_order
from bdiff_jax.optim.zeroth_order import Predicate

LossFn = Callable[[Any], tuple[jax.Array, dict]]


class UpdateRule(Protocol):
  """What the train step needs from an update rule."""

  name: str

  def init(self, params) -> Any:
    ...

  def update(self, loss_fn: LossFn, params, rule_state, key: jax.Array,
             step: jax.Array) -> tuple[Any, Any, dict]:
    ...


def learning_rate_schedule(settings) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `end_learning_rate_fraction`
  (`settings`: an `AdamWSettings`, or anything with its fields)."""
  lr = settings.learning_rate
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=settings.warmup_steps,
      decay_steps=max(settings.num_steps, settings.warmup_steps + 1),
      end_value=lr * settings.end_learning_rate_fraction)


def make_optimizer(settings) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay and global-norm clipping; no decay on vectors."""
  decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
  # The clip slot is always present (identity when grad_clip=0) so that the optimizer state has
  # the same structure whatever the value: a run can be resumed with clipping changed.
  parts = [optax.clip_by_global_norm(settings.grad_clip) if settings.grad_clip > 0
           else optax.identity()]
  parts.append(optax.adamw(learning_rate_schedule(settings), b1=settings.b1,
                           b2=settings.b2, weight_decay=settings.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)


class FirstOrder:
  """Backpropagation + an optax optimizer (AdamW with warmup/cosine and clipping by default).

  With `trainable`, only those leaves are differentiated and updated (the optimizer state then
  covers them alone, as a list in tree_leaves order); the others are returned unchanged.
  """

  name = "adamw"
  deterministic = False
  batches_per_step = 1

  def __init__(self, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               trainable: Optional[Predicate] = None):
    self.optimizer = optimizer
    self.schedule = schedule
    self.trainable = trainable

  def _split(self, params):
    """(trainable leaves, rebuild(trainable leaves) -> params)."""
    names, leaves, treedef = zeroth_order.flat_leaves(params)
    idx = [i for i, nm in enumerate(names) if self.trainable(nm)]

    def rebuild(sub):
      full = list(leaves)
      for i, v in zip(idx, sub):
        full[i] = v
      return jax.tree_util.tree_unflatten(treedef, full)

    return [leaves[i] for i in idx], rebuild

  def init(self, params):
    if self.trainable is None:
      return self.optimizer.init(params)
    sub, _ = self._split(params)
    if not sub:
      raise ConfigError("the update rule trains no parameter of this model.",
                        "check the freeze / peft choice against the model's parameters.")
    return self.optimizer.init(sub)

  def update(self, loss_fn, params, rule_state, key, step):
    del key  # first-order updates are deterministic given the loss
    if self.trainable is None:
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, rule_state = self.optimizer.update(grads, rule_state, params)
      params = optax.apply_updates(params, updates)
    else:
      sub, rebuild = self._split(params)
      (loss, aux), grads = jax.value_and_grad(lambda s: loss_fn(rebuild(s)), has_aux=True)(sub)
      updates, rule_state = self.optimizer.update(grads, rule_state, sub)
      params = rebuild(optax.apply_updates(sub, updates))
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=self.schedule(step))
    return params, rule_state, metrics


RULES = ("adamw", "mezo", "dizo")
FREEZE = ("none", "embeddings")
PEFT = ("none", "lora")
frozen_embeddings = zeroth_order.frozen_embeddings  # what freeze="embeddings" keeps fixed


def trainable_predicate(freeze: str = "none", peft: str = "none") -> Optional[Predicate]:
  """The leaves a rule trains: all (None), all but the embeddings, or the LoRA factors."""
  if freeze not in FREEZE:
    raise ConfigError(f"freeze={freeze!r} is not one of {', '.join(map(repr, FREEZE))}.",
                      "use 'none' (MeZO's all-parameter setting) or 'embeddings'.")
  if peft not in PEFT:
    raise ConfigError(f"peft={peft!r} is not one of {', '.join(map(repr, PEFT))}.",
                      "use 'none' or 'lora'.")
  if peft == "lora":
    return lora.is_lora  # the base (embeddings included) is frozen whatever `freeze` says
  if freeze == "embeddings":
    return lambda names: not frozen_embeddings(names)
  return None


@dataclasses.dataclass(frozen=True)
class AdamWSettings:
  """AdamW with linear warmup, cosine decay and clipping (`make_optimizer`); num_steps is the
  schedule's length (make_rule sets it to total_steps)."""
  learning_rate: float
  warmup_steps: int = 0
  end_learning_rate_fraction: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.99
  grad_clip: float = 1.0
  num_steps: int = 1


@dataclasses.dataclass(frozen=True)
class ZOSettings:
  """MeZO's (and DiZO's MeZO part's) settings; the defaults: config/rule_settings.py."""
  learning_rate: float = 1e-6
  schedule: str = "constant"
  eps: float = 1e-3
  num_perturbations: int = 1
  weight_decay: float = 0.0
  noise: str = "gaussian"  # z's distribution: "gaussian" (MeZO's) | "rademacher" (±1)


@dataclasses.dataclass(frozen=True)
class DiZOSettings:
  """DiZO's projection settings; fresh_batches: a new batch per γ iteration (the reference's
  choice; the train step then takes 1 + iterations stacked batches)."""
  interval: int = 50
  iterations: int = 10
  eps_p: float = 0.1
  step_size: float = 2.0
  tau: float = 0.2
  targets: str = "kv"
  fresh_batches: bool = False


def make_rule(name: str, total_steps: int, *, adamw: Optional[AdamWSettings] = None,
              zo: ZOSettings = ZOSettings(), dizo_settings: DiZOSettings = DiZOSettings(),
              freeze: str = "none", peft: str = "none") -> UpdateRule:
  """The update rule `name` ("adamw" | "mezo" | "dizo") for a run of `total_steps` steps.

  freeze: "none" (every parameter, MeZO's own setting) | "embeddings" (`frozen_embeddings`
  fixed). peft: "none" | "lora" (only the LoRA factors under params["lora"] train; see
  `bdiff_jax/optim/lora.py`). Both apply to every rule; adamw needs `adamw` settings.
  """
  if name not in RULES:
    raise ConfigError(f"unknown update rule {name!r}.",
                      f"use one of {', '.join(map(repr, RULES))}.")
  trainable = trainable_predicate(freeze, peft)
  if name == "adamw":
    if adamw is None:
      raise ConfigError("the adamw rule needs its settings.", "pass adamw=AdamWSettings(...).")
    tc = dataclasses.replace(adamw, num_steps=int(total_steps))
    return FirstOrder(make_optimizer(tc), learning_rate_schedule(tc), trainable)
  lr = zeroth_order.learning_rate_schedule(zo, total_steps)
  kwargs = dict(eps=zo.eps, weight_decay=zo.weight_decay, num_perturbations=zo.num_perturbations,
                noise=zo.noise, trainable=trainable or (lambda names: True))
  if name == "mezo":
    return zeroth_order.MeZO(lr, **kwargs)
  if peft != "none":
    raise ConfigError("DiZO's projection acts on full weights, not on LoRA factors.",
                      "use mezo or adamw with peft='lora'.")
  d = dizo_settings
  targets = zeroth_order.kv_targets if d.targets == "kv" else zeroth_order.kernel_targets
  return dizo.DiZO(lr, interval=d.interval, iterations=d.iterations, eps_p=d.eps_p,
                   step_size=d.step_size, tau=d.tau, targets=targets,
                   fresh_batches=d.fresh_batches, **kwargs)


def batches_per_step(rule) -> int:
  """How many batches one train step of `rule` takes (stacked on a leading axis when > 1)."""
  return int(getattr(rule, "batches_per_step", 1))


def is_deterministic(rule) -> bool:
  """Whether `rule` evaluates its loss with the network in eval mode (no dropout)."""
  return bool(getattr(rule, "deterministic", False))


def trainable_count(rule, params) -> int:
  """How many parameters `rule` trains in `params` (all of them when it has no predicate)."""
  trainable = getattr(rule, "trainable", None)
  names, leaves, _ = zeroth_order.flat_leaves(params)
  return int(sum(v.size for nm, v in zip(names, leaves) if trainable is None or trainable(nm)))
