r"""Memory benchmark of the train step: standard vs reversible (recompute / autodiff) backbones.

Run:
  python main.py --config configs/benchmark.py --mode=memory --workdir runs/mem        # CPU, ~15 min
  python main.py --config configs/benchmark.py:test --mode=memory --workdir /tmp/mem   # < 1 min

Expected result (default preset: width 64, batch 2, vocab 1024, float32, 2 shared CPU cores, 36
configurations each in its own process, ~14 min wall of which most is XLA compilation): the
compiled temp bytes of reversible/recompute are flat in depth apart from the gradient buffer
(temp - one copy of the params is exactly constant from 4 to 24 layers at seq_len 512 and 1024),
while standard and reversible/autodiff (identical memory) grow linearly. At 24 layers recompute
holds ~0.15x (seq 512) and ~0.10x (seq 1024) of the standard total: the "memory" target PASSes
there and FAILs at seq 128 (~0.49x), where params + AdamW moments + EMA + gradients dominate. The
"depth" target (24 vs 4 layers <= 1.25x) FAILs on the total at every seq_len for the same reason
(that state is ~5x the params and grows with depth for every backbone); on temp bytes alone it
PASSes at seq 1024 (~1.07x). On CPU the step time of recompute came out *below* standard (the
standard step streams ~1.3 GB of saved activations at 24 x 1024), so the "time" target PASSes;
CPU timings on a shared machine are noisy. Writes memory_benchmark.json and memory_benchmark.png
to the workdir and prints a table and PASS/FAIL per target.

Presets: "" (default: width 64, batch 2, depths 4/8/16/24, seq_len 128/512/1024), "test" (tiny,
under a minute; used by tests/test_benchmark_memory.py), "gpu" (width 512, batch 8, for an accelerator).
"""

import ml_collections

from bdiff_jax.config.configuration import base_config


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
