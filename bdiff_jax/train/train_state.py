"""`TrainState` and its one initialisation.

The state is everything a step reads and writes: the step counter, the parameters, their EMA, the
update rule's state (`opt_state`: optax state for AdamW, the perturbation bookkeeping of a
zeroth-order rule) and the run's root key. Per-step keys are `fold_in(rng, step)`, so a resumed
run draws exactly what an uninterrupted run would.
"""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax import models
from bdiff_jax.evaluation import baselines


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar
  params: Any
  ema_params: Any
  opt_state: Any  # the update rule's state
  rng: jnp.ndarray  # raw uint32[2] key; per-step keys are fold_in(rng, step)


def create_train_state(params, update_rule, key) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=update_rule.init(params), rng=key)


def unigram_log_probs(tokens, vocab_size: int) -> jnp.ndarray:
  """The unigram baseline's add-one log frequencies of `tokens`, float32 [vocab_size]."""
  return jnp.asarray(baselines.unigram_log_probs(np.asarray(tokens), vocab_size), jnp.float32)


def init_train_state(network, update_rule, *, seed: int, seq_len: int,
                     head_bias: Optional[jnp.ndarray] = None) -> TrainState:
  """The initial state of a run with `seed` (pure; jit it, or `jax.eval_shape` it for shapes).

  `head_bias`, a distribution over the V words as log-probabilities (e.g. `unigram_log_probs`
  of the train split), when given and the network has an output bias, sets the initial biases
  so that the head predicts it when its kernels are zero.
  """
  params_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  params = models.init_params(network, params_key, seq_len=seq_len)
  if head_bias is not None and "head_bias" in params:
    # The distribution head_bias [V] as the head's output biases (an adaptive head splits it
    # into its shortlist-and-clusters bias and each cluster's own).
    biases = models.output_bias_params(network.spec, head_bias)
    params = dict(params, **{k: jnp.asarray(v, params[k].dtype) for k, v in biases.items()})
  return create_train_state(params, update_rule, train_key)


def abstract_train_state(network, update_rule, *, seq_len: int) -> TrainState:
  """Shapes and dtypes of the state (`jax.ShapeDtypeStruct` leaves), without computing it."""
  return jax.eval_shape(lambda: init_train_state(network, update_rule, seed=0, seq_len=seq_len))
