"""Parameters and peak train-step memory of a model, through `benchmarks.step_memory`.

A single-device training run reports the memory analysis of the step it compiled
(`modes.train.TrainResult.step_memory`): `StepMemory.record` keeps it, so that the harness does
not compile that step a second time (the numbers are identical; tests/test_compare.py checks).

The memory is that of the real train step (`train_step.make_train_step`: loss, backward,
clipping, AdamW, EMA, donated state) compiled for the run's batch of
`train.batch_size x data.seq_len` tokens, read from XLA's compiled memory analysis — the same
function and quantities as the memory benchmark (`bdiff_jax.benchmarks.memory`): temp
(activations and scratch), argument (state + batch), output (new state + metrics) and alias
(outputs written into the donated state) bytes; total = temp + argument + output, held =
total - alias. Nothing is computed: shapes only.
"""

import copy
from typing import Any

import ml_collections

from bdiff_jax.benchmarks import step_memory

MEMORY_FIELDS = ("temp_bytes", "argument_bytes", "output_bytes", "alias_bytes", "total_bytes",
                 "held_bytes")


def count_parameters(config: ml_collections.ConfigDict, vocab_size: int) -> int:
  """Parameters of config's model (shapes only)."""
  return step_memory.count_parameters(config, vocab_size)


def train_step_memory(config: ml_collections.ConfigDict, vocab_size: int) -> dict[str, Any]:
  """Byte counts (MEMORY_FIELDS) of config's compiled train step, and its "num_params"."""
  built = step_memory.compile_train_step(config, vocab_size)
  return {**{k: built.stats[k] for k in MEMORY_FIELDS}, "num_params": built.num_params}


class StepMemory:
  """`train_step_memory` for one vocabulary, compiled once per distinct config.

  Configs that differ only in their seed give the same program, so they share one measurement.
  """

  def __init__(self, vocab_size: int):
    self.vocab_size = int(vocab_size)
    self._cache: dict[str, dict[str, Any]] = {}

  @staticmethod
  def _key(config: ml_collections.ConfigDict) -> str:
    c = copy.deepcopy(config)
    c.seed = 0
    return c.to_json(sort_keys=True)

  def record(self, config: ml_collections.ConfigDict, stats: dict[str, Any],
             num_params: int) -> None:
    """Stores the measurement of config's step that its training compiled: the same program,
    so measuring it again would only compile it a second time."""
    self._cache[self._key(config)] = {**{k: int(stats[k]) for k in MEMORY_FIELDS},
                                      "num_params": int(num_params)}

  def __call__(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
    key = self._key(config)
    if key not in self._cache:
      self._cache[key] = train_step_memory(config, self.vocab_size)
    return self._cache[key]
