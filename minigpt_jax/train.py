"""Train state and the jit-compiled train and eval steps: the pure math.

Randomness: one root key from `config.seed` is stored in the state; batches,
dropout masks and evaluation batches each come from `fold_in(key, step)`, so
they depend on the step alone and a resumed run repeats an unbroken one
bit for bit, on any number of devices.

One route for a step: `train_steps` scans `train_step` over the batches of
one compiled call. A batch is windows [B, block_size + 1] of token ids:
drawn inside the call from the corpus, which every device holds, or
gathered by the host with the same keys (`batches.py`, for corpora past the
device budget); the two differ only in where the windows come from. They are
split over every device of the data x fsdp mesh; each device (and each
process) computes the loss and gradients of only its rows (a shard_map), and
the averaged gradients update params and optimizer state, whose matrices are
split along `fsdp` (replicated at fsdp 1). See `parallel.py`.

The loop that drives these (files, checkpoints, logs, signals) is `loop.py`.
The optimizer `config.train` asks for is built in `optimizer.py`.
Owns: `TrainState`, `create_train_state`, `train_step` (with gradient
accumulation), `train_steps`, `eval_step`, `estimate_loss` (the lecture's
sampled estimate), `score_windows` (an exact evaluation's), and the keys of
the train and eval batches. May import: model, data, optimizer, parallel;
nothing that writes files.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from minigpt_jax import data, parallel
from minigpt_jax.model import ModelConfig, build_model, cross_entropy, init_params, rows_from
from minigpt_jax.optimizer import LossScaleState, loss_scale, make_optimizer

# Streams derived from the root key; never reuse one for two purposes.
_DATA, _DROPOUT, _EVAL, _INIT, _SAMPLE = range(5)


def _stream(rng: jax.Array, which: int) -> jax.Array:
  return jax.random.fold_in(rng, which)


def sample_key(state: "TrainState") -> jax.Array:
  """The key of the end-of-training sample: a stream of its own."""
  return _stream(jax.device_get(state.rng), _SAMPLE)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer updates done
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # root PRNG key of the run
  model_cfg: ModelConfig = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply(self, params, idx_BT, deterministic=True, dropout_key=None):
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    return build_model(self.model_cfg).apply(
        {"params": params}, idx_BT, deterministic=deterministic, rngs=rngs)


def create_train_state(config: ml_collections.ConfigDict, vocab_size: int,
                       mesh: Mesh | None = None) -> TrainState:
  """A fresh state from `config.seed`, laid out over `mesh` (`parallel.shardings`)."""
  model_cfg = ModelConfig.from_config(config.model, vocab_size)
  init = _jit_init(model_cfg, make_optimizer(config.train, model_cfg.dtype), mesh)
  return init(jax.random.PRNGKey(config.seed))


@functools.cache
def _jit_init(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh | None):
  # Cached: a resumed or repeated run reuses the compiled init.
  def init(rng):
    params = init_params(build_model(model_cfg), _stream(rng, _INIT))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng, model_cfg=model_cfg, tx=tx)

  if mesh is None:
    return jax.jit(init)
  abstract = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))
  return jax.jit(init, out_shardings=parallel.shardings(abstract, mesh))


def batch_keys(rng: jax.Array, first_step, num_steps: int) -> jax.Array:
  """Keys [K] of the training batches of steps first_step .. first_step + K - 1."""
  data_key = _stream(rng, _DATA)
  return jax.vmap(lambda s: jax.random.fold_in(data_key, s))(first_step + jnp.arange(num_steps))


def eval_keys(rng: jax.Array, step, split_index: int, eval_iters: int) -> jax.Array:
  """Keys [eval_iters] of the evaluation batches of split `split_index` (sorted names) at `step`."""
  split_key = jax.random.fold_in(jax.random.fold_in(_stream(rng, _EVAL), step), split_index)
  return jax.vmap(lambda j: jax.random.fold_in(split_key, j))(jnp.arange(eval_iters))


def draw_batch(state: TrainState, train_N: jax.Array, batch_size: int, block_size: int):
  """The windows [B, block_size + 1] of `state.step`'s batch, drawn from ids on device."""
  key = batch_keys(state.rng, state.step, 1)[0]
  return data.draw_windows(key, train_N, batch_size, block_size)


