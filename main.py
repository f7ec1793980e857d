"""bdiff_jax entry point.

  python main.py --config configs/wikitext2.py --workdir runs/wt2                 # train + eval
  python main.py --config configs/wikitext2.py --workdir runs/wt2 --mode=eval     # restore, eval
  python main.py --config configs/wikitext2.py --workdir runs/wt2 --mode=sample \
      --prompt="the game was [MASK] in"
  python main.py --config configs/benchmark.py --workdir runs/mem --mode=memory   # memory bench
  python main.py --config configs/compare.py --workdir runs/cmp --mode=compare    # comparison
  python main.py --config configs/glue.py:test --workdir runs/glue --mode=glue     # GLUE bench

Override any config field with --config.<field>=<value>. Bad input (data, config files and
values, checkpoints, prompts) ends with one line `error: ...` and exit status 2; a lost peer of a
multi-process run with one such line and exit status 3 (bdiff_jax/runtime/distributed.py; each
process of such a run does its work in a child of a JAX-free supervisor,
bdiff_jax/runtime/supervisor.py, so that a lost coordinator is one line too).

Before anything can start JAX, flag parsing calls `bootstrap()` (bdiff_jax/runtime/bootstrap.py:
host allocator, XLA flags, the distributed runtime, the GC's thresholds). JAX itself, the modes
and what surrounds a mode's run (bdiff_jax/modes/launch.py) are imported by name only once the
flags are parsed, so that --help and flag errors do not pay for importing them.
"""

import importlib
import logging as std_logging
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bdiff_jax.errors import UserError
from bdiff_jax.runtime import bootstrap
from bdiff_jax.runtime import supervisor  # JAX-free, as bootstrap

# --mode -> the module whose `run(config, workdir, reporter)` it calls. Imported on use (by
# bdiff_jax/modes/launch.py), so that --help and flag errors do not pay for importing JAX.
MODES = {
    "train": "bdiff_jax.modes.train",
    "eval": "bdiff_jax.modes.evaluate",
    "sample": "bdiff_jax.modes.sample",
    "memory": "bdiff_jax.benchmarks.memory",
    "compare": "bdiff_jax.benchmarks.compare",
    "glue": "bdiff_jax.modes.glue",
}

# What runs a mode: checks the config serves it, applies --prompt, calls the mode's `run`.
LAUNCH = "bdiff_jax.modes.launch"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:preset]).",
                                          lock_config=True)


class ConfigFileError(Exception):
  """A config file that cannot give a config (a syntax error, a failing import or get_config, a
  get_config returning something else than a ConfigDict). Not a ValueError, so that absl's flag
  parsing lets it through instead of wrapping it in a traceback-sized message."""

  def __init__(self, problem: str, fix: str):
    self.problem, self.fix = problem, fix
    super().__init__(f"{problem} Fix: {fix}")


_CONFIG_FIX = ("correct the file or the preset after ':' (presets are listed at the top of each "
               "configs/*.py), or pass another --config.")


class _DropRecords(std_logging.Filter):
  """Drops every record (ml_collections' warning about a get_config returning None, which the
  one error line says instead)."""

  def filter(self, record):
    return False


def _failure_in_file(e: BaseException, path: str) -> str:
  """`e` in words, with the line of the config file it was raised from when there is one."""
  if isinstance(e, (TypeError, ValueError)) and str(e).startswith("Error whilst parsing config"):
    e = e.__context__ or e  # ml_collections re-raises these with the traceback as the message
  if isinstance(e, SyntaxError):
    where = f"{os.path.basename(e.filename or path)} line {e.lineno}"
    return f"{type(e).__name__} at {where}: {e.msg}"
  target = os.path.abspath(path)
  lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__)
           if os.path.abspath(frame.filename) == target]
  message = _last_line(e) if str(e).strip() else ""
  where = f" (line {lines[-1]})" if lines else ""
  return f"{type(e).__name__}{where}" + (f": {message}" if message else "")


