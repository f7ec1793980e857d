r"""Masked-diffusion LM on WikiText-2 (word level).

Run:
  python main.py --config configs/wikitext2.py --workdir runs/wt2            # default (GPU-sized)
  python main.py --config configs/wikitext2.py:cpu --workdir runs/wt2_cpu    # ~30 min on 2 CPU cores
  python main.py --config configs/wikitext2.py:smoke --workdir /tmp/smoke    # < 1 min, used by tests

Expected results (word-level perplexity UPPER BOUNDS from the diffusion ELBO, 3 eval seeds):
  smoke:   ~45 s on 2 CPU cores; bound ~1.4e3 valid / ~650 test on the first 2,048 tokens of
           each split (a wiring check: the output bias starts at the unigram model).
  cpu:     30 min of training on 2 shared CPU cores (312 of 500 steps, 1.28M tokens, stopped by
           train.max_wall_seconds), then the full splits: valid 875 ± 32, test 862 ± 43.
  default: sized for one GPU; not yet measured (no accelerator was available).

Presets: "" (default), "smoke", "cpu". Any field can be overridden with --config.<field>=...
"""

from bdiff_jax.configuration import base_config


def get_config(preset: str = ""):
  c = base_config()
  preset = preset or "default"
  if preset == "default":
    # Sized for one GPU; also runs (slowly) on CPU.
    c.data.seq_len = 256
    c.model.num_layers = 8
    c.model.emb_dim = 512
    c.model.num_heads = 8
    c.model.num_kv_heads = 8
    c.model.head_dim = 64
    c.model.mlp_dim = 2048
    c.model.dropout_rate = 0.1
    c.train.batch_size = 64
    c.train.num_steps = 50_000
    c.train.learning_rate = 5e-4
    c.train.warmup_steps = 1000
    c.train.eval_every = 2500
    c.train.checkpoint_every = 2500
    c.eval.during_training_max_tokens = 32_768
    c.eval.num_time_samples = 4
  elif preset == "cpu":
    # About 30 minutes of training on 2 CPU cores (plus the full-split evaluation).
    c.data.seq_len = 128
    c.model.num_layers = 4
    c.model.emb_dim = 128
    c.model.num_heads = 4
    c.model.num_kv_heads = 4
    c.model.head_dim = 32
    c.model.mlp_dim = 512
    c.train.batch_size = 32
    c.train.num_steps = 500
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 50
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.ema_decay = 0.98
    c.train.max_wall_seconds = 1800.0
    c.eval.batch_size = 64
    c.eval.during_training_max_tokens = 8192
    c.eval.num_time_samples = 1
  elif preset == "smoke":
    # Wiring check on the real data, well under a minute on CPU; evaluation on a subset.
    c.data.seq_len = 64
    c.model.num_layers = 2
    c.model.emb_dim = 64
    c.model.num_heads = 2
    c.model.num_kv_heads = 2
    c.model.head_dim = 32
    c.model.mlp_dim = 128
    c.train.batch_size = 16
    c.train.num_steps = 40
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 5
    c.train.log_every = 10
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.train.ema_decay = 0.0
    c.train.progress_bar = False
    c.eval.batch_size = 32
    c.eval.max_tokens = 2048
    c.eval.during_training_max_tokens = 1024
    c.sample.num_samples = 2
    c.sample.length = 32
    c.sample.num_steps = 16
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'smoke' or 'cpu'")
  return c
