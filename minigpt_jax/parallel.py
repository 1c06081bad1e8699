"""Devices and processes: the mesh, the two shardings we use, and jax.distributed.

One code path serves 1..N devices on 1..P processes: a 1-D mesh with a `data`
axis; batches are sharded over it, params and optimizer state are replicated,
and `cpu_tricks.mean_over_devices` averages the gradients. On one device
every sharding is trivial and the same programs run.

Owns: the mesh, shardings, process start-up and agreement (`any_process`,
`barrier`). May import: JAX, `errors`.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minigpt_jax.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run; with no arguments JAX detects Slurm, TPU pods, etc.

  Must run before anything touches a device.
  """
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except (RuntimeError, ValueError) as e:
    raise UserError(f"jax.distributed.initialize failed: {' '.join(str(e).split())}; "
                    "pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I, "
                    "or run under Slurm/on a TPU VM for automatic detection") from None


def set_cpu_devices(num_devices: int) -> None:
  """Splits the host CPU into `num_devices` JAX devices, to train data-parallel over its cores.

  XLA:CPU spreads a single small program over cores poorly, so two devices
  with half the batch each train faster than one on a 2-core machine
  (docs/speed.md). Must run before JAX's first operation.
  """
  if num_devices < 1:
    raise UserError(f"--cpu_devices is {num_devices}; use a positive integer")
  try:
    jax.config.update("jax_num_cpu_devices", num_devices)
  except RuntimeError:
    raise UserError("--cpu_devices came after JAX had started; set it before any JAX "
                    "operation (in a notebook, restart the runtime)") from None


def make_mesh(num_shards: int) -> Mesh:
  """A mesh of the first `num_shards` devices (all of them in a multi-process run)."""
  return Mesh(np.asarray(jax.devices()[:num_shards]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`; the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def put_replicated(array_N: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array every process holds in full (e.g. the corpus), on every device."""
  return jax.make_array_from_process_local_data(replicated(mesh), np.asarray(array_N))


def is_main_process() -> bool:
  """Only process 0 writes logs, metrics, progress and samples."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process; every process gets the same answer.

  A collective: every process must call it at the same point of the program.
  With one process it is `flag` itself, at no cost.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
