"""The rows of the GLUE benchmark: (network, initial params, encoder, objective, update rule).

A row is written `model:rule[:head][:lora]` (config `glue.rows`, comma-separated):

  model  reversible_qwen3 | standard_qwen3   a bdiff network with the Qwen3 block, from scratch
                                             (shape `glue.bdiff.model`, objective
                                             `glue.bdiff.model.objective`, word vocabulary of the
                                             task's train text) or restored from a bdiff
                                             workdir: `glue.init_workdir_reversible` /
                                             `glue.init_workdir_standard` (else
                                             `glue.init_workdir`): its config.json, vocab.json
                                             and orbax checkpoint `glue.init_checkpoint`; the
                                             backbone must match.
         opt                                 OPT from `glue.opt_dir`: a Hugging Face OPT
                                             directory (its weights and BPE tokenizer), or a
                                             bdiff workdir trained with model.backbone=opt
                                             (configs/wikitext2.py:cpu_opt; told apart by its
                                             config.json's `model` section): its word
                                             vocabulary and checkpoint `glue.init_checkpoint`.
  rule   adamw (first order, `glue.adamw`) | mezo | dizo (zeroth order, `glue.zo`, `glue.dizo`).
  head   a pooled linear head (the non-prompt baseline) instead of prompt scoring.
  lora   parameter-efficient (MeZO's LoRA variant): only LoRA factors on the attention
         query/value kernels train (rank `glue.lora_rank`, alpha `glue.lora_alpha`).

Prompt scoring follows the network: a causal LM (OPT, an autoregressive bdiff model) scores
candidates causally, a masked-diffusion model at a [MASK] (`glue/objectives.py`).
"""

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from bdiff_jax import models
from bdiff_jax.data import tokenizer as tokenizer_lib
from bdiff_jax.data.bpe_tokenizer import load_bpe_tokenizer
from bdiff_jax.errors import CheckpointError, ConfigError
from bdiff_jax.glue import encoding as glue_encoding
from bdiff_jax.glue import objectives as classification
from bdiff_jax.glue import prompts as glue_prompts
from bdiff_jax.glue.tasks import GlueSplit
from bdiff_jax.models.classifier import OPTLM, PooledClassifier
from bdiff_jax.models.hf_checkpoint import load_opt
from bdiff_jax.optim import lora
from bdiff_jax.optim import update_rule
from bdiff_jax.train import builder
from bdiff_jax.train import experiment
from bdiff_jax.train.train_step import make_train_step

BDIFF_MODELS = {"reversible_qwen3": "reversible", "standard_qwen3": "standard"}
MODELS = (*BDIFF_MODELS, "opt")
RULES = ("adamw", "mezo", "dizo")


@dataclasses.dataclass(frozen=True)
class RowSpec:
  model: str
  rule: str
  head: bool
  peft: str = "none"  # "lora": only LoRA factors (and a head's classifier) train

  @property
  def name(self) -> str:
    return (f"{self.rule}_{self.model}" + ("_head" if self.head else "") +
            ("_lora" if self.peft == "lora" else ""))


ROW_OPTIONS = ("head", "lora")


def parse_rows(text: str) -> list[RowSpec]:
  """`"opt:mezo,opt:mezo:lora,standard_qwen3:adamw:head"` -> RowSpecs; raises ConfigError on a
  bad entry. Options after the rule: `head` (a pooled head instead of prompt scoring), `lora`
  (parameter-efficient: LoRA factors on the attention query/value kernels, `glue.lora_rank`,
  `glue.lora_alpha`; not with dizo, whose projection needs the full layer weights)."""
  rows = []
  for item in [s.strip() for s in str(text).split(",") if s.strip()]:
    parts = item.split(":")
    opts = parts[2:]
    ok = (len(parts) >= 2 and parts[0] in MODELS and parts[1] in RULES and
          all(o in ROW_OPTIONS for o in opts) and len(set(opts)) == len(opts))
    if not ok:
      raise ConfigError(f"glue.rows entry {item!r} is not model:rule[:head][:lora].",
                        f"use models {MODELS}, rules {RULES}, options {ROW_OPTIONS}, e.g. "
                        "'opt:mezo' or 'opt:mezo:lora'.")
    if parts[1] == "dizo" and "lora" in opts:
      raise ConfigError(f"glue.rows entry {item!r}: DiZO projects whole layer weights, which "
                        "a LoRA row does not train.", "use mezo:lora or adamw:lora, or dizo "
                        "without lora.")
    rows.append(RowSpec(parts[0], parts[1], "head" in opts, "lora" if "lora" in opts else "none"))
  if not rows:
    raise ConfigError("glue.rows is empty.", "list at least one row, e.g. 'opt:mezo'.")
  return rows


