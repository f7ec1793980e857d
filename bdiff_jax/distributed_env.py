"""What the environment asks of JAX's distributed runtime, read without importing JAX.

`main.py` decides from this, before anything imports JAX, whether it is one process of a
multi-process run (and then runs its work under `bdiff_jax.supervisor`); `bdiff_jax.distributed`
starts the runtime with these arguments. The variables are listed in distributed.py's docstring.
"""

from typing import Mapping, Optional

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
