"""`--mode=sample`: restore a checkpoint, draw samples (optionally around a prompt), print them
and write them to `<workdir>/samples_step<N>.txt`."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax import experiment, objectives, sampling, schedules
from bdiff_jax.errors import ConfigError


def _ar_sample(exp, params, key, prompt_ids):
  """Ancestral left-to-right sampling for the autoregressive baseline (lax.fori_loop)."""
  c = exp.config.sample
  length, v = c.length, exp.network.spec.vocab_size
  if length > exp.config.data.seq_len and exp.config.model.positional == "learned":
    raise ConfigError(f"config.sample.length={length} exceeds the learned positions "
                      f"({exp.config.data.seq_len}).", "sample at most data.seq_len tokens.")
  n = c.num_samples
  fixed = np.full((n, length), v, np.int32)
  if prompt_ids is not None:
    fixed[:, :prompt_ids.shape[-1]] = prompt_ids
  fixed = jnp.asarray(fixed)

  def logits_at(tokens, i):
    logits = exp.network.apply({"params": params}, objectives.ar_inputs(tokens, v), train=False)
    return jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)

  def body(i, tokens):
    logits = sampling.filter_logits(logits_at(tokens, i), temperature=c.temperature,
                                    top_k=c.top_k, top_p=c.top_p)
    draw = sampling.categorical(jax.random.fold_in(key, i), logits)
    keep = fixed[:, i] != v
    return tokens.at[:, i].set(jnp.where(keep, fixed[:, i], draw))

  return jax.jit(lambda t: jax.lax.fori_loop(0, length, body, t))(fixed)


def run_sample(config, workdir: str) -> list[str]:
  """--mode=sample: restore config.eval.checkpoint and sample (with config.sample.prompt)."""
  exp = experiment.build(config, workdir)
  prompt_ids = _encode_prompt(exp)  # fail on a bad prompt before restoring anything
  params, meta, desc = experiment.restore_params(exp)
  return write_samples(exp, params, meta, desc, prompt_ids)


def _encode_prompt(exp):
  c = exp.config.sample
  prompt_ids = exp.tokenizer.encode_prompt(c.prompt) if c.prompt.strip() else None
  if prompt_ids is not None and prompt_ids.shape[-1] > c.length:
    raise ConfigError(f"the prompt has {prompt_ids.shape[-1]} tokens, more than "
                      f"config.sample.length={c.length}.", "shorten the prompt or raise the length.")
  return prompt_ids


def write_samples(exp, params, meta: dict, desc: str, prompt_ids=None) -> list[str]:
  """Samples with config.sample, prints them and writes <workdir>/samples_step<N>.txt."""
  config = exp.config
  c = config.sample
  tok = exp.tokenizer
  key = jax.random.PRNGKey(c.seed)
  if config.model.objective == "autoregressive":
    out = _ar_sample(exp, params, key, prompt_ids)
  else:
    logits_fn = lambda z, t: exp.network.apply({"params": params}, z, t, train=False)
    out = sampling.sample(
        logits_fn, key, length=c.length, num_steps=c.num_steps, mask_id=tok.mask_id,
        batch_size=c.num_samples, prompt=None if prompt_ids is None else jnp.asarray(prompt_ids),
        temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
        schedule=schedules.from_config(config.diffusion), grid=c.grid)
  out = np.asarray(out)
  if (out == tok.mask_id).any():
    raise AssertionError("sampler emitted [MASK]; this is a bug")
  texts = [tok.decode(row) for row in out]
  prompt_text = c.prompt if prompt_ids is not None else ""
  header = (f"# {desc}; objective={config.model.objective}; prompt={prompt_text!r}; "
            f"steps={c.num_steps}; temperature={c.temperature}; top_k={c.top_k}; "
            f"top_p={c.top_p}; seed={c.seed}")
  body = "\n\n".join(f"--- sample {i} ---\n{t}" for i, t in enumerate(texts))
  print(f"{header}\n{body}", flush=True)
  path = os.path.join(exp.workdir, f"samples_step{meta.get('step')}.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write(header + "\n" + body + "\n")
  print(f"samples written to {path}")
  return texts
