"""The optimizer from `config.train`: schedule, decay groups, clipping, Muon, skipping,
and float16's dynamic loss scale.

Built from optax pieces. The defaults are the lecture's, and build exactly
what it used, `optax.adamw` at a constant rate on every parameter, so they
keep its results bit for bit and its checkpoints' optimizer-state layout.

Schedules (`learning_rate`): update n (counted from 0) of `steps` runs at
- `warmup_steps` first: peak * (n + 1) / (warmup_steps + 1), as nanoGPT;
- then `constant` at the peak, `cosine` or `linear` from the peak down to
  `min_learning_rate`, or `wsd`: the peak until the last `decay_fraction` of
  the steps, then linear down to `min_learning_rate`. The decays reach it at
  update `steps`, one past the last, as nanoGPT's does at `lr_decay_iters`.

Muon (`optax.contrib.muon`) updates the blocks' 2-D kernels at
`muon_learning_rate`; AdamW updates the embeddings, the head, the LayerNorm
gains and the biases at `learning_rate`. Both follow the schedule's shape.

float16 (`model.dtype`, for GPUs without bfloat16) wraps the whole optimizer
in `dynamic_loss_scale`, torch's GradScaler as an optax transform: its scale
and counters are optimizer state, so checkpoints keep them and a resume is
bit-identical.

Owns: `OptimizerConfig` (the optimizer's fields of `config.train`), the
schedule, the parameter groups, the loss scale, `make_optimizer`, and which
fields fix the optimizer state's layout. May import: optax, JAX, settings.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from minigpt_jax import settings
from minigpt_jax.settings import one_of, rule, setting

_POSITIVE_RATE = rule(lambda v: v > 0, "use a positive learning rate")
INITIAL_LOSS_SCALE = 2.0**16  # GradScaler's init_scale
MIN_LOSS_SCALE = 1.0  # an overflow at this scale is the model's, not the scale's
_MAX_LOSS_SCALE = 2.0**64  # growth stops here, short of float32's range


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer's fields of `config.train`, declared once, plus `train.steps`.

  config.get_config's defaults and config.validate's one-field checks follow
  from these lines; `layout(train)` marks what fixes the optimizer state's
  arrays, the default being the lecture's. Frozen and compared by value, so
  equal settings build one optimizer and jit reuses its compilations.
  """
  optimizer: str = setting("adamw", '"adamw" | "muon" (hidden matrices; AdamW the rest)',
                           check=one_of("adamw", "muon"), layout=lambda t: t["optimizer"])
  learning_rate: float = setting(1e-3, "the peak; constant, as in the lecture",
                                 check=_POSITIVE_RATE)
  muon_learning_rate: float = setting(0.02, "muon's group; learning_rate is AdamW's",
                                      check=_POSITIVE_RATE)
  schedule: str = setting(
      "constant", 'over train.steps: "constant" | "cosine" | "linear" | "wsd" (warmup, '
      "stable, then a linear decay over the last decay_fraction)",
      check=one_of("constant", "cosine", "linear", "wsd"),
      layout=lambda t: t["schedule"] != "constant" or t["warmup_steps"] > 0)  # a step count
  warmup_steps: int = setting(0, "linear from 0 to learning_rate")
  min_learning_rate: float = setting(0.0, "where cosine, linear and wsd end")
  decay_fraction: float = setting(0.2, "wsd: the share of steps spent decaying",
                                  check=rule(lambda v: 0.0 < v <= 1.0, "use a fraction in (0, 1]"))
  beta1: float = setting(0.9, "AdamW's first-moment decay (torch's default)")
  beta2: float = setting(0.999, "AdamW's second-moment decay (torch's default)")
  eps: float = setting(1e-8, "AdamW's (and Muon's) denominator guard",
                       check=rule(lambda v: v > 0, "use a small positive eps"))
  weight_decay: float = setting(0.01, "decoupled, as torch's AdamW (and Muon's group)",
                                check=rule(lambda v: v >= 0, "use a non-negative weight decay"))
  weight_decay_on: str = setting(
      "all", '"all" (torch) | "matrices" (2-D and up, nanoGPT)', check=one_of("all", "matrices"),
      layout=lambda t: t["weight_decay_on"])  # a masked state
  grad_clip: float = setting(
      0.0, "clip the global gradient norm to this; 0: off",
      check=rule(lambda v: v >= 0, "use 0 (off) or a positive global norm"),
      layout=lambda t: t["grad_clip"] > 0)  # a chained clip
  skip_nonfinite_updates: int = setting(
      0, "0: a non-finite loss or gradient stops the run; N > 0: such updates are skipped "
      "(optax.apply_if_finite, counted in the metrics), N + 1 in a row stop it",
      check=rule(lambda v: isinstance(v, int) and v >= 0,
                 "use 0 (stop at the first non-finite update) or a positive limit"),
      layout=lambda t: t["skip_nonfinite_updates"] > 0 and not t["loss_scaling"])
  loss_scale_growth_interval: int = setting(
      2000, "model.dtype float16: the loss scale doubles after this many finite updates in a "
      "row and halves at each overflow, whose update is skipped (GradScaler's)",
      check=settings.positive_int)
  steps: int | None = dataclasses.field(default=None, kw_only=True)  # train.steps
  loss_scaling: bool = dataclasses.field(default=False, kw_only=True)  # model.dtype float16

  @classmethod
  def from_config(cls, train_config, model_dtype="float32") -> "OptimizerConfig":
    """From `config.train`; fields the optimizer does not use are None, so they match.

    In float16 the loss scale skips non-finite updates, so skip_nonfinite_updates is unused.
    """
    t = cls(steps=train_config["steps"], loss_scaling=is_float16(model_dtype),
            **settings.read(cls, train_config))
    if t.loss_scaling:
      t = dataclasses.replace(t, skip_nonfinite_updates=0)
    else:
      t = dataclasses.replace(t, loss_scale_growth_interval=None)
    if t.schedule == "constant" and t.warmup_steps == 0:
      t = dataclasses.replace(t, steps=None, min_learning_rate=None, decay_fraction=None)
    if t.optimizer != "muon":
      t = dataclasses.replace(t, muon_learning_rate=None)
    return t


