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
multi-process run with one such line and exit status 3 (bdiff_jax/distributed.py; each process of
such a run does its work in a child of a JAX-free supervisor, bdiff_jax/supervisor.py, so that a
lost coordinator is one line too).
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

from bdiff_jax import host_allocator
from bdiff_jax import xla_flags

# --mode -> the module whose `run(config, workdir, reporter)` it calls. Imported on use, so that
# --help and flag errors do not pay for importing JAX.
MODES = {
    "train": "bdiff_jax.modes.train",
    "eval": "bdiff_jax.modes.evaluate",
    "sample": "bdiff_jax.modes.sample",
    "memory": "bdiff_jax.benchmarks.memory",
    "compare": "bdiff_jax.benchmarks.compare",
    "glue": "bdiff_jax.modes.glue",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:preset]).",
                                          lock_config=True)
# The sections a config of these modes must have (those of configuration.base_config()).
TRAINER_MODES = ("train", "eval", "sample")


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


def _start_distributed() -> None:
  """Starts JAX's distributed runtime for a multi-process run (settings from the environment:
  see bdiff_jax/distributed.py), before the config file can touch a JAX backend."""
  from bdiff_jax import distributed  # pylint: disable=g-import-not-at-top
  from bdiff_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_flags(argv):
  """absl flag parsing, but bad flags, overrides or arguments are one clear line and exit 2."""
  # First, before any thread allocates: keep freed host memory for reuse instead of
  # page-faulting every step's buffers in again (bdiff_jax/host_allocator.py;
  # BDIFF_HOST_ALLOCATOR=system disables it).
  try:
    host_allocator.configure()
  except ValueError as e:
    _fail(f"{e}.", f"unset {host_allocator.ENV_VAR} or set it to one of "
          f"{', '.join(host_allocator.MODES)}.")
  # Before anything can start JAX's backend (the config file's automatic preset looks at the
  # devices): XLA reads XLA_FLAGS once. User flags win; BDIFF_XLA_FLAGS=none disables ours.
  xla_flags.apply_default_flags()
  if not any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
    _start_distributed()
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
          "bdiff_jax/configuration.py) with a value of its type.")
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


def check_mode_fields(config, mode: str, config_arg: str) -> None:
  """Raises ConfigError when `config` lacks fields that --mode=`mode` reads (e.g. the GLUE
  config, which has only a `glue` section, given to --mode=train)."""
  if mode not in TRAINER_MODES:
    return
  from bdiff_jax import configuration  # pylint: disable=g-import-not-at-top
  from bdiff_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

  def paths(c, prefix=""):
    for key, value in c.items():
      if hasattr(value, "items"):
        yield from paths(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}"

  base = configuration.base_config()
  have = set(paths(config))
  missing = [p for p in paths(base) if p not in have]
  if missing:
    sections = [k for k, v in base.items() if hasattr(v, "items") and k not in config]
    lacks = (f"has no {', '.join(sections)} section" + ("s" if len(sections) > 1 else "")
             if sections else f"lacks config.{missing[0]}" +
             (f" and {len(missing) - 1} more field(s)" if len(missing) > 1 else ""))
    other = [k for k in config.keys() if k not in base]
    serves = (f" (its own section(s): {', '.join(other)}; see the file's docstring for its "
              "--mode)" if other else "")
    raise ConfigError(
        f"config {config_arg} cannot serve --mode={mode}: it {lacks}{serves}.",
        f"pass the --mode that config is for (e.g. configs/glue.py with --mode=glue), or a "
        f"config made from configuration.base_config() (e.g. configs/wikitext2.py) for "
        f"--mode={mode}.")


def main(argv):
  del argv  # _parse_flags refuses stray arguments
  logging.set_verbosity(logging.ERROR)  # orbax logs every save/restore (INFO, WARNING)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  from bdiff_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from bdiff_jax.reporter import Reporter  # pylint: disable=g-import-not-at-top
  from bdiff_jax.config_compat import explicit_overrides_from_argv  # pylint: disable=g-import-not-at-top
  try:
    config = _load_config()
    check_mode_fields(config, _MODE.value, flags.FLAGS["config"].config_filename)
    if _PROMPT.value is not None:
      config.sample.prompt = _PROMPT.value
    options = {}
    if _MODE.value in ("eval", "sample"):  # they take the model from the workdir's config.json
      options["explicit_overrides"] = explicit_overrides_from_argv(sys.argv)
    result = importlib.import_module(MODES[_MODE.value]).run(config, _WORKDIR.value, Reporter(),
                                                             **options)
  except UserError as e:
    _exit_with_error(f"error: {e}", 2)
  except Exception as e:  # pylint: disable=broad-except
    from bdiff_jax import distributed  # pylint: disable=g-import-not-at-top
    line = distributed.lost_peer_line(e)
    if line is None:
      raise
    # os._exit: a normal exit would wait for JAX's shutdown barrier, then abort with a C++ dump.
    _exit_with_error(line, distributed.LOST_PEER_EXIT_CODE)
  except KeyboardInterrupt:  # before the trainer's own handler is installed, or a second Ctrl-C
    print("error: interrupted (Ctrl-C) before anything more could be saved. Fix: rerun the "
          "same command; training resumes from its latest checkpoint, --mode=glue from its "
          "finished units.", file=sys.stderr, flush=True)
    sys.exit(130)
  sys.exit(getattr(result, "exit_code", 0))


if __name__ == "__main__":
  # One process of a multi-process run does its work in a child process, so that a lost
  # coordinator is one error line (bdiff_jax/supervisor.py); any other run goes on here.
  from bdiff_jax import supervisor  # pylint: disable=g-import-not-at-top
  supervisor.run_if_multiprocess()
  app.run(main, flags_parser=_parse_flags)
