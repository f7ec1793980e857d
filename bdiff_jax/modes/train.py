"""`--mode=train`: train (resuming from the workdir), then evaluate, sample and plot.

The loop is a few named pieces: `resume_or_init` (the state and the first step),
`metrics_log.MetricsBuffer` (device metrics fetched lazily, checked for finiteness, averaged over
the log interval), `StopRules` (when to evaluate, checkpoint and stop), the schedule fitted to the
wall clock (`wall_schedule`), and `run` that strings them together and
returns a `TrainResult` in every path.
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
from bdiff_jax.errors import CheckpointError, NonFiniteLossError, UserError
from bdiff_jax.evaluation import plotting
from bdiff_jax.modes import evaluate as evaluate_mode
from bdiff_jax.modes import sample as sample_mode
from bdiff_jax.optim import update_rule
from bdiff_jax.runtime import checkpointing
from bdiff_jax.runtime import distributed
from bdiff_jax.runtime import interrupt
from bdiff_jax.runtime import metrics_log
from bdiff_jax.runtime import platform_info
from bdiff_jax.runtime import sharding as sharding_lib
from bdiff_jax.runtime import workdir as workdir_lib
from bdiff_jax.runtime.reporter import Reporter
from bdiff_jax.train import experiment
from bdiff_jax.train import wall_schedule
from bdiff_jax.train.nonfinite import check_finite_weights, nonfinite_message
from bdiff_jax.train.train_step import make_train_step

FINISHED = "finished"  # reached train.num_steps
STOPPED_AT_STEP = "stopped_at_step"  # reached train.stop_at_step < num_steps
OUT_OF_TIME = "out_of_time"  # train.max_wall_seconds ran out
INTERRUPTED = "interrupted"  # SIGINT / SIGTERM: checkpoint saved, exit with 130 / 143


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
class StopRules:
  """When to evaluate, checkpoint and stop, from config.train."""
  stop_step: int
  num_steps: int
  eval_every: int
  checkpoint_every: int
  max_wall_seconds: float
  checkpoint_every_seconds: float = 0.0

  @classmethod
  def from_config(cls, tc) -> "StopRules":
    return cls(stop_step=min(tc.stop_at_step or tc.num_steps, tc.num_steps),
               num_steps=int(tc.num_steps), eval_every=int(tc.eval_every),
               checkpoint_every=int(tc.checkpoint_every),
               max_wall_seconds=float(tc.max_wall_seconds),
               checkpoint_every_seconds=60.0 * float(tc.checkpoint_every_minutes))

  def checkpoint_is_due(self, seconds_since_last: float) -> bool:
    """Time-based checkpoints, so that a long step interval loses little on SIGKILL."""
    return bool(self.checkpoint_every_seconds) and (
        seconds_since_last >= self.checkpoint_every_seconds)

  def is_eval_step(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.num_steps

  def is_checkpoint_step(self, step: int) -> bool:
    return step % self.checkpoint_every == 0 or step == self.stop_step

  def out_of_time(self, elapsed: float) -> bool:
    return bool(self.max_wall_seconds) and elapsed > self.max_wall_seconds


def resume_or_init(exp: experiment.Experiment, ckpt: checkpointing.Checkpointer,
                   batches: pipeline.TrainBatches, log: metrics_log.MetricsLog,
                   reporter: Reporter, shardings=None):
  """(state, first step): the latest checkpoint of the workdir, or a fresh state at step 0.

  With `shardings` (a pytree matching the state) the state is created, or restored by orbax,
  directly in that layout: a checkpoint saved on any mesh restores onto this one.
  metrics.jsonl keeps only the records up to that step (a crashed run's later records would
  otherwise appear twice)."""
  start = ckpt.latest_step()
  if start is None:
    log.truncate_after(0)
    return exp.init_state(shardings), 0
  target = exp.abstract_state()
  if shardings is not None:
    target = sharding_lib.with_shardings(target, shardings)
  state, meta, desc = ckpt.restore("latest", target)
  position = {k: int(v) for k, v in batches.position(start).items()}
  if int(state.step) != start or meta.get("position") != position:
    raise CheckpointError(  # never silently continue from an inconsistent checkpoint
        f"checkpoint {desc} in {exp.workdir} is inconsistent (step/data position).",
        "restore another step or train in a new --workdir; nothing was deleted.")
  dropped = log.truncate_after(start)
  reporter.info(f"resuming from {desc} (data epoch {meta['position']['epoch']}, batch "
                f"{meta['position']['batch_in_epoch']})" +
                (f"; dropped {dropped} metrics records after step {start}" if dropped else ""))
  return state, start


def _log_line(step, m):
  return (f"step {step}: loss {m['loss']:.4f} | grad_norm {m.get('grad_norm', float('nan')):.3f}"
          f" | lr {m['learning_rate']:.2e} | {m['tokens_per_sec']:.0f} tok/s")


def _valid_subset(exp: experiment.Experiment, state) -> dict:
  """The periodic evaluation: the bound on blocks spread over the validation split."""
  config = exp.config
  params = state.ema_params if config.eval.use_ema else state.params
  return exp.evaluator.evaluate(params, exp.splits, seeds=tuple(config.eval.seeds)[:1],
                                max_tokens=config.eval.during_training_max_tokens, spread=True,
                                split_names=("valid",))["valid"]


def _periodic_eval(exp: experiment.Experiment, state, step: int, log: metrics_log.MetricsLog):
  v = _valid_subset(exp, state)
  log.write("eval", step, valid_nll_per_token=v["nll_per_token"], valid_word_ppl=v["word_ppl"],
            valid_tokens=v["num_tokens"])
  return {checkpointing.BEST_METRIC: v["nll_per_token"]}, v


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
  mesh = sharding_lib.make_mesh(config.mesh)
  sharding_lib.check_batch_divisible(config.train.batch_size, mesh)
  eval_mesh = experiment.inference_mesh(config)  # None in one process: one device
  batches = pipeline.TrainBatches(pipeline.load_wikitext2(config.data, None).train,
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


def _loop(exp, rules: StopRules, step_fn, state, start: int, mesh, batches, buffer, bar, save,
          stop, log, reporter, fit=None):
  """Steps from `start` until a stop rule fires -> (last step, status, state).

  `fit`: None, or (first timed step, decision step, decide) for `train.fit_steps_to_wall`: the
  loop times the steps in between, evaluates and checkpoints at the decision step, times both,
  and continues with the step function (None: the same)
  and stop rules that `decide` returns for the fitted schedule."""
  tc = exp.config.train
  t_begin = t_saved = time.time()
  step = start
  status = FINISHED if start >= rules.num_steps else STOPPED_AT_STEP
  while step < rules.stop_step:
    state, metrics = step_fn(state, _global_batch(batches, step, mesh))
    step += 1
    buffer.add(step, metrics)
    bar.update(1)
    if fit is not None and step == fit[0]:
      t_timed = time.time()  # the steps up to here (warm-up) are not timed
    if fit is not None and step == fit[1]:
      t_decide = time.time()
    if step % tc.log_every == 0 or step == rules.stop_step:
      last = buffer.flush(step)
      bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_sec']:.0f}")
      if not tc.progress_bar:
        reporter.info(_log_line(step, last))
    out_of_time, interrupted, due = distributed.agreed(rules.out_of_time(time.time() - t_begin),
                                            stop.stop_requested(),
                                            rules.checkpoint_is_due(time.time() - t_saved))
    deciding = fit is not None and step == fit[1] and not (interrupted or out_of_time)
    if rules.is_eval_step(step) or deciding:
      buffer.flush(step)
      best, v = _periodic_eval(exp, state, step, log)
      reporter.info(f"step {step}: valid word ppl {v['word_ppl']:.2f} "
                    f"({'bound, ' if exp.objective.is_upper_bound else ''}"
                    f"{v['num_tokens']} tokens{', ' + v['subset'] if v['subset'] else ''})")
      t_save = time.time()
      save(step, state, best_metrics=best)
      t_saved = time.time()
    elif (rules.is_checkpoint_step(step) or rules.is_eval_step(step) or out_of_time or
          interrupted or due or deciding):
      buffer.flush(step)
      t_save = time.time()
      save(step, state)
      t_saved = time.time()
    if deciding:
      fitted_fn, rules = fit[2](state, step, step_seconds=(t_decide - t_timed) /
                                (fit[1] - fit[0]), save_seconds=t_saved - t_save,
                                elapsed=time.time() - t_begin)
      step_fn = fitted_fn or step_fn
      bar.total = rules.stop_step
      bar.refresh()
      t_saved = time.time()
    if interrupted:
      reporter.info(stop.message(step))
      status = INTERRUPTED
      break
    if out_of_time:
      reporter.info(f"stopping at step {step}: train.max_wall_seconds={tc.max_wall_seconds} "
                    "reached (checkpoint saved; rerun to resume)")
      status = OUT_OF_TIME
      break
  else:
    status = FINISHED if step >= rules.num_steps else STOPPED_AT_STEP
  return step, status, state


def _global_batch(batches: pipeline.TrainBatches, step: int, mesh):
  """Step `step`'s batch on the mesh; this process reads only the rows its devices hold."""
  return sharding_lib.global_batch(mesh, (batches.batch_size, batches.seq_len),
                                   lambda start, stop: batches.rows(step, start, stop))


