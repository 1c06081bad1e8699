"""Devices and processes: the data x fsdp mesh, its shardings, and jax.distributed.

One code path serves 1..N devices on 1..P processes. The mesh has two axes:
the batch is split over both (`data` major, `fsdp` minor); along `fsdp` each
weight matrix, and its optimizer state, is split on its largest dimension
that divides by the axis size (`fsdp_spec`), the rest is replicated. With
fsdp 1 that is plain data parallelism (nanoGPT's DDP). Inside the train
step's shard_map each device all-gathers the full params (`gather_params`),
computes its rows' gradients, and `mean_grads` averages them over the
devices, handing each its own shard (a reduce-scatter along `fsdp`). On one
device every sharding is trivial and the same programs run.

Owns: the mesh, shardings, the gather and reduction of sharded params and
gradients, per-device memory, process start-up and agreement (`any_process`,
`barrier`). May import: JAX, `cpu_tricks`, `errors`.
"""

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minigpt_jax import cpu_tricks
from minigpt_jax.errors import UserError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch's rows split over both, data major


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


def make_mesh(data: int, fsdp: int = 1) -> Mesh:
  """A data x fsdp mesh of the first data * fsdp devices (all of them across processes).

  jax.devices() lists each process' devices together, so a process' devices
  share rows of the mesh: fsdp's gathers stay within a host where they can.
  """
  devices = np.asarray(jax.devices()[:data * fsdp]).reshape(data, fsdp)
  return Mesh(devices, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device (data, then fsdp); the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_size(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.shape[FSDP_AXIS]


def fsdp_spec(shape: tuple, fsdp: int) -> P:
  """A matrix split along `fsdp` on its largest dimension divisible by it; else P().

  Vectors and scalars (biases, LayerNorm gains, step counts) stay replicated,
  as does a matrix with no dimension that divides.
  """
  if fsdp == 1 or len(shape) < 2:
    return P()
  fits = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
  if not fits:
    return P()
  dim = max(fits, key=lambda d: (shape[d], -d))  # the largest; the first of equals
  return P(*(FSDP_AXIS if d == dim else None for d in range(len(shape))))


def specs(tree, mesh: Mesh | None):
  """`fsdp_spec` of each leaf of `tree` (arrays or shape structs)."""
  return jax.tree.map(lambda x: fsdp_spec(x.shape, fsdp_size(mesh)), tree)


def shardings(tree, mesh: Mesh):
  """NamedShardings of params, optimizer state or a whole TrainState on `mesh`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs(tree, mesh))


def _sharded_dim(spec: P) -> int | None:
  return next((d for d, axis in enumerate(spec) if axis == FSDP_AXIS), None)


def gather_params(params, specs_tree):
  """Inside shard_map: each device's fsdp shards all-gathered into whole params."""
  def gather(x, spec):
    dim = _sharded_dim(spec)
    return x if dim is None else lax.all_gather(x, FSDP_AXIS, axis=dim, tiled=True)
  return jax.tree.map(gather, params, specs_tree)


def mean_grads(loss, grads, specs_tree, tricks: bool):
  """Inside shard_map: (loss, grads) averaged over every device; grads in each device's shard.

  Replicated leaves (all of them at fsdp 1) take `cpu_tricks.mean_over_devices`;
  a sharded leaf is summed by a reduce-scatter along `fsdp` and an all-reduce
  along `data`.
  """
  leaves, treedef = jax.tree.flatten(grads)
  spec_leaves = treedef.flatten_up_to(specs_tree)
  whole = [i for i, spec in enumerate(spec_leaves) if _sharded_dim(spec) is None]
  loss, whole_leaves = cpu_tricks.mean_over_devices(
      (loss, [leaves[i] for i in whole]), BATCH_AXES, tricks)
  out = list(leaves)
  for i, leaf in zip(whole, whole_leaves):
    out[i] = leaf
  devices = lax.psum(1, BATCH_AXES)
  for i, spec in enumerate(spec_leaves):
    dim = _sharded_dim(spec)
    if dim is not None:
      shard = lax.psum_scatter(leaves[i], FSDP_AXIS, scatter_dimension=dim, tiled=True)
      out[i] = lax.psum(shard, DATA_AXIS) / devices
  return loss, jax.tree.unflatten(treedef, out)


def device_index() -> jax.Array:
  """Inside shard_map: this device's place in the batch's row order (data major)."""
  return lax.axis_index(DATA_AXIS) * lax.psum(1, FSDP_AXIS) + lax.axis_index(FSDP_AXIS)


def bytes_per_device(tree) -> int:
  """The most bytes any one device holds of `tree`'s arrays (params + optimizer state)."""
  held = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return max(held.values(), default=0)


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
