"""What machine we run on: the JAX backend, its devices and how much memory a step may use.

Used to pick a config preset that fits (`configs/wikitext2.py` with no preset) and to refuse,
before training, a train step whose compiled memory would not fit (`check_step_fits`), or
that fits only if freed host memory is returned to the kernel (`check_host_memory`).
"""

import dataclasses
import os
import sys
from typing import Any, Optional

import jax

from bdiff_jax import host_allocator
from bdiff_jax.errors import UserError


class ResourceError(UserError):
  """The run needs more memory than the machine has."""


@dataclasses.dataclass(frozen=True)
class Platform:
  backend: str  # "cpu" | "gpu" | "tpu" | ...
  device_kind: str
  num_devices: int
  memory_bytes: int  # per device: accelerator memory, or the host's available RAM for CPU
  cpu_count: int

  def describe(self) -> str:
    mem = f"{self.memory_bytes / 2**30:.1f} GiB"
    what = "available host RAM" if self.backend == "cpu" else "memory per device"
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


def detect() -> Platform:
  """The local platform. `$BDIFF_MEMORY_LIMIT_BYTES` caps the memory it reports (to share a
  machine, or to test the refusal of steps that do not fit)."""
  devices = jax.local_devices()
  backend = jax.default_backend()
  memory = None if backend == "cpu" else _device_memory(devices[0])
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
                  cpu_count=os.cpu_count() or 1)


def memory_stats(compiled) -> dict[str, int]:
  """Byte counts from XLA's memory analysis of a compiled executable.

  temp (activations and scratch), argument, output, alias (outputs written into donated
  arguments), generated_code and peak_memory (0 where the backend does not report it);
  total = temp + argument + output and held = total - alias.
  """
  mem = compiled.memory_analysis()
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
  argument + output - alias bytes, per device) exceeds `headroom` x the platform's memory."""
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
          f"bdiff_jax/host_allocator.py)")
