"""The pure train step: `(state, batch) -> (state, metrics)`, jitted with the state donated.

The objective supplies the loss, the update rule turns it into new parameters (first order:
gradients + optax; zeroth order: perturbed forward passes), and the step keeps the EMA.
Randomness: the per-step key `fold_in(state.rng, state.step)` is split into the objective's noise
key (times, masks), the dropout key and the update rule's key, so a resumed run draws exactly
what an uninterrupted run would.

The rule's `deterministic` (MeZO/DiZO) binds the network in eval mode (no dropout). A rule with
`batches_per_step` n > 1 (DiZO with fresh batches) gets a batch of n stacked batches (leading
axis n) and the loss `loss_fn(params, i=0)` of batch i, whose objective/dropout key is
fold_in(loss key, i); with n = 1 the step is exactly the single-batch one.
"""

from typing import Any, Callable, Optional

import jax
from jax.sharding import Mesh

from bdiff_jax import models
from bdiff_jax.optim import update_rule as update_rule_lib
from bdiff_jax.runtime import sharding as sharding_lib
from bdiff_jax.train.train_state import TrainState


def loss_fn(params, objective, network, tokens, key, *, train: bool = True):
  """The objective's training loss of one batch -> (loss, aux); `key` is split for noise and
  dropout."""
  noise_key, dropout_key = jax.random.split(key)
  apply = models.bind(network, params, train=train, dropout_key=dropout_key)
  return objective.loss(apply, tokens, noise_key)


def make_train_step(objective, network, update_rule, *, ema_decay: float,
                    mesh: Optional[Mesh] = None, state_shardings: Any = None) -> Callable:
  """Returns a jitted `step(state, batch) -> (state, metrics)` with the state donated.

  With a `mesh`, the batch comes in split over its devices (`sharding.batch_sharding`) and the
  state in and out with `state_shardings` (a pytree of shardings matching the state, e.g.
  `sharding.state_shardings(abstract_state, mesh)`; None: replicated); metrics are replicated.
  Without a mesh, placement is left to JAX.
  """
  ema_decay = float(ema_decay)
  train = not update_rule_lib.is_deterministic(update_rule)
  num_batches = update_rule_lib.batches_per_step(update_rule)
  if num_batches > 1 and mesh is not None:
    raise ValueError(f"a rule with {num_batches} batches per step runs without a mesh only "
                     "(the stacked axis would be split over the devices).")

  gather = None
  if mesh is not None and state_shardings is not None and (
      sharding_lib.axis_size(mesh, sharding_lib.FSDP_AXIS) > 1):
    gather = sharding_lib.replicated(mesh)

  def step(state: TrainState, batch):
    key = jax.random.fold_in(state.rng, state.step)
    loss_key, rule_key = jax.random.split(key)

    if num_batches > 1:
      for leaf in jax.tree_util.tree_leaves(batch):
        if leaf.ndim < 1 or leaf.shape[0] != num_batches:
          raise ValueError(f"the rule takes {num_batches} stacked batches per step; got a "
                           f"batch leaf of shape {leaf.shape} (stack them on axis 0).")

    def bound_loss(params, i=0):
      """The loss of the step's batch; with stacked batches, of batch `i` (its own key)."""
      if gather is not None:
        # FSDP: the forward/backward pass uses whole (all-gathered) weights on batch-sharded
        # activations; gradients are reduce-scattered back onto the parameter shards. Without
        # this XLA may instead keep weights split and replicate the activations (4x the
        # temporaries of the replicated step in scripts/scaleout_memory.py).
        params = jax.lax.with_sharding_constraint(params, gather)
      if num_batches == 1:
        return loss_fn(params, objective, network, batch, loss_key, train=train)
      one = jax.tree_util.tree_map(lambda x: x[i], batch)
      return loss_fn(params, objective, network, one, jax.random.fold_in(loss_key, i),
                     train=train)

    params, opt_state, metrics = update_rule.update(bound_loss, state.params, state.opt_state,
                                                    rule_key, state.step)
    if ema_decay > 0:
      ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                   state.ema_params, params)
    else:
      ema = params
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state)
    return new_state, metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  replicated = sharding_lib.replicated(mesh)
  state_in = replicated if state_shardings is None else state_shardings
  return jax.jit(step, donate_argnums=0,
                 in_shardings=(state_in, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(state_in, replicated))
