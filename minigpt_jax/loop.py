"""The training loop: set up, a loop of small periodic actions, and a summary.

`train_and_evaluate(config, workdir)` is what launch/train.py runs:

- set up (`_start`): the mesh and corpus, checked before anything compiles
  (`make_mesh`, `tokens.load_corpus`; with `config.train.init_from`, the
  source run's vocabulary, `transfer.vocabulary_base`); the workdir lock; a
  fresh state, resumed from the newest checkpoint that restores
  (`restore.resume`), or else given the source's params (`transfer.start_from`); the
  batches (`batches.make`: drawn on device or gathered on the host);
- the loop: `_Run.train_call` (one compiled call of `train.train_steps`),
  then when due `log_train`, `evaluate_and_save`, and the stop check that
  every process agrees on (`save_for_stop`);
- `_summary`, then an `on_end` hook (the launcher plots and samples).

`guards.Stopwatch` times it; `guards.DivergenceGuard` stops it, naming the
last good checkpoint, before a non-finite loss or gradient is logged or saved.
Owns: the loop's side effects. May import: the core modules and support/.
"""

import contextlib
import math
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import tqdm
from jax.sharding import Mesh

from minigpt_jax import (batches, config as config_lib, cpu_tricks, evaluation, optimizer, parallel,
                         precision, tokens)
from minigpt_jax import tokenizer as tokenizer_lib
from minigpt_jax.errors import UserError
from minigpt_jax.model import count_params
from minigpt_jax.support import (checkpoint, files, guards, profiling, restore, transfer,
                                 workdir_lock)
