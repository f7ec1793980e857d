"""Sampling speed: the step-wise diffusion sampler vs the event-driven one, and the full-forward
autoregressive sampler vs the KV-cache one, at the `cpu` preset's model shape.

    python -m bdiff_jax.benchmarks.sampling_speed [--reps 3] [--out sampling_speed.json]

Shapes: the model fields of configs/wikitext2.py:cpu (4 layers x 128 wide), the WikiText-2
vocabulary (33,278 words), `--samples` (4) sequences of `--length` (128) tokens, `--steps` (128)
diffusion steps on the cosine grid, linear schedule. Parameters are a random initialisation
(speed does not depend on their values).

Measured, each as the median (and min) wall time of `--reps` calls of a jitted sampler after
one compiling call, the variants interleaved rep by rep so that load changes on a shared
machine hit all of them alike:

  diffusion/stepwise        the previous sampler: a model call and a categorical over every
                            position and the whole vocabulary at every step (64-bit Gumbel)
  diffusion/fast            `sampling.sample`: reveal steps first, a model call only at steps
                            that reveal something, draws only at revealed positions
  diffusion/fast_positions  the same with logits_at_fn = Network(..., logit_positions=...), so
                            the output head runs only at the drawn positions
  (each for a time-conditioned (adaLN) network and one without time conditioning; the
  step-wise sampler only for the adaLN one: its cost does not depend on the conditioning)
  ar/full_forward           the previous AR sampler: a full causal forward per position
  ar/kv_cache               `ar_sampling.sample_autoregressive`: one token per forward

plus the number of network calls of the fast sampler at `--steps` and at 256 steps (rows at their
own steps, and rows together), and whether the two AR samplers drew the same tokens. Prints a
table and writes JSON (refuses to overwrite an existing file).
"""

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys
import time

from bdiff_jax.errors import UserError
from bdiff_jax.runtime import bootstrap
from bdiff_jax.runtime import host_allocator

if __name__ == "__main__":
  # As main.py does, before JAX starts a thread: the host allocator's settings and our XLA
  # flags (bdiff_jax/runtime/bootstrap.py), so the samplers are timed as the program runs them.
  try:
    bootstrap.bootstrap()
  except UserError as _e:
    sys.exit(f"error: {_e}")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from bdiff_jax.diffusion import sampling
from bdiff_jax.diffusion import schedules
from bdiff_jax.models import init_params
from bdiff_jax.objectives import ar_sampling
from bdiff_jax.objectives import objective_class
from bdiff_jax.train import builder

WIKITEXT2_VOCAB = 33_278
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class OutputExistsError(UserError):
  """The JSON output file exists already."""


