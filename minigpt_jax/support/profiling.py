"""`config.train.profile_steps`: a `jax.profiler` trace of a few training steps.

The trace starts after the run's first compiled call (its compilation is
warm-up, not a step worth tracing) and covers whole calls until at least
`profile_steps` steps ran inside it: with `steps_per_dispatch` K > 1 a call
runs K steps (or 1, next to a log or an evaluation), so the trace may hold
more than N; its log line names the steps.
It stops only once those calls' results are ready, so the device work is in
it. Anything the loop does between those calls (a log record, an
evaluation, a save) is in the trace too.

It is written under `<workdir>/profile/`: `plugins/profile/<time>/` holds
the `.xplane.pb` that TensorBoard's profile plugin (`tensorboard-plugin-profile`,
or xprof) reads, and `perfetto_trace.json.gz`, which https://ui.perfetto.dev
opens. Only process 0 traces. Profiling only watches: the run's results are
those of the same run without it (tested).

Owns: the trace window. May import: JAX.
"""

from pathlib import Path

import jax

PROFILE_DIR = "profile"


class StepProfiler:
  """Starts a trace before the second call and stops it after the call that reaches N steps."""

  def __init__(self, workdir: Path, steps: int, enabled: bool = True, log=None):
    self.steps = steps if enabled else 0
    self.directory = Path(workdir) / PROFILE_DIR
    self.log = log or (lambda line: None)
    self._calls = 0  # calls seen
    self._traced = None  # (first step, steps so far, calls) while tracing
    self.done = self.steps == 0

  def before_call(self, step: int) -> None:
    """Called before each compiled call, with the step it starts from."""
    if not self.done and self._traced is None and self._calls >= 1:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self._traced = (step, 0, 0)

  def after_call(self, steps_run: int, outputs) -> None:
    """Called after each call with its step count and results (waited for before stopping)."""
    self._calls += 1
    if self._traced is None:
      return
    first, steps, calls = self._traced
    self._traced = (first, steps + steps_run, calls + 1)
    if steps + steps_run >= self.steps:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    """Ends a trace still running (the run ended first); a no-op otherwise."""
    if self._traced is None:
      return
    first, steps, calls = self._traced
    self._traced, self.done = None, True
    jax.profiler.stop_trace()
    self.log(f"profiled steps {first + 1}-{first + steps} ({calls} compiled call"
             f"{'s' if calls > 1 else ''}) into {self.directory}: "
             f"tensorboard --logdir {self.directory}, or open its perfetto_trace.json.gz "
             "in https://ui.perfetto.dev")