from minigpt_jax.support.metrics import MetricsWriter, bits_per_char
from minigpt_jax.train import TrainState, create_train_state


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The data x fsdp mesh `config.parallel` asks for, checked against the devices."""
  config_lib.validate(config)
  return parallel.make_mesh(*config_lib.validate_for_devices(
      config, jax.device_count(), jax.process_count()))


def _steps_in_next_call(step: int, config: ml_collections.ConfigDict) -> int:
  """`steps_per_dispatch`, or 1 where that would run past a log, eval or the end.

  Only two compiled variants, so no recompiles; aligned runs use the first alone.
  """
  t = config.train
  next_event = min((step // t.log_every + 1) * t.log_every,
                   (step // t.eval_interval + 1) * t.eval_interval, t.steps)
  return t.steps_per_dispatch if step + t.steps_per_dispatch <= next_event else 1


class EndOfRun(NamedTuple):
  """What an `on_end` hook of `train_and_evaluate` gets (process 0 only)."""
  state: TrainState
  tokenizer: tokenizer_lib.CharTokenizer | tokenizer_lib.BpeTokenizer
  writer: MetricsWriter
  workdir: Path
  summary: dict


def _start(config, workdir: Path, stack: contextlib.ExitStack, say,
           show_progress: bool) -> "_Run":
  """Mesh, corpus, lock, state, resume and batches; `stack` closes what opens here.

  User mistakes fail before anything compiles. Nothing in the workdir is
  touched before the lock.
  """
  is_main = parallel.is_main_process()
  mesh = make_mesh(config)
  base, source = transfer.vocabulary_base(config, workdir, say)
  corpus = tokens.load_corpus(config, base)
  vocab = corpus.tokenizer.to_json()
  workdir.mkdir(parents=True, exist_ok=True)
  stack.callback(workdir_lock.lock_run(workdir, is_main, say).release)
  if is_main:
    restore.clean_unfinished(workdir, say)
  parallel.barrier("minigpt_jax.cleaned")
  mngr = checkpoint.manager(workdir, keep=config.checkpoint.keep)
  stack.callback(mngr.close)
  state = create_train_state(config, corpus.tokenizer.vocab_size, mesh)
  state, meta = restore.resume(mngr, state, config, corpus, workdir, is_main, say)
  origin = meta.get("init_from")  # a resumed transfer run's source, as it saved it
  if not meta and source is not None:
    state, origin = transfer.start_from(state, source, corpus.tokenizer)
  config_dict = config.to_dict()
  if is_main:
    files.write_json(workdir / "config.json", config_dict)
    files.write_json(workdir / "vocab.json", vocab)
  writer = stack.enter_context(contextlib.closing(MetricsWriter(
      workdir, resume_step=int(state.step), log=say, enabled=is_main, config=config_dict,
      wandb_project=config.get("metrics", {}).get("wandb_project", ""))))
  splits = {"train": corpus.train_ids, "val": corpus.val_ids}
  why = batches.uses_host(config, splits)
  if why is not None:
    say(f"batches come from the host: {why}")
  feed = stack.enter_context(contextlib.closing(batches.make(config, splits, mesh, state.rng)))
  t = config.train
  evaluator = feed if t.eval_mode == "sampled" else evaluation.FullEvaluation(
      splits, mesh, t.batch_size, config.model.block_size, t.eval_stride, t.eval_train_windows)
  profiler = profiling.StepProfiler(workdir, config.train.profile_steps, is_main, say)
  stack.callback(profiler.stop)
  step, processes = int(state.step), jax.process_count()
  decode = precision.choose_decode(config.model.dtype)
  if meta:
    started = f"resuming from step {step}" + (
        f" of a run started from {origin['workdir']} step {origin['step']}" if origin else "")
  else:
    started = ("starting " + transfer.describe(origin, corpus.tokenizer.vocab_size) if origin
               else "training from scratch")
  say(f"{started} in {workdir}: "
      f"{config.model.name}, {count_params(state.params):,} params, vocab "
      f"{corpus.tokenizer.vocab_size}, corpus {corpus.name} ({len(corpus.train_ids):,} train "
      f"/ {len(corpus.val_ids):,} val tokens), {jax.default_backend()} x {mesh.devices.size} "
      f"({processes} process{'es' if processes > 1 else ''}), dtype "
      f"{state.model_cfg.dtype} ({precision.choose(config.model.dtype).reason}), decoding "
      f"{decode.dtype} ({decode.reason})")
  bar = tqdm.tqdm(total=config.train.steps, initial=step, file=sys.stderr, unit="step",
                  disable=not (show_progress and is_main), dynamic_ncols=True, mininterval=0.5)
  lineage = {"corpus": corpus.name, "corpus_sha256": corpus.sha256,
             **({"init_from": origin} if origin else {})}
  return _Run(config, workdir, say, mesh, corpus, state, meta, mngr, writer, feed, evaluator,
              profiler, bar, lineage)


class _Run:
  """One training run's loop: compiled calls, train records, evaluations and saves."""

  def __init__(self, config, workdir: Path, say, mesh: Mesh, corpus: tokens.Corpus,
               state: TrainState, meta: dict, mngr, writer: MetricsWriter, feed, evaluator,
               profiler, bar, lineage: dict):
    self.config, self.workdir, self.say, self.mesh, self.corpus = config, workdir, say, mesh, corpus
    self.lineage = lineage  # saved in every checkpoint's meta: the text, and init_from's source
    self.state, self.meta, self.step = state, meta, int(state.step)
    self.mngr, self.writer, self.profiler, self.bar = mngr, writer, profiler, bar
    self.batches = feed  # where each call's windows come from (batches.py)
    self.evaluator = evaluator  # the batches' sampled estimate, or evaluation.FullEvaluation
    self.is_main = parallel.is_main_process()
    self.config_dict, self.vocab = config.to_dict(), corpus.tokenizer.to_json()
    self.best = restore.best_of(meta)  # (val loss, step)
    self.guard = guards.DivergenceGuard(config.train.skip_nonfinite_updates)
    self.clock = guards.Stopwatch()
    self.wait_each_call = cpu_tricks.wait_each_call(mesh)
    self.metrics = None  # the last call's, each of shape [steps in it]
    self.early_stopped = False

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
    skips = {k: last[k] for k in ("skipped_updates", "loss_scale") if k in last}
    self.writer.write(
        "train", self.step, loss=last["loss"], grad_norm=last["grad_norm"], **skips,
        **_rates(self.config.train, self.step - 1),
        steps_per_s=None if rate is None else round(rate, 3),
        tokens_per_s=None if rate is None else round(rate * _tokens_per_step(self.config)),
        wall_s=self.clock.wall_s())

  def evaluate_and_save(self) -> None:
    """Both splits' losses (sampled or full), an eval record, and (past step 0) a checkpoint."""
    self._check_finite()
    with self.clock.paused(self.state):
      losses = {k: float(v) for k, v in self.evaluator.evaluate(self.state, self.step).items()}
      bad = [f"{k} loss {v}" for k, v in sorted(losses.items()) if not math.isfinite(v)]
      if bad:
        raise _diverged(f"{' and '.join(bad)} at the evaluation of step {self.step}",
                        self.mngr, self.best, self.config)
      if self.best[0] is None or losses["val"] < self.best[0]:
        self.best = (losses["val"], self.step)
      self.meta = {"step": self.step, "train_loss": losses["train"],
                   "val_loss": losses["val"], "best_val_loss": self.best[0],
                   "best_step": self.best[1], **self.lineage}
      self.writer.write("eval", self.step, train_loss=losses["train"], val_loss=losses["val"],
                        train_bpc=_bpc(self.corpus, losses["train"], "train"),
                        val_bpc=_bpc(self.corpus, losses["val"]), wall_s=self.clock.wall_s())
      if self.step > 0:
        checkpoint.save(self.mngr, self.state, self.config_dict, self.vocab, self.meta)

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
      self.meta = {**self.meta, "step": self.step, "train_loss": None, "val_loss": None,
                   **self.lineage}
      checkpoint.save(self.mngr, self.state, self.config_dict, self.vocab, self.meta)

  def _check_finite(self) -> None:
    problem = self.guard.check()
    if problem is not None:
      raise _diverged(problem, self.mngr, self.best, self.config)


def _tokens_per_step(config) -> int:
  return config.train.batch_size * config.model.block_size


def _rates(train_config, update: int) -> dict:
  """The learning rates update `update` (from 0) ran at, for the train record."""
  rates = {"learning_rate": optimizer.learning_rate_at(train_config, update)}
  if train_config.optimizer == "muon":
    rates["muon_learning_rate"] = optimizer.learning_rate_at(
        train_config, update, train_config.muon_learning_rate)
  return rates


