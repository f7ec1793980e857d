"""`--mode=train`: train (resuming from the workdir), then evaluate, sample and plot.

`run` checks the config and the workdir and builds the experiment; `_train` then reads top to
bottom: set up (state, its first step, the compiled step, the wall-clock fit), loop over the
steps (`train.loop.train_steps`: periodic evaluation, checkpoints, the wall-clock fit and
interrupts are its named pieces), report, and at the end evaluate, write samples and plot.
Every path returns a `TrainResult`.
"""

import contextlib
import dataclasses
import os
import time
from typing import Optional

import jax

from bdiff_jax.config import compat as config_compat
from bdiff_jax.config import configuration
from bdiff_jax.data import pipeline
from bdiff_jax.errors import UserError
from bdiff_jax.evaluation import plotting
from bdiff_jax.modes import evaluate as evaluate_mode
from bdiff_jax.modes import sample as sample_mode
from bdiff_jax.runtime import checkpointing
from bdiff_jax.runtime import distributed
from bdiff_jax.runtime import interrupt
from bdiff_jax.runtime import metrics_log
from bdiff_jax.runtime import platform_info
from bdiff_jax.runtime import sharding as sharding_lib
from bdiff_jax.runtime import workdir as workdir_lib
from bdiff_jax.runtime.reporter import Reporter
from bdiff_jax.train import experiment
from bdiff_jax.train import loop
from bdiff_jax.train import wall_schedule
from bdiff_jax.train.nonfinite import check_finite_weights

FINISHED = loop.FINISHED
STOPPED_AT_STEP = loop.STOPPED_AT_STEP
OUT_OF_TIME = loop.OUT_OF_TIME
INTERRUPTED = loop.INTERRUPTED


@dataclasses.dataclass
class TrainResult:
  """What a call to `run` did. `evaluation` is None when the run stopped before the end."""
  status: str
  start_step: int
  end_step: int
  tokens: int
  wall_seconds: float
  evaluation: Optional[dict] = None
  exit_code: int = 0  # what main.py exits with (non-zero after an interruption)
  # XLA's memory analysis (platform_info.memory_stats) of the train step this call compiled;
  # None when it compiled none (nothing left to train).
  step_memory: Optional[dict] = None

  @property
  def evaluated(self) -> bool:
    return self.evaluation is not None


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """The train step compiled ahead of the loop (None when nothing is left to train)."""
  fn: Optional[object] = None
  memory: Optional[dict] = None  # platform_info.memory_stats of `fn`
  seconds: float = 0.0  # its compile time


def run(config, workdir: str, reporter: Reporter, **unused) -> TrainResult:
  """Trains (resuming from the workdir's latest checkpoint); at the end (num_steps reached or the
  wall-clock budget spent) evaluates like `--mode=eval`, writes samples and plots.

  Order: the config, the mesh and the batch size (against the devices and the data) are checked
  before the workdir is created; then the workdir is checked writable and locked for the whole
  run; the config is checked against the workdir's config.json before anything is restored or
  written; config.json is (re)written only after a successful start. A workdir this run created
  is removed again when the run is refused before it recorded anything (`workdir.remove_if_unused`).

  Multi-process (`bdiff_jax.runtime.distributed`): every process trains (one SPMD step over the global
  mesh, checkpoints saved and restored collectively) and reads only its rows of each batch;
  the periodic evaluations (and so the best checkpoint), the final evaluation and the samples
  run over the same mesh with every process taking part (`experiment.inference_mesh`); process
  0 alone holds the lock and writes config.json, metrics, evaluations, plots and samples, and
  the others report nothing.
  """
  del unused
  # Everything that can be checked without the workdir is checked before it is created or
  # locked: the config's values, the mesh, the batch against the devices and the data.
  configuration.validate(config)
  mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
  sharding_lib.check_batch_divisible(config.train.batch_size, mesh)
  eval_mesh = experiment.inference_mesh(config)  # None in one process: one device
  batches = pipeline.TrainBatches(pipeline.load_wikitext2(config.data.to_dict(), None).train,
                                  config.data.seq_len, config.train.batch_size, config.seed)
  created = not os.path.exists(workdir)
  workdir = workdir_lib.prepare_writable_workdir(workdir)
  main = distributed.is_main_process()
  if not main:
    reporter = Reporter(verbose=False)
  try:
    with workdir_lib.WorkdirLock(workdir) if main else contextlib.nullcontext():
      saved = config_compat.load_saved_config(workdir)
      with checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints) as ckpt:
        fitted = False
        if ckpt.latest_step() is not None and saved is not None:
          config_compat.check_compatible(saved, config)
          # A schedule fitted to the wall clock at the start of this run continues as fitted.
          config, fitted = wall_schedule.adopt(config, wall_schedule.load_record(workdir))
          changes = config_compat.schedule_changes(saved, config)
        else:
          changes = []
        exp = experiment.build(config, workdir, mesh=eval_mesh)
        sample_mode.judge_config(exp)  # a bad sample.judge_workdir fails now, not after training
        log = metrics_log.MetricsLog(workdir) if main else metrics_log.NullMetricsLog()
        return _train(exp, mesh, batches, log, ckpt, reporter, changes, fitted)
  except UserError:
    if created and main:
      workdir_lib.remove_if_unused(workdir)
    raise


