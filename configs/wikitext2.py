r"""Masked-diffusion LM on WikiText-2 (word level).

Run:
  python main.py --config configs/wikitext2.py --workdir runs/wt2          # picks a preset that fits
  python main.py --config configs/wikitext2.py:cpu --workdir runs/wt2_cpu  # force one: cpu|gpu|tpu|smoke
  python main.py --config configs/wikitext2.py:cpu_opt --workdir runs/wt2_opt  # OPT, autoregressive

With no preset the config looks at the machine (JAX backend and memory) and picks `tpu` on a TPU,
`gpu` on a GPU and `cpu` otherwise; the train mode prints the choice and the reason, and refuses
(one `error:` line, before training) a step whose compiled memory does not fit the machine.
On an Apple-silicon GPU through the jax-mps plugin (JAX platform `mps`, requirements-metal.txt)
it picks `gpu` where 2/3 of the RAM (unified memory) is at least 8 GiB, else `cpu`; the plugin
gives no compiled memory analysis, so there the fit check is skipped (said in the reason). Where
the plugin is installed but does not start, or with JAX_ENABLE_X64 (Metal has no float64), the
run goes to the CPU and the reason says why (bdiff_jax/runtime/platform_info.py, start_backend).

Expected results (word-level perplexity UPPER BOUNDS from the diffusion ELBO, 3 eval seeds):
  smoke:   ~30-40 s on 2 CPU cores; bound ~1.2e3 valid / ~870 test on the first 2,048 tokens
           of each split (a wiring check: the output bias starts at the unigram model; the
           cpu preset's adaptive head).
  cpu:     the bijective model (reversible backbone, simple block, untied embeddings, no time
           conditioning), the count estimator, the adaptive softmax head; 6,500 steps of 4,096
           tokens, ~27 min of steps on 2 idle cores of the AMD EPYC of 2026-12-06 (~16,300
           tokens/s) plus ~1 min of periodic evaluations. 2026-12-06, --config.train.
           max_wall_seconds=0 (fixed steps), one core per run: bound 217.7 ± 0.8 / 206.0 ± 1.4
           valid / test word-ppl (3 seeds: 218.6 / 207.2, 217.4 / 206.4, 217.2 / 204.5; unigram
           968 / 914, bigram 328 / 305; README.md). The same network
           trained autoregressively (--config.model.objective=autoregressive), 3 seeds: 151.4 ±
           1.0 / 141.0 ± 1.0 exact (best checkpoint: step 3,500 in each; it overfits after), so
           diffusion / AR = 1.46 / 1.48 / 1.45 per seed (test). The 5,000-step schedule before
           it: 3 seeds 237.9 ± 1.5 / 225.1 ± 1.3, no plateau. The preset until 2026-12-06
           (standard backbone, tied embeddings, adaLN, 3,000 steps) gave 426 ± 38 / 402 ± 35 in
           30 minutes on the Xeon of that day (docs/results_log.md).
  gpu:     sized for one GPU (8 x 512, seq 256, batch 64), the cpu preset's bijective model;
           not yet measured (no accelerator was available). `default` is an alias of `gpu`.
  tpu:     a TPU host (bfloat16 compute, batch 256 over its devices); not yet measured.
  cpu_opt: not the diffusion model: OPT's architecture (models/opt_network.py: pre-LN, ReLU,
           learned positions, tied head) trained with the autoregressive objective (exact
           NLL), in the cpu preset's shape (4 x 128, 4 heads, mlp 512, seq 128) and budget
           (lr 2e-3, 50 warmup steps). It pretrains the `opt` rows of the GLUE benchmark, which
           cannot download real OPT weights here: `configs/glue.py --config.glue.opt_dir=<this
           workdir>`. Not yet measured.

Peak train-step memory: XLA's memory analysis of the compiled train step (temp + arguments +
outputs - donated aliases; the whole batch on one device), compiled on CPU with jaxlib 0.10.2,
V = 33,278, the count estimator. A GPU/TPU compilation may differ somewhat; the train mode
checks the real one before the first step; `python -m bdiff_jax.benchmarks.throughput
--memory_preset NAME` prints it. cpu, gpu and tpu measured 2026-12-06 with the bijective model
(reversible backbone, untied embeddings, no time conditioning), the others earlier:
  smoke      288 MiB  (2.30M parameters; standard backbone, tied)
  cpu      1,064 MiB  (6.03M; the standard backbone with tied embeddings and adaLN, the preset
                       until 2026-12-06: 1,370 MiB, 5.44M)
  cpu_opt  2,903 MiB  (5.07M; the AR loss covers every position, so its head is computed at all
                       of them, not only at the masked ones)
  gpu      5,722 MiB  (59.3M; the full head's logits at the masked positions are most of it).
                       The standard backbone needed model.remat for 4,859 MiB (16,570 without,
                       2026-11-22). `auto` picks gpu on a GPU with at least 8 GiB (5.6 GiB / the
                       0.9 headroom of the fit check, plus margin for a GPU compilation's
                       differences); smaller cards get `cpu`.
  tpu     16,064 MiB  for the whole batch of 256 on one device (bfloat16); sharded over the
                       host's devices along the batch, each holds about 1/N of the activations.
"""

