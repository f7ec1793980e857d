"""What main.py does around a mode once its flags are parsed (and `bootstrap()` has run): check
that the config serves the mode, apply --prompt, hand eval and sample the config overrides given
on the command line, call the mode's `run(config, workdir, reporter)`, and tell a lost peer of a
multi-process run from a bug (`lost_peer_line`).

main.py imports this module, like the modes, by name after flag parsing: it imports JAX, which
--help and flag errors must not pay for.
"""

import importlib

from bdiff_jax.config import configuration
from bdiff_jax.config.compat import explicit_overrides_from_argv
from bdiff_jax.errors import ConfigError
from bdiff_jax.runtime.distributed import LOST_PEER_EXIT_CODE  # noqa: F401  (main.py's exit status)
from bdiff_jax.runtime.distributed import lost_peer_line  # noqa: F401  (main.py's error line)
from bdiff_jax.runtime.reporter import Reporter

# The sections a config of these modes must have (those of configuration.base_config()).
TRAINER_MODES = ("train", "eval", "sample")
# Modes that take the model from the workdir's config.json and need the overrides given.
_SAVED_CONFIG_MODES = ("eval", "sample")


def check_mode_fields(config, mode: str, config_arg: str) -> None:
  """Raises ConfigError when `config` lacks fields that --mode=`mode` reads (e.g. the GLUE
  config, which has only a `glue` section, given to --mode=train)."""
  if mode not in TRAINER_MODES:
    return

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


def run_mode(config, mode: str, module: str, workdir: str, *, config_arg: str, prompt, argv):
  """Runs --mode=`mode` (its module's `run`) on `config` in `workdir`; returns what it returns.

  `config_arg`: the --config value (for messages); `prompt`: --prompt or None; `argv`: the
  command line (the config overrides eval and sample apply to the saved config).
  """
  check_mode_fields(config, mode, config_arg)
  if prompt is not None:
    config.sample.prompt = prompt
  options = {}
  if mode in _SAVED_CONFIG_MODES:
    options["explicit_overrides"] = explicit_overrides_from_argv(argv)
  return importlib.import_module(module).run(config, workdir, Reporter(), **options)
