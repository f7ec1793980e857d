"""The base configuration shared by every config file, and its validation.

Config files in `configs/` start from `base_config()` and override fields. `validate()` checks
every value before anything expensive happens, so a typo fails in the first second with a message
that names the field and the allowed values.
"""

import math
import os

import ml_collections

from bdiff_jax.diffusion import corruption
from bdiff_jax.errors import ConfigError
from bdiff_jax.config import rule_settings
from bdiff_jax.models import adaptive_head

BACKBONES = ("standard", "reversible", "opt")
BLOCKS = ("simple", "qwen3")
OBJECTIVES = ("diffusion", "autoregressive")  # bdiff_jax.objectives.NAMES (a test checks)
SCHEDULES = ("linear", "cosine", "polynomial")
CORRUPTIONS = ("absorbing", "prototype_mix")
ESTIMATORS = corruption.ESTIMATORS
TIME_CONDITIONING = ("none", "adaln")
POSITIONAL = ("rope", "learned")
DTYPES = ("float32", "bfloat16", "float64")
REVERSIBLE_BACKWARD = ("recompute", "autodiff")
ATTENTION = ("dense", "candidate")
HEADS = ("full", "adaptive")
VARIANTS = ("v1", "raw")
SAMPLING_GRIDS = ("cosine", "uniform")


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every field. Config files override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Which preset of the config file this is and why it was chosen (set by configs/*.py; the
  # train mode prints it). Informational only.
  c.preset = ""
  c.preset_reason = ""

  c.data = ml_collections.ConfigDict()
  c.data.name = "wikitext2"
  c.data.variant = "v1"  # "v1": word-level .tokens files; "raw": .raw files.
  # Directory holding wiki.{train,valid,test}.tokens (or .raw). Empty: download when online.
  c.data.data_dir = os.environ.get("BDIFF_DATA_DIR", "")
  # Where TFDS writes the prepared array_record files. Empty: <workdir>/tfds.
  c.data.tfds_dir = ""
  c.data.seq_len = 128
  # Check that each split has WikiText-2's published word/line counts (catches truncated files).
  # Tests on tiny synthetic corpora turn it off.
  c.data.verify_counts = True

  c.model = ml_collections.ConfigDict()
  # "standard" | "reversible" | "opt": OPT's architecture (pre-LN, ReLU, learned positions,
  # tied head; bdiff_jax/models/opt_network.py), autoregressive objective only.
  c.model.backbone = "standard"
  c.model.block = "simple"  # "simple" (LayerNorm + GELU MLP) | "qwen3"
  c.model.objective = "diffusion"  # "diffusion" | "autoregressive"
  c.model.num_layers = 4
  c.model.emb_dim = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.head_dim = 64
  c.model.mlp_dim = 1024
  c.model.dropout_rate = 0.0
  c.model.time_conditioning = "adaln"  # "none" | "adaln"
  c.model.positional = "rope"  # "rope" | "learned"
  c.model.rope_theta = 10000.0
  c.model.norm_eps = 1e-6
  c.model.tie_embeddings = True
  # The output head: "full" (a softmax over all V words) or "adaptive" (the adaptive softmax,
  # bdiff_jax/models/adaptive_head.py: exact probabilities; a shortlist of the most frequent
  # words [0, c_0) plus one logit per tail cluster [c_i, c_i+1), whose words are scored from a
  # projection of width emb_dim / shrink^(i+1), only for rows whose target is in the cluster).
  c.model.head = "full"
  c.model.adaptive_cutoffs = (4000, 12000)
  c.model.adaptive_shrink = 4
  # Rows of each tail cluster's gathered buffer, as a fraction of the rows scored; a batch with
  # more targets in a cluster is computed exactly over all rows (slower). Speed only.
  c.model.adaptive_tail_capacity = 0.15
  # Initial output bias (simple block only): "unigram" = log train-split token frequencies, so
  # training starts at the unigram model instead of spending its first steps learning it.
  c.model.head_bias_init = "unigram"  # "unigram" | "zeros"
  c.model.dtype = "float32"  # compute dtype of attention/MLP: float32 | bfloat16 | float64
  c.model.reversible_backward = "recompute"  # "recompute" | "autodiff"
  # Standard backbone only: recompute each layer's activations in the backward pass
  # (`nn.remat` around the scanned layer): training keeps one layer's inputs per layer instead
  # of all its intermediates, for ~1 extra forward pass of compute. Same loss and gradients.
  c.model.remat = False
  c.model.attention = "dense"  # "dense" | "candidate"
  c.model.candidate_k = 0  # keys kept per query with attention="candidate"

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "linear"  # "linear" | "cosine" | "polynomial"
  c.diffusion.schedule_exponent = 2.0  # for "polynomial"
  c.diffusion.corruption = "absorbing"  # "absorbing" | "prototype_mix"
  c.diffusion.uniform_fraction = 0.1  # share of corrupted tokens substituted, "prototype_mix" only
  c.diffusion.antithetic = True
  # The Monte Carlo estimator of the ELBO, in training and evaluation (bdiff_jax/diffusion/elbo.py):
  # "time": t ~ U(0, 1], Bernoulli masks, weight w(t); "count": k ~ U{1..L} masked tokens
  # exactly, weight L / k, the network conditioned on k / L. The same bound in expectation for
  # a denoiser of z alone; "count" has bounded weights and far lower variance.
  c.diffusion.estimator = "time"
  # Output head + cross-entropy only at masked positions (exactly the same loss and bound; a
  # fixed-size gather with an exact fallback). False: the head at every position.
  c.diffusion.masked_head = True
  # Run the masked head on this many rows at a time (recomputed in the backward): less memory
  # for large vocabularies x batches; 0 = all at once.
  c.diffusion.head_chunk_rows = 0
  # Training only: score at most this many of each sequence's masked positions (a uniform random
  # subset, scaled up: an unbiased estimate of the same loss, the head at batch x this many
  # rows); 0 = all of them. Evaluation always scores every masked position.
  c.diffusion.train_positions_per_seq = 0

  c.train = ml_collections.ConfigDict()
  # How parameters are updated: "adamw" (backpropagation + AdamW), or the zeroth-order rules
  # "mezo" / "dizo" (two forward passes per step, no gradient; settings in train.zo/train.dizo).
  c.train.update_rule = "adamw"
  c.train.zo = rule_settings.default_config().zo
  c.train.dizo = rule_settings.default_config().dizo
  c.train.batch_size = 32
  c.train.num_steps = 10_000
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 500
  c.train.end_learning_rate_fraction = 0.1
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.99
  c.train.grad_clip = 1.0
  c.train.ema_decay = 0.999  # 0 disables EMA (the EMA params then equal the params)
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  # Also checkpoint when this many minutes passed since the last save (0 = off), so that a
  # SIGKILL loses little even when checkpoint_every steps take long.
  c.train.checkpoint_every_minutes = 30.0
  c.train.max_wall_seconds = 0.0  # stop (with a checkpoint) after this much time; 0 = no limit
  # Fit num_steps (then an upper limit) to max_wall_seconds: the trainer times the first steps
  # (inside the warmup) and picks the longest schedule that ends within the budget, so that the
  # learning rate decays fully on any machine (bdiff_jax/train/wall_schedule.py).
  c.train.fit_steps_to_wall = False
  # Stop (with a checkpoint) at this step without changing the LR schedule, e.g. to split one
  # run of num_steps over several jobs; 0 = run to num_steps.
  c.train.stop_at_step = 0
  c.train.progress_bar = True

  # The device mesh (bdiff_jax/runtime/sharding.py): `data` x `fsdp` devices over all processes.
  # fsdp=1 replicates the state on every device (data parallelism); fsdp=k splits each state
  # leaf with >= 2 dims k ways along its largest dim divisible by k. data=-1: all remaining.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.num_time_samples = 1  # K time draws per sequence for the diffusion bound
  c.eval.seeds = (0, 1, 2)  # spread of the bound over evaluation seeds
  c.eval.max_tokens = 0  # evaluate only the first N tokens of each split; 0 = the whole split
  # Periodic evals score about this many tokens in blocks spread evenly over the validation
  # split (pipeline.spread_blocks; a prefix is not representative); 0 = the whole split.
  c.eval.during_training_max_tokens = 0
  c.eval.use_ema = True
  c.eval.checkpoint = "best"  # for --mode=eval/sample: "best" | "latest" | a step number

  c.sample = ml_collections.ConfigDict()
  c.sample.num_samples = 4
  c.sample.length = 128
  c.sample.num_steps = 128
  c.sample.grid = "cosine"  # "cosine" | "uniform"
  c.sample.temperature = 1.0
  c.sample.top_k = 0
  c.sample.top_p = 1.0
  c.sample.prompt = ""  # words; "[MASK]" marks a hole to infill
  c.sample.seed = 0
  # The sample quality table (bdiff_jax/evaluation/sample_quality.py), in --mode=sample and after
  # training:
  # the workdir of an autoregressive model trained on the same data and vocabulary, whose exact
  # NLL gives the samples' generative perplexity; "" = none (entropies only).
  c.sample.judge_workdir = ""
  # Sampler step counts of the table's rows, comma-separated ("32,128"); "" = sample.num_steps.
  c.sample.quality_steps = ""
  return c


def _choice(path, value, allowed):
  if value not in allowed:
    raise ConfigError(
        f"config.{path}={value!r} is not one of {', '.join(map(repr, allowed))}.",
        f"set --config.{path} to one of those values.")


def _positive(path, value, *, allow_zero=False):
  ok = value >= 0 if allow_zero else value > 0
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise ConfigError(f"config.{path}={value!r} is invalid: it must be {bound}.",
                      f"pass --config.{path}=<a value {bound}>.")


def _in_unit(path, value, *, closed_low=True, closed_high=True):
  low_ok = value >= 0 if closed_low else value > 0
  high_ok = value <= 1 if closed_high else value < 1
  if not (low_ok and high_ok):
    lo = "[" if closed_low else "("
    hi = "]" if closed_high else ")"
    raise ConfigError(f"config.{path}={value!r} must lie in {lo}0, 1{hi}.",
                      f"pass --config.{path}=<a value in {lo}0, 1{hi}>.")


def _validate_opt(m) -> None:
  """What OPT's architecture cannot do (bdiff_jax/models/opt_network.py)."""
  if m.objective != "autoregressive":
    raise ConfigError(
        f"config.model.backbone='opt' is a causal LM; it cannot be trained with "
        f"objective={m.objective!r}.",
        "pass --config.model.objective=autoregressive --config.model.time_conditioning=none, "
        "or another backbone.")
  if m.emb_dim % m.num_heads:
    raise ConfigError(f"config.model.emb_dim={m.emb_dim} is not divisible by "
                      f"config.model.num_heads={m.num_heads} (OPT's head size).",
                      "choose num_heads dividing emb_dim.")
  if not m.tie_embeddings or m.attention != "dense":
    raise ConfigError("backbone 'opt' has a tied LM head and dense attention; "
                      f"config.model.tie_embeddings={m.tie_embeddings!r}, "
                      f"attention={m.attention!r} cannot be honoured.",
                      "pass --config.model.tie_embeddings=true --config.model.attention=dense.")


def quality_steps(sample_config) -> tuple[int, ...]:
  """The sampler step counts of the quality table: `sample.quality_steps` ("32,128"), ascending
  and without repeats, or (sample.num_steps,) when it is empty.

  Raises:
    ConfigError: a part that is not a whole number > 0.
  """
  text = str(sample_config.quality_steps).strip()
  if not text:
    return (int(sample_config.num_steps),)
  parts = [p.strip() for p in text.split(",")]
  if not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ConfigError(
        f"config.sample.quality_steps={text!r} is not a comma-separated list of step counts > 0.",
        "pass e.g. --config.sample.quality_steps=32,128, or '' for config.sample.num_steps alone.")
  return tuple(sorted({int(p) for p in parts}))


def _check_finite(c, prefix: str = "") -> None:
  """Every float of the config (also inside tuples) is finite: inf or nan is never a setting
  (`sample.temperature=inf` would otherwise pass `> 0` and fail only when sampling, after a
  whole training run)."""
  for key, value in c.items():
    path = f"{prefix}{key}"
    if hasattr(value, "items"):
      _check_finite(value, f"{path}.")
      continue
    values = value if isinstance(value, (tuple, list)) else (value,)
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
      raise ConfigError(f"config.{path}={value!r} is not a finite number.",
                        f"pass a finite value as --config.{path}.")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field (every field train, eval and sample read:
  the modes call this before they create, lock or write anything)."""
  _check_finite(c)
  _choice("data.variant", c.data.variant, VARIANTS)
  _positive("data.seq_len", c.data.seq_len)
  m = c.model
  _choice("model.backbone", m.backbone, BACKBONES)
  _choice("model.block", m.block, BLOCKS)
  _choice("model.objective", m.objective, OBJECTIVES)
  _choice("model.time_conditioning", m.time_conditioning, TIME_CONDITIONING)
  _choice("model.positional", m.positional, POSITIONAL)
  _choice("model.dtype", m.dtype, DTYPES)
  _choice("model.reversible_backward", m.reversible_backward, REVERSIBLE_BACKWARD)
  _choice("model.attention", m.attention, ATTENTION)
  _choice("model.head_bias_init", m.head_bias_init, ("unigram", "zeros"))
  _choice("model.head", m.head, HEADS)
  if m.head == "adaptive":
    problem = adaptive_head.layout_problem(None, tuple(m.adaptive_cutoffs), m.emb_dim,
                                           m.adaptive_shrink)
    if problem:
      raise ConfigError(f"config.{problem}.",
                        "pass e.g. --config.model.adaptive_cutoffs=\"(4000, 12000)\" "
                        "--config.model.adaptive_shrink=4, or --config.model.head=full.")
    if m.backbone == "opt":
      raise ConfigError("config.model.head='adaptive' is not available for backbone 'opt' "
                        "(OPT's LM head is tied to its full embedding table).",
                        "pass --config.model.head=full.")
    _in_unit("model.adaptive_tail_capacity", m.adaptive_tail_capacity, closed_low=False)
  for f in ("num_layers", "emb_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
    _positive(f"model.{f}", m[f])
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(
        f"config.model.num_heads={m.num_heads} is not a multiple of "
        f"config.model.num_kv_heads={m.num_kv_heads}.",
        "choose num_kv_heads dividing num_heads (grouped-query attention).")
  if m.positional == "rope" and m.head_dim % 2 and m.backbone != "opt":  # OPT: learned
    raise ConfigError(f"config.model.head_dim={m.head_dim} must be even for RoPE.",
                      "use an even head_dim or --config.model.positional=learned.")
  _in_unit("model.dropout_rate", m.dropout_rate, closed_high=False)
  _positive("model.rope_theta", m.rope_theta)
  _positive("model.norm_eps", m.norm_eps)
  if m.attention == "candidate":
    _positive("model.candidate_k", m.candidate_k)
  if m.backbone == "opt":
    _validate_opt(m)
  if not isinstance(m.remat, bool):
    raise ConfigError(f"config.model.remat={m.remat!r} must be true or false.",
                      "pass --config.model.remat=true or false.")
  if m.remat and m.backbone != "standard":
    raise ConfigError(
        f"config.model.remat=True applies to the standard backbone, not {m.backbone!r} (the "
        "reversible backbone already rebuilds its activations by inversion).",
        "pass --config.model.remat=false as well (the gpu and tpu presets set it), or use "
        "--config.model.backbone=standard.")
  d = c.diffusion
  _choice("diffusion.schedule", d.schedule, SCHEDULES)
  _choice("diffusion.corruption", d.corruption, CORRUPTIONS)
  _choice("diffusion.estimator", d.estimator, ESTIMATORS)
  corruption.check_estimator(d.estimator, d.corruption)
  _positive("diffusion.schedule_exponent", d.schedule_exponent)
  _positive("diffusion.head_chunk_rows", d.head_chunk_rows, allow_zero=True)
  _positive("diffusion.train_positions_per_seq", d.train_positions_per_seq, allow_zero=True)
  if d.train_positions_per_seq and not d.masked_head:
    raise ConfigError(
        f"config.diffusion.train_positions_per_seq={d.train_positions_per_seq} needs the masked "
        "head (it runs the head at the chosen positions only), but diffusion.masked_head is "
        "False.",
        "pass --config.diffusion.masked_head=true, or --config.diffusion.train_positions_per_seq=0.")
  _in_unit("diffusion.uniform_fraction", d.uniform_fraction)
  t = c.train
  _choice("train.update_rule", t.update_rule, ("adamw", "mezo", "dizo"))
  rule_settings.validate(t)
  for f in ("batch_size", "num_steps", "learning_rate", "log_every", "eval_every",
            "checkpoint_every", "keep_checkpoints"):
    _positive(f"train.{f}", t[f])
  for f in ("warmup_steps", "weight_decay", "grad_clip", "max_wall_seconds", "stop_at_step",
            "checkpoint_every_minutes"):
    _positive(f"train.{f}", t[f], allow_zero=True)
  _in_unit("train.end_learning_rate_fraction", t.end_learning_rate_fraction)
  if t.fit_steps_to_wall:
    if not t.max_wall_seconds:
      raise ConfigError("config.train.fit_steps_to_wall=True needs a wall-clock budget, but "
                        "train.max_wall_seconds is 0.",
                        "pass --config.train.max_wall_seconds=SECONDS, or "
                        "--config.train.fit_steps_to_wall=false.")
    if t.update_rule != "adamw" or t.warmup_steps < 2:
      raise ConfigError(
          "config.train.fit_steps_to_wall=True times steps inside the learning-rate warmup, so "
          f"it needs train.update_rule='adamw' and train.warmup_steps >= 2 (got "
          f"{t.update_rule!r}, {t.warmup_steps}).",
          "pass --config.train.fit_steps_to_wall=false, or use adamw with a warmup.")
  _in_unit("train.b1", t.b1, closed_high=False)
  _in_unit("train.b2", t.b2, closed_high=False)
  _in_unit("train.ema_decay", t.ema_decay, closed_high=False)
  if c.mesh.data != -1:
    _positive("mesh.data", c.mesh.data)
  _positive("mesh.fsdp", c.mesh.fsdp)
  e = c.eval
  _positive("eval.batch_size", e.batch_size)
  _positive("eval.num_time_samples", e.num_time_samples)
  _positive("eval.max_tokens", e.max_tokens, allow_zero=True)
  _positive("eval.during_training_max_tokens", e.during_training_max_tokens, allow_zero=True)
  if len(tuple(e.seeds)) < 1:
    raise ConfigError("config.eval.seeds is empty.", "give at least one seed, e.g. (0, 1, 2).")
  ck = str(e.checkpoint)
  if ck not in ("best", "latest") and not ck.isdigit():
    raise ConfigError(f"config.eval.checkpoint={ck!r} is not 'best', 'latest' or a step number.",
                      "pass --config.eval.checkpoint=best, latest or e.g. 1000.")
  s = c.sample
  for f in ("num_samples", "length", "num_steps"):
    _positive(f"sample.{f}", s[f])
  _choice("sample.grid", s.grid, SAMPLING_GRIDS)
  _positive("sample.temperature", s.temperature)
  _positive("sample.top_k", s.top_k, allow_zero=True)
  _in_unit("sample.top_p", s.top_p, closed_low=False)
  quality_steps(s)  # the judge workdir is checked when it is opened (modes/sample.open_judge)
