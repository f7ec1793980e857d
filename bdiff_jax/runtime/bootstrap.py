"""Process setup before JAX starts: the one function every entry point calls first.

`bootstrap()` does, in this order, what must happen before JAX's backend (or any thread that
allocates) starts, and what therefore cannot be left to module imports:

  1. the host allocator's malloc settings (`host_allocator.configure`): read once, when glibc
     first needs a second arena, so before the process starts its second allocating thread;
  2. our default XLA flags (`xla_flags.apply_default_flags`): XLA reads `XLA_FLAGS` once, when
     its backend starts;
  3. with `compilation_cache_dir`, a persistent XLA compilation cache (`JAX_COMPILATION_CACHE_DIR`
     and `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`, unless set already): JAX reads them when
     it is imported;
  4. with `distributed=True`, JAX's distributed runtime for a multi-process run
     (`distributed.initialize`, settings from the environment), before anything (a config
     file's automatic preset, say) can touch a backend. JAX is imported only here;
  5. the cyclic garbage collector's thresholds (`GC_THRESHOLDS`): tracing and lowering JAX
     programs allocate container objects by the hundred thousand, and with Python's defaults
     (a young collection every 700 net allocations, a full one every 100 young ones) the process
     spends much of its start walking the long-lived ones (JAX, Flax, orbax, ours: ~160,000
     objects once the modes are imported). A smoke run (`configs/wikitext2.py:smoke`, 8 steps,
     warm compilation cache, fast-compile settings) ran ~990 young and 7 full collections,
     1.1-1.3 of its 12-16 CPU-s; with these thresholds ~260 and 2, 0.3-0.6 CPU-s (3 interleaved
     pairs, 2026-12-07). Garbage is still collected, a little later; reference counting frees
     whatever is not in a cycle at once, as before.

Entry points: main.py (in its flag parsing), the Colab notebook, the benchmarks run as scripts
(`benchmarks/sampling_speed.py`), and the test session (tests/conftest.py). Worker processes
that measure the allocator's effect set it themselves (`benchmarks/throughput.py`).

This is the only function of the package that imports project modules inside its body: the
distributed runtime imports JAX, which must come after steps 1-3, and `--help` never needs it.
"""

import gc
import os

from bdiff_jax.errors import ConfigError
from bdiff_jax.runtime import host_allocator
from bdiff_jax.runtime import xla_flags

# (young generation every N allocations, middle every M young collections, full every K middle
# ones): Python's defaults are (700, 10, 10).
GC_THRESHOLDS = (10_000, 10, 10)


def bootstrap(*, distributed: bool = False, compilation_cache_dir: str = "",
              cache_min_compile_seconds: float = 0.3) -> None:
  """Sets up this process before JAX starts (see the module docstring). Call it first thing.

  Raises:
    ConfigError: `BDIFF_HOST_ALLOCATOR` has an unknown value.
    UserError: the distributed runtime's settings are incomplete or it cannot start.
  """
  try:
    host_allocator.configure()
  except ValueError as e:
    raise ConfigError(f"{e}.", f"unset {host_allocator.ENV_VAR} or set it to one of "
                      f"{', '.join(host_allocator.MODES)}.") from None
  xla_flags.apply_default_flags()
  if compilation_cache_dir:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", compilation_cache_dir)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                          str(cache_min_compile_seconds))
  if distributed:
    from bdiff_jax.runtime import distributed as distributed_lib  # pylint: disable=g-import-not-at-top
    distributed_lib.initialize()
  gc.set_threshold(*GC_THRESHOLDS)
