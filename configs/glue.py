r"""GLUE fine-tuning benchmark: prompt-based (MeZO / LM-BFF) and head fine-tuning of bdiff
Qwen3-style models and OPT, with first-order (AdamW) and zeroth-order (MeZO, DiZO) update rules.

  test   python main.py --config configs/glue.py:test --workdir /tmp/glue_test --mode=glue \
             --config.glue.glue_dir=<dir with SST-2/train.tsv, dev.tsv>
         CI wiring check, < 1 min on CPU: tiny from-scratch bdiff models + the tiny OPT fixture
         (tests/fixtures/tiny_opt), a few steps, 2 seeds. Gives accuracies near chance, every row
         flagged ("selected step 0", "within 2 standard errors of the majority", ...): numbers
         that are not results. The learning tests (tests/test_glue_learning.py) raise the steps
         on a separable toy task and require >= 0.9.
  quick  python main.py --config configs/glue.py:quick --workdir runs/glue_quick --mode=glue \
             --config.glue.init_workdir_reversible=runs/wt2_reversible_qwen3 \
             --config.glue.init_workdir_standard=runs/wt2_standard_qwen3 \
             --config.glue.opt_dir=runs/wt2_opt
         SST-2, k=16 per class, a balanced selection set of 500, dev (872), 3 seeds, 200 steps.
         WikiText-2 workdirs: configs/wikitext2.py:cpu with --config.model.block=qwen3 and
         --config.model.backbone=reversible|standard; runs/wt2_opt: configs/wikitext2.py:cpu_opt
         (the OPT architecture pretrained here; its word vocabulary and checkpoint
         `glue.init_checkpoint` are used; glue.seq_len must not exceed its data.seq_len), or a
         Hugging Face OPT directory. About 2 minutes per row and seed on 2 CPU cores. Gives
         k=16 numbers of CPU-pretrained models: expect chance (flagged) unless the start models
         are good; compare with the BoW LR column (the data ceiling of k=16: near chance).
  cpu    python main.py --config configs/glue.py:cpu --workdir runs/glue_cpu --mode=glue
         One command: first pretrains on WikiText-2 (or reuses when finished, resumes when
         interrupted) the three start models under `glue.starts_dir` (runs/glue_starts), 30
         minutes each on 2 cores: reversible and standard Qwen3-style diffusion
         (configs/wikitext2.py:cpu with model.block=qwen3) and the OPT architecture trained
         autoregressively (configs/wikitext2.py:cpu_opt). Then every task in ../shared/data
         (GLUE SST-2, MRPC, RTE, WNLI, STS-B; SuperGLUE WiC, COPA, WSC, MultiRC), 3 seeds, a
         balanced selection set of 500 (at most 10% of train); first-order rows on the full
         train split minus the selection set (8,000 AdamW steps); MeZO (full and LoRA) and
         DiZO rows 5,000 steps, ±1 perturbations (`glue.zo.noise`), the learning rate chosen
         from `glue.zo.learning_rates` on the selection set (500 steps each on seed 0). Many
         hours on 2 CPU cores (SST-2, one core per unit: ~15-30 min per AdamW unit on a
         Qwen3-style start, ~11 on OPT, 3-5 per zeroth-order unit; more than a day for the whole
         level, docs/glue.md). Gave on SST-2 (2026-12-07, 3 seeds): AdamW reversible
         0.807 +- 0.015, standard 0.805 +- 0.005, OPT 0.802 +- 0.004 (bag-of-words 0.798,
         majority 0.509); MeZO 0.577 +- 0.019, DiZO 0.554 +- 0.017, MeZO+LoRA 0.500 +- 0.014
         (its grid chose 1e-1, the one rate that moved a prediction in 500 steps; flagged).
         The start probe (a linear readout of the OPT start's label-slot features) gave 0.583
         on a re-pretrained start whose MeZO row gave 0.551 +- 0.012: the zeroth-order rows
         learn a readout, not features (docs/glue.md).
  full   python main.py --config configs/glue.py:full,scale=1 --workdir runs/glue_full \
             --mode=glue --config.glue.opt_dir=/data/opt-1.3b
         GPU/TPU; scale=0,1,2: bdiff shapes 6x512 (8 heads, 4 kv), 12x768 (12/6), 24x1024
         (16/8), k=16, 1,000 dev examples, 3 seeds, 1,000 steps per row. Not yet measured.

`glue.opt_dir` is '' by default and every level but `test` refuses to run an opt row without an
existing one (no silent stand-in); `test` uses the tiny fixture. The bdiff rows are
"Qwen3-style" networks (the Qwen3 block at the shapes of `glue.bdiff`, word-level vocabulary),
not Qwen3 checkpoints; each row's `init` says so with its parameter count.

What it gives (glue.md / glue.json / glue.png / glue_curves_<task>.png in the workdir): per task
(MNLI: MNLI-m and MNLI-mm) and row, the dev metric (mean ± std over seeds) beside the step-0
(zero-shot) dev metric, the majority class, a bag-of-words logistic regression on the row's
training examples and twice the dev standard error; the selection score of the selected and of
step 0, the selected steps, the relative parameter change, the prediction distribution and
flags; steps, forward/backward passes, seconds, train-step memory, parameters, init, OOV rate;
DiZO vs MeZO at equal forward passes; the learning-rate grids. glue.json's records hold each
seed's curve (selection score, dev metric, forward passes, seconds at every evaluation).

Data options (see bdiff_jax/modes/glue.py): `glue.k_per_class` (> 0: k per class of train minus
the selection set; 0: all of it), `glue.train_examples` (> 0: at most that many of those, drawn
by the seed), `glue.selection` / `glue.selection_fraction` / `glue.selection_balanced`.
`glue.starts_dir` (cpu level: pretrain the start models there first, 30 minutes each, or reuse them).
"""

