"""What train, eval and sample modes share: data, objective, network, update rule, restore.

Config -> data -> objective -> network -> update rule -> (abstract) TrainState -> checkpoint.
Eval and sample in a new process rebuild exactly this and restore into it, so they see what
training saw.

Placement (`inference_mesh`): in one process evaluation and sampling run on one device, the
restored parameters there. In a multi-process run every process takes part: the experiment
carries the run's global mesh, checkpoints are restored collectively into the training layout on
it, and the evaluator and the samplers run over it (process 0 alone writes their files).
"""

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import ml_collections

from bdiff_jax import models
from bdiff_jax.config import compat as config_compat
from bdiff_jax.data import pipeline
from bdiff_jax.data import tokenizer as tokenizer_lib
from bdiff_jax.errors import CheckpointError
from bdiff_jax.evaluation.evaluator import Evaluator
from bdiff_jax.objectives import Objective
from bdiff_jax.runtime import checkpointing
from bdiff_jax.runtime import sharding as sharding_lib
from bdiff_jax.train import builder
from bdiff_jax.train import train_state


@dataclasses.dataclass
class Experiment:
  config: Any
  workdir: str
  splits: Any
  objective: Objective
  network: Any
  update_rule: Any
  evaluator: Evaluator  # built once: periodic and final evaluations share its compilation
  # None: evaluation and sampling on one device; a multi-process run's global mesh (see above).
  mesh: Optional[Any] = None
  # (network, update rule, seq_len, abstract state) of the last `abstract_state()` call.
  _abstract: Optional[tuple] = dataclasses.field(default=None, init=False, repr=False,
                                                 compare=False)

  @property
  def tokenizer(self):
    return self.splits.tokenizer

  def _init_state(self) -> train_state.TrainState:
    head_bias = None
    if self.config.model.head_bias_init == "unigram":
      head_bias = train_state.unigram_log_probs(self.splits.train, self.network.spec.vocab_size)
    return train_state.init_train_state(self.network, self.update_rule, seed=self.config.seed,
                                        seq_len=self.config.data.seq_len, head_bias=head_bias)

  def init_state(self, shardings: Any = None) -> train_state.TrainState:
    """The initial state; with `shardings` (a pytree matching the state) created directly in
    that layout, so a sharded state never exists whole on one device."""
    # One compiled program instead of hundreds of small op-by-op initialiser dispatches.
    return jax.jit(self._init_state, out_shardings=shardings)()

  def abstract_state(self):
    """The state's shapes, dtypes and structure (`jax.eval_shape`: nothing is computed). A
    train run asks for it several times (the shardings, the model report, restoring); it is
    traced once for the experiment's network, update rule and sequence length, and again only
    when one of them is replaced (the wall-clock fit replaces the update rule). The initial
    head bias only sets values, so it is not computed here (`train_state.abstract_train_state`)."""
    network, rule, seq_len = self.network, self.update_rule, self.config.data.seq_len
    if self._abstract is not None:
      held_network, held_rule, held_seq_len, state = self._abstract
      if held_network is network and held_rule is rule and held_seq_len == seq_len:
        return state
    state = train_state.abstract_train_state(network, rule, seq_len=seq_len)
    self._abstract = (network, rule, seq_len, state)
    return state

  def num_params(self) -> int:
    return models.count_params(self.abstract_state().params)


def inference_mesh(config) -> Optional[Any]:
  """The mesh evaluation and sampling run on: None in one process (one device, as always); in a
  multi-process run the global mesh of `config.mesh`, the one training uses.

  Raises:
    ConfigError: the mesh does not fit the devices, or eval.batch_size is not a multiple of them.
  """
  if jax.process_count() == 1:
    return None
  mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
  sharding_lib.check_batch_divisible(config.eval.batch_size, mesh, "eval.batch_size")
  return mesh


