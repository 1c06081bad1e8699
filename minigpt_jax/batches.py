"""Where each step's batch comes from: the corpus on every device, or windows from the host.

On device (the default, for corpora within `config.data.device_budget_mb`):
the ids go to every device once and the compiled step draws its own batch.
On the host (`config.data.on_device=False`, a corpus past the budget, or
past 2**31 tokens): each call's windows are drawn with the same keys
(`train.batch_keys`, `data.window_starts`), gathered in numpy from the
arrays (a token file's np.memmap: only the windows are read, with pread), each
process gathering only the rows of the global batch its devices hold, and
assembled with `jax.make_array_from_process_local_data`. Both give the same
windows to the same compiled `train.train_steps`, so the same losses.

The next call's windows are gathered on a background thread while the
current call runs (host path only); they depend on the step alone, so
prefetching changes nothing but the wait.

Owns: the choice of path (`uses_host`), `DeviceBatches`, `HostBatches`.
May import: JAX, numpy, data, train, parallel.
"""

import concurrent.futures

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minigpt_jax import data, parallel, train

_INT32_BYTES = 4  # the device path holds int32 ids


def device_bytes(splits: dict) -> int:
  """What the device path would put on every device: int32 ids of every split."""
  return _INT32_BYTES * sum(len(ids) for ids in splits.values())


def uses_host(config, splits: dict) -> str | None:
  """Why batches come from the host under `config`, or None for the device path."""
  if not config.data.on_device:
    return "config.data.on_device is False"
  mb = device_bytes(splits) / 2**20
  if mb > config.data.device_budget_mb:
    return (f"the corpus takes {mb:,.0f} MB as int32, over config.data.device_budget_mb "
            f"({config.data.device_budget_mb})")
  longest = max(len(ids) for ids in splits.values())
  if longest - config.model.block_size > data.INT32_SPAN:
    return f"{longest:,} tokens are past int32 indices"
  return None


class DeviceBatches:
  """The corpus on every device; each compiled call draws its own windows."""

  on_device = True

  def __init__(self, splits: dict, mesh: Mesh, batch_size: int, block_size: int,
               eval_iters: int, grad_accum_steps: int):
    self.splits = {k: parallel.put_replicated(np.asarray(ids, np.int32), mesh)
                   for k, ids in splits.items()}
    self.shapes = dict(batch_size=batch_size, block_size=block_size, mesh=mesh)
    self.eval_iters, self.grad_accum_steps = eval_iters, grad_accum_steps

  def run_steps(self, state, step: int, num_steps: int, next_num_steps: int | None = None):
    """(state, metrics) after `num_steps` updates from `step` (state.step)."""
    return train.jit_train_steps(state, self.splits["train"], num_steps=num_steps,
                                 grad_accum_steps=self.grad_accum_steps, **self.shapes)

  def evaluate(self, state, step: int) -> dict:
    return train.jit_estimate_loss(state, self.splits, eval_iters=self.eval_iters,
                                   **self.shapes)

  def close(self) -> None:
    pass


def local_rows(sharding: NamedSharding, shape: tuple, axis: int) -> tuple[int, int]:
  """The rows [lo, hi) along `axis` of an array of `shape` that this process's devices hold."""
  slices = [index[axis] for index in sharding.addressable_devices_indices_map(shape).values()]
  bounds = sorted({(s.start or 0, shape[axis] if s.stop is None else s.stop) for s in slices})
  lo, hi = bounds[0][0], bounds[-1][1]
  if sum(b - a for a, b in bounds) != hi - lo:  # jax.devices() keeps a process together
    raise ValueError(f"this process's rows {bounds} are not one block")
  return lo, hi


def _host_device() -> jax.Device:
  """Where the keys and starts are computed: this process's CPU, off the accelerator's queue."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # no CPU backend (JAX_PLATFORMS names none)
    return jax.local_devices()[0]


class HostBatches:
  """Windows gathered on the host from numpy arrays (memmaps), this process's rows only."""

  on_device = False

  def __init__(self, splits: dict, mesh: Mesh, rng: jax.Array, batch_size: int,
               block_size: int, eval_iters: int, grad_accum_steps: int, prefetch: bool = True):
    self.splits = splits
    self.B, self.T, self.eval_iters = batch_size, block_size, eval_iters
    self.shapes = dict(batch_size=batch_size, block_size=block_size, mesh=mesh)
    self.grad_accum_steps = grad_accum_steps
    self.sharding = NamedSharding(mesh, P(None, parallel.BATCH_AXES))  # [K, B, T+1]
    self.rows = local_rows(self.sharding, (1, batch_size, block_size + 1), 1)
    # The root key never changes; a replicated array, so any shard is all of it. A
    # copy: the state's own buffer is donated to the next call.
    self.rng = jax.device_put(np.array(rng.addressable_data(0)), _host_device())
    self._pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
    self._next = None  # ((step, num_steps), future of its local windows)

  def _local_windows(self, keys_K: jax.Array, ids_N: np.ndarray) -> np.ndarray:
    """This process's rows of the windows of `keys_K`: [K, hi - lo, T + 1] int32."""
    lo, hi = self.rows
    starts_KB = data.window_starts(keys_K, len(ids_N), self.B, self.T)
    return data.gather_windows(ids_N, starts_KB[:, lo:hi], self.T)

  def _global(self, local_KbT1: np.ndarray) -> jax.Array:
    shape = (local_KbT1.shape[0], self.B, self.T + 1)
    return jax.make_array_from_process_local_data(self.sharding, local_KbT1, shape)

  def _train_windows(self, step: int, num_steps: int) -> np.ndarray:
    keys_K = train.batch_keys(self.rng, step, num_steps)
    return self._local_windows(keys_K, self.splits["train"])

  def run_steps(self, state, step: int, num_steps: int, next_num_steps: int | None = None):
    """(state, metrics) after `num_steps` updates from `step`; prefetches `next_num_steps`."""
    if self._next is not None and self._next[0] == (step, num_steps):
      local = self._next[1].result()
    else:
      local = self._train_windows(step, num_steps)
    self._next = None
    out = train.jit_train_steps(state, self._global(local), num_steps=num_steps,
                                grad_accum_steps=self.grad_accum_steps, **self.shapes)
    if self._pool is not None and next_num_steps:
      after = step + num_steps
      self._next = ((after, next_num_steps),
                    self._pool.submit(self._train_windows, after, next_num_steps))
    return out

  def evaluate(self, state, step: int) -> dict:
    windows = {}
    for i, (name, ids_N) in enumerate(sorted(self.splits.items())):
      keys_J = train.eval_keys(self.rng, step, i, self.eval_iters)
      windows[name] = self._global(self._local_windows(keys_J, ids_N))
    return train.jit_estimate_loss(state, windows, eval_iters=self.eval_iters, **self.shapes)

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True)


def make(config, splits: dict, mesh: Mesh, rng: jax.Array):
  """The batches `config` asks for (`uses_host`), over `mesh`."""
  t = config.train
  shapes = dict(batch_size=t.batch_size, block_size=config.model.block_size,
                eval_iters=t.eval_iters, grad_accum_steps=t.grad_accum_steps)
  if uses_host(config, splits) is None:
    return DeviceBatches(splits, mesh, **shapes)
  return HostBatches(splits, mesh, rng, **shapes)
