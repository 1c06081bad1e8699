"""What watches a training loop: Ctrl-C, a loss that diverges, and the clock.

Owns: `Interrupt` (signals to a flag the loop checks between calls),
`DivergenceGuard` (every step's loss and gradient norm read before anything
is logged or saved), `Stopwatch` (training speed, compilation and pauses
excluded). May import: JAX, numpy, optimizer.
"""

import contextlib
import signal
import sys
import time

import jax
import numpy as np

from minigpt_jax.optimizer import MIN_LOSS_SCALE


class Interrupt:
  """Turns the first Ctrl-C (SIGINT/SIGTERM) into a flag the loop checks between calls.

  The first signal also restores the default handlers, so a second one ends
  the process at once: the escape from a save or a barrier that hangs.
  """

  def __init__(self):
    self.requested = False
    self._old = {}  # signal -> the handler before ours, while inside the block

  def __enter__(self):
    self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    return self

  def _handle(self, signum, frame):
    self.requested = True
    for s in self._old:
      signal.signal(s, signal.SIG_DFL)
    print(f"\n{signal.Signals(signum).name}: stopping after this call and saving; send it "
          "again to abort at once without saving", file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for s, handler in self._old.items():
      signal.signal(s, handler)


class DivergenceGuard:
  """Reads every step's loss and gradient norm before anything is logged or saved.

  Calls queue their metrics without waiting for them; `check` reads the queue
  (one device sync, at log and save points only) and returns what went wrong
  at the first step whose loss or gradient norm is not finite and whose
  update was not skipped, or None. float16 (a `loss_scale` metric) skips every
  overflow: one at the floor scale, MIN_LOSS_SCALE, is the model's and stops the run.
  """

  def __init__(self, skip_limit: int):
    self.skip_limit = skip_limit
    self._pending = []  # (step before the call, that call's metrics of shape [K])

  def add(self, step_before: int, metrics_K: dict) -> None:
    self._pending.append((step_before, metrics_K))

  def check(self) -> str | None:
    pending, self._pending = self._pending, []
    for start, metrics_K in pending:
      host = {k: np.asarray(v) for k, v in metrics_K.items()}
      finite_K = np.isfinite(host["loss"]) & np.isfinite(host["grad_norm"])
      if finite_K.all():
        continue
      streak_K = host.get("nonfinite_streak", np.zeros_like(finite_K, np.int32))
      if "loss_scale" in host:
        bad_K = ~finite_K & (host["loss_scale"] <= MIN_LOSS_SCALE)
      else:
        bad_K = ~finite_K & ~((streak_K > 0) & (streak_K <= self.skip_limit))
      if not bad_K.any():
        continue
      i = int(np.argmax(bad_K))
      first, last = pending[0][0] + 1, pending[-1][0] + len(pending[-1][1]["loss"])
      problem = (f"loss {host['loss'][i]} and gradient norm {host['grad_norm'][i]} at step "
                 f"{start + i + 1} (the first of steps {first}-{last} not finite)")
      if "loss_scale" in host:
        problem += (f", at float16's lowest loss scale ({MIN_LOSS_SCALE:g}) after "
                    f"{streak_K[i] - 1} overflows in a row")
      elif self.skip_limit and streak_K[i] > self.skip_limit:
        problem += (f", after {self.skip_limit} skipped updates in a row, the limit of "
                    "config.train.skip_nonfinite_updates")
      return problem
    return None


class Stopwatch:
  """Training speed: time from the end of the first call (compilation) on, less pauses.

  Evaluations and saves run inside `paused()`, which first waits for the
  steps still running, so those count as training time.
  """

  def __init__(self, clock=time.perf_counter):
    self._now = clock
    self.started = clock()
    self._first = None  # (step, time, paused seconds) at the end of the first call
    self._paused_s = 0.0
    self._mark = None  # (step, time, paused seconds) of the last `rate_since_mark`

  def wall_s(self) -> float:
    return round(self._now() - self.started, 2)

  def call_done(self, step: int, metrics) -> None:
    if self._first is None:  # the first call compiled: its end starts the clock
      jax.block_until_ready(metrics)
      now = self._now()
      self._first = self._mark = (step, now, self._paused_s)

  @contextlib.contextmanager
  def paused(self, state):
    jax.block_until_ready(state)
    start = self._now()
    try:
      yield
    finally:
      self._paused_s += self._now() - start

  def rate_since_mark(self, step: int) -> float | None:
    """Steps per second since the last call (or the first call's end); None with none run."""
    mark_step, mark_time, mark_paused = self._mark
    now = self._now()
    elapsed = now - mark_time - (self._paused_s - mark_paused)
    self._mark = (step, now, self._paused_s)
    return (step - mark_step) / elapsed if step > mark_step and elapsed > 0 else None

  def overall_rate(self, step: int) -> float | None:
    if self._first is None or step <= self._first[0]:
      return None
    first_step, first_time, paused_before = self._first  # pauses before it are not training
    elapsed = self._now() - first_time - (self._paused_s - paused_before)
    return (step - first_step) / elapsed
