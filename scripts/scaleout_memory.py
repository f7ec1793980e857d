"""Per-device train-step memory of a model under each mesh option, from XLA's memory analysis.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python scripts/scaleout_memory.py [--preset full,scale=large] [--meshes 8x1,1x8,2x4]

Compiles (never runs: the state is abstract) the AdamW train step of configs/compare.py:PRESET
(default: the `large` scale, 24 x 1024, seq 256, batch 64) for the reversible and the standard
diffusion backbone with the WikiText-2 vocabulary (33,279 tokens incl. [MASK]) on each
`data`x`fsdp` mesh, and prints a Markdown table of the per-device bytes: arguments (the state
shard + the batch rows), temporaries, and held = arguments + temporaries + outputs - donated
aliases (what `platform_info.check_step_fits` compares with the device's memory). CPU numbers:
XLA's CPU and GPU/TPU compilers fuse and schedule differently, so temporaries on an accelerator
differ; the argument bytes (the state) are exact on any backend.
"""

import argparse
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bdiff_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from bdiff_jax.train import builder  # pylint: disable=g-import-not-at-top,wrong-import-position
from bdiff_jax.runtime import platform_info  # pylint: disable=g-import-not-at-top,wrong-import-position
from bdiff_jax.runtime import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from bdiff_jax.train import train_state  # pylint: disable=g-import-not-at-top,wrong-import-position
from bdiff_jax.train.train_step import make_train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

VOCAB = 33_279  # WikiText-2 word level: 33,278 words + [MASK]


def _compare_config(preset: str):
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "compare.py")
  spec = importlib.util.spec_from_file_location("compare_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def step_memory(config, backbone: str, data: int, fsdp: int) -> dict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.backbone = backbone
  c.model.time_conditioning = "none"
  objective, net = builder.build_model(c, vocab_size=VOCAB, mask_id=VOCAB - 1)
  rule = builder.build_update_rule(c.train)
  mesh = sharding.make_mesh(data, fsdp)
  abstract = train_state.abstract_train_state(net, rule, seq_len=c.data.seq_len)
  shardings = sharding.state_shardings(abstract, mesh)
  step = make_train_step(objective, net, rule, ema_decay=c.train.ema_decay, mesh=mesh,
                         state_shardings=shardings)
  batch = jax.ShapeDtypeStruct((c.train.batch_size, c.data.seq_len), jnp.int32,
                               sharding=sharding.batch_sharding(mesh))
  compiled = step.lower(sharding.with_shardings(abstract, shardings), batch).compile()
  stats = platform_info.memory_stats(compiled)
  stats["params"] = models.count_params(abstract.params)
  return stats


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="full,scale=large")
  parser.add_argument("--meshes", default="8x1,1x8")
  parser.add_argument("--backbones", default="reversible,standard")
  args = parser.parse_args()
  config = _compare_config(args.preset)
  gib = lambda b: f"{b / 2**30:.2f}"
  print(f"{args.preset}: {config.model.num_layers} x {config.model.emb_dim}, batch "
        f"{config.train.batch_size} x {config.data.seq_len}, {jax.device_count()} "
        f"{jax.default_backend()} devices\n")
  print("| backbone | mesh (data x fsdp) | params | arguments GiB | temp GiB | held GiB |")
  print("|---|---|---|---|---|---|")
  for backbone in args.backbones.split(","):
    for mesh in args.meshes.split(","):
      data, fsdp = map(int, mesh.split("x"))
      s = step_memory(config, backbone, data, fsdp)
      print(f"| {backbone} | {data} x {fsdp} | {s['params'] / 1e6:.1f} M | "
            f"{gib(s['argument_bytes'])} | {gib(s['temp_bytes'])} | {gib(s['held_bytes'])} |",
            flush=True)


if __name__ == "__main__":
  main()
