r"""Memory benchmark of the train step: standard vs reversible (recompute / autodiff) backbones.

Run:
  python main.py --config configs/benchmark.py --mode=memory --workdir runs/mem        # ~10 min, CPU
  python main.py --config configs/benchmark.py:test --mode=memory --workdir /tmp/mem   # seconds

Expected result (default preset, measured on 2 CPU cores; numbers in README.md): the compiled
temp (activation) bytes of reversible/recompute stay flat with depth while standard and
reversible/autodiff grow linearly, so at 24 layers and seq_len >= 512 recompute holds well under
0.3x the standard backbone's total memory and under 1.25x its own 4-layer memory; at seq_len 128
the depth-proportional parameters + AdamW state + EMA dominate the total and the depth target
fails on the total (it passes on temp bytes). Recompute costs about one extra forward per step
(~1.3x standard step time). Writes memory_benchmark.json and memory_benchmark.png to the workdir
and prints PASS/FAIL per target.

Presets: "" (default: width 64, batch 2, depths 4/8/16/24, seq_len 128/512/1024), "test" (tiny,
seconds; used by tests/test_benchmark_memory.py), "gpu" (width 512, batch 8, for an accelerator).
"""

import ml_collections

from bdiff_jax.configuration import base_config


def get_config(preset: str = ""):
  c = base_config()
  c.train.grad_clip = 1.0
  c.train.warmup_steps = 1
  c.train.ema_decay = 0.999  # the step includes the EMA update, as in training
  c.model.dropout_rate = 0.0
  c.model.time_conditioning = "adaln"

  b = ml_collections.ConfigDict()
  b.depths = (4, 8, 16, 24)
  b.seq_lens = (128, 512, 1024)
  b.backbones = ("standard", "reversible/recompute", "reversible/autodiff")
  b.batch_size = 2
  b.width = 64  # emb_dim; mlp_dim = mlp_ratio * width; head_dim = width / num_heads
  b.mlp_ratio = 4
  b.num_heads = 2
  b.vocab_size = 1024  # random tokens; the logits [B, L, V] are the same for every backbone
  b.steps = 3  # timed steps (after one warm-up step); the median is reported
  b.timeout_s = 900.0  # per configuration (each runs in its own process)
  c.benchmark = b

  preset = preset or "default"
  if preset == "default":
    pass
  elif preset == "test":
    b.depths = (1, 2)
    b.seq_lens = (16,)
    b.width = 32
    b.vocab_size = 64
    b.steps = 2
    b.timeout_s = 300.0
  elif preset == "gpu":
    b.width = 512
    b.num_heads = 8
    b.batch_size = 8
    b.vocab_size = 32768
    b.steps = 10
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'test' or 'gpu'")
  return c
