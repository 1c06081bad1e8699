"""Train state, the jit-compiled steps, and the training loop.

Randomness: one root key from `config.seed` is stored in the state; batches,
dropout masks and evaluation batches each come from `fold_in(key, step)`, so
they depend on the step alone and a resumed run repeats an unbroken one
bit for bit, on any number of devices.

Devices: batches are drawn inside the compiled step from the corpus, which
every device holds, and constrained to be sharded over the mesh's `data`
axis; each device (and each process) computes the loss and gradients of only
its rows of the global batch (a shard_map), and the averaged gradients update
params and optimizer state, which are replicated. See `parallel.py`.

Layout: the pure math first (`TrainState`, `make_optimizer`, `train_step`,
`train_steps`, `eval_step`, `estimate_loss`), then the loop's side effects:
setup (`make_mesh`, `load_corpus`, lock, resume), `_Run`'s periodic actions
(train call, log, evaluate and save, stop), the summary; `Stopwatch` times it.
Owns: the optimizer, the train step and the loop. May import: every module
but the launchers' (benchmark, plotting, cli).
"""

import contextlib
import functools
import math
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from minigpt_jax import (checkpoint, config as config_lib, cpu_tricks, data, files, parallel,
                         sampling, workdir_lock)
from minigpt_jax.errors import UserError
from minigpt_jax.metrics import MetricsWriter
from minigpt_jax.model import ModelConfig, build_model, count_params, cross_entropy, init_params

# Streams derived from the root key; never reuse one for two purposes.
_DATA, _DROPOUT, _EVAL, _INIT, _SAMPLE = range(5)


def _stream(rng: jax.Array, which: int) -> jax.Array:
  return jax.random.fold_in(rng, which)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer updates done
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # root PRNG key of the run
  model_cfg: ModelConfig = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply(self, params, idx_BT, deterministic=True, dropout_key=None, first_row=0):
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    return build_model(self.model_cfg).apply(
        {"params": params}, idx_BT, deterministic=deterministic, rngs=rngs, first_row=first_row)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with PyTorch's defaults, decaying every parameter as torch.optim.AdamW does.

  With `skip_nonfinite_updates` = N > 0, wrapped in `optax.apply_if_finite`:
  an update whose gradients are not finite is dropped, up to N in a row.
  """
  return _adamw(train_config.learning_rate, train_config.beta1, train_config.beta2,
                train_config.eps, train_config.weight_decay,
                train_config.skip_nonfinite_updates)


@functools.cache
def _adamw(learning_rate, b1, b2, eps, weight_decay, skip_nonfinite) -> optax.GradientTransformation:
  # Cached: equal settings give the same object, so jit reuses its compilations.
  tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return optax.apply_if_finite(tx, skip_nonfinite) if skip_nonfinite else tx


def create_train_state(config: ml_collections.ConfigDict, vocab_size: int,
                       mesh: Mesh | None = None) -> TrainState:
  """A fresh state from `config.seed`, replicated over `mesh`; built by one jit call."""
  model_cfg = ModelConfig.from_config(config.model, vocab_size)
  init = _jit_init(model_cfg, make_optimizer(config.train), mesh)
  return init(jax.random.PRNGKey(config.seed))


@functools.cache
def _jit_init(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh | None):
  # Cached: a resumed or repeated run reuses the compiled init.
  def init(rng):
    params = init_params(build_model(model_cfg), _stream(rng, _INIT))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng, model_cfg=model_cfg, tx=tx)

  return jax.jit(init, out_shardings=None if mesh is None else parallel.replicated(mesh))


def draw_batch(state: TrainState, data_N: jax.Array, batch_size: int, block_size: int,
               mesh: Mesh | None = None):
  """The training batch of `state.step`, sharded over the mesh's `data` axis."""
  key = jax.random.fold_in(_stream(state.rng, _DATA), state.step)
  return _shard_batch(data.get_batch(key, data_N, batch_size, block_size), mesh)


def _shard_batch(batch, mesh: Mesh | None):
  if mesh is None:
    return batch
  return lax.with_sharding_constraint(batch, parallel.batch_sharded(mesh))