@dataclasses.dataclass
class Row:
  """Everything one benchmark row trains with."""
  spec: RowSpec
  network: Any  # flax module with the bdiff network interface
  params: Any  # initial parameters
  encoder: Any  # glue.encoding.WordEncoder | BPEEncoder
  scoring: str  # "causal" | "cloze" | "head"
  objective: classification.ClassificationObjective
  rule: Any  # update_rule.UpdateRule
  init: str  # what the parameters were initialised from
  time_of_fraction: Any = float
  ema_decay: float = 0.0  # > 0: an EMA of the parameters is what is evaluated and selected


@dataclasses.dataclass
class RowPrograms:
  """What the seeds of one row on one task share: the first seed's network, objective and
  update rule (`adopt`: the seeds change the parameters and the data, not the program), and
  what is compiled from them once (`compile`): the train step (`make_train_step`) and the
  candidate scorer. `stop` (a `runtime.interrupt.GracefulInterrupt`, optional) is checked
  after every train step."""
  stop: Any = None
  network: Any = None
  objective: Any = None
  rule: Any = None
  ema_decay: float = 0.0  # the row's (Row.ema_decay): evaluate state.ema_params when > 0
  step: Any = None  # the train step, compiled for the first seed's state and batch
  scored: Any = None  # jitted (params, batch) -> (scores float[B, C], readout [B, D] or None)

  def scores(self, params, batch):
    """Candidate scores float[B, C] (the objective's `scores_and_readout`, compiled once)."""
    return self.scored(params, batch)[0]

  def readout(self, params, batch):
    """The final hidden states [B, D] where the candidates are read, or None (glue/probe.py)."""
    return self.scored(params, batch)[1]

  def adopt(self, row: Row) -> None:
    """The first seed's parts for `row` (or `row`'s, when it is the first seed's): not its
    parameters, which would stay in memory for the task's remaining seeds."""
    if self.network is None:
      self.network, self.objective, self.rule = row.network, row.objective, row.rule
      self.ema_decay = float(row.ema_decay)
    else:
      row.network, row.objective, row.rule = self.network, self.objective, self.rule

  def compile(self, state, batch) -> None:
    """Compiles the train step for `state` and `batch` and jits the scorer, once."""
    if self.step is not None:
      return
    network, objective = self.network, self.objective
    self.scored = jax.jit(lambda p, b: objective.scores_and_readout(
        models.bind(network, p, train=False), b))
    step_fn = make_train_step(objective, network, self.rule, ema_decay=self.ema_decay)
    self.step = step_fn.lower(state, batch).compile()


def _scratch_vocab(train: GlueSplit) -> tokenizer_lib.WordTokenizer:
  """A word vocabulary of the task's train text plus the template words of each candidate."""
  p = glue_prompts.render(train.task, train[0], spacing="word")
  lines = [" ".join(seg[i] for seg in train.texts) for i in range(len(train))]
  return tokenizer_lib.WordTokenizer.from_corpus(
      lines + [p.text(c) for c in range(len(p.candidates))])


