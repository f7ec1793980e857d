"""Update rules: how one train step turns a loss function into new parameters.

The train step hands every rule the same things and asks for the same things back:

    rule.init(params) -> rule_state                       (a pytree, checkpointed)
    rule.update(loss_fn, params, rule_state, key, step) -> (params, rule_state, metrics)

`loss_fn(params) -> (loss, aux)` has the batch and the objective's randomness already bound, so
evaluating it twice sees the same masks and dropout. A first-order rule differentiates it; a
zeroth-order rule (MeZO/DiZO, `bdiff_jax/zeroth_order.py`) evaluates it at perturbed parameters
and keeps no gradient buffer. `key` is this step's own key for the rule's randomness
(perturbation directions); `step` the 0-based step being taken (traced). Everything runs inside
one jitted step with the state donated.
"""

from typing import Any, Callable, Protocol

import jax
import optax

from bdiff_jax import dizo, zeroth_order
from bdiff_jax.errors import ConfigError

LossFn = Callable[[Any], tuple[jax.Array, dict]]


class UpdateRule(Protocol):
  """What the train step needs from an update rule."""

  name: str

  def init(self, params) -> Any:
    ...

  def update(self, loss_fn: LossFn, params, rule_state, key: jax.Array,
             step: jax.Array) -> tuple[Any, Any, dict]:
    ...


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `end_learning_rate_fraction`."""
  lr = train_config.learning_rate
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=train_config.warmup_steps,
      decay_steps=max(train_config.num_steps, train_config.warmup_steps + 1),
      end_value=lr * train_config.end_learning_rate_fraction)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay and global-norm clipping; no decay on vectors."""
  decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
  # The clip slot is always present (identity when grad_clip=0) so that the optimizer state has
  # the same structure whatever the value: a run can be resumed with clipping changed.
  parts = [optax.clip_by_global_norm(train_config.grad_clip) if train_config.grad_clip > 0
           else optax.identity()]
  parts.append(optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1,
                           b2=train_config.b2, weight_decay=train_config.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)


class FirstOrder:
  """Backpropagation + an optax optimizer (AdamW with warmup/cosine and clipping by default)."""

  name = "adamw"

  def __init__(self, optimizer: optax.GradientTransformation, schedule: optax.Schedule):
    self.optimizer = optimizer
    self.schedule = schedule

  def init(self, params):
    return self.optimizer.init(params)

  def update(self, loss_fn, params, rule_state, key, step):
    del key  # first-order updates are deterministic given the loss
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, rule_state = self.optimizer.update(grads, rule_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=self.schedule(step))
    return params, rule_state, metrics


RULES = ("adamw", "mezo", "dizo")


def zeroth_order_rule(train_config, total_steps: int, name: str):
  """MeZO or DiZO ("mezo" | "dizo") from config.train.zo / config.train.dizo."""
  if name not in ("mezo", "dizo"):
    raise ConfigError(f"unknown zeroth-order update rule {name!r}.", "use 'mezo' or 'dizo'.")
  zeroth_order.validate(train_config)
  z = train_config.zo
  kwargs = dict(eps=z.eps, weight_decay=z.weight_decay, num_perturbations=z.num_perturbations,
                freeze_embeddings=z.freeze_embeddings)
  lr = zeroth_order.learning_rate_schedule(z, total_steps)
  if name == "mezo":
    return zeroth_order.MeZO(lr, **kwargs)
  d = train_config.dizo
  targets = zeroth_order.kv_targets if d.targets == "kv" else zeroth_order.kernel_targets
  return dizo.DiZO(lr, interval=d.interval, iterations=d.iterations, eps_p=d.eps_p,
                   step_size=d.step_size, tau=d.tau, targets=targets, **kwargs)


def build_update_rule(train_config) -> UpdateRule:
  """The update rule of `config.train.update_rule`: AdamW (first order), MeZO or DiZO."""
  name = train_config.update_rule
  if name not in RULES:
    raise ConfigError(f"config.train.update_rule={name!r} is not one of "
                      f"{', '.join(map(repr, RULES))}.", "pass one of those values.")
  if name in ("mezo", "dizo"):
    return zeroth_order_rule(train_config, train_config.num_steps, name)
  return FirstOrder(make_optimizer(train_config), learning_rate_schedule(train_config))
