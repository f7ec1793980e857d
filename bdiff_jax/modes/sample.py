"""`--mode=sample`: restore a checkpoint, draw samples (optionally around a prompt), report them
and write them to `<workdir>/samples_step<N>.txt`."""

from typing import Optional

import jax
import numpy as np

from bdiff_jax import experiment
from bdiff_jax import workdir as workdir_lib
from bdiff_jax.errors import ConfigError
from bdiff_jax.modes import evaluate as evaluate_mode
from bdiff_jax.reporter import Reporter


def encode_prompt(exp: experiment.Experiment) -> Optional[np.ndarray]:
  """The prompt's token ids ([MASK] marks a hole), or None; raises on a bad prompt."""
  c = exp.config.sample
  prompt_ids = exp.tokenizer.encode_prompt(c.prompt) if c.prompt.strip() else None
  if prompt_ids is not None and prompt_ids.shape[-1] > c.length:
    raise ConfigError(f"the prompt has {prompt_ids.shape[-1]} tokens, more than "
                      f"config.sample.length={c.length}.", "shorten the prompt or raise the length.")
  return prompt_ids


def draw_samples(exp: experiment.Experiment, params, prompt_ids=None) -> np.ndarray:
  """int32[num_samples, length] from the objective's sampler, compiled as one program."""
  c = exp.config.sample
  sample = jax.jit(lambda p, key: exp.objective.sample(
      exp.network, p, key, sample_config=c, max_len=exp.config.data.seq_len,
      prompt_ids=prompt_ids))
  out = np.asarray(sample(params, jax.random.PRNGKey(c.seed)))
  if (out == exp.objective.mask_id).any():
    raise AssertionError("sampler emitted [MASK]; this is a bug")
  return out


def write_samples(exp: experiment.Experiment, params, meta: dict, desc: str, reporter: Reporter,
                  prompt_ids=None) -> list[str]:
  """Samples with config.sample, reports them and writes <workdir>/samples_step<N>.txt."""
  config = exp.config
  c = config.sample
  out = draw_samples(exp, params, prompt_ids)
  texts = [exp.tokenizer.decode(row) for row in out]
  prompt_text = c.prompt if prompt_ids is not None else ""
  header = (f"# {desc}; objective={exp.objective.name}; prompt={prompt_text!r}; "
            f"steps={c.num_steps}; temperature={c.temperature}; top_k={c.top_k}; "
            f"top_p={c.top_p}; seed={c.seed}")
  body = "\n\n".join(f"--- sample {i} ---\n{t}" for i, t in enumerate(texts))
  reporter.info(f"{header}\n{body}")
  # Never overwrite earlier samples: samples_step<N>.txt, then samples_step<N>_1.txt, ...
  path = workdir_lib.unique_path(exp.workdir, f"samples_step{meta.get('step')}", ".txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write(header + "\n" + body + "\n")
  reporter.info(f"samples written to {path}")
  return texts


def run(config, workdir: str, reporter: Reporter, explicit_overrides=(), **unused) -> list[str]:
  """Restores config.eval.checkpoint and samples (with config.sample.prompt)."""
  del unused
  workdir, config = evaluate_mode.open_trained(config, workdir, reporter, explicit_overrides)
  with workdir_lib.WorkdirLock(workdir):
    exp = experiment.build(config, workdir)
    prompt_ids = encode_prompt(exp)  # fail on a bad prompt before restoring anything
    params, meta, desc = experiment.restore_params(exp)
    return write_samples(exp, params, meta, desc, reporter, prompt_ids)
