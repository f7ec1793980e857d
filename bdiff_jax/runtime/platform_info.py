"""What machine we run on: the JAX backend, its devices and how much memory a step may use.

Used to pick a config preset that fits (`configs/wikitext2.py` with no preset) and to refuse,
before training, a train step whose compiled memory would not fit (`check_step_fits`), or
that fits only if freed host memory is returned to the kernel (`check_host_memory`).

Apple-silicon GPUs run through a third-party PJRT plugin, jax-mps (requirements-metal.txt pins
it), which registers the JAX platform "mps". `start_backend` starts JAX's backend for `detect`:
where the plugin is installed but cannot start (no Metal device, a failing `initialize()`), or
the run enables float64 (`JAX_ENABLE_X64`, which Metal lacks), it runs on the CPU and says why in
`Platform.note`, one line, instead of a traceback. The plugin reports no device memory and no
compiled memory analysis: the memory is a share of the machine's RAM (unified memory,
`METAL_MEMORY_SHARE`) and `memory_stats` returns `UnanalysedMemory`.
"""

import dataclasses
import importlib.util
import logging
import os
import sys
from typing import Any, Optional

import jax

from bdiff_jax.errors import UserError
from bdiff_jax.runtime import host_allocator


class ResourceError(UserError):
  """The run needs more memory than the machine has."""


# JAX platform names registered by PJRT plugins for Apple-silicon GPUs: jax-mps registers "mps"
# (its jax_plugins/mps/__init__.py: xla_bridge.register_plugin("mps", priority=500), above the
# CPU's 0, so JAX picks it by default where it starts).
METAL_PLATFORMS = ("mps",)
METAL_PLUGIN = "jax-mps"  # the distribution that requirements-metal.txt pins
METAL_PLUGIN_MODULE = "jax_plugins.mps"  # its module, found by JAX's plugin discovery
# The share of the machine's RAM assumed usable by the GPU (unified memory). jax-mps 0.10.11
# gives no device memory statistics; macOS lets a GPU wire about 2/3 to 3/4 of RAM (Metal's
# recommendedMaxWorkingSetSize). The lower end; not measured on a Mac.
METAL_MEMORY_SHARE = 2 / 3


@dataclasses.dataclass(frozen=True)
class Platform:
  backend: str  # "cpu" | "gpu" | "tpu" | ...
  device_kind: str
  num_devices: int
  memory_bytes: int  # per device: accelerator memory, or the host's available RAM for CPU
  cpu_count: int
  # One line where the run is not on the backend one would expect (an installed Metal plugin
  # that did not start, float64 routed to the CPU); "" otherwise.
  note: str = ""

  @property
  def metal(self) -> bool:
    """Whether this is an Apple-silicon GPU through a Metal plugin (`METAL_PLATFORMS`)."""
    return self.backend in METAL_PLATFORMS

  def describe(self) -> str:
    mem = f"{self.memory_bytes / 2**30:.1f} GiB"
    what = ("available host RAM" if self.backend == "cpu" else
            "of unified memory for the GPU" if self.metal else
            "memory per device")
    return (f"{self.num_devices} {self.backend} device(s) ({self.device_kind}), {mem} "
            f"{what}, {self.cpu_count} CPU cores")


def host_available_bytes() -> int:
  """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 0


def host_physical_bytes() -> int:
  """The machine's physical memory (sysconf: Linux and macOS), 0 where unknown."""
  try:
    return max(0, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError, AttributeError):
    return 0


def host_resident_mib() -> dict[str, float]:
  """This process's resident host memory now and at its peak, in MiB ({} where unknown).

  Now: /proc/self/statm (Linux). Peak: getrusage's ru_maxrss (KiB on Linux, bytes on macOS).
  Logged with the train metrics, so a run shows what the process holds as it goes (on CPU,
  host_allocator's retention; anywhere, the host side of data and checkpoints)."""
  out = {}
  try:
    with open("/proc/self/statm", encoding="ascii") as f:
      out["host_rss_mib"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, ValueError, IndexError):
    pass
  try:
    import resource  # pylint: disable=g-import-not-at-top
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["host_peak_rss_mib"] = peak / (2**20 if sys.platform == "darwin" else 2**10)
  except (ImportError, OSError):
    pass
  if len(out) == 2:  # the kernel updates ru_maxrss lazily: it can trail statm by a few pages
    out["host_peak_rss_mib"] = max(out.values())
  return out


def _device_memory(device) -> Optional[int]:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None  # backends without memory statistics
  if not stats:
    return None
  return int(stats.get("bytes_limit") or stats.get("bytes_reservable_limit") or 0) or None


MEMORY_LIMIT_ENV = "BDIFF_MEMORY_LIMIT_BYTES"


