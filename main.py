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
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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


def _parse_flags(argv):
  """absl flag parsing, but a bad --config.<field> override is one clear line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    msg = str(e).strip().strip("'\"").replace("\\n", " ").replace("\n", " ")
    msg = msg.replace("\\'", "").replace("\'", "")
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"error: invalid config override ({msg}) among {' '.join(bad) or 'the arguments'}. "
          "Fix: use a field that exists in the config file (see configs/ and "
          "bdiff_jax/configuration.py) with a value of its type.", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.ERROR)  # orbax logs every save/restore (INFO, WARNING)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  from bdiff_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from bdiff_jax.reporter import Reporter  # pylint: disable=g-import-not-at-top
  try:
    config = _CONFIG.value
    if _PROMPT.value is not None:
      config.sample.prompt = _PROMPT.value
    importlib.import_module(MODES[_MODE.value]).run(config, _WORKDIR.value, Reporter())
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
