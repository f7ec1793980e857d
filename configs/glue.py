r"""GLUE fine-tuning benchmark: prompt-based (MeZO / LM-BFF) and head fine-tuning of bdiff Qwen3
models and OPT, with first-order (AdamW) and zeroth-order (MeZO, DiZO) update rules.

Run:
  python main.py --config configs/glue.py:test --workdir /tmp/glue_test --mode=glue \
      --config.glue.glue_dir=<dir with SST-2/train.tsv, dev.tsv>
  python main.py --config configs/glue.py:quick --workdir runs/glue_quick --mode=glue \
      --config.glue.init_workdir_reversible=runs/wt2_reversible_qwen3 \
      --config.glue.init_workdir_standard=runs/wt2_standard_qwen3 --config.glue.opt_dir=runs/wt2_opt
      # WikiText-2 workdirs: configs/wikitext2.py:cpu with --config.model.block=qwen3 and
      # --config.model.backbone=reversible|standard, and configs/wikitext2.py:cpu_opt
  python main.py --config configs/glue.py:quick --workdir runs/glue_quick_opt --mode=glue \
      --config.glue.rows=opt:mezo,opt:dizo,opt:adamw \
      --config.glue.opt_dir=runs/wt2_opt   # OPT pretrained here: configs/wikitext2.py:cpu_opt
  python main.py --config configs/glue.py:full,scale=1 --workdir runs/glue_full --mode=glue \
      --config.glue.opt_dir=/data/opt-1.3b

What it gives (glue.md / glue.json / glue.png in the workdir): per task and row, the dev metric
(mean ± std over seeds), the majority-class baseline, the prediction distribution and flags
("constant predictor", "at or below majority"), steps, forward/backward passes, train seconds,
train-step memory, parameters, what the row was initialised from and (word-level models) the
out-of-vocabulary rate.

  test:  tiny from-scratch bdiff models + the tiny OPT fixture on a tiny SST-2-layout TSV, a few
         steps, 2 seeds: a wiring check (accuracies near chance; rows flagged). < 1 min on CPU.
  quick: SST-2 from ../shared/data/glue, k=16 per class, 500 held-out selection examples, dev
         (872); bdiff rows initialised from `glue.init_workdir_reversible` /
         `glue.init_workdir_standard` (WikiText-2 workdirs whose model matches the row's
         backbone; '' = from scratch); OPT from `glue.opt_dir` (default:
         the tiny fixture). Point opt_dir at a real Hugging Face checkpoint, or, where none
         can be downloaded, at a WikiText-2 workdir trained with configs/wikitext2.py:cpu_opt
         (the OPT architecture pretrained autoregressively here; its word vocabulary and
         checkpoint `glue.init_checkpoint` are used, and glue.seq_len must not exceed its
         data.seq_len). About 2 minutes per row and seed on 2 CPU cores; the measured
         table (from WikiText-2 models pretrained for minutes: all rows at chance) is in
         docs/glue.md.
  full:  GPU/TPU; scale=0,1,2: bdiff shapes 6x512 (8 heads, 4 kv), 12x768 (12/6), 24x1024
         (16/8), k=16, 1,000 dev examples, 3 seeds, 1,000 steps per row. Not yet measured.
"""

import os

import ml_collections

from bdiff_jax.configuration import base_config

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCALES = ((6, 512, 8, 4), (12, 768, 12, 6), (24, 1024, 16, 8))


def _bdiff(num_layers, emb_dim, num_heads, num_kv_heads):
  c = base_config()
  c.model.block = "qwen3"
  c.model.objective = "diffusion"
  c.model.num_layers = num_layers
  c.model.emb_dim = emb_dim
  c.model.num_heads = num_heads
  c.model.num_kv_heads = num_kv_heads
  c.model.head_dim = emb_dim // num_heads
  c.model.mlp_dim = 4 * emb_dim
  c.model.time_conditioning = "none"
  return c


def _parse(arg: str) -> tuple[str, dict]:
  level, *rest = (arg or "test").split(",")
  opts = dict(kv.split("=", 1) for kv in rest if kv)
  return level, opts


def get_config(arg: str = "test"):
  level, opts = _parse(arg)
  c = ml_collections.ConfigDict()
  g = c.glue = ml_collections.ConfigDict()
  g.level = level
  g.tasks = "SST-2"
  g.glue_dir = os.path.join(_REPO, "..", "shared", "data", "glue")
  g.rows = ("reversible_qwen3:adamw,standard_qwen3:adamw,opt:mezo,opt:dizo,opt:adamw,"
            "opt:adamw:head")
  g.seeds = (0, 1)
  g.k_per_class = 16
  g.selection = 64
  g.eval_max = 1000
  g.seq_len = 64
  g.batch_size = 8
  g.eval_batch_size = 32
  g.num_steps = 100
  g.eval_every = 25
  g.opt_dir = os.path.join(_REPO, "tests", "fixtures", "tiny_opt")
  g.init_workdir = ""  # the bdiff rows' start: a WikiText-2 workdir ('' = from scratch)...
  g.init_workdir_reversible = ""  # ...or one per backbone (reversible_qwen3 / standard_qwen3)
  g.init_workdir_standard = ""
  g.init_checkpoint = "best"
  g.bdiff = _bdiff(2, 64, 4, 2)
  g.adamw = base_config().train
  g.adamw.learning_rate = 1e-4
  g.adamw.warmup_steps = 0
  g.adamw.weight_decay = 0.0
  g.adamw.ema_decay = 0.0
  g.zo = ml_collections.ConfigDict(dict(learning_rate=1e-6, schedule="constant", eps=1e-3,
                                        num_perturbations=1, weight_decay=0.0,
                                        freeze_embeddings=True))
  g.dizo = ml_collections.ConfigDict(dict(interval=50, iterations=10, eps_p=0.1, step_size=2.0,
                                          tau=0.2))
  if level == "test":
    g.description = "CI wiring check: tiny models, a few steps; numbers are not results."
    g.bdiff = _bdiff(1, 32, 2, 1)
    g.seq_len = 40
    g.batch_size = 4
    g.eval_batch_size = 16
    g.k_per_class = 4
    g.selection = 8
    g.num_steps = 3
    g.eval_every = 2
    g.dizo.interval = 2
    g.dizo.iterations = 2
    g.adamw.learning_rate = 1e-3
    g.zo.learning_rate = 1e-3
  elif level == "quick":
    g.description = "SST-2, k=16 per class, CPU-sized."
    g.selection = 500
    g.num_steps = 200
    g.eval_every = 50
    g.adamw.learning_rate = 1e-4
  elif level == "full":
    scale = int(opts.get("scale", 0))
    g.description = f"GPU/TPU, bdiff scale {_SCALES[scale]}."
    g.bdiff = _bdiff(*_SCALES[scale])
    g.seeds = (0, 1, 2)
    g.selection = 500
    g.seq_len = 128
    g.batch_size = 16
    g.num_steps = 1000
    g.eval_every = 100
  else:
    raise ValueError(f"unknown glue level {level!r}: use test, quick or full")
  return c