def is_float16(model_dtype) -> bool:
  """Whether `model.dtype` (the config's string, or ModelConfig's) asks for float16."""
  return model_dtype == "float16" or model_dtype is jnp.float16


def learning_rate(train_config, peak: float | None = None):
  """The schedule: a float when constant (optax.adamw's own path), else n -> rate."""
  t = train_config
  peak = t.learning_rate if peak is None else peak
  if t.schedule == "constant" and t.warmup_steps == 0:
    return peak
  floor = t.min_learning_rate * peak / t.learning_rate  # muon's group scales with its peak
  warmup, total = t.warmup_steps, t.steps
  decay_start = {"wsd": total - max(1, round(t.decay_fraction * total))}.get(t.schedule, warmup)
  decay_steps = max(1, total - decay_start)

  def schedule(count):
    n = jnp.asarray(count, jnp.float32)
    progress = jnp.clip((n - decay_start) / decay_steps, 0.0, 1.0)
    if t.schedule == "cosine":
      after = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(math.pi * progress))
    elif t.schedule in ("linear", "wsd"):
      after = peak + (floor - peak) * progress
    else:
      after = jnp.full_like(n, peak)
    return jnp.where(n < warmup, peak * (n + 1) / (warmup + 1), after)

  return schedule


def learning_rate_at(train_config, update: int, peak: float | None = None) -> float:
  """The rate update `update` (from 0) ran at, for the logs."""
  rate = learning_rate(train_config, peak)
  return float(rate) if isinstance(rate, float) else float(rate(update))


def is_hidden_matrix(path, leaf) -> bool:
  """A transformer block's 2-D kernel: what Muon updates."""
  return (leaf.ndim == 2 and str(getattr(path[0], "key", "")).startswith("block_")
          and getattr(path[-1], "key", None) == "kernel")