def _restore_bdiff(workdir: str, which: str):
  """(network spec, tokenizer, objective, network, params, where) of a bdiff workdir's
  checkpoint; the spec (`models.ModelSpec`) says its backbone, block and positions (its
  config.json's model fields and data.seq_len)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{path} does not exist.",
                          "set glue.init_workdir to a trained bdiff workdir (or '' for scratch).")
  m = experiment.restore_model(workdir, which)
  return m.network.spec, m.tokenizer, m.objective, m.network, m.params, m.where


def _workdir_model(directory: str):
  """The `model` section of a bdiff workdir's config.json, or None for anything else (e.g. a
  Hugging Face checkpoint directory, whose config.json has no such section)."""
  try:
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return None  # the Hugging Face loader reports a missing or unreadable config.json
  model = saved.get("model") if isinstance(saved, dict) else None
  return model if isinstance(model, dict) else None


def _opt(glue):
  """(network, params, encoder, init) of an `opt` row: a Hugging Face OPT checkpoint, or a
  bdiff workdir trained with backbone "opt" (the same architecture, a word vocabulary)."""
  model = _workdir_model(glue.opt_dir)
  if model is None:
    opt_config, opt_params = load_opt(glue.opt_dir)
    encoder = glue_encoding.BPEEncoder(load_bpe_tokenizer(glue.opt_dir))
    n = models.count_params(opt_params)
    init = f"OPT, {n / 1e6:.1f} M parameters ({n:,}), BPE, {glue.opt_dir}"
    return OPTLM(opt_config), {"opt": opt_params}, encoder, init
  if model.get("backbone") != "opt":
    raise ConfigError(f"glue.opt_dir={glue.opt_dir} is a bdiff workdir with backbone "
                      f"{model.get('backbone')!r}, not an OPT model.",
                      "point glue.opt_dir at a Hugging Face OPT directory or at a workdir "
                      "trained with configs/wikitext2.py:cpu_opt (model.backbone=opt).")
  spec, tok, _, network, params, where = _restore_bdiff(glue.opt_dir, glue.init_checkpoint)
  if int(glue.seq_len) > int(spec.max_len):
    raise ConfigError(f"glue.seq_len={glue.seq_len} exceeds the {spec.max_len} learned "
                      f"positions of the OPT model in {glue.opt_dir}.",
                      f"set --config.glue.seq_len to at most {spec.max_len}.")
  n = models.count_params(params)
  init = (f"OPT architecture pretrained on WikiText-2 (autoregressive), {where}, "
          f"{n / 1e6:.1f} M parameters ({n:,}), word-level")
  return network, params, glue_encoding.WordEncoder(tok), init


def init_workdir(glue, model: str) -> str:
  """The bdiff workdir the row `model` starts from: `glue.init_workdir_<backbone>` when set,
  else `glue.init_workdir` ('' = from scratch)."""
  return str(getattr(glue, f"init_workdir_{BDIFF_MODELS[model]}") or glue.init_workdir)


def _bdiff(spec: RowSpec, glue, train: GlueSplit, key):
  workdir = init_workdir(glue, spec.model)
  if workdir:
    saved, tok, lm_obj, network, params, init = _restore_bdiff(workdir, glue.init_checkpoint)
    if saved.backbone != BDIFF_MODELS[spec.model] or saved.block != "qwen3":
      raise ConfigError(f"{workdir} holds a {saved.backbone}/{saved.block} "
                        f"model, not {spec.model}.", "drop that row or use a matching workdir "
                        f"(glue.init_workdir_{BDIFF_MODELS[spec.model]}).")
  else:
    model = {**glue.bdiff["model"], "backbone": BDIFF_MODELS[spec.model], "block": "qwen3"}
    tok = _scratch_vocab(train)
    lm_obj, network = builder.build_model({**glue.bdiff, "model": model},
                                          vocab_size=tok.vocab_size, mask_id=tok.mask_id,
                                          max_len=glue.seq_len)
    params = models.init_params(network, key, seq_len=glue.seq_len)
    init = "from scratch"
  n = models.count_params(params)
  init = (f"Qwen3-style ({BDIFF_MODELS[spec.model]}), {n / 1e6:.1f} M parameters ({n:,}), "
          f"word-level, {init}")
  timed = lm_obj.uses_time and lm_obj.time_conditioned
  tof = lm_obj.time_of_masked_fraction() if timed else float
  return tok, lm_obj.causal, timed, network, params, init, tof


def build_row(spec: RowSpec, glue, train: GlueSplit, *, seed: int, total_steps: int) -> Row:
  """The row `spec` for a task whose (full) train split is `train`; params drawn from `seed`."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  regression = train.is_regression
  if spec.model == "opt":
    network, params, encoder, init = _opt(glue)
    causal, timed, tof = True, False, float
  else:
    tok, causal, timed, network, params, init, tof = _bdiff(spec, glue, train, key)
    encoder = glue_encoding.WordEncoder(tok)
  if spec.head:
    num_out = 1 if regression else train.num_labels
    network = PooledClassifier(network, num_out, causal)
    dummy = jnp.zeros((1, 4), jnp.int32)
    fresh = network.init({"params": jax.random.fold_in(key, 2)}, dummy, jnp.zeros((1,)),
                         padding_mask=jnp.ones((1, 4), bool))["params"]
    params = {"backbone": {k: v for k, v in params.items() if k in fresh["backbone"]},
              "classifier": fresh["classifier"]}
    objective = classification.PooledHead(causal=causal, time_conditioned=timed,
                                          regression=regression)
    scoring = "head"
  elif causal:
    objective, scoring = classification.CausalPrompt(regression=regression), "causal"
  else:
    objective = classification.ClozePrompt(time_conditioned=timed, regression=regression)
    scoring = "cloze"
  if spec.peft == "lora":
    train_also = (lambda names: names[0] == "classifier") if spec.head else None
    network, params = lora.wrap(network, params, jax.random.fold_in(key, 3),
                                rank=int(glue.lora_rank), alpha=float(glue.lora_alpha),
                                train_also=train_also)
    init += f"; LoRA rank {int(glue.lora_rank)}, alpha {float(glue.lora_alpha):g} on q/v"
  return Row(spec=spec, network=network, params=params, encoder=encoder, scoring=scoring,
             objective=objective, rule=build_rule(spec.rule, glue, total_steps, peft=spec.peft),
             init=init, time_of_fraction=tof,
             ema_decay=float(glue.adamw["ema_decay"]) if spec.rule == "adamw" else 0.0)