from bdiff_jax.config.configuration import base_config
from bdiff_jax.runtime import platform_info

PRESETS = ("auto", "smoke", "cpu", "cpu_opt", "gpu", "tpu", "default")
# Below this much accelerator memory the gpu preset's step (5.6 GiB, see above) may not fit
# with the fit check's headroom; fall back to the cpu-sized preset.
GPU_PRESET_MIN_BYTES = 8 * 2**30


def _auto() -> tuple[str, str]:
  """(preset, reason) for this machine."""
  p = platform_info.detect()
  if p.backend == "tpu":
    return "tpu", f"a TPU backend: {p.describe()}"
  if p.backend == "gpu":
    if p.memory_bytes >= GPU_PRESET_MIN_BYTES:
      return "gpu", f"a GPU backend: {p.describe()}"
    return "cpu", (f"a GPU with less than {GPU_PRESET_MIN_BYTES / 2**30:.0f} GiB: "
                   f"{p.describe()}; the cpu-sized preset fits")
  if p.metal:
    # The plugin gives no compiled memory analysis, so the train mode cannot check the step
    # before it runs: the gpu preset only with the same margin as on a CUDA GPU.
    what = f"an Apple GPU (Metal, {platform_info.METAL_PLUGIN}): {p.describe()}"
    unchecked = "; no memory analysis on Metal, the fit check is skipped"
    if p.memory_bytes >= GPU_PRESET_MIN_BYTES:
      return "gpu", what + unchecked
    if p.memory_bytes:
      return "cpu", (f"{what}, less than {GPU_PRESET_MIN_BYTES / 2**30:.0f} GiB: the "
                     f"cpu-sized preset{unchecked}")
    return "cpu", f"{what}, memory unknown: the cpu-sized preset{unchecked}"
  if p.note:
    return "cpu", f"no accelerator: {p.note}; {p.describe()}"
  return "cpu", f"no accelerator: {p.describe()}"


def _metal_note() -> str:
  """Where the Metal plugin is installed, a forced preset starts JAX's backend here too, as
  `_auto` does, so that a plugin that cannot start means the CPU and a note, not a traceback
  later; "" (and nothing started) without the plugin."""
  if not platform_info.metal_plugin_installed():
    return ""
  _, note = platform_info.start_backend()
  return f"; {note}" if note else ""


