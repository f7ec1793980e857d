"""bdiff_jax entry point.

  python main.py --config configs/wikitext2.py --workdir runs/wt2                 # train + eval
  python main.py --config configs/wikitext2.py --workdir runs/wt2 --mode=eval     # restore, eval
  python main.py --config configs/wikitext2.py --workdir runs/wt2 --mode=sample \
      --prompt="the game was [MASK] in"
  python main.py --config configs/benchmark.py --workdir runs/mem --mode=memory   # memory bench
  python main.py --config configs/compare.py --workdir runs/cmp --mode=compare    # comparison
  python main.py --config configs/glue.py:test --workdir runs/glue --mode=glue     # GLUE bench

Override any config field with --config.<field>=<value>. Bad input (data, config values,
checkpoints, prompts) ends with one line `error: ...` and exit status 2.
"""

import importlib
import os
import sys

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
    if _PROMPT.value is not None:
      config.sample.prompt = _PROMPT.value
    options = {}
    if _MODE.value in ("eval", "sample"):  # they take the model from the workdir's config.json
      options["explicit_overrides"] = explicit_overrides_from_argv(sys.argv)
    result = importlib.import_module(MODES[_MODE.value]).run(config, _WORKDIR.value, Reporter(),
                                                             **options)
  except UserError as e:
    _exit_with_error(f"error: {e}", 2)
  except KeyboardInterrupt:  # before the trainer's own handler is installed, or a second Ctrl-C
    print("error: interrupted (Ctrl-C) before a checkpoint could be taken. Fix: rerun the same "
          "command; training resumes from the latest checkpoint.", file=sys.stderr, flush=True)
    sys.exit(130)
  sys.exit(getattr(result, "exit_code", 0))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
