"""XLA flags the program sets for itself, before JAX starts its backend.

`apply_default_flags()` must run before the first JAX computation (XLA reads `XLA_FLAGS` once,
when the backend starts); main.py calls it first thing. It prepends the defaults below to
`XLA_FLAGS`, leaving out any flag the user already set there, so the user's flags always win.

Defaults (verified on jaxlib 0.10.x, the pinned version; on another jaxlib nothing is added,
because XLA aborts the process on a flag it does not know):

  --xla_cpu_experimental_ynn_fusion_type=-reduce
      Takes reductions out of XLA:CPU's YNNPACK fusions (the flag's "-name" form removes one
      type from the default list). Measured on 2 cores: the column sum of a [4096, 33278]
      float32 array (the output-bias gradient) takes 2.8 s in a YNNPACK reduce fusion and 68 ms
      as an ordinary XLA loop fusion; every bias gradient and norm statistic of a train step is
      such a reduction. It changes only CPU code generation (GPU/TPU ignore it).

Environment:
  BDIFF_XLA_FLAGS unset: the defaults above.
  BDIFF_XLA_FLAGS=none (or empty): add nothing.
  BDIFF_XLA_FLAGS="--flag=value ...": add these instead of the defaults.
"""

import importlib.metadata
import os
import shlex
from typing import MutableMapping, Optional

DEFAULT_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-reduce",)
# jaxlib versions (major.minor) on which the default flags exist.
VERIFIED_JAXLIB = ("0.10",)
ENV_VAR = "BDIFF_XLA_FLAGS"


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0].strip()


def _jaxlib_minor() -> Optional[str]:
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None
  return ".".join(version.split(".")[:2])


def verified_jaxlib() -> bool:
  """Whether the installed jaxlib is one on which this module's flags were verified (on another
  one XLA may not know a flag, and it aborts the process on a flag it does not know)."""
  return _jaxlib_minor() in VERIFIED_JAXLIB


def default_flags(environ: Optional[MutableMapping[str, str]] = None) -> tuple[str, ...]:
  """The flags `apply_default_flags` would add, before removing those the user set."""
  environ = os.environ if environ is None else environ
  override = environ.get(ENV_VAR)
  if override is not None:
    if override.strip().lower() in ("", "none"):
      return ()
    return tuple(shlex.split(override))
  if not verified_jaxlib():
    return ()
  return DEFAULT_FLAGS


def apply_default_flags(environ: Optional[MutableMapping[str, str]] = None) -> str:
  """Prepends the default flags to environ["XLA_FLAGS"]; returns the new value.

  A default whose flag name already appears in XLA_FLAGS is left out (the user's value wins).
  Idempotent. Has no effect on a JAX backend that has already started.
  """
  environ = os.environ if environ is None else environ
  user = environ.get("XLA_FLAGS", "")
  user_names = {_flag_name(f) for f in shlex.split(user)}
  added = [f for f in default_flags(environ) if _flag_name(f) not in user_names]
  value = " ".join(added + ([user] if user.strip() else []))
  if value or "XLA_FLAGS" in environ:
    environ["XLA_FLAGS"] = value
  return value