def train_step(state: TrainState, batch, mesh: Mesh | None = None) -> tuple[TrainState, dict]:
  """One AdamW update on batch (x_BT, y_BT); dropout keyed by the step.

  Metrics: the loss and the global gradient norm; with skipped non-finite
  updates on, also the current run of skips and their total.

  With a mesh of several devices, each device computes the loss and
  gradients of its rows of the batch (shard_map), and one
  `cpu_tricks.mean_over_devices` averages them. Dropout masks depend on the
  key and each row's index in the whole batch, so any number of devices
  draws the same masks.
  """
  x_BT, y_BT = batch
  dropout_key = jax.random.fold_in(_stream(state.rng, _DROPOUT), state.step)
  data_parallel = mesh is not None and mesh.devices.size > 1

  def loss_and_grads(params, x_bT, y_bT):
    first_row = lax.axis_index(parallel.DATA_AXIS) * x_bT.shape[0] if data_parallel else 0

    def loss_fn(params):
      logits_bTV = state.apply(params, x_bT, deterministic=False, dropout_key=dropout_key,
                               first_row=first_row)
      return cross_entropy(logits_bTV, y_bT)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    if not data_parallel:
      return loss, grads
    return cpu_tricks.mean_over_devices((loss, grads), parallel.DATA_AXIS,
                                        state.model_cfg.cpu_tricks)

  if data_parallel:
    loss_and_grads = jax.shard_map(
        loss_and_grads, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
        out_specs=P(), check_vma=False)  # the mean leaves them equal on every device
  loss, grads = loss_and_grads(state.params, x_BT, y_BT)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  if isinstance(opt_state, optax.ApplyIfFiniteState):
    metrics.update(nonfinite_streak=opt_state.notfinite_count,
                   skipped_updates=opt_state.total_notfinite)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_steps(state: TrainState, train_N: jax.Array, *, batch_size: int, block_size: int,
                num_steps: int = 1, mesh: Mesh | None = None) -> tuple[TrainState, dict]:
  """`num_steps` updates in one compiled call (a lax.scan), each on its own batch.

  Draws the batch of each step from the corpus on device, so a call needs no
  host input; the results equal `num_steps` calls of `train_step`.
  Returns the new state and train_step's metrics, each of shape [num_steps].
  """

  def one_step(state, _):
    batch = draw_batch(state, train_N, batch_size, block_size, mesh)
    return train_step(state, batch, mesh)

  state, metrics_K = lax.scan(one_step, state, length=num_steps)
  if mesh is not None:
    state = lax.with_sharding_constraint(state, parallel.replicated(mesh))
  return state, metrics_K


def eval_step(state: TrainState, params, batch) -> jax.Array:
  x_BT, y_BT = batch
  return cross_entropy(state.apply(params, x_BT), y_BT)


def estimate_loss(state: TrainState, splits: dict, batch_size: int, block_size: int,
                  eval_iters: int, mesh: Mesh | None = None) -> dict:
  """Mean loss over `eval_iters` random batches of each split (the lecture's)."""
  key = jax.random.fold_in(_stream(state.rng, _EVAL), state.step)
  losses = {}
  for i, (name, data_N) in enumerate(sorted(splits.items())):
    split_key = jax.random.fold_in(key, i)

    def add(j, total):
      batch = _shard_batch(data.get_batch(jax.random.fold_in(split_key, j), data_N,
                                          batch_size, block_size), mesh)
      return total + eval_step(state, state.params, batch)

    losses[name] = jax.lax.fori_loop(0, eval_iters, add, jnp.float32(0)) / eval_iters
  return losses


# Compiled once per shape and config, shared by every run in the process.
jit_train_steps = jax.jit(train_steps, donate_argnums=0,
                          static_argnames=("batch_size", "block_size", "num_steps", "mesh"))
jit_estimate_loss = jax.jit(estimate_loss,
                            static_argnames=("batch_size", "block_size", "eval_iters", "mesh"))


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
  tokenizer: data.CharTokenizer
  name: str
  train_ids: np.ndarray
  val_ids: np.ndarray


