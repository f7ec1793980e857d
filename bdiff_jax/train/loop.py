"""The training loop's pieces: when to stop (`StopRules`), where to start (`resume_or_init`),
what one step needs (`Trainer`), and `train_steps`, which steps until a stop rule fires.

Each step: the compiled step on the step's global batch; its metrics into the buffer (fetched
and logged at log boundaries); the stop signals every process agrees on (`Signals`: out of
wall-clock time, interrupted, a time-based checkpoint due); at eval steps the periodic
evaluation and a checkpoint with its best metric, at checkpoint steps a checkpoint; at the
wall-clock fit's decision step (`WallFit`) the fitted schedule; then stop if a signal says so.
"""

import dataclasses
import functools
import time
from typing import Any, Optional

import jax

from bdiff_jax.data import pipeline
from bdiff_jax.errors import CheckpointError, NonFiniteLossError
from bdiff_jax.runtime import checkpointing
from bdiff_jax.runtime import distributed
from bdiff_jax.runtime import metrics_log
from bdiff_jax.runtime import sharding as sharding_lib
from bdiff_jax.runtime.reporter import Reporter
from bdiff_jax.train import builder
from bdiff_jax.train import experiment
from bdiff_jax.train import wall_schedule
from bdiff_jax.train.nonfinite import nonfinite_message
from bdiff_jax.train.train_step import make_train_step

FINISHED = "finished"  # reached train.num_steps
STOPPED_AT_STEP = "stopped_at_step"  # reached train.stop_at_step < num_steps
OUT_OF_TIME = "out_of_time"  # train.max_wall_seconds ran out
INTERRUPTED = "interrupted"  # SIGINT / SIGTERM: checkpoint saved, exit with 130 / 143


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


def global_batch(batches: pipeline.TrainBatches, step: int, mesh):
  """Step `step`'s batch on the mesh; this process reads only the rows its devices hold."""
  return sharding_lib.global_batch(mesh, (batches.batch_size, batches.seq_len),
                                   functools.partial(batches.rows, step))


@dataclasses.dataclass(frozen=True)
class StepCompiler:
  """Compiles the train step of `exp` (its objective, network and current update rule) for the
  state's layout on `mesh`."""
  exp: experiment.Experiment
  mesh: Any
  shardings: Any
  batches: pipeline.TrainBatches

  def compile(self, state, step: int):
    fn = make_train_step(self.exp.objective, self.exp.network, self.exp.update_rule,
                         ema_decay=self.exp.config.train.ema_decay, mesh=self.mesh,
                         state_shardings=self.shardings)
    return fn.lower(state, global_batch(self.batches, step, self.mesh)).compile()


@dataclasses.dataclass(frozen=True)
class Saver:
  """Saves a checkpoint with the data position of its step."""
  ckpt: checkpointing.Checkpointer
  batches: pipeline.TrainBatches

  def save(self, step: int, state, best_metrics=None) -> None:
    position = {k: int(v) for k, v in self.batches.position(step).items()}
    self.ckpt.save(step, state, {"step": step, "position": position},
                   best_metrics=best_metrics, force=True)


@dataclasses.dataclass(frozen=True)
class NonfiniteStop:
  """The metrics buffer's `on_nonfinite`: waits for pending saves, then raises
  NonFiniteLossError naming the last good checkpoint and the step's batch."""
  ckpt: checkpointing.Checkpointer
  batches: pipeline.TrainBatches
  start: int
  vocab_size: int

  def __call__(self, step: int, loss) -> None:
    self.ckpt.wait()
    raise NonFiniteLossError(*nonfinite_message(
        step, loss, start=self.start, good=self.ckpt.latest_step(),
        checkpoints=self.ckpt.latest_dir,
        batch=functools.partial(self.batches.rows, step - 1, 0, self.batches.batch_size),
        vocab_size=self.vocab_size))