def _frozen(names) -> bool:
  """The leaves freeze="embeddings" keeps fixed: token and position embeddings (bdiff `embed`,
  OPT's tables); the same set as the LM train mode's (`update_rule.frozen_embeddings`)."""
  return update_rule.frozen_embeddings(names)


def build_rule(name: str, glue, total_steps: int, *, peft: str = "none"):
  """The update rule `name` with the row budget `total_steps` (for LR schedules): a thin call
  into `train.builder.update_rule_from_sections` (the LM train mode's too) with the sections
  `glue.adamw` / `glue.zo` / `glue.dizo`.

  Zeroth-order rules freeze by `glue.zo.freeze` ("none" | "embeddings"); AdamW trains every
  parameter. peft ("none" | "lora") selects LoRA (the row's params must then be lora.wrap's).
  DiZO draws a fresh batch per γ iteration when `glue.dizo.fresh_batches` (the step then takes
  `update_rule.batches_per_step(rule)` stacked batches).
  """
  if name == "adamw":
    return builder.update_rule_from_sections("adamw", total_steps, adamw=glue.adamw, peft=peft)
  return builder.update_rule_from_sections(name, total_steps, zo=glue.zo, dizo=glue.dizo,
                                           peft=peft)


def forward_passes(rule, num_steps: int) -> dict:
  """Forward (and backward) passes over a batch that `num_steps` steps of `rule` take.

  First order: one forward and one backward per step. MeZO: 2 forwards per perturbation per
  step. DiZO: MeZO's plus 2 per gamma iteration at each projection step (step % interval ==
  interval - 1), as `dizo.DiZO.update` runs them, whether each γ iteration has a batch of its
  own (fresh_batches) or not. LoRA or frozen embeddings change no count (every pass runs the
  whole network; LoRA's merge is not a pass over the batch).
  """
  n = getattr(rule, "num_perturbations", None)
  if n is None:
    return {"forward": num_steps, "backward": num_steps}
  fwd = 2 * n * num_steps
  interval = getattr(rule, "interval", None)
  if interval:
    fwd += 2 * rule.iterations * (num_steps // interval)
  return {"forward": fwd, "backward": 0}
