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

Owns: the schedule, the parameter groups, `make_optimizer`, and which train
fields fix the optimizer state's layout. May import: optax, JAX.
"""

import functools
import math

import jax
import jax.numpy as jnp
import optax

# The train fields `make_optimizer` reads. Equal values (those it uses) give
# the same object, so jit reuses its compilations, across a resume with more
# steps at a constant rate too.
_FIELDS = ("optimizer", "learning_rate", "muon_learning_rate", "schedule", "warmup_steps",
           "min_learning_rate", "decay_fraction", "steps", "beta1", "beta2", "eps",
           "weight_decay", "weight_decay_on", "grad_clip", "skip_nonfinite_updates")


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
  """
  fields = {f: train_config[f] for f in _FIELDS}
  if fields["schedule"] == "constant" and fields["warmup_steps"] == 0:
    fields.update(steps=None, min_learning_rate=None, decay_fraction=None)  # unused
  if fields["optimizer"] != "muon":
    fields["muon_learning_rate"] = None
  return _build(tuple(fields.items()))


class _Fields(dict):
  """Train fields read as attributes, like the ConfigDict they came from."""
  __getattr__ = dict.__getitem__


@functools.cache
def _build(fields: tuple) -> optax.GradientTransformation:
  t = _Fields(fields)
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


# What fixes the optimizer state's layout, per train field, and the lecture's values.
_LAYOUT = {"optimizer": (lambda t: t["optimizer"], "adamw"),
           "schedule": (lambda t: t["schedule"] != "constant" or t["warmup_steps"] > 0,
                        "constant"),  # a schedule keeps a step count
           "weight_decay_on": (lambda t: t["weight_decay_on"], "all"),  # a masked state
           "grad_clip": (lambda t: t["grad_clip"] > 0, 0.0),  # a chained clip
           "skip_nonfinite_updates": (lambda t: t["skip_nonfinite_updates"] > 0, 0)}


def layout_change(saved_train: dict, train_config) -> str | None:
  """The first train field whose change alters the optimizer state's arrays, or None.

  A checkpoint cannot resume across such a change. Fields missing from a
  saved config (an older version's) read as the lecture's values.
  """
  saved = {"warmup_steps": 0, **{f: d for f, (_, d) in _LAYOUT.items()}, **saved_train}
  now = {f: train_config[f] for f in (*_LAYOUT, "warmup_steps")}
  for field, (key, _) in _LAYOUT.items():
    if key(saved) != key(now):
      return field
  return None
