r"""The GLUE benchmark's start models, pretrained on WikiText-2 by the train mode (resumable).

`ensure_starts(starts_dir, budget_seconds=..., reporter=..., data_dir=...)` returns a WikiText-2
workdir per row model, pretraining the ones that are not finished:

  reversible_qwen3  configs/wikitext2.py:cpu --config.model.block=qwen3
                    --config.model.backbone=reversible     -> <starts_dir>/wt2_reversible_qwen3
  standard_qwen3    configs/wikitext2.py:cpu --config.model.block=qwen3
                    --config.model.backbone=standard       -> <starts_dir>/wt2_standard_qwen3
  opt               configs/wikitext2.py:cpu_opt (OPT's architecture, autoregressive)
                                                           -> <starts_dir>/wt2_opt

each with `--config.train.max_wall_seconds` = the budget (the main command's 30 minutes by
default). Each runs as what a user runs, a child process

  python main.py --config configs/wikitext2.py:<preset> --workdir <workdir> --mode=train \
      --config.train.max_wall_seconds=<seconds> --config.train.progress_bar=false \
      --config.data.data_dir=<data_dir> <overrides>

whose output goes to the reporter (and to <workdir>/pretrain.log), so a crash stays in the child
and comes back as one `StartModelError` line.

Resuming: a workdir is *finished* when the train mode ended it (num_steps reached or its
wall-clock budget spent): its final evaluation (eval_*.json) and training_curves.png, which only
the train mode's end writes, are no older than its latest checkpoint. A finished workdir is used
as it is (also one trained by hand with the commands above). Any other workdir is trained on:
the train mode resumes from its latest checkpoint. The wall-clock budget is the total over the
attempts: `glue_start.json` in the workdir records the seconds each attempt ran (the whole child
process, compilation included), and a resumed attempt gets what is left (at least one second:
one step, then the final evaluation).

`level="smoke"` pretrains smoke-sized models instead (configs/wikitext2.py:smoke with the same
backbones; OPT with its architecture's settings), for tests and wiring checks.
"""

import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Mapping, Optional, Sequence

from bdiff_jax.errors import ConfigError, UserError
from bdiff_jax.glue.settings import GlueSettings, with_changes
from bdiff_jax.runtime.reporter import Reporter

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIKITEXT2_CONFIG = os.path.join(REPO, "configs", "wikitext2.py")
BUDGET_SECONDS = 1800.0  # the main command's budget (configs/wikitext2.py:cpu)
NAMES = ("reversible_qwen3", "standard_qwen3", "opt")
# row model -> the configs/glue.py field its workdir goes to
GLUE_FIELDS = {"reversible_qwen3": "init_workdir_reversible",
               "standard_qwen3": "init_workdir_standard", "opt": "opt_dir"}
LEDGER = "glue_start.json"
LOG = "pretrain.log"

_QWEN3 = ("--config.model.block=qwen3",)
# The cpu level's Qwen3-style starts: the main command's recipe (untied embeddings, no time
# conditioning, count estimator, adaptive head) with the Qwen3 block, on a 5,000-step schedule:
# the Qwen3 block's step is slower than the simple block's, and 5,000 steps took 31.9 minutes on
# 2 cores (2026-12-06, periodic evaluations included; valid / test bound 233.0 / 220.7 for the
# reversible start, against 460.7 / 436.9 for the recipe before, tied with time conditioning and
# 3,000 steps cut by the budget at step 2,284; docs/glue.md). The level's 30-minute budget
# (`glue.starts_budget_seconds`) stops a run at about step 4,700 there.
_CPU_RECIPE = ("--config.train.num_steps=5000",)
# What configs/wikitext2.py:cpu_opt sets on top of the cpu shape, for the smoke-sized OPT.
_OPT = ("--config.model.backbone=opt", "--config.model.objective=autoregressive",
        "--config.model.time_conditioning=none", "--config.model.positional=learned",
        "--config.model.head_bias_init=zeros", "--config.model.head=full")
# level -> row model -> (configs/wikitext2.py preset, overrides)
LEVELS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "cpu": {"reversible_qwen3": ("cpu", _QWEN3 + _CPU_RECIPE
                                 + ("--config.model.backbone=reversible",)),
            "standard_qwen3": ("cpu", _QWEN3 + _CPU_RECIPE
                               + ("--config.model.backbone=standard",)),
            "opt": ("cpu_opt", ())},
    "smoke": {"reversible_qwen3": ("smoke", _QWEN3 + ("--config.model.backbone=reversible",)),
              "standard_qwen3": ("smoke", _QWEN3 + ("--config.model.backbone=standard",)),
              "opt": ("smoke", _OPT)},
}


class StartModelError(UserError):
  """Pretraining a GLUE start model failed (the child's last line says why)."""


def workdir_of(starts_dir: str, name: str) -> str:
  """The WikiText-2 workdir of row model `name` under `starts_dir`."""
  return os.path.join(os.path.abspath(starts_dir), f"wt2_{name}")