def metal_plugin_installed() -> bool:
  """Whether the Metal plugin's module is importable (JAX's discovery would initialise it)."""
  try:
    return importlib.util.find_spec(METAL_PLUGIN_MODULE) is not None
  except (ImportError, ValueError):
    return False


def _one_line(text: str, limit: int = 200) -> str:
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  line = lines[-1] if lines else str(text).strip()
  return line if len(line) <= limit else line[:limit - 3] + "..."


class _PluginFailures(logging.Filter):
  """Takes JAX's report of a failing Metal plugin (`logger.exception`: a traceback on stderr)
  off the log and keeps its last line for `Platform.note`."""

  def __init__(self):
    super().__init__()
    self.failures = []

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    about_metal = METAL_PLUGIN_MODULE in text or any(f"'{p}'" in text for p in METAL_PLATFORMS)
    if not about_metal or (record.levelno < logging.ERROR and "Unable to initialize" not in text):
      return True  # e.g. JAX's warning that the platform is experimental stays
    error = record.exc_info[1] if record.exc_info and record.exc_info[1] else None
    self.failures.append(_one_line(f"{type(error).__name__}: {error}" if error else text))
    return False


_started: Optional[tuple[str, str]] = None


def _requested_platforms() -> str:
  """JAX_PLATFORMS / jax_platforms: "" where JAX chooses."""
  return (jax.config.jax_platforms or "").strip()


def _x64_enabled() -> bool:
  return bool(jax.config.jax_enable_x64)


def start_backend() -> tuple[str, str]:
  """Starts JAX's backend; returns (platform name, note), the same on every call.

  With the Metal plugin installed (`metal_plugin_installed`), the run goes to the CPU, and the
  note says why in one line, where the plugin's `initialize()` fails (JAX logs a traceback and
  falls back to the CPU; the traceback is kept off stderr), where its backend raises when JAX
  starts it (no Metal device: JAX raises "Unable to initialize backend 'mps'"), or where the
  run enables float64 (JAX_ENABLE_X64; Metal has no float64, and jax-mps would fail or
  silently downcast; a UserError where the backend had already started on Metal). The note is
  "" where nothing was changed, and always without the plugin: CPU, CUDA and TPU runs start
  exactly as before.
  """
  global _started
  if _started is not None:
    return _started
  if not metal_plugin_installed():
    return jax.default_backend(), ""  # as before; not cached
  requested = _requested_platforms()
  wants_metal = not requested or any(p in requested.split(",") for p in METAL_PLATFORMS)
  note = ""
  x64 = wants_metal and _x64_enabled()
  if x64:  # before the backend starts (main.py starts none earlier): Metal is never tried
    jax.config.update("jax_platforms", "cpu")
  failures = _PluginFailures()
  xla_bridge_log = logging.getLogger("jax._src.xla_bridge")
  xla_bridge_log.addFilter(failures)
  try:
    try:
      backend = jax.default_backend()
    except RuntimeError as e:  # JAX started the CPU first; the plugin's backend then raised
      if not any(f"'{p}'" in str(e) for p in METAL_PLATFORMS):
        raise
      jax.config.update("jax_platforms", "cpu")
      backend = jax.default_backend()
      failures.failures.append(_one_line(str(e).split(" (set JAX_PLATFORMS")[0]
                                         .split(" (you may need")[0]))
  finally:
    xla_bridge_log.removeFilter(failures)
  if x64 and backend in METAL_PLATFORMS:  # it had started already: too late to route
    raise UserError(f"float64 (JAX_ENABLE_X64) is not supported on Metal ({METAL_PLUGIN}), and "
                    "JAX's backend had already started there.",
                    "unset JAX_ENABLE_X64, or run on the CPU: JAX_PLATFORMS=cpu.")
  if x64:
    note = (f"float64 (JAX_ENABLE_X64) is not supported on Metal ({METAL_PLUGIN}); "
            f"running on the {backend}")
  elif wants_metal and backend not in METAL_PLATFORMS:
    why = failures.failures[-1] if failures.failures else "JAX started no Metal backend"
    note = f"the Metal plugin {METAL_PLUGIN} did not start ({why}); running on the {backend}"
  _started = (backend, note)
  return _started


