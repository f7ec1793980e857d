"""What machine we run on: the JAX backend, its devices and how much memory a step may use.

Used to pick a config preset that fits (`configs/wikitext2.py` with no preset) and to refuse,
before training, a train step whose compiled memory would not fit (`check_step_fits`).
"""

import dataclasses
import os
from typing import Optional

import jax

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


def _device_memory(device) -> Optional[int]:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None  # backends without memory statistics
  if not stats:
    return None
  return int(stats.get("bytes_limit") or stats.get("bytes_reservable_limit") or 0) or None


def detect() -> Platform:
  devices = jax.local_devices()
  backend = jax.default_backend()
  memory = None if backend == "cpu" else _device_memory(devices[0])
  if memory is None:
    memory = host_available_bytes()
  return Platform(backend=backend, device_kind=str(devices[0].device_kind),
                  num_devices=len(devices), memory_bytes=int(memory),
                  cpu_count=os.cpu_count() or 1)


def check_step_fits(stats: dict, platform: Platform, *, what: str, fix: str,
                    headroom: float = 0.9) -> None:
  """Raises ResourceError when a compiled step's memory (`step_memory.memory_stats`: temp +
  argument + output - alias bytes, per device) exceeds `headroom` x the platform's memory."""
  need = int(stats["held_bytes"])
  have = int(platform.memory_bytes * headroom)
  if platform.memory_bytes and need > have:
    raise ResourceError(
        f"{what} needs {need / 2**30:.1f} GiB per device (XLA memory analysis of the compiled "
        f"train step) but this machine has {platform.memory_bytes / 2**30:.1f} GiB "
        f"({platform.describe()}); it would be killed for lack of memory.", fix)