def _decay_mask(params):
  """Weight decay on matrices only (2-D and up: kernels, embeddings), as nanoGPT."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _groups(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, p: "muon" if is_hidden_matrix(path, p) else "adamw", params)


def make_optimizer(train_config, model_dtype="float32") -> optax.GradientTransformation:
  """The `config.train` optimizer; with skip_nonfinite_updates = N > 0, in apply_if_finite.

  That wrapper drops an update whose gradients are not finite, up to N in a row.
  A float16 model's optimizer is in `dynamic_loss_scale` instead. Equal values
  (those it uses) give the same object, so jit reuses its compilations, across
  a resume with more steps at a constant rate too.
  """
  return _build(OptimizerConfig.from_config(train_config, model_dtype))


@functools.cache
def _build(t: OptimizerConfig) -> optax.GradientTransformation:
  mask = _decay_mask if t.weight_decay_on == "matrices" else None
  tx = optax.adamw(learning_rate(t), b1=t.beta1, b2=t.beta2, eps=t.eps,
                   weight_decay=t.weight_decay, mask=mask)
  if t.optimizer == "muon":
    muon = optax.contrib.muon(learning_rate(t, t.muon_learning_rate),
                              weight_decay=t.weight_decay, eps=t.eps)
    tx = optax.partition({"muon": muon, "adamw": tx}, _groups)
  if t.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  if t.skip_nonfinite_updates:
    tx = optax.apply_if_finite(tx, t.skip_nonfinite_updates)
  if t.loss_scaling:
    tx = dynamic_loss_scale(tx, t.loss_scale_growth_interval)
  return tx


class LossScaleState(NamedTuple):
  """`dynamic_loss_scale`'s state; the counters are named as optax.ApplyIfFiniteState's."""
  inner_state: optax.OptState
  scale: jax.Array  # float32: what the next step's loss is multiplied by
  good_steps: jax.Array  # int32: finite updates since the scale last changed
  notfinite_count: jax.Array  # int32: updates skipped in a row
  total_notfinite: jax.Array  # int32: updates skipped in all


def dynamic_loss_scale(inner: optax.GradientTransformation, growth_interval: int,
                       initial_scale: float = INITIAL_LOSS_SCALE) -> optax.GradientTransformation:
  """`inner` fed gradients of a loss multiplied by `loss_scale(state)`, as torch's GradScaler.

  The gradients are divided by the scale first. If any is not finite (float16
  overflowed), the update is zero, `inner`'s state is kept and the scale
  halves (not below MIN_LOSS_SCALE); after `growth_interval` finite updates
  in a row it doubles. Selects, not lax.cond, so it compiles into the step.
  The scale stays a power of two: scaling and unscaling are exact.
  """
  def init(params):
    zero = jnp.zeros((), jnp.int32)
    return LossScaleState(inner.init(params), jnp.asarray(initial_scale, jnp.float32),
                          zero, zero, zero)

  def update(grads, state, params=None):
    grads = jax.tree.map(lambda g: g / state.scale.astype(g.dtype), grads)
    finite = jnp.all(jnp.stack([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]))
    grads = jax.tree.map(lambda g: jnp.where(finite, g, 0), grads)  # no NaN inside `inner`
    updates, inner_state = inner.update(grads, state.inner_state, params)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, 0), updates)
    inner_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                               inner_state, state.inner_state)
    grow = finite & (state.good_steps + 1 >= growth_interval)
    scale = jnp.where(grow, jnp.minimum(2 * state.scale, _MAX_LOSS_SCALE), state.scale)
    scale = jnp.where(finite, scale, jnp.maximum(state.scale / 2, MIN_LOSS_SCALE))
    skipped = (~finite).astype(jnp.int32)
    return updates, LossScaleState(
        inner_state, scale, jnp.where(finite & ~grow, state.good_steps + 1, 0),
        jnp.where(finite, 0, state.notfinite_count + 1), state.total_notfinite + skipped)

  return optax.GradientTransformation(init, update)


def loss_scale(opt_state) -> jax.Array | None:
  """What this step multiplies its loss by: float16's scale, or None (no scaling)."""
  return opt_state.scale if isinstance(opt_state, LossScaleState) else None


def layout_change(saved_train: dict, train_config, saved_dtype="float32",
                  model_dtype="float32") -> str | None:
  """The first field whose change alters the optimizer state's arrays, or None.

  Named "model.dtype" (float16 adds the loss scale) or "train.NAME". A
  checkpoint cannot resume across such a change. Fields missing from a saved
  config (an older version's) read as the lecture's values.
  """
  if is_float16(saved_dtype) != is_float16(model_dtype):
    return "model.dtype"
  saved = {**settings.read(OptimizerConfig, saved_train), "loss_scaling": is_float16(saved_dtype)}
  now = {**settings.read(OptimizerConfig, train_config), "loss_scaling": is_float16(model_dtype)}
  for field in settings.declared(OptimizerConfig, "layout"):
    key = field.metadata["layout"]
    if key(saved) != key(now):
      return f"train.{field.name}"
  return None