@dataclasses.dataclass
class WallFit:
  """`train.fit_steps_to_wall`: the steps after `timed_from` up to `decide_at` are timed; at
  `decide_at` the loop evaluates and checkpoints, times both, and fits the schedule."""
  timed_from: int
  decide_at: int
  compile_seconds: float  # the train step's compilation at the start of the run
  t_timed: float = 0.0  # when step `timed_from` ended (the steps up to it are warm-up)
  t_decide: float = 0.0  # when step `decide_at` ended

  def note_step(self, step: int) -> None:
    if step == self.timed_from:
      self.t_timed = time.time()
    if step == self.decide_at:
      self.t_decide = time.time()

  def step_seconds(self) -> float:
    return (self.t_decide - self.t_timed) / (self.decide_at - self.timed_from)


@dataclasses.dataclass
class Clock:
  """The loop's wall clock: when it began, when the last checkpoint save ended and how long
  that save took."""
  begin: float
  saved: float
  save_seconds: float = 0.0

  @classmethod
  def start(cls) -> "Clock":
    now = time.time()
    return cls(begin=now, saved=now)

  def elapsed(self) -> float:
    return time.time() - self.begin


@dataclasses.dataclass(frozen=True)
class Signals:
  """What stops or checkpoints the run after a step, agreed by every process."""
  out_of_time: bool
  interrupted: bool
  checkpoint_due: bool

  @classmethod
  def agreed(cls, rules: StopRules, stop, clock: Clock) -> "Signals":
    out_of_time, interrupted, due = distributed.agreed(
        rules.out_of_time(clock.elapsed()), stop.stop_requested(),
        rules.checkpoint_is_due(time.time() - clock.saved))
    return cls(out_of_time=out_of_time, interrupted=interrupted, checkpoint_due=due)

  @property
  def stopping(self) -> bool:
    return self.out_of_time or self.interrupted


@dataclasses.dataclass
class Trainer:
  """What the loop steps with; `step_fn` and `rules` change once, when a wall-clock fit
  chooses a shorter schedule."""
  exp: experiment.Experiment
  mesh: Any
  batches: pipeline.TrainBatches
  log: Any  # metrics_log.MetricsLog or NullMetricsLog
  reporter: Reporter
  buffer: metrics_log.MetricsBuffer
  saver: Saver
  compiler: StepCompiler
  rules: StopRules
  step_fn: Any
  fit: Optional[WallFit] = None


@dataclasses.dataclass(frozen=True)
class LoopEnd:
  step: int
  status: str
  state: Any


def train_steps(t: Trainer, state, start: int, bar, stop) -> LoopEnd:
  """Steps from `start` until a stop rule fires. `bar`: the progress bar; `stop`: the
  interrupt handler (`runtime.interrupt.GracefulInterrupt`)."""
  clock = Clock.start()
  step = start
  while step < t.rules.stop_step:
    state, metrics = t.step_fn(state, global_batch(t.batches, step, t.mesh))
    step += 1
    t.buffer.add(step, metrics)
    bar.update(1)
    if t.fit is not None:
      t.fit.note_step(step)
    _log_progress(t, step, bar)
    signals = Signals.agreed(t.rules, stop, clock)
    deciding = t.fit is not None and step == t.fit.decide_at and not signals.stopping
    _evaluate_or_checkpoint(t, state, step, clock, signals, deciding)
    if deciding:
      _fit_schedule(t, state, step, clock)
      bar.total = t.rules.stop_step
      bar.refresh()
    if signals.interrupted:
      t.reporter.info(stop.message(step))
      return LoopEnd(step, INTERRUPTED, state)
    if signals.out_of_time:
      t.reporter.info(f"stopping at step {step}: train.max_wall_seconds="
                      f"{t.exp.config.train.max_wall_seconds} reached (checkpoint saved; rerun "
                      "to resume)")
      return LoopEnd(step, OUT_OF_TIME, state)
  return LoopEnd(step, FINISHED if step >= t.rules.num_steps else STOPPED_AT_STEP, state)