import os

import ml_collections

from bdiff_jax.config.configuration import base_config

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
  g.superglue_dir = os.path.join(_REPO, "..", "shared", "data", "superglue")
  g.rows = ("reversible_qwen3:adamw,standard_qwen3:adamw,opt:mezo,opt:dizo,opt:adamw,"
            "opt:adamw:head")
  g.seeds = (0, 1, 2)
  g.k_per_class = 16  # > 0: k per class of train minus the selection set; 0: all of it
  g.train_examples = 0  # > 0: at most this many train examples (drawn by the seed); 0: no cap
  g.selection = 64  # the selection set's size...
  g.selection_fraction = 0.0  # ...at most this fraction of train (0 = no cap)
  g.selection_balanced = True  # stratified per class (STS-B: per score half)
  g.eval_max = 1000
  g.seq_len = 64
  g.seq_len_by_task = ""  # "SST-2:64,RTE:128": a task's own length (at most seq_len)
  g.batch_size = 8
  g.eval_batch_size = 32
  g.num_steps = 100
  g.eval_every = 25
  g.dev_curve = True  # evaluate dev at every evaluation point too (the curves)
  g.opt_dir = ""  # required by opt rows (no default model); `test`: the tiny fixture
  g.init_workdir = ""  # the bdiff rows' start: a WikiText-2 workdir ('' = from scratch)...
  g.init_workdir_reversible = ""  # ...or one per backbone (reversible_qwen3 / standard_qwen3)
  g.init_workdir_standard = ""
  g.init_checkpoint = "best"
  # Start models pretrained on WikiText-2 (glue_starts): '' = off; else a directory where the
  # rows' start models are trained (or reused when finished, resumed when interrupted) for
  # `starts_budget_seconds` each, and used as init_workdir_* / opt_dir.
  g.starts_dir = ""
  g.starts_budget_seconds = 1800.0  # the main command's 30 minutes
  g.lora_rank = 8  # rows with the `lora` option (MeZO's LoRA setting: r 8, alpha 16)
  g.lora_alpha = 16.0
  g.bdiff = _bdiff(2, 64, 4, 2)
  g.adamw = base_config().train
  g.adamw.learning_rate = 1e-4
  g.adamw.warmup_steps = 0
  g.adamw.weight_decay = 0.0
  g.adamw.ema_decay = 0.0
  g.zo = ml_collections.ConfigDict(dict(learning_rate=1e-6, schedule="constant", eps=1e-3,
                                        num_perturbations=1, weight_decay=0.0, noise="gaussian",
                                        freeze="none"))  # MeZO's setting: every parameter
  # A learning-rate grid for the zeroth-order rows: each candidate trains `grid_steps` steps on
  # the first seed; the best selection score's rate is used for every seed (() = off).
  g.zo.learning_rates = ()
  g.zo.num_steps = 0  # the zeroth-order rows' steps (0 = glue.num_steps)
  g.zo.grid_steps = 500
  # A zeroth-order row with the `lora` option uses these instead of glue.zo's where non-zero:
  # LoRA's B factor starts at zero, and with the full model's eps (1e-3) and rates it does not
  # move at all (SST-2, cpu level, docs/glue.md); MeZO's LoRA runs use larger rates too.
  g.lora_zo = ml_collections.ConfigDict(dict(eps=0.0, learning_rate=0.0, learning_rates=()))
  # fresh_batches: each γ iteration of DiZO's projection search draws its own batch, as the
  # reference does (the step then reads 1 + iterations batches).
  g.dizo = ml_collections.ConfigDict(dict(interval=50, iterations=10, eps_p=0.1, step_size=2.0,
                                          tau=0.2, fresh_batches=True))
  if level == "test":
    g.description = "CI wiring check: tiny models, a few steps; numbers are not results."
    g.opt_dir = os.path.join(_REPO, "tests", "fixtures", "tiny_opt")
    g.seeds = (0, 1)
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
  elif level == "cpu":
    g.description = ("GLUE + SuperGLUE tasks of shared/data, full train minus a balanced "
                     "selection set, 3 seeds, CPU-sized models.")
    g.tasks = "SST-2,MRPC,RTE,WNLI,STS-B,WiC,COPA,WSC,MultiRC"
    g.rows = ("reversible_qwen3:adamw,standard_qwen3:adamw,opt:adamw,opt:mezo,opt:mezo:lora,"
              "opt:dizo")
    g.starts_dir = os.path.join("runs", "glue_starts")
    g.seq_len = 128  # the start models' positions; pair tasks need the room
    g.seq_len_by_task = "SST-2:64,WiC:64,COPA:64"  # short texts: less padding
    g.k_per_class = 0
    g.selection = 500
    g.selection_fraction = 0.1
    g.eval_max = 1000
    g.batch_size = 16
    # Two epochs of SST-2: at 4,000 steps (one epoch) the dev accuracy was still rising when
    # the cosine schedule ended (3 seeds per row, row means 0.789-0.794); at 8,000 the three
    # first-order rows' means are 0.802-0.807 (docs/glue.md).
    g.num_steps = 8000
    g.eval_every = 500
    # Chosen on the SST-2 selection set (seed 0, reversible start, 1,000 steps): 1e-3 reached
    # informedness 0.232 (dev 0.696), 1e-4 only 0.100 (dev 0.587).
    g.adamw.learning_rate = 1e-3
    g.adamw.warmup_steps = 100
    g.zo.learning_rates = (1e-6, 1e-5, 1e-4, 1e-3)  # small models need larger rates than OPT-13B
    # ±1 perturbations (SPSA's): on CPU, drawing OPT's 5.1M Gaussian z three times per step
    # took most of a MeZO step (200 SST-2 steps: 23 s Gaussian, 7 s Rademacher, one core).
    g.zo.noise = "rademacher"
    g.zo.grid_steps = 500
    g.zo.num_steps = 5000
    g.lora_zo.eps = 1e-2  # measured on SST-2: the LoRA row moved (0.548) only with these
    g.lora_zo.learning_rates = (1e-3, 1e-2, 1e-1)
  elif level == "full":
    scale = int(opts.get("scale", 0))
    if not 0 <= scale < len(_SCALES):
      raise ValueError(f"unknown glue scale {scale}: use full,scale=0, 1 or 2")
    g.description = f"GPU/TPU, bdiff scale {_SCALES[scale]}."
    g.bdiff = _bdiff(*_SCALES[scale])
    g.selection = 500
    g.seq_len = 128
    g.batch_size = 16
    g.num_steps = 1000
    g.eval_every = 100
  else:
    raise ValueError(f"unknown glue level {level!r}: use test, quick, cpu or full")
  return c