class _OneLineConfigParser(type(flags.FLAGS["config"].parser)):  # ml_collections' own parser
  """absl's config file parser, raising `ConfigFileError` for every way a file can fail."""

  def parse(self, path):
    file = str(path).split(":", 1)[0]
    if file and not os.path.isfile(file):
      raise ConfigFileError(f"no such config file: {file}.",
                            "pass --config=<an existing configs/*.py file>[:<one of its presets>].")
    quiet = _DropRecords()
    std_logging.getLogger("absl").addFilter(quiet)
    try:
      config = super().parse(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigFileError(f"config file {path} failed to load: "
                            f"{_failure_in_file(e, file)}.", _CONFIG_FIX) from None
    finally:
      std_logging.getLogger("absl").removeFilter(quiet)
    if not hasattr(config, "to_dict"):
      raise ConfigFileError(f"get_config() of config file {path} returned "
                            f"{type(config).__name__}, not an ml_collections.ConfigDict.",
                            "make get_config return the config (e.g. `return c` at its end).")
    return config


flags.FLAGS["config"].parser = _OneLineConfigParser("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, metrics, "
                               "vocabulary, samples and plots.")
_MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to do.")
_PROMPT = flags.DEFINE_string("prompt", None, "Shorthand for --config.sample.prompt (sample mode): "
                              "words of the vocabulary; [MASK] marks a hole to fill.")
flags.mark_flags_as_required(["config"])


def _fail(problem: str, fix: str) -> None:
  print(f"error: {problem} Fix: {fix}", file=sys.stderr, flush=True)
  sys.exit(2)


def _last_line(text: str) -> str:
  """The message of an error whose text embeds a traceback: its last non-empty line."""
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  return lines[-1] if lines else str(text)


def _parse_flags(argv):
  """absl flag parsing, but bad flags, overrides or arguments are one clear line and exit 2."""
  # First, before any thread allocates and before anything can start JAX's backend (the config
  # file's automatic preset looks at the devices): the host allocator keeps freed memory for
  # reuse (BDIFF_HOST_ALLOCATOR=system disables it), our XLA flags (user flags win;
  # BDIFF_XLA_FLAGS=none disables ours), and JAX's distributed runtime for a multi-process run
  # (settings from the environment: bdiff_jax/runtime/distributed.py), except for --help.
  try:
    bootstrap.bootstrap(
        distributed=not any(a in ("--help", "-h", "--helpfull") for a in argv[1:]))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  try:
    argv = flags.FLAGS(argv)
  except ConfigFileError as e:
    _fail(e.problem, e.fix)
  except flags.Error as e:
    _fail(f"bad command line ({_last_line(e)}).",
          "see `python main.py --help`; presets are listed at the top of each configs/*.py.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    msg = str(e).strip().strip("'\"").replace("\\n", " ").replace("\n", " ")
    msg = msg.replace("\\'", "").replace("\'", "")
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    _fail(f"invalid config override ({msg}) among {' '.join(bad) or 'the arguments'}.",
          "use a field that exists in the config file (see configs/ and "
          "bdiff_jax/config/configuration.py) with a value of its type.")
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}.",
          "pass options as --flag=value (e.g. --config.train.num_steps=100), or quote values "
          "with spaces.")
  return argv


def _exit_with_error(line: str, code: int) -> None:
  """Prints the one error line and leaves at once. Background threads of libraries (orbax's
  savers after a failed write) may still be winding down and would log tracebacks at
  interpreter shutdown; their logging is silenced and the process exits without waiting."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.FATAL)
  std_logging.disable(std_logging.CRITICAL)
  print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access


def _load_config():
  """The config file's config, or one error line (missing file, failing get_config)."""
  try:
    config = _CONFIG.value
    config.to_dict()  # a config that failed to load raises on first use: make that happen here
    return config
  except (OSError, ImportError, SyntaxError, ValueError, KeyError, AttributeError) as e:
    _fail(f"cannot load the config ({_last_line(e)}).",
          "pass --config=<an existing configs/*.py file>[:<one of its presets>].")


def main(argv):
  del argv  # _parse_flags refuses stray arguments
  logging.set_verbosity(logging.ERROR)  # orbax logs every save/restore (INFO, WARNING)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  launch = importlib.import_module(LAUNCH)  # imports JAX: after bootstrap(), not for --help
  try:
    config = _load_config()
    result = launch.run_mode(config, _MODE.value, MODES[_MODE.value], _WORKDIR.value,
                             config_arg=flags.FLAGS["config"].config_filename,
                             prompt=_PROMPT.value, argv=sys.argv)
  except UserError as e:
    _exit_with_error(f"error: {e}", 2)
  except Exception as e:  # pylint: disable=broad-except
    line = launch.lost_peer_line(e)
    if line is None:
      raise
    # os._exit: a normal exit would wait for JAX's shutdown barrier, then abort with a C++ dump.
    _exit_with_error(line, launch.LOST_PEER_EXIT_CODE)
  except KeyboardInterrupt:  # before the trainer's own handler is installed, or a second Ctrl-C
    print("error: interrupted (Ctrl-C) before anything more could be saved. Fix: rerun the "
          "same command; training resumes from its latest checkpoint, --mode=glue from its "
          "finished units.", file=sys.stderr, flush=True)
    sys.exit(130)
  sys.exit(getattr(result, "exit_code", 0))


if __name__ == "__main__":
  # One process of a multi-process run does its work in a child process, so that a lost
  # coordinator is one error line (bdiff_jax/runtime/supervisor.py); any other run goes on here.
  supervisor.run_if_multiprocess()
  app.run(main, flags_parser=_parse_flags)