def cpu_model_config():
  """config.model of configs/wikitext2.py:cpu."""
  spec = importlib.util.spec_from_file_location(
      "wikitext2_config", os.path.join(_REPO, "configs", "wikitext2.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("cpu").model


def stepwise_sample(logits_fn, key, *, length, num_steps, mask_id, batch_size,
                    grid="cosine"):
  """The previous `sampling.sample` (linear schedule, no prompt, no filtering): every step calls
  the model and draws a categorical at every position over the whole vocabulary."""
  with jax.ensure_compile_time_eval():
    times = sampling.sampling_grid(num_steps, grid)
    reveal_prob = jnp.asarray(sampling.reveal_probabilities(schedules.linear(), times))
  noisy = jnp.full((batch_size, length), mask_id, jnp.int32)

  def step(i, noisy):
    reveal_key, draw_key = jax.random.split(jax.random.fold_in(key, i))
    logits = logits_fn(noisy, jnp.full((batch_size,), times[i], jnp.float32))
    draws = sampling.categorical(draw_key, sampling.filter_logits(logits))
    reveal = (jax.random.uniform(reveal_key, noisy.shape) < reveal_prob[i]) | (i == num_steps - 1)
    return jnp.where((noisy == mask_id) & reveal, draws, noisy)

  return jax.lax.fori_loop(0, num_steps, step, noisy)


def full_forward_ar_sample(network, params, key, *, length, num_samples, bos_id):
  """The previous AR sampler: position i from a full causal forward, key fold_in(key, i)."""
  tokens = jnp.full((num_samples, length), bos_id, jnp.int32)

  def body(i, tokens):
    inputs = jnp.concatenate([jnp.full((num_samples, 1), bos_id, jnp.int32), tokens[:, :-1]], 1)
    logits = network.apply({"params": params}, inputs, train=False)
    logits = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
    draw = sampling.categorical(jax.random.fold_in(key, i), sampling.filter_logits(logits))
    return tokens.at[:, i].set(draw)

  return jax.lax.fori_loop(0, length, body, tokens)


def _time_interleaved(fns: dict, reps: int) -> dict:
  """{name: (fn() -> array)} -> {name: {"median_s", "min_s", "times_s"}}; one compiling call
  each first, then `reps` rounds calling every fn once per round."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t}
          for name, t in times.items()}


def _jit_sampler(net, sampler, *, positions: bool, **kwargs):
  """jit of (params, key) -> sampler(logits_fn, key, **kwargs) for `net`. The parameters are an
  argument, as in `--mode=sample`, not constants folded into the compiled sampler."""
  def run(params, key):
    logits_fn = lambda z, t: net.apply({"params": params}, z, t)
    at_fn = {}
    if positions:
      at_fn["logits_at_fn"] = lambda z, t, pos: net.apply({"params": params}, z, t,
                                                          logit_positions=pos)
    return sampler(logits_fn, key, **kwargs, **at_fn)
  return jax.jit(run)


def run(*, reps: int, length: int, steps: int, samples: int, vocab: int) -> dict:
  """Runs every measurement and returns the results (see the module docstring)."""
  results = {"shape": {"length": length, "steps": steps, "samples": samples, "vocab": vocab,
                       "model": "configs/wikitext2.py:cpu", "reps": reps,
                       "device": str(jax.devices()[0])}}
  key = jax.random.key(0)
  mask_id = vocab
  fns, calls = {}, {}
  for conditioning in ("adaln", "none"):
    m = cpu_model_config()
    m.time_conditioning = conditioning
    net = builder.build_network(m, vocab_size=vocab, max_len=length,
                                causal=objective_class(m.objective).causal)
    params = jax.jit(lambda k, net=net: init_params(net, k, seq_len=length))(jax.random.key(1))
    common = dict(length=length, mask_id=mask_id, batch_size=samples)
    fast = _jit_sampler(net, sampling.sample, positions=False, num_steps=steps, **common)
    fast_at = _jit_sampler(net, sampling.sample, positions=True, num_steps=steps, **common)
    fns[f"diffusion/fast/{conditioning}"] = functools.partial(fast, params, key)
    fns[f"diffusion/fast_positions/{conditioning}"] = functools.partial(fast_at, params, key)
    if conditioning == "adaln":
      old = _jit_sampler(net, stepwise_sample, positions=False, num_steps=steps, **common)
      fns["diffusion/stepwise/adaln"] = functools.partial(old, params, key)
    for num_steps in sorted({steps, 256}):
      for independent in (True, False):
        stats_fn = _jit_sampler(net, sampling.sample, positions=True, num_steps=num_steps,
                                return_stats=True, independent_rows=independent, **common)
        stats = [stats_fn(params, jax.random.key(seed))[1] for seed in range(reps)]
        calls[f"{conditioning}/steps{num_steps}/" + ("own_steps" if independent else
                                                     "shared_steps")] = {
            "network_calls": [int(s.network_calls) for s in stats],
            "overflow_calls": [int(s.overflow_calls) for s in stats]}
  results["diffusion_network_calls"] = calls

  m = cpu_model_config()
  m.objective, m.time_conditioning = "autoregressive", "none"
  ar_net = builder.build_network(m, vocab_size=vocab, max_len=length,
                                 causal=objective_class(m.objective).causal)
  ar_params = jax.jit(lambda k: init_params(ar_net, k, seq_len=length))(jax.random.key(2))
  ar_common = dict(length=length, num_samples=samples, bos_id=vocab)
  ar_old = jax.jit(functools.partial(full_forward_ar_sample, ar_net, **ar_common))
  ar_new = jax.jit(functools.partial(ar_sampling.sample_autoregressive, ar_net, **ar_common))
  fns["ar/full_forward"] = functools.partial(ar_old, ar_params, key)
  fns["ar/kv_cache"] = functools.partial(ar_new, ar_params, key)
  results["times"] = _time_interleaved(fns, reps)
  old_tokens, new_tokens = np.asarray(ar_old(ar_params, key)), np.asarray(ar_new(ar_params, key))
  results["ar_tokens_identical_fraction"] = float(np.mean(old_tokens == new_tokens))
  t = results["times"]
  results["speedups"] = {
      name: t["diffusion/stepwise/adaln"]["median_s"] / t[name]["median_s"]
      for name in t if name.startswith("diffusion/fast")}
  results["speedups"]["ar/kv_cache"] = (t["ar/full_forward"]["median_s"] /
                                        t["ar/kv_cache"]["median_s"])
  return results


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--steps", type=int, default=128)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=WIKITEXT2_VOCAB)
  parser.add_argument("--out", default="sampling_speed.json")
  args = parser.parse_args(argv)
  settings = {"host_allocator": "retain" if host_allocator.retaining() else "system",
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
  print(f"host allocator: {settings['host_allocator']}; XLA_FLAGS: {settings['xla_flags']!r}")
  if os.path.exists(args.out):
    raise OutputExistsError(f"{args.out} exists already.", "pass --out with a new file name.")
  results = run(reps=args.reps, length=args.length, steps=args.steps, samples=args.samples,
                vocab=args.vocab)
  results.update(settings)
  print(f"{results['shape']}")
  for name, t in results["times"].items():
    speedup = results["speedups"].get(name)
    extra = f"  ({speedup:.1f}x faster)" if speedup else ""
    print(f"  {name:36s} median {t['median_s']:8.3f} s   min {t['min_s']:8.3f} s{extra}")
  for name, c in results["diffusion_network_calls"].items():
    print(f"  calls {name:34s} {c['network_calls']} (overflow {c['overflow_calls']})")
  print(f"  AR tokens identical (KV cache vs full forward): "
        f"{100 * results['ar_tokens_identical_fraction']:.2f}%")
  with open(args.out, "x", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  print(f"written to {args.out}")
  return results


if __name__ == "__main__":
  try:
    main()
  except UserError as e:
    print(f"error: {e.problem} Fix: {e.fix}", file=sys.stderr)
    sys.exit(2)