def get_config(preset: str = ""):
  c = base_config()
  preset = preset or "auto"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS[1:])} or none "
                     "(auto)")
  if preset == "auto":
    preset, reason = _auto()
  else:
    reason = "chosen on the command line" + _metal_note()
  preset = "gpu" if preset == "default" else preset
  c.preset, c.preset_reason = preset, reason
  # The count estimator of the ELBO (bdiff_jax/diffusion/elbo.py): the same bound as the time
  # estimator, with bounded weights; at equal steps the cpu preset's model trained with it was
  # 10% better (valid bound 696 vs 772 after 600 steps) and its bound 2.7x less spread over
  # evaluation seeds. (Ignored by the autoregressive cpu_opt.)
  c.diffusion.estimator = "count"
  if preset in ("gpu", "tpu"):
    # Sized for one GPU; also runs (slowly) on CPU.
    c.data.seq_len = 256
    c.model.num_layers = 8
    c.model.emb_dim = 512
    c.model.num_heads = 8
    c.model.num_kv_heads = 8
    c.model.head_dim = 64
    c.model.mlp_dim = 2048
    c.model.dropout_rate = 0.1
    # The bijective model, as in the cpu preset (below): the reversible backbone rebuilds each
    # layer's inputs in the backward pass by inversion, so its activation memory does not grow
    # with depth (no remat needed; the standard backbone needs model.remat=True to fit, 4.7 GiB
    # instead of 16.2 GiB); untied embeddings; no time conditioning.
    c.model.backbone = "reversible"
    c.model.tie_embeddings = False
    c.model.time_conditioning = "none"
    c.train.batch_size = 64
    c.train.num_steps = 50_000
    c.train.learning_rate = 5e-4
    c.train.warmup_steps = 1000
    c.train.eval_every = 2500
    c.train.checkpoint_every = 2500
    c.eval.during_training_max_tokens = 32_768
    c.eval.num_time_samples = 4
    if preset == "tpu":
      c.model.dtype = "bfloat16"
      c.train.batch_size = 256
      c.train.learning_rate = 1e-3
      c.eval.batch_size = 256
  elif preset in ("cpu", "cpu_opt"):
    # About 30 minutes of training on 2 CPU cores (plus the full-split evaluation).
    if preset == "cpu":
      # The adaptive softmax head (docs/design.md, "The output head"): the same model quality per
      # step (6-minute screen on 2026-12-06: periodic readings 825 / 771 / 726 at steps 100 / 200 /
      # 300, against 824 / 771 / 734 with the full head) at 1.63x the steps per second, so the
      # 30 minutes train 10.8M tokens instead of 5.8M: bound 388 / 367 against 481 / 453 with
      # the full head on the same machine the same day (docs/results_log.md).
      c.model.head = "adaptive"
      # The bijective model (docs/results_log.md, "2026-12-06 screen": periodic readings of
      # 500-step screens, seed 0, one core each): the reversible backbone (602 vs 638 for the
      # standard one at step 500, Qwen3 block); untied input and output embeddings, the largest
      # lever (step 400, Qwen3 block: 553 vs 650 tied; simple block untied and without time
      # conditioning 501 vs 607 tied with it); no time
      # conditioning (the count estimator's time is the masked fraction, which the network can
      # count; 617 vs 650 at step 400, and no time MLP); the simple block (untied, no time:
      # 501 vs 558 for the Qwen3 block at step 400, at 1.3x its steps per second).
      c.model.backbone = "reversible"
      c.model.tie_embeddings = False
      c.model.time_conditioning = "none"
    c.data.seq_len = 128
    c.model.num_layers = 4
    c.model.emb_dim = 128
    c.model.num_heads = 4
    c.model.num_kv_heads = 4
    c.model.head_dim = 32
    c.model.mlp_dim = 512
    c.train.batch_size = 32
    # The step runs ~7,900 tokens/s on 2 idle cores of the faster processor this was tuned on
    # (masked head, host-allocator settings): ~3,300 steps of 4,096 tokens in 30 minutes. The
    # schedule ends at 3,000 so that it decays fully within the wall-clock budget, periodic
    # evaluations included; max_wall_seconds stops a slower machine (~4,800 tokens/s: step
    # ~2,100, before the decay ends).
    c.train.num_steps = 3000
    if preset == "cpu":
      # The AMD EPYC of 2026-12-06 runs this preset's step at ~16,300 tokens/s on 2 idle cores:
      # 6,500 steps (26.6M tokens) in ~27 minutes plus ~1 minute of periodic evaluations and
      # checkpoints, so the schedule fills the 30-minute budget (timed 2026-12-07: the steps in
      # 28.4 minutes, the whole command in 29.0, all 6,500 steps done); a slower machine is
      # stopped by max_wall_seconds near the end of the decay (the Xeon above: step ~2,600).
      # 6,500 rather than 5,000 steps (~21 minutes, the preset until 2026-12-06): seed 0's bound
      # 218.6 / 207.2 against 239.2 / 226.6 (docs/results_log.md); the AR twin overfits either
      # way.
      c.train.num_steps = 6500
    # Not train.fit_steps_to_wall: on 2026-12-04 the schedule fitted to 30 minutes (1,649 steps,
    # fully decayed, 6.75M tokens) gave 501 / 472 against 412 / 382 for this 3,000-step
    # schedule cut at step 2,109 (8.64M tokens). The fit's timed steps 11-30 ran at 1.04 s
    # where the run then averaged 0.89 s, so 19% of the budget went unused; and at equal steps
    # the decayed run was no better (its 64-block reading at step 1,649: 428, the cut run's
    # ~415), so on this budget the learning rate is better kept high than decayed early.
    # diffusion.train_positions_per_seq stays 0 (every masked position scored): with 16, the
    # step was 1.73x faster and the 30-minute run saw 12.29M tokens over all 3,000 steps, yet
    # its bound was 489 / 461 against this preset's 412 / 382 (docs/results_log.md, ♦).
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
    if preset == "cpu_opt":  # the same shape and budget, OPT's architecture, AR objective
      c.model.backbone = "opt"
      c.model.objective = "autoregressive"
      c.model.time_conditioning = "none"
      c.model.positional = "learned"  # what OPT has (opt_network.opt_spec says so anyway)
      c.model.head_bias_init = "zeros"  # OPT's tied head has no output bias
  elif preset == "smoke":
    # Wiring check on the real data, well under a minute on CPU; evaluation on a subset. The
    # cpu preset's adaptive head; still the standard backbone with tied embeddings and adaLN
    # (the cpu preset's model since 2026-12-06 is trained by its own runs, docs/results_log.md;
    # moving the smoke preset, which most end-to-end tests use, is left for a later change).
    c.model.head = "adaptive"
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
  return c
