"""Host memory allocator settings the program sets for itself, before JAX allocates anything.

Why: on CPU, XLA allocates each step's temporary buffers (1.7 GiB at the throughput benchmark's
reference shape) with the C library's malloc and frees them when the step ends. glibc serves
every allocation above its mmap threshold (at most 32 MiB), and in the arenas of threads other
than the main one every allocation larger than their 64 MiB heaps, with a fresh `mmap` region
that `free` hands back with `munmap`. So every step touches all of that memory for the first
time again: the kernel takes a page fault and zeroes a page for every 4 KiB. Measured at the reference shape on 2 cores
(getrusage, per train step after warm-up): 390,000 minor page faults and 0.8-1.0 s of system
CPU time against 2.1-2.3 s of user time; with the settings below, 0 page faults and 0.03 s.

What `configure()` sets, through glibc's `mallopt` (the documented run-time equivalents of the
`glibc.malloc.*` tunables):

  M_ARENA_MAX = 1         every thread allocates from the main arena (XLA's worker threads
                          included), so the two settings below apply to all of them;
  M_MMAP_MAX = 0          no allocation is served by its own mmap: large buffers come from
                          the heap, and a freed one is reused by the next step;
  M_TRIM_THRESHOLD = -1   freed heap memory is never returned to the kernel.

The cost: the process keeps what it frees until it exits, and one arena fragments. At the
`cpu` preset's shape (a step holding 1.4 GiB, 1.3 GiB of it temporary buffers) the throughput
benchmark's worker peaked at 4.1 GiB resident against 2.0 GiB with glibc's defaults, and the
whole main command (training with periodic evaluations and checkpoints, the full-split
evaluation, sampling) at 7.1-8.0 GiB against 2.8 GiB: ~5 more copies of the step's temporary
buffers. The growth is bounded, not a leak: train records log the process's resident memory
(`host_rss_mib`), and in a 3,000-step `cpu` run it was 5.1 GiB at step 10, 6.1 GiB at step 20,
6.7 GiB after the first periodic evaluation and checkpoint (step 100), then flat within 3 MiB to
step 3,000; the final full-split evaluation and sampling took the peak to 7.1 GiB. `release()` goes back to glibc's defaults for large allocations
(the train mode calls it, with a note, when a CPU step fits the machine only without this cost:
`platform_info.check_host_memory`). Threads share one arena lock (XLA's threads allocate
rarely; user CPU time per step went down, not up). Nothing computed changes: only where
buffers live.

Must run before the process starts its second thread that allocates (the arena limit is read
once, when glibc first needs a second arena): main.py calls it first thing, as the benchmark's
workers and the test session do. Elsewhere (not Linux/glibc: macOS, Windows, musl) it does
nothing.

Environment:
  BDIFF_HOST_ALLOCATOR unset or "retain": the settings above.
  BDIFF_HOST_ALLOCATOR=system: leave the C library's defaults.
  GLIBC_TUNABLES naming a glibc.malloc tunable, or any MALLOC_*_ variable of glibc: the user
  configured malloc; nothing is changed.
"""

import ctypes
import os
from typing import Any, MutableMapping, Optional

ENV_VAR = "BDIFF_HOST_ALLOCATOR"
MODES = ("retain", "system")

# glibc's mallopt parameter numbers (<malloc.h>).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
# glibc's defaults for the two that decide whether freed memory is kept (<malloc.h>, mallopt(3)).
RELEASE_SETTINGS = ((M_MMAP_MAX, 65536), (M_TRIM_THRESHOLD, 128 * 1024))
# Extra copies of a step's temporary buffers the process may hold while retaining (measured up to
# ~5 over a whole main command; see the module docstring).
RETAINED_TEMP_COPIES = 6.0

# Whether this process's malloc currently runs with SETTINGS: process-wide state of the C
# library, mirrored here so that `release` never touches settings it did not make.
_retaining = False

# glibc's own malloc environment variables: if the user set any, their choice stands.
_GLIBC_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_MMAP_MAX_",
                     "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _glibc() -> Optional[Any]:
  """The running glibc (a ctypes library with `mallopt`), or None on any other C library."""
  try:
    libc = ctypes.CDLL(None)
    version = libc.gnu_get_libc_version  # only glibc has it
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return None
  del version
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return libc


def configure(environ: Optional[MutableMapping[str, str]] = None, libc: Any = "auto") -> str:
  """Applies the settings of the module docstring; returns what was done, in a few words.

  Args:
    environ: the environment to read (default os.environ).
    libc: an object with `mallopt(param, value) -> int` (tests), None for "not glibc", or
      "auto" for the running C library.

  Returns:
    "retain" (settings applied), or "system: <why>" (nothing changed).

  Raises:
    ValueError: BDIFF_HOST_ALLOCATOR holds an unknown mode.
  """
  environ = os.environ if environ is None else environ
  mode = environ.get(ENV_VAR, "retain").strip().lower() or "retain"
  if mode not in MODES:
    raise ValueError(f"{ENV_VAR}={environ.get(ENV_VAR)!r} is not one of {', '.join(MODES)}")
  if mode == "system":
    return f"system: {ENV_VAR}=system"
  if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
    return "system: GLIBC_TUNABLES sets malloc"
  user_set = [name for name in _GLIBC_MALLOC_ENV if name in environ]
  if user_set:
    return f"system: {user_set[0]} is set"
  if isinstance(libc, str):
    libc = _glibc()
  if libc is None:
    return "system: not glibc"
  global _retaining
  for param, value in SETTINGS:
    if libc.mallopt(param, value) != 1:
      return f"system: mallopt({param}, {value}) refused"
  _retaining = True
  return "retain"


def retaining() -> bool:
  """Whether `configure` applied the settings in this process (and `release` has not undone
  them)."""
  return _retaining


def release(libc: Any = "auto") -> bool:
  """Goes back to glibc's defaults for large allocations (each its own mmap, freed memory
  trimmed); True if it did, False if the settings were not in effect. The arena limit stays
  (harmless, and glibc cannot merge arenas again)."""
  global _retaining
  if not _retaining:
    return False
  if isinstance(libc, str):
    libc = _glibc()
  for param, value in RELEASE_SETTINGS:
    libc.mallopt(param, value)
  _retaining = False
  return True
