"""The optimizer from `config.train`: schedule, decay groups, clipping, Muon, skipping.

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

Owns: `OptimizerConfig` (the optimizer's fields of `config.train`), the
schedule, the parameter groups, `make_optimizer`, and which fields fix the
optimizer state's layout. May import: optax, JAX, settings.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax

from minigpt_jax import settings
from minigpt_jax.settings import one_of, rule, setting

_POSITIVE_RATE = rule(lambda v: v > 0, "use a positive learning rate")


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
      layout=lambda t: t["skip_nonfinite_updates"] > 0)
  steps: int | None = dataclasses.field(default=None, kw_only=True)  # train.steps

  @classmethod
  def from_config(cls, train_config) -> "OptimizerConfig":
    """From `config.train`; fields the optimizer does not use are None, so they match."""
    t = cls(steps=train_config["steps"], **settings.read(cls, train_config))
    if t.schedule == "constant" and t.warmup_steps == 0:
      t = dataclasses.replace(t, steps=None, min_learning_rate=None, decay_fraction=None)
    if t.optimizer != "muon":
      t = dataclasses.replace(t, muon_learning_rate=None)
    return t


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


def make_optimizer(train_config) -> optax.GradientTransformation:
  """The `config.train` optimizer; with skip_nonfinite_updates = N > 0, in apply_if_finite.

  That wrapper drops an update whose gradients are not finite, up to N in a row.
  Equal values (those it uses) give the same object, so jit reuses its
  compilations, across a resume with more steps at a constant rate too.
  """
  return _build(OptimizerConfig.from_config(train_config))


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
  return tx


def layout_change(saved_train: dict, train_config) -> str | None:
  """The first train field whose change alters the optimizer state's arrays, or None.

  A checkpoint cannot resume across such a change. Fields missing from a
  saved config (an older version's) read as the lecture's values.
  """
  saved = {**settings.defaults(OptimizerConfig), **saved_train}
  for field in settings.declared(OptimizerConfig, "layout"):
    key = field.metadata["layout"]
    if key(saved) != key(train_config):
      return field.name
  return None