def detect() -> Platform:
  """The local platform. `$BDIFF_MEMORY_LIMIT_BYTES` caps the memory it reports (to share a
  machine, or to test the refusal of steps that do not fit).

  On a Metal platform the memory is the device's own limit where the plugin reports one, else
  METAL_MEMORY_SHARE of the machine's RAM (0 where unknown: the auto preset then takes cpu)."""
  backend, note = start_backend()
  devices = jax.local_devices()
  memory = None if backend == "cpu" else _device_memory(devices[0])
  if memory is None and backend in METAL_PLATFORMS:
    memory = int(host_physical_bytes() * METAL_MEMORY_SHARE)
  if memory is None:
    memory = host_available_bytes()
  limit = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
  if limit:
    try:
      memory = min(memory, int(float(limit))) if memory else int(float(limit))
    except ValueError:
      raise UserError(f"${MEMORY_LIMIT_ENV}={limit!r} is not a number of bytes.",
                      "unset it or set it to e.g. 8e9.") from None
  return Platform(backend=backend, device_kind=str(devices[0].device_kind),
                  num_devices=len(devices), memory_bytes=int(memory),
                  cpu_count=os.cpu_count() or 1, note=note)


class UnanalysedMemory(dict):
  """`memory_stats` of a backend that gives no compiled memory analysis (the Metal plugin):
  empty; reading a byte count is a one-line UserError, so that a mode that reports memory
  refuses cleanly, while `check_step_fits` (the train mode's check) skips it."""

  def __init__(self, backend: str):
    super().__init__()
    self.backend = backend

  def __missing__(self, key):
    raise UserError(
        f"the {self.backend} backend ({METAL_PLUGIN}) gives no compiled memory analysis, so "
        f"{key} cannot be reported.",
        "run this mode on the CPU: JAX_PLATFORMS=cpu python main.py ...")


def memory_stats(compiled) -> dict[str, int]:
  """Byte counts from XLA's memory analysis of a compiled executable.

  temp (activations and scratch), argument, output, alias (outputs written into donated
  arguments), generated_code and peak_memory (0 where the backend does not report it);
  total = temp + argument + output and held = total - alias. On a Metal platform, which gives
  no analysis, an empty `UnanalysedMemory`.
  """
  metal = jax.default_backend() in METAL_PLATFORMS
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    if not metal:
      raise
    mem = None  # jax-mps 0.10.11: "GetCompiledMemoryStats not implemented"
  if mem is None and metal:
    return UnanalysedMemory(jax.default_backend())
  if mem is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no compiled memory analysis; "
                       "cannot report train-step memory.")
  stats = {f"{k}_bytes": int(getattr(mem, f"{k}_size_in_bytes")) for k in
           ("temp", "argument", "output", "alias", "generated_code")}
  stats["peak_memory_bytes"] = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
  stats["total_bytes"] = stats["temp_bytes"] + stats["argument_bytes"] + stats["output_bytes"]
  stats["held_bytes"] = stats["total_bytes"] - stats["alias_bytes"]
  return stats


# The share of a device's memory a compiled step may use (the rest: the runtime, fragmentation).
FIT_HEADROOM = 0.9


def check_step_fits(stats: dict, platform: Platform, *, what: str, fix: str,
                    headroom: float = FIT_HEADROOM) -> None:
  """Raises ResourceError when a compiled step's memory (`step_memory.memory_stats`: temp +
  argument + output - alias bytes, per device) exceeds `headroom` x the platform's memory.
  Nothing to check where the backend gives no analysis (`UnanalysedMemory`)."""
  if isinstance(stats, UnanalysedMemory):
    return
  need = int(stats["held_bytes"])
  have = int(platform.memory_bytes * headroom)
  if platform.memory_bytes and need > have:
    raise ResourceError(
        f"{what} needs {need / 2**30:.1f} GiB per device (XLA memory analysis of the compiled "
        f"train step) but this machine has {platform.memory_bytes / 2**30:.1f} GiB "
        f"({platform.describe()}); it would be killed for lack of memory.", fix)


def check_host_memory(stats: dict, platform: Platform, *, headroom: float = FIT_HEADROOM,
                      libc: Any = "auto") -> Optional[str]:
  """On CPU, while `host_allocator` keeps freed memory for reuse: if the step (which fits,
  `check_step_fits`) plus RETAINED_TEMP_COPIES more copies of its temporary buffers would not,
  goes back to glibc's default allocation (`host_allocator.release`) and returns a note for the
  user; otherwise None."""
  if platform.backend != "cpu" or not platform.memory_bytes or not host_allocator.retaining():
    return None
  need = int(stats["held_bytes"] + host_allocator.RETAINED_TEMP_COPIES * stats["temp_bytes"])
  if need <= int(platform.memory_bytes * headroom):
    return None
  host_allocator.release(libc)
  return (f"host memory: keeping freed memory for reuse could take the step to "
          f"{need / 2**30:.1f} GiB, more than this machine's "
          f"{platform.memory_bytes / 2**30:.1f} GiB allow; using glibc's default allocation "
          f"instead (slower on CPU: each step's buffers are page-faulted in again; "
          f"bdiff_jax/runtime/host_allocator.py)")
