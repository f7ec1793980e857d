r"""Reversible vs standard backbone, as diffusion models and against an autoregressive baseline.

Run (the harness is bdiff_jax/benchmarks/compare/; outputs compare.md, compare.json and
compare.png in the workdir, and the table is printed):
  python main.py --config configs/compare.py:test --workdir /tmp/cmp_test --mode=compare
  python main.py --config configs/compare.py:quick --workdir runs/cmp_quick --mode=compare
  python main.py --config configs/compare.py:full,scale=small --workdir runs/cmp_small \
      --mode=compare

The preset string is LEVEL[,scale=SCALE]:
  test   wiring only, seconds per model (CI): tiny models, 6 steps, 256 evaluation tokens.
         Expected: a table with finite numbers for every model; perplexities in the thousands
         or more (meaningless: the models are untrained).
  quick  CPU, minutes per model: the `cpu` scale, seq_len 128, batch 8, 65,536 training tokens
         (64 steps) per model, evaluation on the first 8,192 tokens of valid and of test.
         Expected (2 shared CPU cores, ~6 min per model): word perplexities in the thousands
         (barely trained models); the AR number (exact) below both diffusion bounds; reversible
         and standard diffusion close to each other. Measured numbers are in README.md
         (Results) and docs/benchmarks.md.
  full   GPU/TPU, hours per model: the `small` scale by default, seq_len 256, batch 64, 3 seeds,
         327,680,000 tokens per model (20,000 steps), full valid/test splits.
SCALE (the model shape; every scale uses kv heads = heads / 2 and head_dim 64):
  tiny   2 layers x 64 wide,   4 heads, head_dim 16, mlp 192   (test)
  cpu    4 layers x 256 wide,  4 heads, mlp 768                 (fits a 2-core machine)
  small  6 layers x 512 wide,  8 heads, mlp 1536
  medium 12 layers x 768 wide, 12 heads, mlp 2304
  large  24 layers x 1024 wide, 16 heads, mlp 3072
The scale must be chosen in the preset string (it sets config.model); overriding only
--config.compare.scale would leave the model shape unchanged, so the harness refuses it. Model
fields can still be overridden (--config.model.num_layers=...); the table reports actual shapes.

Harness flags (all under config.compare; see the field comments below), e.g.
  --config.compare.models=standard_diffusion,reversible_diffusion:simple,autoregressive
  --config.compare.seeds="(0, 1, 2)"
  --config.compare.budget=seconds --config.compare.budget_amount=600
  --config.compare.overrides="autoregressive:train.learning_rate=1e-3;*:train.warmup_steps=50"
"""

import ml_collections

from bdiff_jax.config.configuration import base_config

# Model shapes: (num_layers, emb_dim, num_heads, head_dim, mlp_dim); kv heads = heads // 2.
SCALES = {
    "tiny": (2, 64, 4, 16, 192),
    "cpu": (4, 256, 4, 64, 768),
    "small": (6, 512, 8, 64, 1536),
    "medium": (12, 768, 12, 64, 2304),
    "large": (24, 1024, 16, 64, 3072),
}
LEVELS = ("test", "quick", "full")
_DEFAULT_SCALE = {"test": "tiny", "quick": "cpu", "full": "small"}


def _parse_preset(preset: str) -> tuple[str, str]:
  parts = [p.strip() for p in (preset or "quick").split(",") if p.strip()]
  level, scale = parts[0], None
  for part in parts[1:]:
    key, _, value = part.partition("=")
    if key != "scale" or not value:
      raise ValueError(f"unknown preset option {part!r}: use LEVEL[,scale=SCALE]")
    scale = value
  if level not in LEVELS:
    raise ValueError(f"unknown level {level!r}: use one of {', '.join(LEVELS)}")
  scale = scale or _DEFAULT_SCALE[level]
  if scale not in SCALES:
    raise ValueError(f"unknown scale {scale!r}: use one of {', '.join(SCALES)}")
  return level, scale


