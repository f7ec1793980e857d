"""Our side of the throughput benchmark (`throughput.py`): the project's real train step at a
shape, and the worker that compiles and times it. The ONE place that knows how the project builds
the step it compares.

Loaded by `throughput.py` by its path, in a worker process that has set the host allocator: a
`base` system's worker imports the project (`bdiff_jax`) from another checkout, this file from
this one.
"""

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from bdiff_jax.config import configuration
from bdiff_jax.objectives import objective_class
from bdiff_jax.train.builder import build_objective
from bdiff_jax.runtime import xla_flags
from bdiff_jax.train import builder
from bdiff_jax.train import train_state
from bdiff_jax.train import train_step


def build_our_step(config, network, *, loss: str, chunk_rows: int = 0):
  """(step_fn, state): the project's jitted train step and an initial train state.

  loss: "masked" (head at the masked positions only, the default training path) or "full"
  (head at every position); chunk_rows: with "masked", run the head this many rows at a time
  (0: all at once).
  """
  config = config.copy_and_resolve_references()
  config.diffusion.masked_head = loss == "masked"
  config.diffusion.head_chunk_rows = int(chunk_rows)
  objective = build_objective(config, mask_id=network.spec.vocab_size)
  rule = builder.build_update_rule(config.train)
  state = jax.jit(lambda: train_state.init_train_state(network, rule, seed=0,
                                                       seq_len=config.data.seq_len))()
  step = train_step.make_train_step(objective, network, rule, ema_decay=config.train.ema_decay)
  return step, state


def our_config(shape: dict[str, int], *, preset_config=None, overrides=()):
  """The project's config at `shape` with the reference architecture (or `preset_config`, a
  preset's config, as it is).

  `overrides`: "section.field=value" strings applied last (values parsed as JSON, else str).
  """
  if preset_config is not None:
    c = preset_config
  else:
    c = configuration.base_config()
    m = c.model
    m.num_layers, m.emb_dim, m.num_heads = shape["layers"], shape["d"], shape["heads"]
    m.num_kv_heads, m.head_dim, m.mlp_dim = shape["heads"], shape["d"] // shape["heads"], 4 * shape["d"]
    m.positional, m.tie_embeddings, m.block, m.dropout_rate = "learned", False, "simple", 0.0
    c.data.seq_len, c.train.batch_size = shape["seq"], shape["batch"]
  for item in overrides:
    path, _, value = item.partition("=")
    section, _, field = path.partition(".")
    try:
      c[section][field] = json.loads(value)
    except json.JSONDecodeError:
      c[section][field] = value
  return c


def worker(args: dict[str, Any], reply, *, max_rss_mib, preset_config,
           profile_steps) -> None:
  """The worker protocol of `throughput.py` for one of our systems (`args["kind"] == "jax"`):
  compile, reply with its info, then answer "steps", "profile" and "gemm" commands from stdin.

  `max_rss_mib()`: this process's peak resident memory; `preset_config(name)`: the config of
  configs/wikitext2.py:<name>; `profile_steps(run_step, n)`: the breakdown of `n` traced steps
  (`step_profile.profile_steps`).
  """
  # Before JAX starts its backend (importing JAX does not start it): XLA reads XLA_FLAGS then.
  if args.get("flags") is None:
    xla_flags.apply_default_flags()
  else:
    os.environ["XLA_FLAGS"] = "" if args["flags"] == "none" else args["flags"]
  shape = args["shape"]
  preset = args.get("preset", "")
  config = our_config(shape, preset_config=preset_config(preset) if preset else None,
                      overrides=[*args.get("set", ()), *args.get("overrides", ())])
  network = builder.build_network(config.model, vocab_size=shape["vocab"],
                                  max_len=config.data.seq_len,
                                  causal=objective_class(config.model.objective).causal)
  loss, _, chunk_rows = args["loss"].partition(":")
  step, state = build_our_step(config, network, loss=loss, chunk_rows=int(chunk_rows or 0))
  batch = jax.random.randint(jax.random.PRNGKey(2), (config.train.batch_size,
                                                    config.data.seq_len), 0, shape["vocab"])
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  info = {"compile_s": time.perf_counter() - t0, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "jax": jax.__version__, "allocator": args["allocator_applied"]}
  mem = compiled.memory_analysis()
  info["memory"] = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
                    ("temp", "argument", "output", "alias")}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  info["xla_flops"] = float((cost or {}).get("flops", -1.0))
  if args.get("compile_only"):
    reply(info)
    return
  state, metrics = compiled(state, batch)
  info["loss"] = float(metrics["loss"])
  a = jax.random.normal(jax.random.PRNGKey(3), (2048, 2048), jnp.float32)
  matmul = jax.jit(lambda x: x @ x).lower(a).compile()
  matmul(a).block_until_ready()
  reply(info)
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "steps":
      times = []
      for _ in range(cmd["n"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
      reply({"times": times, "loss": float(metrics["loss"]), "max_rss_mib": max_rss_mib()})
    elif cmd["cmd"] == "profile":  # after the timed rounds: tracing slows the steps it traces

      def run_step():
        nonlocal state, metrics
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))

      reply(profile_steps(run_step, cmd["n"]))
    elif cmd["cmd"] == "gemm":
      times = []
      for _ in range(3):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - t0)
      reply({"gflops": 2 * 2048**3 / min(times) / 1e9})
    else:
      return
