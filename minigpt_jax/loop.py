"""The training loop: setup, a loop of small periodic actions, and a summary.

`train_and_evaluate(config, workdir)` is what launch/train.py runs:

- setup (`_Run.start`): the mesh and corpus, checked before anything compiles
  (`make_mesh`, `load_corpus`); the workdir lock; a fresh state, resumed from
  the newest checkpoint that restores (`_resume`);
- the loop: `_Run.train_call` (one compiled call of `train.train_steps`, its
  batches drawn on device or gathered on the host: `batches.py`), then
  when due `log_train`, `evaluate_and_save`, and the stop check that every
  process agrees on (`save_for_stop`);
- `_Run.summary`, then an `on_end` hook (the launcher plots and samples).

`Stopwatch` times it; `_DivergenceGuard` stops it, naming the last good
checkpoint, before a non-finite loss or gradient is logged or saved.
Owns: the loop's side effects. May import: every module but the launchers'.
"""

import contextlib
import math
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import tqdm
from jax.sharding import Mesh

from minigpt_jax import (batches, checkpoint, config as config_lib, cpu_tricks, files,
                         optimizer, parallel, plotting, profiling, sampling,
                         tokenizer as tokenizer_lib, tokens, workdir_lock)
from minigpt_jax.errors import UserError
from minigpt_jax.metrics import MetricsWriter, bits_per_char
from minigpt_jax.model import count_params
from minigpt_jax.train import TrainState, create_train_state, sample_key


class _Interrupt:
  """Turns the first Ctrl-C (SIGINT/SIGTERM) into a flag the loop checks between calls.

  The first signal also restores the default handlers, so a second one ends
  the process at once: the escape from a save or a barrier that hangs.
  """

  def __init__(self):
    self.requested = False

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


