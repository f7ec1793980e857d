"""`--mode=sample`: restore a checkpoint, draw samples (optionally around a prompt), report them
and write them to `<workdir>/samples_step<N>.txt`; for unconditional samples also a table of
their quality (`bdiff_jax/evaluation/sample_quality.py`: generative perplexity under the judge
`config.sample.judge_workdir`, unigram entropy) at the step counts `config.sample.quality_steps`,
reported and written to `<workdir>/sample_quality_step<N>.json`. Neither file is ever
overwritten (`_1`, `_2`, ... are added).

Keys: every draw takes fold_in(PRNGKey(sample.seed), i), with i the step count of a draw of the
sampled model (>= 1; the samples file is its draw at sample.num_steps, which the table scores
too) and i = JUDGE_KEY_INDEX = 0 for the judge's own samples. The root key itself is never used,
so no two draws share a key.

Multi-process (`bdiff_jax/runtime/distributed.py`): every process restores the checkpoint (and the
judge's) onto the global mesh and runs the same samplers and judge over it
(`experiment.inference_mesh`), so all hold the same samples and table; process 0 alone holds the
workdir lock, reports and writes the files.
"""

import dataclasses
import os
from typing import Any, Optional

import jax
import numpy as np

from bdiff_jax.config import compat as config_compat
from bdiff_jax.config import configuration
from bdiff_jax.data import tokenizer as tokenizer_lib
from bdiff_jax.errors import ConfigError, UserError
from bdiff_jax.evaluation import sample_quality
from bdiff_jax.modes import evaluate as evaluate_mode
from bdiff_jax.objectives import SampleSettings, objective_class
from bdiff_jax.runtime import checkpointing
from bdiff_jax.runtime import distributed
from bdiff_jax.runtime import sharding as sharding_lib
from bdiff_jax.runtime import workdir as workdir_lib
from bdiff_jax.runtime.reporter import Reporter
from bdiff_jax.train import experiment

JUDGE_KEY_INDEX = 0  # the model's draws use their step count (>= 1)


