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
gathering only the rows its devices hold; the last batch is padded with
windows that score nothing. `train.score_windows` returns each window's sum,
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minigpt_jax import batches, data, parallel, train


def _batched(windows: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int,
             block_size: int, rows: tuple[int, int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Groups (windows [n, T+1], first [n]) into padded batches, this process's rows of each."""
  pending_w, pending_f, held = [], [], 0

  def emit():
    w, f = np.concatenate(pending_w), np.concatenate(pending_f)
    pad = batch_size - len(f)
    w = np.concatenate([w, np.zeros((pad, block_size + 1), np.int32)])
    f = np.concatenate([f, np.full(pad, block_size, np.int32)])  # padding: nothing scored
    lo, hi = rows
    return w[lo:hi], f[lo:hi]

  for w, f in windows:
    while len(f):
      take = min(batch_size - held, len(f))
      pending_w.append(w[:take])
      pending_f.append(f[:take])
      w, f, held = w[take:], f[take:], held + take
      if held == batch_size:
        yield emit()
        pending_w, pending_f, held = [], [], 0
  if held:
    yield emit()


def score(state: train.TrainState, windows: Iterable[tuple[np.ndarray, np.ndarray]],
          batch_size: int, block_size: int, mesh: Mesh | None = None) -> tuple[float, int]:
  """(sum of the scored token losses, their count) of (windows, first) pieces, in order."""
  sharding = (NamedSharding(mesh, P(parallel.DATA_AXIS)) if mesh is not None
              else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  rows = (batches.local_rows(sharding, (batch_size, block_size + 1), 0) if mesh is not None
          else (0, batch_size))
  outputs = []
  for local_w, local_f in _batched(windows, batch_size, block_size, rows):
    windows_BT1 = jax.make_array_from_process_local_data(
        sharding, local_w, (batch_size, block_size + 1))
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


def _gathered(ids_N: np.ndarray, starts_W: np.ndarray, first_W: np.ndarray, block_size: int,
              chunk: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  for i in range(0, len(starts_W), chunk):
    yield (data.gather_windows(ids_N, starts_W[i:i + chunk], block_size),
           first_W[i:i + chunk])


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
      total, count = score(state, _gathered(self.splits[name], starts_W, first_W, self.T),
                           self.B, self.T, self.mesh)
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
