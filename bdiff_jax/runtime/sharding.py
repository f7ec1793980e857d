"""The 2-D device mesh (`data`, `fsdp`) and where the train state and batches live on it.

Mesh (`config.mesh`): the global devices (all processes) laid out as a `data` x `fsdp` grid,
`mesh.fsdp` devices per parameter shard group and `mesh.data` groups (-1: all remaining devices).

  fsdp = 1 (default)  plain data parallelism: every device holds the whole state (replicated),
                      the batch is split over all devices and XLA all-reduces the gradients.
  fsdp = k > 1        FSDP / ZeRO-3 style: every state leaf with >= 2 dimensions is split k ways
                      along its largest dimension divisible by k (ties: the first such axis);
                      leaves with no such dimension, vectors and scalars are replicated. The
                      rule looks only at shapes, so the AdamW moments (which mirror the params),
                      the EMA params and any optimizer copy get the same layout as the parameter
                      they belong to. XLA all-gathers a layer's weights where the step needs them
                      and reduce-scatters their gradients, so the state in memory per device
                      falls by about k.

The batch's rows are split over all devices (`data` and `fsdp` jointly), so the batch size must
be a multiple of the number of devices. Plain data parallelism (the state replicated on every
device) is the fsdp = 1 case.

Multi-process: the mesh spans `jax.devices()` of every process; `global_batch` builds the global
batch array from the rows each process's devices hold, read by that process alone, and
`replicate` puts a small host value that every process holds alike (a PRNG key) on every device.
"""

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bdiff_jax.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
AXES = (DATA_AXIS, FSDP_AXIS)


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes for `num_devices` devices; data = -1 takes all remaining devices.

  Raises:
    ConfigError: the sizes do not multiply to the device count.
  """
  data, fsdp = int(data), int(fsdp)
  if fsdp < 1 or num_devices % fsdp:
    raise ConfigError(
        f"config.mesh.fsdp={fsdp} does not divide the {num_devices} devices.",
        f"pass --config.mesh.fsdp=<a divisor of {num_devices}> (1 = replicated state).")
  if data == -1:
    data = num_devices // fsdp
  if data < 1 or data * fsdp != num_devices:
    raise ConfigError(
        f"config.mesh.data={data} x config.mesh.fsdp={fsdp} is not the {num_devices} devices.",
        "pass --config.mesh.data=-1 (all remaining devices) or sizes whose product is "
        f"{num_devices}.")
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The (`data`, `fsdp`) mesh (`config.mesh`'s sizes; -1: the devices left) over `devices`
  (default: the global `jax.devices()`, every process's)."""
  devices = list(devices if devices is not None else jax.devices())
  data, fsdp = mesh_shape(data, fsdp, len(devices))
  return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), AXES)


def axis_size(mesh: Mesh, axis: str) -> int:
  """The size of `axis` in `mesh` (1 when the mesh has no such axis)."""
  return int(dict(zip(mesh.axis_names, mesh.devices.shape)).get(axis, 1))


def leaf_spec(shape: Sequence[int], fsdp: int) -> P:
  """The FSDP rule for one leaf: `fsdp` shards along its largest dimension divisible by `fsdp`
  (the first such axis on ties) when it has >= 2 dimensions; P() (replicated) otherwise."""
  if fsdp <= 1 or len(shape) < 2:
    return P()
  best = None
  for axis, size in enumerate(shape):
    if size % fsdp == 0 and (best is None or size > shape[best]):
      best = axis
  if best is None:
    return P()
  return P(*([None] * best + [FSDP_AXIS]))


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """A `NamedSharding` per leaf of `abstract_state` (anything with .shape: arrays or
  `jax.ShapeDtypeStruct`s) by the FSDP rule (`leaf_spec`); all replicated when fsdp = 1."""
  fsdp = axis_size(mesh, FSDP_AXIS)
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), fsdp)),
                                abstract_state)


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct` leaves carrying `shardings` (e.g. orbax restore targets)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over every mesh axis among (`data`, `fsdp`) jointly: each device gets its own rows."""
  return NamedSharding(mesh, P(tuple(a for a in AXES if a in mesh.axis_names)))


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(
        f"config.{what}={batch_size} is not divisible by the {n} devices of the mesh.",
        f"pass --config.{what}=<a multiple of {n}>.")


def local_row_range(mesh: Mesh, batch_size: int) -> tuple[int, int]:
  """[start, stop) of the global batch's rows that this process's devices hold (contiguous: the
  mesh orders devices by process)."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size, 1))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [batch_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  return min(starts), max(stops)


def global_batch(mesh: Mesh, shape: tuple[int, int],
                 rows: Callable[[int, int], np.ndarray]) -> jax.Array:
  """The global int32[batch, seq] batch array on `mesh`, from `rows(start, stop)` (the global
  batch's rows start..stop-1): only the rows this process's devices hold are read."""
  sharding = batch_sharding(mesh)
  start, stop = local_row_range(mesh, shape[0])
  local = np.asarray(rows(start, stop))

  def shard(index):
    r = index[0]
    lo = (r.start or 0) - start
    hi = (shape[0] if r.stop is None else r.stop) - start
    return local[lo:hi]

  return jax.make_array_from_callback(tuple(shape), sharding, shard)


def shard_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host batch (the whole global batch, every process holding it) on `mesh`."""
  batch = np.asarray(batch)
  return global_batch(mesh, batch.shape, lambda start, stop: batch[start:stop])


def replicate(value: Any, mesh: Mesh) -> jax.Array:
  """A host value (or a single-device array) that every process holds with the same contents,
  replicated on every device of `mesh`: e.g. an evaluation or sampling key beside parameters
  that live on a multi-process mesh (a jitted program cannot mix the two placements)."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, replicated(mesh), lambda index: value[index])


def place_state(state: Any, mesh: Mesh) -> tuple[Any, Any]:
  """(state on `mesh` by the FSDP rule, its shardings) for a state held on the host or on one
  device (every process holding the same values)."""
  shardings = state_shardings(state, mesh)
  return jax.device_put(state, shardings), shardings
