"""Multi-process runs on JAX's distributed runtime (`jax.distributed.initialize`).

One process per host (or per GPU); all run the same command. The runtime must start before
anything touches a JAX backend, and the config file's automatic preset already does (it asks the
backend for its memory), so the settings come from the environment, read by `main.py` before it
parses the command line:

  JAX_COORDINATOR_ADDRESS=host:port  process 0's address (all processes give the same one),
  JAX_NUM_PROCESSES=N                with the number of processes
  JAX_PROCESS_ID=i                   and this process's index, 0 <= i < N;
  BDIFF_DISTRIBUTED=auto|on|off      auto (default): start the runtime when the address is set or
                                     a cluster is detected: a SLURM job step with several tasks,
                                     or a multi-host Cloud TPU slice (JAX then finds the
                                     coordinator, count and index itself); on: always, leaving
                                     detection to JAX; off: never.

Roles: every process computes (the mesh spans all devices, the step is one SPMD program, orbax
saves and restores checkpoints collectively); only process 0 (`is_main_process()`) writes
metrics, config.json, plots and samples, prints, and holds the workdir lock.
"""

import os
from typing import Mapping, Optional

import jax

from bdiff_jax.errors import ConfigError

MODES = ("auto", "on", "off")


def _int_env(environ: Mapping[str, str], name: str) -> int:
  value = environ.get(name, "")
  try:
    return int(value)
  except ValueError:
    raise ConfigError(
        f"{name}={value!r} is not an integer (JAX_COORDINATOR_ADDRESS is set).",
        "set JAX_NUM_PROCESSES=<number of processes> and JAX_PROCESS_ID=<0..N-1> in every "
        "process's environment.") from None


def _cluster_detected(environ: Mapping[str, str]) -> bool:
  """A SLURM step with several tasks, or a multi-host Cloud TPU slice."""
  try:
    slurm_tasks = int(environ.get("SLURM_NTASKS", "1") or 1)
  except ValueError:
    slurm_tasks = 1
  if "SLURM_JOB_ID" in environ and slurm_tasks > 1:
    return True
  tpu_hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in tpu_hosts or bool(environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize_arguments(environ: Mapping[str, str]) -> Optional[dict]:
  """The keyword arguments of `jax.distributed.initialize` for this environment, or None for a
  single-process run.

  Raises:
    ConfigError: BDIFF_DISTRIBUTED has another value, or the coordinator address is set without a
      valid process count and index.
  """
  mode = environ.get("BDIFF_DISTRIBUTED", "auto") or "auto"
  if mode not in MODES:
    raise ConfigError(f"BDIFF_DISTRIBUTED={mode!r} is not one of auto, on, off.",
                      "unset it (auto) or set it to on or off.")
  if mode == "off":
    return None
  address = environ.get("JAX_COORDINATOR_ADDRESS", "")
  if address:
    num, index = _int_env(environ, "JAX_NUM_PROCESSES"), _int_env(environ, "JAX_PROCESS_ID")
    if num < 1 or not 0 <= index < num:
      raise ConfigError(f"JAX_PROCESS_ID={index} is not in [0, JAX_NUM_PROCESSES={num}).",
                        "number the processes 0..N-1 and give all of them the same N.")
    return {"coordinator_address": address, "num_processes": num, "process_id": index}
  if mode == "on" or _cluster_detected(environ):
    return {}
  return None


def initialize(environ: Optional[Mapping[str, str]] = None) -> bool:
  """Starts the distributed runtime when `initialize_arguments` asks for it; returns whether it
  did. Call once, before any JAX computation."""
  kwargs = initialize_arguments(os.environ if environ is None else environ)
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  return True


def is_main_process() -> bool:
  """Whether this process writes files and prints (process 0; always true in one process)."""
  return jax.process_index() == 0
