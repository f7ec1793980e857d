"""The device mesh and the placement of batches and state on it.

Data parallelism: the batch is sharded over all local devices along the `data` mesh axis and the
state is replicated (`jax.device_put` of the whole state); XLA inserts the gradient all-reduce.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bdiff_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.local_devices())
  return Mesh(devices, (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: np.ndarray, mesh: Mesh):
  return jax.device_put(batch, batch_sharding(mesh))


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated_sharding(mesh))


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(
        f"config.{what}={batch_size} is not divisible by the {n} local devices.",
        f"pass --config.{what}=<a multiple of {n}>.")