def _shard(windows, mesh: Mesh | None):
  """Windows [B, T + 1] split over every device of the mesh by their first (batch) axis."""
  if mesh is None:
    return windows
  return lax.with_sharding_constraint(windows, parallel.batch_sharded(mesh))


def train_step(state: TrainState, windows_BT1: jax.Array, mesh: Mesh | None = None,
               grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
  """One optimizer update on a batch of windows [B, T + 1]; dropout keyed by the step.

  Metrics: the loss and the global gradient norm (before clipping); with
  skipped non-finite updates on, also the current run of skips and their total;
  in float16 these too, and the `loss_scale` the loss was multiplied by.

  With a mesh of several devices, each device computes the loss and
  gradients of its rows of the batch (shard_map) from the whole params,
  all-gathered from their fsdp shards, and `parallel.mean_grads` averages the
  gradients, each device keeping its shard. With `grad_accum_steps` = K,
  each device's rows go through in K micro-batches whose gradients are
  averaged: the same update, in less memory. Each share of the batch is
  computed under `model.rows_from(its first row)`, so dropout draws the masks
  of the whole batch however it is split. The optimizer then updates each
  shard where it lives.
  """
  dropout_key = jax.random.fold_in(_stream(state.rng, _DROPOUT), state.step)
  sharded = mesh is not None and mesh.devices.size > 1
  specs = parallel.specs(state.params, mesh)
  scale = loss_scale(state.opt_state)  # float16's, so small gradients survive; else None

  def loss_fn(params, windows_bT1):
    logits_bTV = state.apply(params, windows_bT1[:, :-1], deterministic=False,
                             dropout_key=dropout_key)
    loss = cross_entropy(logits_bTV, windows_bT1[:, 1:])
    return loss if scale is None else loss * scale

  def loss_and_grads(params, windows_bT1):
    if not sharded:
      return _accumulate(jax.value_and_grad(loss_fn), params, windows_bT1, 0, grad_accum_steps)
    first_row = parallel.device_index() * windows_bT1.shape[0]
    loss, grads = _accumulate(jax.value_and_grad(loss_fn), parallel.gather_params(params, specs),
                              windows_bT1, first_row, grad_accum_steps)
    return parallel.mean_grads(loss, grads, specs, state.model_cfg.cpu_tricks)

  if sharded:
    loss_and_grads = jax.shard_map(
        loss_and_grads, mesh=mesh, in_specs=(specs, P(parallel.BATCH_AXES)),
        out_specs=(P(), specs), check_vma=False)  # the mean leaves them equal on every device
  loss, grads = loss_and_grads(state.params, windows_BT1)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  if scale is not None:  # the optimizer divided the gradients by it; the metrics do too
    metrics = {k: v / scale for k, v in metrics.items()} | {"loss_scale": scale}
  if isinstance(opt_state, (optax.ApplyIfFiniteState, LossScaleState)):
    metrics.update(nonfinite_streak=opt_state.notfinite_count,
                   skipped_updates=opt_state.total_notfinite)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _accumulate(value_and_grad, params, windows_bT1, first_row, micro_batches: int):
  """(loss, grads) of rows windows_bT1 as the mean over `micro_batches` equal slices of them."""
  if micro_batches == 1:
    with rows_from(first_row):
      return value_and_grad(params, windows_bT1)
  rows = windows_bT1.shape[0] // micro_batches
  windows_KmT1 = windows_bT1.reshape(micro_batches, rows, *windows_bT1.shape[1:])

  def add(total, k):
    with rows_from(first_row + k * rows):
      loss_grads = value_and_grad(params, windows_KmT1[k])
    return jax.tree.map(jnp.add, total, loss_grads), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  total, _ = lax.scan(add, zeros, jnp.arange(micro_batches))
  return jax.tree.map(lambda x: x / micro_batches, total)


def train_steps(state: TrainState, train_source: jax.Array, *, batch_size: int,
                block_size: int, num_steps: int = 1, mesh: Mesh | None = None,
                grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
  """`num_steps` updates in one compiled call (a lax.scan), each on its own batch.

  `train_source` is where each step's windows come from: the train ids [N]
  on every device, from which the step draws the windows of its key
  (`draw_batch`), or the windows [num_steps, B, block_size + 1] the host
  gathered with the same keys (batches.py). Either way the results equal
  `num_steps` calls of `train_step`. Returns the new state and train_step's
  metrics, each of shape [num_steps].
  """
  on_device = train_source.ndim == 1

  def one_step(state, windows_BT1):
    if on_device:
      windows_BT1 = draw_batch(state, train_source, batch_size, block_size)
    state, metrics = train_step(state, _shard(windows_BT1, mesh), mesh, grad_accum_steps)
    return _keep_layout(state, mesh), metrics

  state, metrics_K = lax.scan(one_step, state, None if on_device else train_source,
                              length=num_steps)
  return _keep_layout(state, mesh), metrics_K


def _keep_layout(state: TrainState, mesh: Mesh | None) -> TrainState:
  """The state in the layout it came in: fsdp shards where they were, the rest replicated."""
  if mesh is None:
    return state
  return lax.with_sharding_constraint(state, parallel.shardings(state, mesh))


def eval_step(state: TrainState, params, windows_BT1) -> jax.Array:
  return cross_entropy(state.apply(params, windows_BT1[:, :-1]), windows_BT1[:, 1:])


def estimate_loss(state: TrainState, sources: dict, *, batch_size: int, block_size: int,
                  eval_iters: int, mesh: Mesh | None = None) -> dict:
  """Mean loss over `eval_iters` random batches of each split (the lecture's estimate).

  Each split's source is its ids [N] on every device, drawn from with the
  eval keys of this step (`eval_keys`), or the windows [eval_iters, B,
  block_size + 1] the host gathered with those keys.
  """
  losses = {}
  for i, (name, source) in enumerate(sorted(sources.items())):
    keys_J = eval_keys(state.rng, state.step, i, eval_iters)

    def add(j, total, source=source, keys_J=keys_J):
      if source.ndim == 1:
        windows_BT1 = data.draw_windows(keys_J[j], source, batch_size, block_size)
      else:
        windows_BT1 = source[j]
      return total + eval_step(state, state.params, _shard(windows_BT1, mesh))

    losses[name] = lax.fori_loop(0, eval_iters, add, jnp.float32(0)) / eval_iters
  return losses


def score_windows(state: TrainState, windows_BT1: jax.Array, first_B: jax.Array,
                  mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
  """Per window: the sum of its token losses from position first_B on, and their count.

  For an exact evaluation (`evaluation.py`): a window whose `first` is
  block_size (padding) scores nothing. Sums are per window, so the total,
  added on the host in float64, does not depend on how the windows were
  split over devices or batches. Both results come back whole to every
  process.
  """
  windows_BT1 = _shard(windows_BT1, mesh)
  logits_BTV = state.apply(state.params, windows_BT1[:, :-1])
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, windows_BT1[:, 1:])
  scored_BT = jnp.arange(losses_BT.shape[1])[None, :] >= first_B[:, None]
  out = (jnp.where(scored_BT, losses_BT, 0.0).sum(axis=1), scored_BT.sum(axis=1))
  return out if mesh is None else lax.with_sharding_constraint(out, parallel.replicated(mesh))


# Compiled once per shape and config, shared by every run in the process.
jit_train_steps = jax.jit(train_steps, donate_argnums=0,
                          static_argnames=("batch_size", "block_size", "num_steps", "mesh",
                                           "grad_accum_steps"))
jit_estimate_loss = jax.jit(estimate_loss,
                            static_argnames=("batch_size", "block_size", "eval_iters", "mesh"))
jit_score_windows = jax.jit(score_windows, static_argnames=("mesh",))