def _log_progress(t: Trainer, step: int, bar) -> None:
  tc = t.exp.config.train
  if step % tc.log_every == 0 or step == t.rules.stop_step:
    last = t.buffer.flush(step)
    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_sec']:.0f}")
    if not tc.progress_bar:
      t.reporter.info(
          f"step {step}: loss {last['loss']:.4f} | grad_norm "
          f"{last.get('grad_norm', float('nan')):.3f} | lr {last['learning_rate']:.2e} | "
          f"{last['tokens_per_sec']:.0f} tok/s")


def _evaluate_or_checkpoint(t: Trainer, state, step: int, clock: Clock, signals: Signals,
                            deciding: bool) -> None:
  """An eval step (or the fit's decision step): the periodic evaluation, then a checkpoint
  with its best metric; a checkpoint step or a stop signal: a checkpoint."""
  if t.rules.is_eval_step(step) or deciding:
    t.buffer.flush(step)
    best = periodic_eval(t.exp, state, step, t.log, t.reporter)
    _save(t, state, step, clock, best)
  elif (t.rules.is_checkpoint_step(step) or signals.out_of_time or signals.interrupted or
        signals.checkpoint_due):
    t.buffer.flush(step)
    _save(t, state, step, clock)


def _save(t: Trainer, state, step: int, clock: Clock, best_metrics=None) -> None:
  t_save = time.time()
  t.saver.save(step, state, best_metrics=best_metrics)
  clock.saved = time.time()
  clock.save_seconds = clock.saved - t_save


def _fit_schedule(t: Trainer, state, step: int, clock: Clock) -> None:
  """At the decision step: times a warm periodic evaluation (this step's compiled it), fits
  num_steps to the rest of the budget and, when it changed, continues as the run configured
  with it (`exp.config`, its update rule, a step compiled for it, its stop rules)."""
  elapsed = clock.elapsed()
  tc = t.exp.config.train
  t_eval = time.time()
  jax.block_until_ready(valid_subset(t.exp, state))
  timing = wall_schedule.Timing(step=t.fit.step_seconds(),
                                event=time.time() - t_eval + clock.save_seconds,
                                compile=t.fit.compile_seconds)
  fitted = wall_schedule.fit_and_record(
      t.exp.config, t.exp.workdir, at_step=step, timed_from=t.fit.timed_from + 1,
      timing=timing, remaining_seconds=tc.max_wall_seconds - elapsed, log=t.log,
      reporter=t.reporter, write=distributed.is_main_process(),
      agree=distributed.agreed_int if jax.process_count() > 1 else None)
  if fitted is not None:
    t.exp.config = fitted  # the same run from here on as one configured with its num_steps
    t.exp.update_rule = builder.build_update_rule(fitted.train)
    t.step_fn = t.compiler.compile(state, step)
  t.rules = StopRules.from_config(t.exp.config.train)
  clock.saved = time.time()


def valid_subset(exp: experiment.Experiment, state) -> dict:
  """The periodic evaluation: the bound on blocks spread over the validation split."""
  config = exp.config
  params = state.ema_params if config.eval.use_ema else state.params
  return exp.evaluator.evaluate(params, exp.splits, seeds=tuple(config.eval.seeds)[:1],
                                max_tokens=config.eval.during_training_max_tokens, spread=True,
                                split_names=("valid",))["valid"]


def periodic_eval(exp: experiment.Experiment, state, step: int, log, reporter: Reporter) -> dict:
  """Evaluates on the validation subset, logs and reports it -> the checkpoint's best metrics."""
  v = valid_subset(exp, state)
  log.write("eval", step, valid_nll_per_token=v["nll_per_token"], valid_word_ppl=v["word_ppl"],
            valid_tokens=v["num_tokens"])
  reporter.info(f"step {step}: valid word ppl {v['word_ppl']:.2f} "
                f"({'bound, ' if exp.objective.is_upper_bound else ''}"
                f"{v['num_tokens']} tokens{', ' + v['subset'] if v['subset'] else ''})")
  return {checkpointing.BEST_METRIC: v["nll_per_token"]}