def command(name: str, workdir: str, *, data_dir: str, budget_seconds: float,
            level: str = "cpu", extra_args: Sequence[str] = ()) -> list[str]:
  """The train-mode command line (argv) that pretrains row model `name` into `workdir`."""
  if level not in LEVELS:
    raise ConfigError(f"start-model level {level!r} is not one of {tuple(LEVELS)}.",
                      "use one of those.")
  if name not in LEVELS[level]:
    raise ConfigError(f"no start model {name!r}: the row models are {NAMES}.",
                      "pass some of those in `which`.")
  preset, overrides = LEVELS[level][name]
  argv = [sys.executable, os.path.join(REPO, "main.py"),
          f"--config={WIKITEXT2_CONFIG}:{preset}", f"--workdir={workdir}", "--mode=train",
          f"--config.train.max_wall_seconds={float(budget_seconds)!r}",
          "--config.train.progress_bar=false"]  # log lines instead of a bar's \r updates
  if data_dir:
    argv.append(f"--config.data.data_dir={os.path.abspath(data_dir)}")
  return argv + list(overrides) + list(extra_args)


def latest_checkpoint_step(workdir: str) -> Optional[int]:
  """The newest step under <workdir>/checkpoints (orbax step directories), or None."""
  root = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(root) if n.isdigit()] if os.path.isdir(root) else []
  return max(steps) if steps else None


def is_finished(workdir: str) -> bool:
  """Whether the train mode ended this workdir's training (see the module docstring)."""
  step = latest_checkpoint_step(workdir)
  if step is None:
    return False
  ckpt_time = os.path.getmtime(os.path.join(workdir, "checkpoints", str(step)))
  plot = os.path.join(workdir, "training_curves.png")
  evals = [os.path.join(workdir, n) for n in os.listdir(workdir)
           if n.startswith("eval_") and n.endswith(".json")]
  return (os.path.exists(plot) and os.path.getmtime(plot) >= ckpt_time and
          any(os.path.getmtime(e) >= ckpt_time for e in evals))


def read_ledger(workdir: str) -> dict:
  """The budget record of `workdir` ({} when there is none or it is unreadable)."""
  try:
    with open(os.path.join(workdir, LEDGER), encoding="utf-8") as f:
      record = json.load(f)
    return record if isinstance(record, dict) else {}
  except (OSError, ValueError):
    return {}


def _write_ledger(workdir: str, record: dict) -> None:
  path = os.path.join(workdir, LEDGER)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)