def _bpc(corpus: tokens.Corpus, loss: float | None, split: str = "val") -> float | None:
  """Nats per token of a split as bits per character of that split's text."""
  ratio = corpus.train_tokens_per_char if split == "train" else corpus.tokens_per_char
  return bits_per_char(loss, ratio)


def _diverged(problem: str, mngr, best, config) -> UserError:
  """The stop's one line; in float16 the loss scale already skips overflows, so no skip hint."""
  latest = mngr.latest_step()
  if latest is None:
    good = "no checkpoint was saved yet"
  else:
    good = f"the last good checkpoint is step {latest}"
    if best[1] is not None:
      good += f" (best: step {best[1]}, val loss {best[0]:.4f})"
  fix = "rerun to resume from it with a lower --config.train.learning_rate"
  if optimizer.is_float16(config.model.dtype):  # its checkpoints resume only in float16
    fix += (", or start afresh in a new --workdir with --config.model.dtype=float32 (or "
            "bfloat16, which has float32's range)")
  else:
    fix += ", or skip such updates with --config.train.skip_nonfinite_updates=N"
  return UserError(f"training diverged: {problem}; stopped without saving past it: {good}, "
                   f"in {mngr.directory}; {fix}")


def _summary(run: _Run) -> dict:
  """What summary.json holds: the last and best losses, speed, and the run's shape."""
  run.bar.close()
  rate = run.clock.overall_rate(run.step)
  corpus, meta = run.corpus, run.meta
  summary = {
      "step": run.step,
      "train_loss": meta.get("train_loss"),
      "val_loss": meta.get("val_loss"),
      "best_val_loss": run.best[0],
      "best_step": run.best[1],
      "train_bpc": _bpc(corpus, meta.get("train_loss"), "train"),
      "val_bpc": _bpc(corpus, meta.get("val_loss")),
      "best_val_bpc": _bpc(corpus, run.best[0]),
      "early_stopped": run.early_stopped,
      "wall_s": run.clock.wall_s(),
      "steps_per_s": None if rate is None else round(rate, 2),
      "tokens_per_s": None if rate is None else round(rate * _tokens_per_step(run.config)),
      "vocab_size": corpus.tokenizer.vocab_size,
      "num_params": count_params(run.state.params),
      "corpus": corpus.name,
      "init_from": run.lineage.get("init_from"),  # the run it started from, or None
      "backend": jax.default_backend(),
      "dtype": precision.choose(run.config.model.dtype).dtype,  # "auto" resolved
      "dtype_reason": precision.choose(run.config.model.dtype).reason,
      "decode_dtype": precision.choose_decode(run.config.model.dtype).dtype,
      "decode_dtype_reason": precision.choose_decode(run.config.model.dtype).reason,
      "devices": run.mesh.devices.size,
      "mesh": dict(run.mesh.shape),  # {"data": D, "fsdp": F}
      # params + optimizer state on the fullest device: about 1/fsdp of the whole
      "state_bytes_per_device": parallel.bytes_per_device((run.state.params,
                                                           run.state.opt_state)),
      "processes": jax.process_count(),
      "data_on_device": run.batches.on_device,
  }
  if run.is_main:
    files.write_json(run.workdir / "summary.json", summary)
  return summary


def _loop(run: _Run, interrupt: guards.Interrupt) -> None:
  """Train calls until the last step, an early stop, or a stop every process agrees on."""
  t = run.config.train
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       log=None, show_progress: bool = True, on_end=None) -> dict:
  """Trains (or resumes) in `workdir`; returns the summary also written to summary.json.

  In a multi-process run every process calls this; only process 0 logs, holds
  the workdir lock and writes files other than checkpoints, which all
  processes write together. `on_end(EndOfRun)` runs on process 0 after the
  summary, before the metrics close (the launcher plots and samples there).
  """
  log = log or (lambda line: tqdm.tqdm.write(line, file=sys.stderr))
  say = log if parallel.is_main_process() else (lambda line: None)
  t = config.train
  with contextlib.ExitStack() as stack:
    run = _start(config, Path(workdir), stack, say, show_progress)
    try:
      if run.step == 0 and t.eval_at_start:
        run.evaluate_and_save()
      elif run.step >= t.steps:
        run.say(f"already at step {run.step} of {t.steps}; raise --config.train.steps to "
                "train longer")
      if run.step < t.steps and run.stalled():
        run.early_stopped = True
        run.say(f"already stopped early at step {run.step}: val has not improved since step "
                f"{run.best[1]}; raise --config.train.early_stop_evals to train on")
      with guards.Interrupt() as interrupt:
        _loop(run, interrupt)
      summary = _summary(run)
      if on_end is not None and run.is_main:
        on_end(EndOfRun(run.state, run.corpus.tokenizer, run.writer, run.workdir, summary))
    except BaseException:
      run.bar.leave = False  # clear the bar: the error line must stand alone
      run.bar.close()
      raise
  return summary