def draw_key(seed: int, index: int) -> jax.Array:
  """The key of one draw: fold_in(PRNGKey(seed), index) (see the module docstring)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), index)


@dataclasses.dataclass
class Judge:
  """The autoregressive model that scores samples: its experiment, restored parameters and
  checkpoint."""
  exp: experiment.Experiment
  params: Any
  desc: str
  step: Optional[int]

  def nll(self, rows: np.ndarray) -> np.ndarray:
    """-log p(row) in nats, float64[N], exact (the judge's evaluator; its key is unused)."""
    return self.exp.evaluator.rows_nll(self.params, rows, jax.random.PRNGKey(0))


def encode_prompt(exp: experiment.Experiment) -> Optional[np.ndarray]:
  """The prompt's token ids ([MASK] marks a hole), or None; raises on a bad prompt."""
  c = exp.config.sample
  prompt_ids = exp.tokenizer.encode_prompt(c.prompt) if c.prompt.strip() else None
  if prompt_ids is not None and prompt_ids.shape[-1] > c.length:
    raise ConfigError(f"the prompt has {prompt_ids.shape[-1]} tokens, more than "
                      f"config.sample.length={c.length}.", "shorten the prompt or raise the length.")
  return prompt_ids


def sample_settings(sample_config, num_steps: Optional[int] = None) -> SampleSettings:
  """The sampler's settings from `config.sample` (`num_steps` in place of its own when given)."""
  c = sample_config
  return SampleSettings(
      num_samples=int(c.num_samples), length=int(c.length),
      num_steps=int(c.num_steps if num_steps is None else num_steps), grid=str(c.grid),
      temperature=float(c.temperature), top_k=int(c.top_k), top_p=float(c.top_p))


def draw_samples(exp: experiment.Experiment, params, key: jax.Array, *,
                 num_steps: Optional[int] = None, prompt_ids=None) -> np.ndarray:
  """int32[num_samples, length] from the objective's sampler with config.sample (and
  `num_steps` sampler steps when given), compiled as one program.

  With `exp.mesh` (a multi-process run) the program runs over the global mesh with `params` in
  the training layout on it and the key replicated; its samples come back whole to every
  process (the same ones in each)."""
  settings = sample_settings(exp.config.sample, num_steps)
  fn = lambda p, k: exp.objective.sample(exp.network, p, k, settings=settings,
                                         max_len=exp.config.data.seq_len, prompt_ids=prompt_ids)
  if exp.mesh is None:
    out = np.asarray(jax.jit(fn)(params, key))
  else:
    sample = jax.jit(fn, out_shardings=sharding_lib.replicated(exp.mesh))
    out = np.asarray(sample(exp.evaluator.place(params), sharding_lib.replicate(key, exp.mesh)))
  if (out == exp.objective.mask_id).any():
    raise AssertionError("sampler emitted [MASK]; this is a bug")
  return out


def judge_config(exp: experiment.Experiment):
  """The judge's config (its model from <judge>/config.json, evaluation and sampling settings
  from ours, its best checkpoint), or None when config.sample.judge_workdir is "".

  Raises:
    ConfigError: the judge is no directory, not a trained workdir, not autoregressive, has
      another vocabulary, was trained on blocks shorter than config.sample.length, or has no
      checkpoint.
  """
  config = exp.config
  path = str(config.sample.judge_workdir).strip()
  if not path:
    return None
  workdir = os.path.abspath(path)
  flag = f"config.sample.judge_workdir={path!r}"
  fix = ("pass the --workdir of an autoregressive model trained on the same data "
         "(--config.model.objective=autoregressive), or --config.sample.judge_workdir='' to "
         "report entropies only.")
  if not os.path.isdir(workdir):
    what = "not a directory" if os.path.exists(workdir) else "no such directory"
    raise ConfigError(f"{flag}: {what}.", fix)
  try:
    saved = config_compat.load_saved_config(workdir)
  except UserError as e:
    raise ConfigError(f"{flag}: {e.problem}", fix) from None
  if saved is None:
    raise ConfigError(f"{flag} is not the workdir of a trained run (no config.json).", fix)
  judge, _ = experiment.config_for_workdir(config, workdir)
  kind = objective_class(judge.model.objective)
  if kind.is_upper_bound or not kind.causal:  # the judge scores exactly and samples left to right
    raise ConfigError(f"{flag} holds a {judge.model.objective!r} model; the judge must be "
                      "autoregressive (exact likelihoods).", fix)
  try:
    vocab = tokenizer_lib.load_tokenizer(os.path.join(workdir, "vocab.json"))
  except UserError as e:
    raise ConfigError(f"{flag} has no readable vocabulary ({e.problem})", fix) from None
  if vocab.vocab_size != exp.tokenizer.vocab_size:
    raise ConfigError(f"{flag} has a vocabulary of {vocab.vocab_size} tokens, the sampled model "
                      f"{exp.tokenizer.vocab_size}.", fix)
  if vocab != exp.tokenizer:
    raise ConfigError(f"{flag} has another vocabulary than the sampled model (both "
                      f"{vocab.vocab_size} tokens).", fix)
  if judge.data.seq_len < config.sample.length:
    raise ConfigError(f"{flag} was trained on blocks of {judge.data.seq_len} tokens, shorter "
                      f"than config.sample.length={config.sample.length}.",
                      f"pass --config.sample.length={judge.data.seq_len} or less, or a judge "
                      f"trained with data.seq_len >= {config.sample.length}.")
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    ckpt.resolve("best")
  except UserError:
    raise ConfigError(f"{flag} has no checkpoint.",
                      "train the judge first (--mode=train in that workdir), or " + fix) from None
  finally:
    ckpt.close()
  judge.eval.checkpoint = "best"
  configuration.validate(judge)
  return judge


def open_judge(exp: experiment.Experiment) -> Optional[Judge]:
  """The judge of config.sample.judge_workdir, restored (best checkpoint), or None."""
  config = judge_config(exp)
  if config is None:
    return None
  judge_exp = experiment.build(config, os.path.abspath(config.sample.judge_workdir),
                               splits=exp.splits,  # same vocabulary: checked above
                               mesh=exp.mesh)
  params, meta, desc = experiment.restore_params(judge_exp)
  return Judge(exp=judge_exp, params=params, desc=desc, step=meta.get("step"))


def quality_report(exp: experiment.Experiment, params, meta: dict, desc: str, samples: np.ndarray,
                   judge: Optional[Judge], reporter: Reporter) -> dict:
  """The quality table of unconditional `samples` (the draw at sample.num_steps), drawing the
  other step counts of config.sample.quality_steps and the judge's own samples; reports it and
  writes <workdir>/sample_quality_step<N>.json."""
  c = exp.config.sample
  steps = configuration.quality_steps(c)

  def model_draw(k):
    if k == c.num_steps:
      return lambda: samples
    return lambda: draw_samples(exp, params, draw_key(c.seed, k), num_steps=k)

  if exp.objective.causal:  # one token per network call: no step count
    steps = (c.num_steps,)
    model_draws = [(exp.objective.name, None, lambda: samples)]
  else:
    model_draws = [(f"{exp.objective.name}@{k}", k, model_draw(k)) for k in steps]
  rows = sample_quality.quality_table(
      model_draws, real=sample_quality.real_text_rows(exp.splits.valid, c.length, c.num_samples),
      judge_nll=None if judge is None else judge.nll,
      judge_draw=None if judge is None else (
          lambda: draw_samples(judge.exp, judge.params, draw_key(c.seed, JUDGE_KEY_INDEX))))
  settings = {"judge_workdir": "" if judge is None else judge.exp.workdir,
              "judge_checkpoint": None if judge is None else judge.desc,
              "judge_step": None if judge is None else judge.step,
              "temperature": c.temperature, "top_k": c.top_k, "top_p": c.top_p, "grid": c.grid,
              "seed": c.seed, "length": c.length, "num_samples": c.num_samples,
              "steps": list(steps)}
  judged = ("no judge (config.sample.judge_workdir): entropies only" if judge is None else
            f"judge {judge.exp.workdir} ({judge.desc})")
  legend = ("  entropy: nats of each sample's token distribution, mean over samples; real: "
            "blocks of the validation split")
  if judge is not None:
    legend += ("\n  gen_ppl: exp(the judge's NLL per token); ar: the judge's own samples "
               "(same length and temperature)")
  reporter.info(f"sample quality: {c.num_samples} samples x {c.length} tokens, temperature "
                f"{c.temperature}; {judged}\n{sample_quality.format_table(rows)}\n{legend}")
  out = {"checkpoint": desc, "step": meta.get("step"), "objective": exp.objective.name,
         "settings": settings, "rows": rows}
  if not distributed.is_main_process():
    return out
  path = workdir_lib.unique_path(exp.workdir, f"sample_quality_step{meta.get('step')}", ".json")
  evaluate_mode.write_json_atomically(path, out)
  reporter.info(f"sample quality written to {path}")
  return out


def write_samples(exp: experiment.Experiment, params, meta: dict, desc: str, reporter: Reporter,
                  prompt_ids=None, judge: Optional[Judge] = None) -> list[str]:
  """Samples with config.sample, reports them and writes <workdir>/samples_step<N>.txt; for
  unconditional samples also their quality table (`quality_report`, scored by `judge`)."""
  config = exp.config
  c = config.sample
  out = draw_samples(exp, params, draw_key(c.seed, c.num_steps), prompt_ids=prompt_ids)
  texts = [exp.tokenizer.decode(row) for row in out]
  prompt_text = c.prompt if prompt_ids is not None else ""
  header = (f"# {desc}; objective={exp.objective.name}; prompt={prompt_text!r}; "
            f"steps={c.num_steps}; temperature={c.temperature}; top_k={c.top_k}; "
            f"top_p={c.top_p}; seed={c.seed}")
  body = "\n\n".join(f"--- sample {i} ---\n{t}" for i, t in enumerate(texts))
  reporter.info(f"{header}\n{body}")
  if distributed.is_main_process():  # the only writer of a multi-process run
    # Never overwrite earlier samples: samples_step<N>.txt, then samples_step<N>_1.txt, ...
    path = workdir_lib.unique_path(exp.workdir, f"samples_step{meta.get('step')}", ".txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write(header + "\n" + body + "\n")
    reporter.info(f"samples written to {path}")
  if prompt_ids is None:
    quality_report(exp, params, meta, desc, out, judge, reporter)
  else:
    reporter.info("sample quality: not measured for samples around a prompt (the table scores "
                  "unconditional samples).")
  return texts


def run(config, workdir: str, reporter: Reporter, explicit_overrides=(), **unused) -> list[str]:
  """Restores config.eval.checkpoint and samples (with config.sample.prompt)."""
  del unused
  if not distributed.is_main_process():
    reporter = Reporter(verbose=False)
  workdir, config = evaluate_mode.open_trained(config, workdir, reporter, explicit_overrides)
  mesh = experiment.inference_mesh(config)
  with evaluate_mode.main_process_lock(workdir):
    exp = experiment.build(config, workdir, mesh=mesh)
    prompt_ids = encode_prompt(exp)  # fail on a bad prompt before restoring anything
    c = config.sample
    if prompt_ids is not None and (c.judge_workdir.strip() or c.quality_steps.strip()):
      raise ConfigError("config.sample.judge_workdir and quality_steps measure unconditional "
                        "samples, but config.sample.prompt is set.",
                        "drop the prompt, or sample around it without those two settings.")
    judge = open_judge(exp)  # and on a bad judge
    params, meta, desc = experiment.restore_params(exp)
    return write_samples(exp, params, meta, desc, reporter, prompt_ids, judge=judge)
