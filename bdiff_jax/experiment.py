"""What train, eval and sample modes share: data, network, optimizer and checkpoint restore.

Config -> data -> network -> (optimizer, abstract TrainState) -> checkpoint. Eval and sample in
a new process rebuild exactly this and restore into it, so they see what training saw.
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax import checkpointing, configuration, models, train
from bdiff_jax.data import pipeline


@dataclasses.dataclass
class Experiment:
  config: Any
  workdir: str
  splits: Any
  network: Any
  optimizer: Any

  @property
  def tokenizer(self):
    return self.splits.tokenizer

  def init_state(self) -> train.TrainState:
    # One compiled program instead of hundreds of small op-by-op initialiser dispatches.
    return jax.jit(self._init_state)()

  def _init_state(self) -> train.TrainState:
    params_key, train_key = jax.random.split(jax.random.PRNGKey(self.config.seed))
    params = models.init_params(self.network, params_key, seq_len=self.config.data.seq_len)
    if "head_bias" in params and self.config.model.head_bias_init == "unigram":
      params = dict(params, head_bias=unigram_log_probs(self.splits.train,
                                                        self.network.spec.vocab_size))
    return train.create_train_state(params, self.optimizer, train_key)

  def abstract_state(self):
    return jax.eval_shape(self._init_state)

  def num_params(self) -> int:
    return models.count_params(self.abstract_state().params)


def unigram_log_probs(tokens, vocab_size: int):
  """Add-one smoothed log frequencies of the train tokens, float32 [vocab_size]."""
  counts = np.bincount(np.asarray(tokens), minlength=vocab_size)[:vocab_size] + 1.0
  return jnp.asarray(np.log(counts / counts.sum()), jnp.float32)


def build(config, workdir: str) -> Experiment:
  configuration.validate(config)
  os.makedirs(workdir, exist_ok=True)
  splits = pipeline.load_wikitext2(config.data, workdir)
  network = models.build_network(config.model, vocab_size=splits.tokenizer.vocab_size,
                                 max_len=config.data.seq_len)
  return Experiment(config=config, workdir=workdir, splits=splits, network=network,
                    optimizer=train.make_optimizer(config.train))


def restore_params(exp: Experiment, which=None) -> tuple[Any, dict, str]:
  """(params for inference, checkpoint meta, description). EMA params when eval.use_ema."""
  which = exp.config.eval.checkpoint if which is None else which
  ckpt = checkpointing.Checkpointer(exp.workdir, read_only=True)
  try:
    state, meta, desc = ckpt.restore(which, exp.abstract_state())
  finally:
    ckpt.close()
  params = state.ema_params if exp.config.eval.use_ema else state.params
  return params, meta, desc + (" (EMA params)" if exp.config.eval.use_ema else "")


def save_config(config, workdir: str, filename: str) -> None:
  with open(os.path.join(workdir, filename), "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=2))
