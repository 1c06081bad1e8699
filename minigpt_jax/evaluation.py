"""Exact evaluation: every token of a split scored once, the same number on any devices.

`config.train.eval_mode = "full"` replaces the lecture's estimate (random
batches, `train.estimate_loss`) with the loss of the whole val split:
windows of block_size move by `eval_stride` tokens (`data.sliding_windows`),
the first scoring all its positions and each later one only the targets no
earlier window scored. The train split is scored on `eval_train_windows`
fixed, evenly spaced windows (`data.spaced_windows`), the same at every
evaluation. A split's loss is the sum of its token losses over their count.

Windows are gathered on the host from the ids (arrays or a token file's
memmap: only the windows are read), batch_size at a time, each process
gathering only the windows of the rows its devices hold; the last batch is
padded with windows that score nothing. `train.score_windows` returns each window's sum,
and the host adds them in float64 in window order, so 1 device, N devices,
N processes and either batch path give the same number.

`score_text` scores a stream of id chunks the same way without holding the
text (launch/evaluate.py --path).

Owns: `FullEvaluation`, `score`, `stream_windows`. May import: JAX, numpy,
data, train, batches, parallel.
"""

from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from minigpt_jax import batches, data, parallel, train


def _batched(pieces: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int,
             rows: tuple[int, int], fill: np.ndarray,
             block_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Groups (items [n, ...], first [n]) into batches of batch_size, this process's rows of each.

  The last batch is padded with `fill` items whose `first` is block_size: they
  score nothing.
  """
  pending_i, pending_f, held = [], [], 0

  def emit():
    items, first = np.concatenate(pending_i), np.concatenate(pending_f)
    pad = batch_size - len(first)
    items = np.concatenate([items, np.repeat(fill[None], pad, axis=0)])
    first = np.concatenate([first, np.full(pad, block_size, np.int32)])
    lo, hi = rows
    return items[lo:hi], first[lo:hi]

  for items, first in pieces:
    while len(first):
      take = min(batch_size - held, len(first))
      pending_i.append(items[:take])
      pending_f.append(first[:take])
      items, first, held = items[take:], first[take:], held + take
      if held == batch_size:
        yield emit()
        pending_i, pending_f, held = [], [], 0
  if held:
    yield emit()


def score(state: train.TrainState, pieces: Iterable[tuple[np.ndarray, np.ndarray]],
          batch_size: int, block_size: int, mesh: Mesh | None = None,
          ids_N: np.ndarray | None = None) -> tuple[float, int]:
  """(sum of the scored token losses, their count) of (windows, first) pieces, in order.

  With `ids_N`, the pieces are (starts, first) into those ids, and this
  process gathers only the windows of its own rows of each batch.
  """
  sharding = (parallel.batch_sharded(mesh) if mesh is not None
              else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  rows = (batches.local_rows(sharding, (batch_size, block_size + 1), 0) if mesh is not None
          else (0, batch_size))
  fill = np.zeros((), np.int64) if ids_N is not None else np.zeros(block_size + 1, np.int32)
  outputs = []
  for local, local_f in _batched(pieces, batch_size, rows, fill, block_size):
    if ids_N is not None:
      local = data.gather_windows(ids_N, local, block_size)
    windows_BT1 = jax.make_array_from_process_local_data(
        sharding, local, (batch_size, block_size + 1))
    first_B = jax.make_array_from_process_local_data(sharding, local_f, (batch_size,))
    outputs.append(train.jit_score_windows(state, windows_BT1, first_B, mesh=mesh))
    if len(outputs) > 8:  # bound what waits on the device; keeps the order
      outputs = [_add(outputs)]
  if not outputs:
    return 0.0, 0
  total, count = _add(outputs)
  return float(total[0]), int(count[0])


def _add(outputs) -> tuple[np.ndarray, np.ndarray]:
  """Per-window sums of several batches added in window order, in float64: ([sum], [count])."""
  sums = np.concatenate([np.asarray(s, np.float64) for s, _ in outputs])
  counts = np.concatenate([np.asarray(c, np.int64) for _, c in outputs])
  return np.array([np.sum(sums)]), np.array([np.sum(counts)])


class FullEvaluation:
  """The exact losses of a run's splits: what `evaluate(state, step)` gives in "full" mode."""

  def __init__(self, splits: dict, mesh: Mesh | None, batch_size: int, block_size: int,
               stride: int | None = None, train_windows: int | None = None):
    self.splits, self.mesh, self.B, self.T = splits, mesh, batch_size, block_size
    self.stride = stride or block_size
    val = data.sliding_windows(len(splits["val"]), block_size, self.stride)
    self.plans = {"val": val, "train": data.spaced_windows(
        len(splits["train"]), block_size, train_windows or len(val[0]))}

  def tokens_scored(self, split: str) -> int:
    """How many targets an evaluation of `split` scores: val's are all of them."""
    return int(np.sum(self.T - self.plans[split][1]))

  def evaluate(self, state: train.TrainState, step: int | None = None) -> dict:
    """{split: loss} of `state`; the step does not matter: the windows are fixed."""
    losses = {}
    for name in sorted(self.plans):
      starts_W, first_W = self.plans[name]
      total, count = score(state, [(starts_W, first_W)], self.B, self.T, self.mesh,
                           ids_N=self.splits[name])
      losses[name] = total / count
    return losses


def stream_windows(id_chunks: Iterable[np.ndarray], block_size: int,
                   stride: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`data.sliding_windows` of a stream of id chunks, as (windows, first) pieces.

  Holds one chunk and block_size ids at a time, so a text of any size is
  scored in flat memory. Yields nothing for fewer than block_size + 1 ids.
  """
  buf, offset = np.zeros(0, np.int32), 0  # buf[0] is id number `offset`
  start, prev = 0, None  # the next window's start; the last emitted start
  for chunk in id_chunks:
    buf = np.concatenate([buf, np.asarray(chunk, np.int32)])
    end = offset + len(buf)  # ids known: 0 .. end - 1
    starts = np.arange(start, end - block_size, stride, dtype=np.int64)
    if len(starts):
      first = np.zeros(len(starts), np.int32)
      before = np.concatenate([[prev if prev is not None else -block_size], starts[:-1]])
      first[:] = np.maximum(before + block_size - starts, 0)
      yield data.gather_windows(buf, starts - offset, block_size), first
      prev, start = int(starts[-1]), int(starts[-1]) + stride
    if prev is not None:  # keep what the next window, or a last one after prev, needs
      buf, offset = buf[prev + 1 - offset:], prev + 1
  last = offset + len(buf) - 1 - block_size
  if prev is not None and last > prev:  # a last window ends at the last id
    yield (data.gather_windows(buf, np.array([last - offset]), block_size),
           np.array([prev + block_size - last], np.int32))
