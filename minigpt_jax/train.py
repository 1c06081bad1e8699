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
"""

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

from minigpt_jax import (checkpoint, config as config_lib, data, files, parallel, plotting,
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
  `parallel.mean_over_devices` averages them. Dropout masks depend on the
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
    return parallel.mean_over_devices((loss, grads)) if data_parallel else (loss, grads)

  if data_parallel:
    loss_and_grads = jax.shard_map(
        loss_and_grads, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
        out_specs=P(), check_vma=False)  # mean_over_devices leaves them equal on every device
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
jit_train_step = jax.jit(train_step, donate_argnums=0)
jit_train_steps = jax.jit(train_steps, donate_argnums=0,
                          static_argnames=("batch_size", "block_size", "num_steps", "mesh"))
jit_draw_batch = jax.jit(draw_batch, static_argnames=("batch_size", "block_size", "mesh"))
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
  mesh: Mesh  # the data-parallel mesh the config asks for


def load_corpus(config: ml_collections.ConfigDict) -> Corpus:
  """Checks `config` against the devices and the text, then loads and splits the text.

  Every user mistake in the config or the data fails here, in one line,
  before anything compiles.
  """
  config_lib.validate(config)
  num_shards = config_lib.validate_for_devices(config, jax.device_count(),
                                               jax.process_count())
  text, name = data.load_text(config)
  tokenizer = data.CharTokenizer.from_text(text)
  train_ids, val_ids = data.split(tokenizer.encode(text), config.data.train_fraction)
  config_lib.validate_for_data(config, len(train_ids), len(val_ids))
  return Corpus(tokenizer, name, train_ids, val_ids, parallel.make_mesh(num_shards))


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
    checkpoint.check_fits(saved_config, saved_vocab, config, vocab, str(workdir))
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       log=None, show_progress: bool = True) -> dict:
  """Trains (or resumes) in `workdir`; returns the summary also written to summary.json.

  In a multi-process run every process calls this; only process 0 logs, holds
  the workdir lock and writes files other than checkpoints, which all
  processes write together.
  """
  start_time = time.perf_counter()
  workdir = Path(workdir)
  is_main = parallel.is_main_process()
  if not is_main:
    log = lambda line: None
  log = log or (lambda line: tqdm.tqdm.write(line, file=sys.stderr))

  # -- Config, devices and data: every user mistake is caught here, before compiling.
  corpus = load_corpus(config)
  tokenizer, corpus_name, mesh = corpus.tokenizer, corpus.name, corpus.mesh
  train_ids, val_ids = corpus.train_ids, corpus.val_ids
  num_shards = mesh.devices.size
  vocab = tokenizer.to_json()

  # -- One writer per workdir: nothing there is touched before the lock is held.
  workdir.mkdir(parents=True, exist_ok=True)
  lock = _lock_workdir(workdir, is_main, log)
  mngr = writer = bar = None
  try:
    if is_main:
      _remove_unfinished_writes(workdir, log)
    parallel.barrier("minigpt_jax.cleaned")

    # -- State, resumed from this workdir's newest good checkpoint, if any.
    mngr = checkpoint.manager(workdir, keep=config.checkpoint.keep)
    state = create_train_state(config, tokenizer.vocab_size, mesh)
    state, meta = _resume(mngr, state, config, vocab, workdir, is_main, log)
    config_dict = config.to_dict()
    if is_main:
      files.write_json(workdir / "config.json", config_dict)
      files.write_json(workdir / "vocab.json", vocab)
    num_params = count_params(state.params)
    B, T, steps = config.train.batch_size, config.model.block_size, config.train.steps
    splits = {"train": parallel.put_replicated(train_ids, mesh),
              "val": parallel.put_replicated(val_ids, mesh)}
    run_steps = functools.partial(jit_train_steps, batch_size=B, block_size=T, mesh=mesh)
    wait_each_call = parallel.wait_each_call(mesh)
    evaluate = functools.partial(jit_estimate_loss, batch_size=B, block_size=T,
                                 eval_iters=config.train.eval_iters, mesh=mesh)

    step = int(state.step)
    writer = MetricsWriter(workdir, resume_step=step, log=log, enabled=is_main)
    best = (meta.get("best_val_loss"), meta.get("best_step"))
    if not _finite(best[0]):  # a checkpoint of an older version may hold NaN
      best = (None, None)
    guard = _DivergenceGuard(config.train.skip_nonfinite_updates)
    start = "training from scratch" if not meta else f"resuming from step {step}"
    log(f"{start} in {workdir}: {config.model.name}, {num_params:,} params, vocab "
        f"{tokenizer.vocab_size}, corpus {corpus_name} ({len(train_ids):,} train / "
        f"{len(val_ids):,} val chars), {jax.default_backend()} x {num_shards} "
        f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''})")

    def diverged(problem: str) -> UserError:
      latest = mngr.latest_step()
      if latest is None:
        good = "no checkpoint was saved yet"
      else:
        good = f"the last good checkpoint is step {latest}"
        if best[1] is not None:
          good += f" (best: step {best[1]}, val loss {best[0]:.4f})"
      return UserError(
          f"training diverged: {problem}; stopped without saving past it: {good}, in "
          f"{mngr.directory}; rerun to resume from it with a lower "
          "--config.train.learning_rate, or skip such updates with "
          "--config.train.skip_nonfinite_updates=N")

    def check_finite() -> None:
      problem = guard.check()
      if problem is not None:
        raise diverged(problem)

    def evaluate_and_save() -> dict:
      nonlocal best, meta
      check_finite()
      losses = {k: float(v) for k, v in evaluate(state, splits).items()}
      bad = [f"{k} loss {v}" for k, v in sorted(losses.items()) if not math.isfinite(v)]
      if bad:
        raise diverged(f"{' and '.join(bad)} at the evaluation of step {step}")
      if best[0] is None or losses["val"] < best[0]:
        best = (losses["val"], step)
      meta = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
              "best_val_loss": best[0], "best_step": best[1]}
      writer.write("eval", step, train_loss=losses["train"], val_loss=losses["val"],
                   wall_s=round(time.perf_counter() - start_time, 2))
      if step > 0:
        checkpoint.save(mngr, state, config_dict, vocab, meta)
      return meta

    if step == 0:
      evaluate_and_save()
    elif step >= steps:
      log(f"already at step {step} of {steps}; raise --config.train.steps to train longer")
    # Speeds leave out the first call (compilation), evaluations and saves.
    # `mark` is (step, time, paused seconds) at the start of a timed stretch.
    first_call_end, loop_start, paused_s, mark = None, None, 0.0, None
    bar = tqdm.tqdm(total=steps, initial=step, disable=not (show_progress and is_main),
                    file=sys.stderr, unit="step", dynamic_ncols=True, mininterval=0.5)
    with _Interrupt() as interrupt:
      while step < steps:
        n = _steps_in_next_call(step, config)
        state, metrics = run_steps(state, splits["train"], num_steps=n)
        guard.add(step, metrics)
        if wait_each_call:
          jax.block_until_ready(metrics)
        step += n
        if loop_start is None:
          jax.block_until_ready(metrics)
          first_call_end, loop_start = step, time.perf_counter()
          mark = (step, loop_start, paused_s)
        if step % config.train.log_every == 0 or step == steps:
          check_finite()
          last = {k: np.asarray(v)[-1].item() for k, v in metrics.items()}  # no compile
          now = time.perf_counter()
          elapsed = now - mark[1] - (paused_s - mark[2])
          rate = (step - mark[0]) / elapsed if step > mark[0] and elapsed > 0 else None
          mark = (step, now, paused_s)
          bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
          skips = ({"skipped_updates": last["skipped_updates"]}
                   if "skipped_updates" in last else {})
          writer.write("train", step, loss=last["loss"], grad_norm=last["grad_norm"], **skips,
                       learning_rate=config.train.learning_rate,
                       steps_per_s=None if rate is None else round(rate, 3),
                       tokens_per_s=None if rate is None else round(rate * B * T),
                       wall_s=round(now - start_time, 2))
        bar.update(n)
        eval_due = step % config.train.eval_interval == 0 or step == steps
        stop = parallel.any_process(interrupt.requested)  # all processes stop together
        if eval_due or stop:
          jax.block_until_ready(state)  # steps still running count as training time
          pause_start = time.perf_counter()
          if eval_due:
            evaluate_and_save()
          else:
            check_finite()
            meta = {**meta, "step": step, "train_loss": None, "val_loss": None}
            checkpoint.save(mngr, state, config_dict, vocab, meta)
          paused_s += time.perf_counter() - pause_start
        if stop and step < steps:
          bar.close()
          raise KeyboardInterrupt(f"stopped at step {step}; checkpoint saved in "
                                  f"{workdir}; rerun the same command to resume")
    bar.close()
    timed_steps = step - first_call_end if first_call_end is not None else 0
    train_time = (time.perf_counter() - loop_start - paused_s) if loop_start else 0.0

    summary = {
        "step": step,
        "train_loss": meta.get("train_loss"),
        "val_loss": meta.get("val_loss"),
        "best_val_loss": best[0],
        "best_step": best[1],
        "wall_s": round(time.perf_counter() - start_time, 2),
        "steps_per_s": round(timed_steps / train_time, 2) if timed_steps > 0 else None,
        "tokens_per_s": round(timed_steps * B * T / train_time) if timed_steps > 0 else None,
        "vocab_size": tokenizer.vocab_size,
        "num_params": num_params,
        "corpus": corpus_name,
        "backend": jax.default_backend(),
        "devices": num_shards,
        "processes": jax.process_count(),
    }
    if is_main:
      files.write_json(workdir / "summary.json", summary)
      try:
        plotting.save_loss_plot(workdir)
      except OSError as e:
        raise files.write_error(workdir / "loss.png", e) from None
      if config.train.sample_tokens:
        summary["sample"] = _sample(state, tokenizer, config)
        writer.write_text("sample", step, summary["sample"])
  except BaseException:
    if bar is not None:  # clear it: the error line must stand alone
      bar.leave = False
      bar.close()
    raise
  finally:
    if writer is not None:
      writer.close()
    if mngr is not None:
      mngr.close()
    lock.release()
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


def _sample(state: TrainState, tokenizer: data.CharTokenizer,
            config: ml_collections.ConfigDict) -> str:
  """The end-of-training sample, on this process' first device alone, from its own stream."""
  params = jax.device_get(state.params)  # replicated: every process has them whole
  generate = sampling.make_generate(state.model_cfg)
  prompt_ids, _ = sampling.encode_prompt(tokenizer, "")
  out = generate(params, prompt_ids, _stream(jax.device_get(state.rng), _SAMPLE),
                 config.train.sample_tokens)
  return tokenizer.decode(np.asarray(out[0]))