def _train(exp, mesh, batches, log, ckpt, reporter, changes, fitted=False) -> TrainResult:
  config, workdir, tc = exp.config, exp.workdir, exp.config.train
  if config.preset:
    reporter.info(f"preset: {config.preset} ({config.preset_reason})")
  block = "" if config.model.backbone == "opt" else f", {config.model.block} block"
  reporter.info(f"model: {config.model.backbone} backbone{block}, "
                f"{exp.objective.name}; {exp.num_params():,} parameters; "
                f"{mesh.devices.size} {jax.default_backend()} device(s)" +
                (f", mesh data={mesh.devices.shape[0]} x fsdp={mesh.devices.shape[1]}"
                 if mesh.devices.size > 1 else ""))
  shardings = sharding_lib.state_shardings(exp.abstract_state(), mesh)
  state, start = resume_or_init(exp, ckpt, batches, log, reporter, shardings)
  check_finite_weights(state.params, start=start, ckpt=ckpt)
  for field, old, new in changes:
    reporter.info(f"note: resuming with {field} changed from {old!r} to {new!r}; from step "
                  f"{start} on the run follows the new schedule")
    log.write("config_change", start, field=field, saved=old, current=new)
  if distributed.is_main_process():
    config_compat.write_config_atomically(config, workdir)
  state = jax.device_put(state, shardings)  # a no-op when created / restored in place
  rules = StopRules.from_config(tc)

  def compile_step(state, step):
    fn = make_train_step(exp.objective, exp.network, exp.update_rule,
                         ema_decay=tc.ema_decay, mesh=mesh, state_shardings=shardings)
    return fn.lower(state, _global_batch(batches, step, mesh)).compile()

  step_fn, step_memory, compile_seconds = None, None, 0.0
  if start < rules.stop_step:  # compile ahead: refuse a step that cannot fit, before training
    t_compile = time.time()
    step_fn = compile_step(state, start)
    compile_seconds = time.time() - t_compile
    step_memory = platform_info.memory_stats(step_fn)
    platform = platform_info.detect()
    platform_info.check_step_fits(
        step_memory, platform,
        what=f"the train step of this config (preset {config.preset or 'custom'})",
        fix="pick a smaller preset (configs/wikitext2.py:cpu or :smoke) or lower "
            "--config.train.batch_size / --config.data.seq_len / the model size.")
    note = platform_info.check_host_memory(step_memory, platform)
    if note:
      reporter.info(f"note: {note}")
  tokens_per_step = tc.batch_size * config.data.seq_len

  def nonfinite(step, loss):
    ckpt.wait()
    raise NonFiniteLossError(*nonfinite_message(
        step, loss, start=start, good=ckpt.latest_step(), checkpoints=ckpt.latest_dir,
        batch=lambda: batches.rows(step - 1, 0, batches.batch_size),
        vocab_size=exp.network.spec.vocab_size))

  buffer = metrics_log.MetricsBuffer(log, tokens_per_step=tokens_per_step, start_step=start,
                         on_nonfinite=nonfinite)

  def save(step_now, state, best_metrics=None):
    position = {k: int(v) for k, v in batches.position(step_now).items()}
    ckpt.save(step_now, state, {"step": step_now, "position": position},
              best_metrics=best_metrics, force=True)

  fit = None
  if fitted:
    reporter.info(f"schedule: train.num_steps={tc.num_steps:,}, fitted to the wall clock at the "
                  f"start of this run ({wall_schedule.RECORD_FILE})")
  elif tc.fit_steps_to_wall and start < rules.stop_step:
    window = wall_schedule.calibration(start, tc.warmup_steps)
    if window is None:
      reporter.info(f"note: train.fit_steps_to_wall: this run resumes at step {start}, past "
                    f"the warmup steps it times, with no recorded fit; it keeps "
                    f"train.num_steps={tc.num_steps:,}")
    elif window[1] < rules.stop_step:
      def decide(state, step, *, step_seconds, save_seconds, elapsed):
        t = time.time()  # the periodic evaluation of this step compiled it: time a warm one
        jax.block_until_ready(_valid_subset(exp, state))
        timing = wall_schedule.Timing(step=step_seconds, event=time.time() - t + save_seconds,
                                      compile=compile_seconds)
        fitted = wall_schedule.fit_and_record(
            exp.config, workdir, at_step=step, timed_from=window[0] + 1, timing=timing,
            remaining_seconds=tc.max_wall_seconds - elapsed, log=log, reporter=reporter,
            write=distributed.is_main_process(),
            agree=distributed.agreed_int if jax.process_count() > 1 else None)
        if fitted is None:
          return None, StopRules.from_config(tc)
        exp.config = fitted  # the same run from here on as one configured with its num_steps
        exp.update_rule = update_rule.build_update_rule(fitted.train)
        return compile_step(state, step), StopRules.from_config(fitted.train)

      fit = (*window, decide)

  t_begin = time.time()
  bar = reporter.progress(total=rules.stop_step, initial=start, desc="train",
                          enabled=tc.progress_bar)
  with interrupt.GracefulInterrupt() as stop:
    try:
      step, status, state = _loop(exp, rules, step_fn, state, start, mesh, batches, buffer,
                                  bar, save, stop, log, reporter, fit)
    finally:
      reporter.end_progress()
      ckpt.wait()

  rules = StopRules.from_config(exp.config.train)  # the fitted schedule's, after a fit
  wall = time.time() - t_begin
  trained = step - start
  reporter.info(f"trained steps {start}..{step} ({trained} steps, "
                f"{trained * tokens_per_step:,} tokens) in {wall:.1f}s")
  result = TrainResult(status=status, start_step=start, end_step=step,
                       tokens=trained * tokens_per_step, wall_seconds=wall,
                       step_memory=step_memory)
  if status == INTERRUPTED:
    result.exit_code = stop.exit_code
    return result
  if status == STOPPED_AT_STEP:
    reporter.info(f"stopped at train.stop_at_step={rules.stop_step}; rerun with the same config "
                  "to continue.")
    return result
  # Finished, or out of wall-clock budget: evaluate what we have, exactly as --mode=eval does
  # (in a multi-process run every process takes part; process 0 writes).
  params, meta, desc = experiment.restore_params(exp)
  result.evaluation = evaluate_mode.evaluate_params(exp, params, meta, desc, reporter)
  sample_mode.write_samples(exp, params, meta, desc, reporter, judge=sample_mode.open_judge(exp))
  if distributed.is_main_process():
    plotting.plot_training_curves(workdir, baselines=result.evaluation.get("baselines"),
                                  twin_workdir=exp.config.sample.judge_workdir,
                                  upper_bound=exp.objective.is_upper_bound)
  return result