def _train(exp, mesh, batches, log, ckpt, reporter, changes, fitted=False) -> TrainResult:
  tc = exp.config.train
  _report_model(exp, mesh, reporter)
  # Set up: the state and its first step, the compiled step, the wall-clock fit.
  shardings = sharding_lib.state_shardings(exp.abstract_state(), mesh)
  state, start = loop.resume_or_init(exp, ckpt, batches, log, reporter, shardings)
  check_finite_weights(state.params, start=start, ckpt=ckpt)
  _record_schedule_changes(changes, start, log, reporter)
  if distributed.is_main_process():
    config_compat.write_config_atomically(exp.config, exp.workdir)
  state = jax.device_put(state, shardings)  # a no-op when created / restored in place
  rules = loop.StopRules.from_config(tc)
  compiler = loop.StepCompiler(exp, mesh, shardings, batches)
  compiled = CompiledStep()
  if start < rules.stop_step:  # compile ahead: refuse a step that cannot fit, before training
    compiled = _compile_ahead(compiler, state, start, exp.config, reporter)
  tokens_per_step = tc.batch_size * exp.config.data.seq_len
  trainer = loop.Trainer(
      exp=exp, mesh=mesh, batches=batches, log=log, reporter=reporter,
      buffer=metrics_log.MetricsBuffer(
          log, tokens_per_step=tokens_per_step, start_step=start,
          on_nonfinite=loop.NonfiniteStop(ckpt, batches, start, exp.network.spec.vocab_size)),
      saver=loop.Saver(ckpt, batches), compiler=compiler, rules=rules, step_fn=compiled.fn,
      fit=_plan_wall_fit(tc, start, rules, fitted, compiled.seconds, reporter))

  # The loop.
  t_begin = time.time()
  bar = reporter.progress(total=rules.stop_step, initial=start, desc="train",
                          enabled=tc.progress_bar)
  with interrupt.GracefulInterrupt() as stop:
    try:
      end = loop.train_steps(trainer, state, start, bar, stop)
    finally:
      reporter.end_progress()
      ckpt.wait()

  wall = time.time() - t_begin
  trained = end.step - start
  reporter.info(f"trained steps {start}..{end.step} ({trained} steps, "
                f"{trained * tokens_per_step:,} tokens) in {wall:.1f}s")
  result = TrainResult(status=end.status, start_step=start, end_step=end.step,
                       tokens=trained * tokens_per_step, wall_seconds=wall,
                       step_memory=compiled.memory)
  if end.status == INTERRUPTED:
    result.exit_code = stop.exit_code
    return result
  if end.status == STOPPED_AT_STEP:
    reporter.info(f"stopped at train.stop_at_step={trainer.rules.stop_step}; rerun with the "
                  "same config to continue.")
    return result
  # Finished, or out of wall-clock budget: evaluate what we have, exactly as --mode=eval does.
  result.evaluation = _evaluate_sample_plot(exp, reporter)
  return result