def load_corpus(config: ml_collections.ConfigDict) -> Corpus:
  """Checks `config` against the text, then loads and splits the text.

  Every user mistake in the config or the data fails here or in `make_mesh`,
  in one line, before anything compiles.
  """
  config_lib.validate(config)
  text, name = data.load_text(config)
  tokenizer = data.CharTokenizer.from_text(text)
  train_ids, val_ids = data.split(tokenizer.encode(text), config.data.train_fraction)
  config_lib.validate_for_data(config, len(train_ids), len(val_ids))
  return Corpus(tokenizer, name, train_ids, val_ids)


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
      if self.skip_limit:
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

  def __init__(self):
    self.started = time.perf_counter()
    self._first = None  # (step, time) at the end of the first call
    self._paused_s = 0.0
    self._mark = None  # (step, time, paused seconds) of the last `rate_since_mark`

  def wall_s(self) -> float:
    return round(time.perf_counter() - self.started, 2)

  def call_done(self, step: int, metrics) -> None:
    if self._first is None:  # the first call compiled: its end starts the clock
      jax.block_until_ready(metrics)
      now = time.perf_counter()
      self._first, self._mark = (step, now), (step, now, self._paused_s)

  @contextlib.contextmanager
  def paused(self, state):
    jax.block_until_ready(state)
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused_s += time.perf_counter() - start

  def rate_since_mark(self, step: int) -> float | None:
    """Steps per second since the last call (or the first call's end); None with none run."""
    mark_step, mark_time, mark_paused = self._mark
    now = time.perf_counter()
    elapsed = now - mark_time - (self._paused_s - mark_paused)
    self._mark = (step, now, self._paused_s)
    return (step - mark_step) / elapsed if step > mark_step and elapsed > 0 else None

  def overall_rate(self, step: int) -> float | None:
    if self._first is None or step <= self._first[0]:
      return None
    return (step - self._first[0]) / (time.perf_counter() - self._first[1] - self._paused_s)


