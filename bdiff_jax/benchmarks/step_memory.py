"""Compile the real train step for a config and read XLA's memory analysis: one definition for
the memory benchmark and the comparison harness.

The step is `bdiff_jax.train.train_step.make_train_step` (loss, backward or zeroth-order update,
EMA, donated state) of the configured objective, network and update rule, compiled for a batch
of `train.batch_size x data.seq_len` token ids — from shapes alone, nothing is computed.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from bdiff_jax import models
from bdiff_jax.runtime.platform_info import memory_stats  # re-exported: the one definition
from bdiff_jax.train import builder
from bdiff_jax.train import train_state
from bdiff_jax.train.train_step import make_train_step


@dataclasses.dataclass
class StepParts:
  """What the train step of a config is made of, from shapes alone (nothing computed)."""
  objective: Any
  network: Any
  rule: Any
  abstract_state: Any  # jax.ShapeDtypeStruct leaves

  @property
  def num_params(self) -> int:
    return models.count_params(self.abstract_state.params)


def step_parts(config, vocab_size: int) -> StepParts:
  """The objective, network, update rule and abstract train state of `config`."""
  seq_len = int(config.data.seq_len)
  objective, network = builder.build_model(config, vocab_size=vocab_size, max_len=seq_len)
  rule = builder.build_update_rule(config.train)
  state = train_state.abstract_train_state(network, rule, seq_len=seq_len)
  return StepParts(objective=objective, network=network, rule=rule, abstract_state=state)


def count_parameters(config, vocab_size: int) -> int:
  """Parameters of `config`'s network for `vocab_size` real tokens (shapes only)."""
  return step_parts(config, vocab_size).num_params


@dataclasses.dataclass
class CompiledStep:
  """The train step of a config, compiled for its batch shape."""
  network: Any
  rule: Any
  abstract_state: Any  # jax.ShapeDtypeStruct leaves
  compiled: Any  # compiled(state, batch) -> (state, metrics)
  stats: dict  # memory_stats(compiled)

  @property
  def num_params(self) -> int:
    return models.count_params(self.abstract_state.params)


def compile_train_step(config, vocab_size: int, *, batch_size: int = 0) -> CompiledStep:
  """Builds and compiles the train step of `config` for `vocab_size` real tokens, for a batch of
  `batch_size` (default `train.batch_size`) x `data.seq_len` token ids."""
  parts = step_parts(config, vocab_size)
  batch_size = int(batch_size or config.train.batch_size)
  step = make_train_step(parts.objective, parts.network, parts.rule,
                         ema_decay=config.train.ema_decay)
  tokens = jax.ShapeDtypeStruct((batch_size, int(config.data.seq_len)), jnp.int32)
  compiled = step.lower(parts.abstract_state, tokens).compile()
  return CompiledStep(network=parts.network, rule=parts.rule,
                      abstract_state=parts.abstract_state, compiled=compiled,
                      stats=memory_stats(compiled))