def build(config, workdir: str, splits=None, mesh=None) -> Experiment:
  """The experiment of `config` in `workdir`. `splits`: data already loaded for another
  experiment on the same data and vocabulary (the caller checked the workdir's vocab.json), e.g.
  the judge of `--mode=sample`; None loads it (and writes or checks `<workdir>/vocab.json`).
  `mesh`: where evaluation and sampling run (`inference_mesh`; None: one device). The caller
  validated `config` (`configuration.validate`: every mode does, first thing)."""
  os.makedirs(workdir, exist_ok=True)
  if splits is None:
    splits = pipeline.load_wikitext2(config.data.to_dict(), workdir)
  objective, network = builder.build_model(config, vocab_size=splits.tokenizer.vocab_size,
                                           mask_id=splits.tokenizer.mask_id)
  evaluator = Evaluator(objective, network, seq_len=config.data.seq_len,
                        batch_size=config.eval.batch_size,
                        num_time_samples=config.eval.num_time_samples, mesh=mesh)
  return Experiment(config=config, workdir=workdir, splits=splits, objective=objective,
                    network=network, update_rule=builder.build_update_rule(config.train),
                    evaluator=evaluator, mesh=mesh)


def restore_params(exp: Experiment, which=None) -> tuple[Any, dict, str]:
  """(params for inference, checkpoint meta, description). EMA params when eval.use_ema.

  Without `exp.mesh` onto this process's first device, whatever mesh and processes saved the
  checkpoint (without a target placement orbax would refuse one saved by several processes:
  "topology mismatch"); with it (a multi-process run) every process restores together, straight
  into the training layout on the mesh."""
  which = exp.config.eval.checkpoint if which is None else which
  target = exp.abstract_state()
  if exp.mesh is None:
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: one_device, target)
  else:
    shardings = sharding_lib.state_shardings(target, exp.mesh)
  target = sharding_lib.with_shardings(target, shardings)
  ckpt = checkpointing.Checkpointer(exp.workdir, read_only=True)
  try:
    state, meta, desc = ckpt.restore(which, target)
  finally:
    ckpt.close()
  params = state.ema_params if exp.config.eval.use_ema else state.params
  return params, meta, desc + (" (EMA params)" if exp.config.eval.use_ema else "")


@dataclasses.dataclass(frozen=True)
class RestoredModel:
  """A trained workdir's model, for a start outside its own modes (a GLUE row)."""
  config: Any  # its config.json
  tokenizer: Any
  objective: Objective
  network: Any
  params: Any  # of the checkpoint asked for (EMA params when its eval.use_ema)
  where: str  # "<workdir> (<checkpoint>)"


def restore_model(workdir: str, which) -> RestoredModel:
  """The model of `workdir`: its config.json (the saved-config loader), vocab.json, the objective
  and network built from them, and the params of checkpoint `which`."""
  saved = config_compat.load_saved_config(workdir)
  if saved is None:
    raise CheckpointError(f"{os.path.join(workdir, config_compat.CONFIG_FILE)} does not exist.",
                          "point at a trained bdiff workdir.")
  cfg = ml_collections.ConfigDict(saved)
  tok = tokenizer_lib.load_tokenizer(os.path.join(workdir, "vocab.json"))
  objective, network = builder.build_model(cfg, vocab_size=tok.vocab_size, mask_id=tok.mask_id)
  abstract = train_state.abstract_train_state(network, builder.build_update_rule(cfg.train),
                                              seq_len=cfg.data.seq_len)
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    state, _, desc = ckpt.restore(which, abstract)
  finally:
    ckpt.close()
  params = state.ema_params if cfg.eval.use_ema else state.params
  return RestoredModel(config=cfg, tokenizer=tok, objective=objective, network=network,
                       params=params, where=f"{workdir} ({desc})")


def config_for_workdir(config, workdir: str, explicit_overrides=()) -> tuple[Any, list]:
  """(config, [(field, current, saved)]) for eval/sample in a trained workdir: the model,
  objective and data fields come from its config.json (fields set explicitly on the command
  line are checked against it), so any config file evaluates any workdir."""
  saved = config_compat.load_saved_config(workdir)
  if saved is None:
    return config, []
  restored = config_compat.config_for_restore(config, saved, explicit_overrides)
  taken = config_compat.differences(json.loads(restored.to_json()), config,
                                    config_compat.INCOMPATIBLE_FIELDS)
  return restored, [(f, cur, old) for f, old, cur in taken]