def _steps_in_next_call(step: int, config: ml_collections.ConfigDict) -> int:
  """`steps_per_dispatch`, or 1 where that would run past a log, eval or the end.

  Only two compiled variants, so no recompiles; aligned runs use the first alone.
  """
  t = config.train
  next_event = min((step // t.log_every + 1) * t.log_every,
                   (step // t.eval_interval + 1) * t.eval_interval, t.steps)
  return t.steps_per_dispatch if step + t.steps_per_dispatch <= next_event else 1


class Corpus(NamedTuple):
  tokenizer: tokenizer_lib.CharTokenizer | tokenizer_lib.BpeTokenizer
  name: str
  train_ids: np.ndarray  # read-only memmaps of a token folder: uint16 or uint32 ids
  val_ids: np.ndarray
  # Tokens per character of the val (and train) text, for bits per character:
  # 1.0 for characters; under 1 for BPE, whose losses are per token.
  tokens_per_char: float = 1.0
  train_tokens_per_char: float = 1.0


def load_corpus(config: ml_collections.ConfigDict) -> Corpus:
  """Checks `config` against the data, then memory-maps its token folder.

  The folder is `config.data.tokens`, or the corpus or path prepared once into
  the cache (tokens.for_config). Every user mistake in the config or the data
  fails here or in `make_mesh`, in one line, before anything compiles.
  """
  config_lib.validate(config)
  folder, name = tokens.for_config(config)
  prepared = tokens.open_tokens(folder)
  if config.data.tokens:
    tokens.adopt_folder_settings(prepared, config, str(folder))
  config_lib.validate_for_data(config, len(prepared.train), len(prepared.val))
  return Corpus(prepared.tokenizer, name, prepared.train, prepared.val,
                tokens_per_char=prepared.tokens_per_char("val"),
                train_tokens_per_char=prepared.tokens_per_char("train"))


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The data-parallel mesh `config.mesh` asks for, checked against the devices."""
  config_lib.validate(config)
  return parallel.make_mesh(config_lib.validate_for_devices(
      config, jax.device_count(), jax.process_count()))


class _DivergenceGuard:
  """Reads every step's loss and gradient norm before anything is logged or saved.

  Calls queue their metrics without waiting for them; `check` reads the queue
  (one device sync, at log and save points only) and returns what went wrong
  at the first step whose loss or gradient norm is not finite and whose
  update was not skipped, or None.
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
      bad_K = ~finite_K & ~((streak_K > 0) & (streak_K <= self.skip_limit))
      if not bad_K.any():
        continue
      i = int(np.argmax(bad_K))
      first, last = pending[0][0] + 1, pending[-1][0] + len(pending[-1][1]["loss"])
      problem = (f"loss {host['loss'][i]} and gradient norm {host['grad_norm'][i]} at step "
                 f"{start + i + 1} (the first of steps {first}-{last} not finite)")
      if self.skip_limit and streak_K[i] > self.skip_limit:
        problem += (f", after {self.skip_limit} skipped updates in a row, the limit of "
                    "config.train.skip_nonfinite_updates")
      return problem
    return None


def _lock_workdir(workdir: Path, is_main: bool, log) -> workdir_lock.WorkdirLock:
  """Process 0 locks the workdir; every process stops if it cannot."""
  lock = workdir_lock.WorkdirLock(workdir)
  error = None
  if is_main:
    try:
      lock.acquire()
    except UserError as e:
      error = e
    if lock.unsupported is not None:
      log(f"warning: {lock.path} cannot be locked on this filesystem "
          f"({lock.unsupported.strerror}); make sure no other run trains in {workdir}")
  if parallel.any_process(error is not None):
    raise error or UserError(f"process 0 could not lock {workdir}; see its error line")
  return lock


def _remove_unfinished_writes(workdir: Path, log) -> None:
  """What a kill or a full disk left half-written: orbax temp folders, JSON temp files."""
  removed = checkpoint.remove_unfinished(workdir / "checkpoints")
  for tmp in workdir.glob(".*.tmp"):
    tmp.unlink(missing_ok=True)
    removed.append(tmp.name)
  if removed:
    log(f"removed {len(removed)} unfinished write(s) of an earlier run: {', '.join(removed)}")


def _resume(mngr, state: TrainState, config, vocab: dict, workdir: Path, is_main: bool, log):
  """(state, meta) of the newest checkpoint that restores, or (state, {}) with none.

  Damaged newer steps are one warning each, and move to `<workdir>/damaged/`.
  """
  if not mngr.all_steps():
    return state, {}

  def load(step):
    saved_config, saved_vocab, meta = checkpoint.restore_json(mngr, step)
    config_lib.check_fits(saved_config, saved_vocab, config, vocab, str(workdir))
    return checkpoint.restore_state(mngr, step, state), meta

  step, (state, meta) = checkpoint.restore_newest(mngr, load, warn=log)
  damaged = [s for s in mngr.all_steps() if s > step]
  if damaged:
    if is_main:
      for s in damaged:
        log(f"moved damaged step {s} to {checkpoint.quarantine(mngr, s)}")
    parallel.barrier("minigpt_jax.quarantine")
    mngr.reload()
  return state, meta


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


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


class EndOfRun(NamedTuple):
  """What an `on_end` hook of `train_and_evaluate` gets (process 0 only)."""
  state: TrainState
  tokenizer: tokenizer_lib.CharTokenizer | tokenizer_lib.BpeTokenizer
  writer: MetricsWriter
  workdir: Path
  summary: dict


class _Run:
  """One training run's side effects: lock, checkpoints, metrics, progress, the stop check.

  `start` sets up (mesh, corpus, lock, state, resume); the loop in
  `train_and_evaluate` calls `train_call`, `log_train`, `evaluate_and_save`
  and `save_for_stop`; `summary` finishes.
  """

  def __init__(self, config, workdir: Path, log, show_progress: bool):
    self.config, self.workdir = config, workdir
    self.is_main = parallel.is_main_process()
    self.say = log if self.is_main else (lambda line: None)  # a log line
    self.clock = Stopwatch()
    self.lock = self.mngr = self.writer = self.bar = self.profiler = self.batches = None
    self.show_progress = show_progress
    self.early_stopped = False

  # -- Setup -------------------------------------------------------------------------------

  def start(self) -> "_Run":
    """Mesh, corpus, lock, state and resume; user mistakes fail before anything compiles."""
    config, workdir = self.config, self.workdir
    self.mesh = make_mesh(config)
    self.corpus = load_corpus(config)
    self.vocab = self.corpus.tokenizer.to_json()
    workdir.mkdir(parents=True, exist_ok=True)  # nothing there is touched before the lock
    self.lock = _lock_workdir(workdir, self.is_main, self.say)
    if self.is_main:
      _remove_unfinished_writes(workdir, self.say)
    parallel.barrier("minigpt_jax.cleaned")
    self.mngr = checkpoint.manager(workdir, keep=config.checkpoint.keep)
    state = create_train_state(config, self.corpus.tokenizer.vocab_size, self.mesh)
    self.state, self.meta = _resume(self.mngr, state, config, self.vocab, workdir,
                                    self.is_main, self.say)
    self.config_dict = config.to_dict()
    if self.is_main:
      files.write_json(workdir / "config.json", self.config_dict)
      files.write_json(workdir / "vocab.json", self.vocab)
    self.step = int(self.state.step)
    self.writer = MetricsWriter(workdir, resume_step=self.step, log=self.say,
                                enabled=self.is_main, config=self.config_dict,
                                wandb_project=config.get("metrics", {}).get("wandb_project", ""))
    best = (self.meta.get("best_val_loss"), self.meta.get("best_step"))
    self.best = best if _finite(best[0]) else (None, None)  # older versions saved NaN
    self.guard = _DivergenceGuard(config.train.skip_nonfinite_updates)
    self.profiler = profiling.StepProfiler(workdir, config.train.profile_steps, self.is_main,
                                           self.say)
    self._bind_steps()
    self._log_start()
    return self

  def _bind_steps(self) -> None:
    """The compiled step and evaluation with this run's shapes, fed on device or from the host."""
    config, mesh = self.config, self.mesh
    self.tokens_per_step = config.train.batch_size * config.model.block_size
    splits = {"train": self.corpus.train_ids, "val": self.corpus.val_ids}
    why = batches.uses_host(config, splits)
    if why is not None:
      self.say(f"batches come from the host: {why}")
    self.batches = batches.make(config, splits, mesh, self.state.rng)
    self.wait_each_call = cpu_tricks.wait_each_call(mesh)

  def _log_start(self) -> None:
    c, corpus = self.config, self.corpus
    start = "training from scratch" if not self.meta else f"resuming from step {self.step}"
    processes = jax.process_count()
    self.say(f"{start} in {self.workdir}: {c.model.name}, {count_params(self.state.params):,} "
             f"params, vocab {corpus.tokenizer.vocab_size}, corpus {corpus.name} "
             f"({len(corpus.train_ids):,} train / {len(corpus.val_ids):,} val tokens), "
             f"{jax.default_backend()} x {self.mesh.devices.size} "
             f"({processes} process{'es' if processes > 1 else ''})")
    self.bar = tqdm.tqdm(total=c.train.steps, initial=self.step, file=sys.stderr, unit="step",
                         disable=not (self.show_progress and self.is_main),
                         dynamic_ncols=True, mininterval=0.5)

  # -- Periodic actions --------------------------------------------------------------------

  def train_call(self) -> None:
    """One compiled call of `_steps_in_next_call` steps."""
    n = _steps_in_next_call(self.step, self.config)
    after = self.step + n
    following = _steps_in_next_call(after, self.config) if after < self.config.train.steps else None
    self.profiler.before_call(self.step)
    self.state, self.metrics = self.batches.run_steps(self.state, self.step, n, following)
    self.profiler.after_call(n, self.metrics)
    self.guard.add(self.step, self.metrics)
    if self.wait_each_call:
      jax.block_until_ready(self.metrics)
    self.step += n
    self.clock.call_done(self.step, self.metrics)
    self.bar.update(n)

  def log_train(self) -> None:
    """A train record of the call's last step, after checking every step since the last."""
    self._check_finite()
    last = {k: np.asarray(v)[-1].item() for k, v in self.metrics.items()}  # no compile
    rate = self.clock.rate_since_mark(self.step)
    self.bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
    skips = {"skipped_updates": last["skipped_updates"]} if "skipped_updates" in last else {}
    t = self.config.train
    rates = {"learning_rate": optimizer.learning_rate_at(t, self.step - 1)}
    if t.optimizer == "muon":
      rates["muon_learning_rate"] = optimizer.learning_rate_at(t, self.step - 1,
                                                               t.muon_learning_rate)
    self.writer.write(
        "train", self.step, loss=last["loss"], grad_norm=last["grad_norm"], **skips, **rates,
        steps_per_s=None if rate is None else round(rate, 3),
        tokens_per_s=None if rate is None else round(rate * self.tokens_per_step),
        wall_s=self.clock.wall_s())

  def evaluate_and_save(self) -> None:
    """Loss estimates of both splits, an eval record, and (past step 0) a checkpoint."""
    self._check_finite()
    with self.clock.paused(self.state):
      losses = {k: float(v) for k, v in self.batches.evaluate(self.state, self.step).items()}
      bad = [f"{k} loss {v}" for k, v in sorted(losses.items()) if not math.isfinite(v)]
      if bad:
        raise self._diverged(f"{' and '.join(bad)} at the evaluation of step {self.step}")
      if self.best[0] is None or losses["val"] < self.best[0]:
        self.best = (losses["val"], self.step)
      self.meta = {"step": self.step, "train_loss": losses["train"],
                   "val_loss": losses["val"], "best_val_loss": self.best[0],
                   "best_step": self.best[1]}
      self.writer.write("eval", self.step, train_loss=losses["train"],
                        val_loss=losses["val"], train_bpc=self.bpc(losses["train"], "train"),
                        val_bpc=self.bpc(losses["val"]), wall_s=self.clock.wall_s())
      if self.step > 0:
        checkpoint.save(self.mngr, self.state, self.config_dict, self.vocab, self.meta)

  def bpc(self, loss: float | None, split: str = "val") -> float | None:
    """Nats per token of a split as bits per character of that split's text."""
    ratio = self.corpus.train_tokens_per_char if split == "train" else self.corpus.tokens_per_char
    return bits_per_char(loss, ratio)

  def stalled(self) -> bool:
    """Whether val has not improved for `early_stop_evals` evaluations (0: never)."""
    t = self.config.train
    best_step = self.best[1]
    return (t.early_stop_evals > 0 and best_step is not None
            and self.meta.get("val_loss") is not None
            and self.step - best_step >= t.early_stop_evals * t.eval_interval)

  def save_for_stop(self) -> None:
    """The checkpoint of a stop between evaluations: its losses are unmeasured."""
    self._check_finite()
    with self.clock.paused(self.state):
      self.meta = {**self.meta, "step": self.step, "train_loss": None, "val_loss": None}
      checkpoint.save(self.mngr, self.state, self.config_dict, self.vocab, self.meta)

  def _check_finite(self) -> None:
    problem = self.guard.check()
    if problem is not None:
      raise self._diverged(problem)

  def _diverged(self, problem: str) -> UserError:
    latest = self.mngr.latest_step()
    if latest is None:
      good = "no checkpoint was saved yet"
    else:
      good = f"the last good checkpoint is step {latest}"
      if self.best[1] is not None:
        good += f" (best: step {self.best[1]}, val loss {self.best[0]:.4f})"
    return UserError(
        f"training diverged: {problem}; stopped without saving past it: {good}, in "
        f"{self.mngr.directory}; rerun to resume from it with a lower "
        "--config.train.learning_rate, or skip such updates with "
        "--config.train.skip_nonfinite_updates=N")

  # -- Finish ------------------------------------------------------------------------------

  def summary(self) -> dict:
    self.bar.close()
    rate = self.clock.overall_rate(self.step)
    corpus = self.corpus
    summary = {
        "step": self.step,
        "train_loss": self.meta.get("train_loss"),
        "val_loss": self.meta.get("val_loss"),
        "best_val_loss": self.best[0],
        "best_step": self.best[1],
        "train_bpc": self.bpc(self.meta.get("train_loss"), "train"),
        "val_bpc": self.bpc(self.meta.get("val_loss")),
        "best_val_bpc": self.bpc(self.best[0]),
        "early_stopped": self.early_stopped,
        "wall_s": self.clock.wall_s(),
        "steps_per_s": None if rate is None else round(rate, 2),
        "tokens_per_s": None if rate is None else round(rate * self.tokens_per_step),
        "vocab_size": corpus.tokenizer.vocab_size,
        "num_params": count_params(self.state.params),
        "corpus": corpus.name,
        "backend": jax.default_backend(),
        "devices": self.mesh.devices.size,
        "processes": jax.process_count(),
        "data_on_device": self.batches.on_device,
    }
    if self.is_main:
      files.write_json(self.workdir / "summary.json", summary)
    return summary

  def close(self, failed: bool) -> None:
    if failed and self.bar is not None:  # clear it: the error line must stand alone
      self.bar.leave = False
      self.bar.close()
    if self.profiler is not None:
      self.profiler.stop()
    if self.batches is not None:
      self.batches.close()
    if self.writer is not None:
      self.writer.close()
    if self.mngr is not None:
      self.mngr.close()
    if self.lock is not None:
      self.lock.release()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       log=None, show_progress: bool = True, on_end=None) -> dict:
  """Trains (or resumes) in `workdir`; returns the summary also written to summary.json.

  In a multi-process run every process calls this; only process 0 logs, holds
  the workdir lock and writes files other than checkpoints, which all
  processes write together. `on_end(EndOfRun)` runs on process 0 after the
  summary, before the metrics close (the launcher plots and samples there).
  """
  run = _Run(config, Path(workdir), log or (lambda line: tqdm.tqdm.write(line, file=sys.stderr)),
             show_progress)
  failed = True
  try:
    run.start()
    t = config.train
    if run.step == 0 and t.eval_at_start:
      run.evaluate_and_save()
    elif run.step >= t.steps:
      run.say(f"already at step {run.step} of {t.steps}; raise --config.train.steps to "
              "train longer")
    if run.step < t.steps and run.stalled():
      run.early_stopped = True
      run.say(f"already stopped early at step {run.step}: val has not improved since step "
              f"{run.best[1]}; raise --config.train.early_stop_evals to train on")
    with _Interrupt() as interrupt:
      while run.step < t.steps and not run.early_stopped:
        run.train_call()
        if run.step % t.log_every == 0 or run.step == t.steps:
          run.log_train()
        stop = parallel.any_process(interrupt.requested)  # every process stops together
        eval_due = run.step % t.eval_interval == 0 or run.step == t.steps
        if eval_due:
          run.evaluate_and_save()
          run.early_stopped = run.stalled()
          if run.early_stopped:
            run.say(f"stopping early at step {run.step}: val has not improved for "
                    f"{t.early_stop_evals} evaluations (best {run.best[0]:.4f} at step "
                    f"{run.best[1]}; config.train.early_stop_evals)")
        if stop and run.step < t.steps and not run.early_stopped:
          if not eval_due:
            run.save_for_stop()
          run.bar.close()
          raise KeyboardInterrupt(f"stopped at step {run.step}; checkpoint saved in "
                                  f"{run.workdir}; rerun the same command to resume")
    summary = run.summary()
    if on_end is not None and run.is_main:
      on_end(EndOfRun(run.state, run.corpus.tokenizer, run.writer, run.workdir, summary))
    failed = False
  finally:
    run.close(failed)
  return summary


def done_line(summary: dict, workdir) -> str:
  """The launcher's last log line; losses an interrupt left unmeasured read `n/a`."""
  loss = lambda x: "n/a" if x is None else f"{x:.4f}"
  best = ("" if summary["best_step"] is None else
          f" (best {loss(summary['best_val_loss'])} at step {summary['best_step']})")
  rate = "" if summary["steps_per_s"] is None else f", {summary['steps_per_s']} steps/s"
  early = " (stopped early)" if summary.get("early_stopped") else ""
  return (f"done{early}: step {summary['step']}, train loss {loss(summary['train_loss'])}, "
          f"val loss {loss(summary['val_loss'])}{best}{rate}, {summary['wall_s']} s; "
          f"summary in {workdir}/summary.json")


def plot_and_sample(end: EndOfRun, sample_tokens: int) -> str | None:
  """A finished run's chores: loss.png, and a sample of `sample_tokens` (0: none) for TensorBoard.

  Returns the sample, for a launcher to print.
  """
  try:
    plotting.save_loss_plot(end.workdir)
  except OSError as e:
    raise files.write_error(end.workdir / "loss.png", e) from None
  if not sample_tokens:
    return None
  text = sample_text(end.state, end.tokenizer, sample_tokens)
  end.writer.write_text("sample", end.summary["step"], text)
  return text


def sample_text(state: TrainState, tokenizer, num_tokens: int) -> str:
  """The end-of-training sample, on this process' first device alone, from its own stream."""
  params = jax.device_get(state.params)  # replicated: every process has them whole
  generate = sampling.make_generate(state.model_cfg)
  prompt_ids, _ = sampling.encode_prompt(tokenizer, "")
  out = generate(params, prompt_ids, sample_key(state), num_tokens)
  return tokenizer.decode(np.asarray(out[0]))