def _attempt(name: str, workdir: str, argv: list[str], reporter: Reporter, record: dict,
             env: Optional[Mapping[str, str]],
             should_stop: Optional[Callable[[], bool]] = None) -> tuple[int, str]:
  """Runs one child to its end, streaming its output; returns (exit code, its last line).

  The attempt's seconds go into record["spent_seconds"] (written every few seconds, so that a
  killed parent loses little of the count). When `should_stop()` turns true (this process got
  SIGTERM or SIGINT), the child is sent SIGTERM once: it checkpoints and exits, so preemption
  stops the pretraining too (a Ctrl-C in a terminal reaches the child by itself)."""
  spent_before = float(record.get("spent_seconds", 0.0))
  record["attempts"] = int(record.get("attempts", 0)) + 1
  child_env = dict(os.environ)
  child_env.update(env or {})
  child_env["PYTHONUNBUFFERED"] = "1"
  t0 = t_written = time.time()
  last = ""
  with open(os.path.join(workdir, LOG), "a", encoding="utf-8") as log:
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(argv, cwd=REPO, env=child_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    forwarded = False
    try:
      for line in proc.stdout:
        if should_stop is not None and not forwarded and should_stop():
          proc.send_signal(signal.SIGTERM)
          forwarded = True
        line = line.rstrip("\n")
        log.write(line + "\n")
        if line.strip():
          last = line.strip()
          reporter.info(f"[{name}] {line}")
        if time.time() - t_written > 5.0:
          record["spent_seconds"] = spent_before + time.time() - t0
          _write_ledger(workdir, record)
          t_written = time.time()
      code = proc.wait()
    finally:
      if proc.poll() is None:  # this process was interrupted (e.g. Ctrl-C, which the child
        try:                    # got too: it saves a checkpoint and stops); else stop it
          proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
          proc.terminate()  # SIGTERM: the child checkpoints and exits
          proc.wait()
      record["spent_seconds"] = spent_before + time.time() - t0
      _write_ledger(workdir, record)
  return code, last


def glue_fields(workdirs: Mapping[str, str]) -> dict[str, str]:
  """{configs/glue.py field: workdir} for `ensure_starts`' result, e.g.
  {"init_workdir_reversible": ..., "init_workdir_standard": ..., "opt_dir": ...}."""
  return {GLUE_FIELDS[name]: w for name, w in workdirs.items()}


def ensure_start(name: str, starts_dir: str, *, budget_seconds: float = BUDGET_SECONDS,
                 reporter: Reporter, data_dir: str, level: str = "cpu",
                 extra_args: Sequence[str] = (),
                 env: Optional[Mapping[str, str]] = None,
                 should_stop: Optional[Callable[[], bool]] = None) -> str:
  """The finished workdir of row model `name`, pretraining (or resuming) it if needed.

  Raises:
    StartModelError: the child failed (its exit code and last line), or ended without
      finishing the workdir.
  """
  workdir = workdir_of(starts_dir, name)
  if os.path.isdir(workdir) and is_finished(workdir):
    reporter.info(f"start model {name}: {workdir} is finished (step "
                  f"{latest_checkpoint_step(workdir)}); using it")
    return workdir
  os.makedirs(workdir, exist_ok=True)
  record = read_ledger(workdir)
  record.setdefault("name", name)
  record["budget_seconds"] = float(budget_seconds)
  spent = float(record.get("spent_seconds", 0.0))
  left = max(float(budget_seconds) - spent, 1.0)
  step = latest_checkpoint_step(workdir)
  argv = command(name, workdir, data_dir=data_dir, budget_seconds=left, level=level,
                 extra_args=extra_args)
  reporter.info(f"start model {name}: " + (
      f"pretraining into {workdir}" if step is None else
      f"resuming {workdir} from step {step} ({spent:.0f} of {budget_seconds:.0f} s spent)") +
                f", {left:.0f} s of wall clock")
  code, last = _attempt(name, workdir, argv, reporter, record, env, should_stop)
  if code != 0:
    raise StartModelError(
        f"pretraining start model {name} in {workdir} failed (exit {code}): {last}",
        f"see {os.path.join(workdir, LOG)}; rerun to resume from its latest checkpoint.")
  if not is_finished(workdir):
    raise StartModelError(f"pretraining start model {name} in {workdir} ended without its "
                          f"final evaluation: {last}",
                          f"see {os.path.join(workdir, LOG)}; rerun to resume.")
  record["finished_step"] = latest_checkpoint_step(workdir)
  _write_ledger(workdir, record)
  return workdir


def ensure_starts(starts_dir: str, *, budget_seconds: float = BUDGET_SECONDS,
                  reporter: Reporter, data_dir: str, which: Sequence[str] = NAMES,
                  level: str = "cpu", extra_args: Sequence[str] = (),
                  env: Optional[Mapping[str, str]] = None,
                  should_stop: Optional[Callable[[], bool]] = None) -> dict[str, str]:
  """{row model: finished WikiText-2 workdir} for the models in `which` (see the module
  docstring); pretrains, one after the other, those that are not finished.

  Args:
    starts_dir: the directory that holds (or will hold) the workdirs wt2_<name>.
    budget_seconds: each model's wall-clock budget over all its attempts.
    reporter: gets the children's output lines, prefixed with the model name.
    data_dir: the WikiText-2 directory (config.data.data_dir; '' = the config's default).
    which: row model names, a subset of NAMES.
    level: "cpu" (the GLUE cpu level's starts) or "smoke" (tiny models, for tests).
    extra_args: more --config overrides for every child (e.g. a test's step count).
    env: environment entries for the children (on top of this process's).
    should_stop: polled while a child trains; when true, the child is sent SIGTERM (it saves a
      checkpoint and stops; the next call resumes it).

  Raises:
    ConfigError: an unknown name or level, or a budget that is not positive.
    StartModelError: a child failed; the workdirs are left to resume.
  """
  if not float(budget_seconds) > 0:
    raise ConfigError(f"start-model budget_seconds={budget_seconds} must be positive.",
                      f"pass the wall-clock seconds per model (the main command's: "
                      f"{BUDGET_SECONDS:.0f}).")
  unknown = [n for n in which if n not in NAMES]
  if unknown:
    raise ConfigError(f"no start model {unknown[0]!r}: the row models are {NAMES}.",
                      "pass some of those in `which`.")
  if level not in LEVELS:
    raise ConfigError(f"start-model level {level!r} is not one of {tuple(LEVELS)}.",
                      "use one of those.")
  return {name: ensure_start(name, starts_dir, budget_seconds=budget_seconds,
                             reporter=reporter, data_dir=data_dir, level=level,
                             extra_args=extra_args, env=env, should_stop=should_stop)
          for name in which}


def use_starts(g: GlueSettings, specs, reporter: Reporter, should_stop=None) -> GlueSettings:
  """Pretrains (or reuses, or resumes) the WikiText-2 start models of the rows in `specs` under
  `glue.starts_dir` (`ensure_starts`, `glue.starts_budget_seconds` each); returns the settings
  with the rows pointed at them: glue.init_workdir_reversible / init_workdir_standard / opt_dir.
  `should_stop`: see `ensure_starts`."""
  needed = tuple(n for n in NAMES if n in {s.model for s in specs})
  if not needed:
    return g
  dirs = ensure_starts(str(g.starts_dir), reporter=reporter,
                       budget_seconds=float(g.starts_budget_seconds),
                       data_dir=os.environ.get("BDIFF_DATA_DIR", ""), which=needed,
                       should_stop=should_stop)
  reporter.info("start models: " + ", ".join(f"{k} {v}" for k, v in dirs.items()))
  return with_changes(g, **glue_fields(dirs))