class EndOfRun(NamedTuple):
  """What an `on_end` hook of `train_and_evaluate` gets (process 0 only)."""
  state: TrainState
  tokenizer: data.CharTokenizer
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
    self.lock = self.mngr = self.writer = self.bar = None
    self.show_progress = show_progress

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
                                enabled=self.is_main)
    best = (self.meta.get("best_val_loss"), self.meta.get("best_step"))
    self.best = best if _finite(best[0]) else (None, None)  # older versions saved NaN
    self.guard = _DivergenceGuard(config.train.skip_nonfinite_updates)
    self._compile_fns()
    self._log_start()
    return self

  def _compile_fns(self) -> None:
    t, mesh = self.config.train, self.mesh
    B, T = t.batch_size, self.config.model.block_size
    self.splits = {"train": parallel.put_replicated(self.corpus.train_ids, mesh),
                   "val": parallel.put_replicated(self.corpus.val_ids, mesh)}
    self.run_steps = functools.partial(jit_train_steps, batch_size=B, block_size=T, mesh=mesh)
    self.evaluate = functools.partial(jit_estimate_loss, batch_size=B, block_size=T,
                                      eval_iters=t.eval_iters, mesh=mesh)
    self.wait_each_call = cpu_tricks.wait_each_call(mesh)

  def _log_start(self) -> None:
    c, corpus = self.config, self.corpus
    start = "training from scratch" if not self.meta else f"resuming from step {self.step}"
    processes = jax.process_count()
    self.say(f"{start} in {self.workdir}: {c.model.name}, {count_params(self.state.params):,} "
             f"params, vocab {corpus.tokenizer.vocab_size}, corpus {corpus.name} "
             f"({len(corpus.train_ids):,} train / {len(corpus.val_ids):,} val chars), "
             f"{jax.default_backend()} x {self.mesh.devices.size} "
             f"({processes} process{'es' if processes > 1 else ''})")
    self.bar = tqdm.tqdm(total=c.train.steps, initial=self.step, file=sys.stderr, unit="step",
                         disable=not (self.show_progress and self.is_main),
                         dynamic_ncols=True, mininterval=0.5)

  # -- Periodic actions --------------------------------------------------------------------

  def train_call(self) -> None:
    """One compiled call of `_steps_in_next_call` steps."""
    n = _steps_in_next_call(self.step, self.config)
    self.state, self.metrics = self.run_steps(self.state, self.splits["train"], num_steps=n)
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
    self.writer.write(
        "train", self.step, loss=last["loss"], grad_norm=last["grad_norm"], **skips,
        learning_rate=t.learning_rate,
        steps_per_s=None if rate is None else round(rate, 3),
        tokens_per_s=None if rate is None else round(rate * t.batch_size *
                                                      self.config.model.block_size),
        wall_s=self.clock.wall_s())

  def evaluate_and_save(self) -> None:
    """Loss estimates of both splits, an eval record, and (past step 0) a checkpoint."""
    self._check_finite()
    with self.clock.paused(self.state):
      losses = {k: float(v) for k, v in self.evaluate(self.state, self.splits).items()}
      bad = [f"{k} loss {v}" for k, v in sorted(losses.items()) if not math.isfinite(v)]
      if bad:
        raise self._diverged(f"{' and '.join(bad)} at the evaluation of step {self.step}")
      if self.best[0] is None or losses["val"] < self.best[0]:
        self.best = (losses["val"], self.step)
      self.meta = {"step": self.step, "train_loss": losses["train"],
                   "val_loss": losses["val"], "best_val_loss": self.best[0],
                   "best_step": self.best[1]}
      self.writer.write("eval", self.step, train_loss=losses["train"],
                        val_loss=losses["val"], wall_s=self.clock.wall_s())
      if self.step > 0:
        checkpoint.save(self.mngr, self.state, self.config_dict, self.vocab, self.meta)

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
    c, corpus = self.config, self.corpus
    summary = {
        "step": self.step,
        "train_loss": self.meta.get("train_loss"),
        "val_loss": self.meta.get("val_loss"),
        "best_val_loss": self.best[0],
        "best_step": self.best[1],
        "wall_s": self.clock.wall_s(),
        "steps_per_s": None if rate is None else round(rate, 2),
        "tokens_per_s": None if rate is None else round(
            rate * c.train.batch_size * c.model.block_size),
        "vocab_size": corpus.tokenizer.vocab_size,
        "num_params": count_params(self.state.params),
        "corpus": corpus.name,
        "backend": jax.default_backend(),
        "devices": self.mesh.devices.size,
        "processes": jax.process_count(),
    }
    if self.is_main:
      files.write_json(self.workdir / "summary.json", summary)
    return summary

  def close(self, failed: bool) -> None:
    if failed and self.bar is not None:  # clear it: the error line must stand alone
      self.bar.leave = False
      self.bar.close()
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
    if run.step == 0:
      run.evaluate_and_save()
    elif run.step >= t.steps:
      run.say(f"already at step {run.step} of {t.steps}; raise --config.train.steps to "
              "train longer")
    with _Interrupt() as interrupt:
      while run.step < t.steps:
        run.train_call()
        if run.step % t.log_every == 0 or run.step == t.steps:
          run.log_train()
        stop = parallel.any_process(interrupt.requested)  # every process stops together
        eval_due = run.step % t.eval_interval == 0 or run.step == t.steps
        if eval_due:
          run.evaluate_and_save()
        if stop and run.step < t.steps:
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
  return (f"done: step {summary['step']}, train loss {loss(summary['train_loss'])}, "
          f"val loss {loss(summary['val_loss'])}{best}{rate}, {summary['wall_s']} s; "
          f"summary in {workdir}/summary.json")


def sample_text(state: TrainState, tokenizer: data.CharTokenizer, num_tokens: int) -> str:
  """The end-of-training sample, on this process' first device alone, from its own stream."""
  params = jax.device_get(state.params)  # replicated: every process has them whole
  generate = sampling.make_generate(state.model_cfg)
  prompt_ids, _ = sampling.encode_prompt(tokenizer, "")
  out = generate(params, prompt_ids, _stream(jax.device_get(state.rng), _SAMPLE), num_tokens)
  return tokenizer.decode(np.asarray(out[0]))