def apply_scale(model: ml_collections.ConfigDict, scale: str) -> None:
  layers, width, heads, head_dim, mlp = SCALES[scale]
  model.num_layers = layers
  model.emb_dim = width
  model.num_heads = heads
  model.num_kv_heads = heads // 2
  model.head_dim = head_dim
  model.mlp_dim = mlp


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
  """The comparison config for 'LEVEL[,scale=SCALE]' (see the module docstring)."""
  level, scale = _parse_preset(preset)
  c = base_config()
  apply_scale(c.model, scale)
  c.model.block = "qwen3"  # the default block of every model without a ':simple' suffix
  c.model.positional = "rope"
  c.model.dropout_rate = 0.0
  c.model.norm_eps = 1e-6
  c.model.rope_theta = 10000.0

  c.compare = ml_collections.ConfigDict()
  c.compare.level = level
  c.compare.scale = scale
  c.compare.scale_applied = scale  # what get_config wrote into config.model (do not override)
  # Comma-separated NAME[:BLOCK]; NAME is standard_diffusion | reversible_diffusion |
  # autoregressive (= standard_autoregressive) | reversible_autoregressive; BLOCK is qwen3 |
  # simple (default: config.model.block).
  c.compare.models = "standard_diffusion,reversible_diffusion,autoregressive"
  c.compare.seeds = (0,)  # training seeds; mean ± std over them
  # Equal budget for every model: "tokens" (same tokens seen), "steps" (the same, in steps of
  # batch_size x seq_len) or "seconds" (same training wall-clock; train.num_steps then sets the
  # learning-rate schedule and each run stops when its time is up).
  c.compare.budget = "tokens"
  c.compare.budget_amount = 0.0
  # Time conditioning of the diffusion models ("none" | "adaln"). "none" keeps their parameter
  # count equal to the AR model's (absorbing diffusion does not need t); AR always uses "none".
  c.compare.diffusion_time_conditioning = "none"
  # Per-model config overrides: "MODEL:field.path=value;..." (MODEL as in `models`, or * for
  # all), applied last. Invalid ones fail the run before anything trains.
  c.compare.overrides = ""
  # Depths for the memory-vs-depth sweep (standard vs reversible, diffusion, the default block);
  # empty: no sweep.
  c.compare.memory_depths = (1, 2)

  c.eval.checkpoint = "latest"  # evaluate the model at the end of its budget
  c.train.stop_at_step = 0
  if level == "test":
    c.data.seq_len = 32
    c.train.batch_size = 8
    c.compare.budget, c.compare.budget_amount = "steps", 6.0
    c.train.num_steps = 6
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 2
    c.train.ema_decay = 0.0
    c.train.log_every = 1
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.progress_bar = False
    c.eval.batch_size = 8
    c.eval.max_tokens = 256
    c.eval.during_training_max_tokens = 128  # the evaluation train_and_evaluate does at the end
    c.eval.seeds = (0, 1)
    c.sample.num_samples, c.sample.length, c.sample.num_steps = 1, 16, 4  # written after training
    c.compare.memory_depths = (1, 2)
  elif level == "quick":
    c.data.seq_len = 128
    c.train.batch_size = 8
    c.compare.budget, c.compare.budget_amount = "tokens", 65_536.0  # 64 steps
    c.train.num_steps = 64  # the schedule length for budget=seconds
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 8
    c.train.ema_decay = 0.0
    c.train.log_every = 4
    c.train.eval_every = 100_000
    c.train.checkpoint_every = 32
    c.train.progress_bar = False
    c.eval.batch_size = 32
    c.eval.max_tokens = 8192
    c.eval.during_training_max_tokens = 2048  # the evaluation train_and_evaluate does at the end
    c.eval.seeds = (0, 1)
    c.sample.num_samples, c.sample.length, c.sample.num_steps = 1, 32, 8
    c.compare.memory_depths = (2, 4, 8)
  else:  # full
    c.data.seq_len = 256
    c.train.batch_size = 64
    c.compare.budget, c.compare.budget_amount = "tokens", 327_680_000.0  # 20,000 steps
    c.compare.seeds = (0, 1, 2)
    c.train.num_steps = 20_000
    c.train.learning_rate = 5e-4
    c.train.warmup_steps = 1000
    c.train.ema_decay = 0.999
    c.train.log_every = 100
    c.train.eval_every = 2500
    c.train.checkpoint_every = 2500
    c.eval.batch_size = 64
    c.eval.max_tokens = 0
    c.eval.during_training_max_tokens = 32_768
    c.eval.num_time_samples = 4
    c.eval.seeds = (0, 1, 2)
    c.compare.memory_depths = (2, 6, 12, 24)
  return c