def _report_model(exp, mesh, reporter: Reporter) -> None:
  config = exp.config
  if config.preset:
    reporter.info(f"preset: {config.preset} ({config.preset_reason})")
  block = "" if config.model.backbone == "opt" else f", {config.model.block} block"
  reporter.info(f"model: {config.model.backbone} backbone{block}, "
                f"{exp.objective.name}; {exp.num_params():,} parameters; "
                f"{mesh.devices.size} {jax.default_backend()} device(s)" +
                (f", mesh data={mesh.devices.shape[0]} x fsdp={mesh.devices.shape[1]}"
                 if mesh.devices.size > 1 else ""))


def _record_schedule_changes(changes, start: int, log, reporter: Reporter) -> None:
  for field, old, new in changes:
    reporter.info(f"note: resuming with {field} changed from {old!r} to {new!r}; from step "
                  f"{start} on the run follows the new schedule")
    log.write("config_change", start, field=field, saved=old, current=new)


def _compile_ahead(compiler: loop.StepCompiler, state, start: int, config,
                   reporter: Reporter) -> CompiledStep:
  """Compiles the step and refuses one that cannot fit the device (a note when the host's
  memory is tight)."""
  t_compile = time.time()
  fn = compiler.compile(state, start)
  seconds = time.time() - t_compile
  memory = platform_info.memory_stats(fn)
  platform = platform_info.detect()
  platform_info.check_step_fits(
      memory, platform,
      what=f"the train step of this config (preset {config.preset or 'custom'})",
      fix="pick a smaller preset (configs/wikitext2.py:cpu or :smoke) or lower "
          "--config.train.batch_size / --config.data.seq_len / the model size.")
  note = platform_info.check_host_memory(memory, platform)
  if note:
    reporter.info(f"note: {note}")
  return CompiledStep(fn=fn, memory=memory, seconds=seconds)


def _plan_wall_fit(tc, start: int, rules: loop.StopRules, fitted: bool, compile_seconds: float,
                   reporter: Reporter) -> Optional[loop.WallFit]:
  """The wall-clock fit this run makes (`train.fit_steps_to_wall`), or None: none asked for,
  already fitted (a resume adopts the recorded fit), resumed past its timing window, or the run
  stops before its decision step."""
  if fitted:
    reporter.info(f"schedule: train.num_steps={tc.num_steps:,}, fitted to the wall clock at the "
                  f"start of this run ({wall_schedule.RECORD_FILE})")
    return None
  if not tc.fit_steps_to_wall or start >= rules.stop_step:
    return None
  window = wall_schedule.calibration(start, tc.warmup_steps)
  if window is None:
    reporter.info(f"note: train.fit_steps_to_wall: this run resumes at step {start}, past "
                  f"the warmup steps it times, with no recorded fit; it keeps "
                  f"train.num_steps={tc.num_steps:,}")
    return None
  if window[1] >= rules.stop_step:
    return None
  return loop.WallFit(timed_from=window[0], decide_at=window[1], compile_seconds=compile_seconds)


def _evaluate_sample_plot(exp, reporter: Reporter) -> dict:
  """The final evaluation (as --mode=eval), samples and plots; in a multi-process run every
  process takes part and process 0 writes."""
  params, meta, desc = experiment.restore_params(exp)
  evaluation = evaluate_mode.evaluate_params(exp, params, meta, desc, reporter)
  sample_mode.write_samples(exp, params, meta, desc, reporter, judge=sample_mode.open_judge(exp))
  if distributed.is_main_process():
    plotting.plot_training_curves(exp.workdir, baselines=evaluation.get("baselines"),
                                  twin_workdir=exp.config.sample.judge_workdir,
                                  upper_bound=exp.objective.is_upper_bound)
  return evaluation
