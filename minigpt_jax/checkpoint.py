"""Orbax checkpoints in a workdir: save, keep latest N + best, restore, check fit.

Each step directory holds the items `params`, `train_state` (optimizer state,
step, PRNG key), `config`, `vocab` and `meta` (losses). Sampling restores
`params`, `config` and `vocab` only, so it needs neither the corpus nor the
optimizer. `config.json` and `vocab.json` are also written beside the step
directories for people to read.
"""

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from minigpt_jax.data import CharTokenizer
from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig, build_model, init_params

# Fields of config.model that fix parameter shapes or the computation.
_MODEL_FIELDS = ("name", "block_size", "n_embed", "n_heads", "n_layer")


def write_json(path: Path, obj) -> None:
  """Atomic JSON write: a kill mid-write leaves the old file, never half a file."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def manager(workdir: str | Path, keep: int = 3) -> ocp.CheckpointManager:
  """A manager keeping the `keep` latest checkpoints plus the best by val loss."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
          keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, create=True,
      enable_async_checkpointing=False)  # a save is on disk before training goes on
  return ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints", options=options)


def save(mngr: ocp.CheckpointManager, state, config_dict: dict, vocab: dict,
         meta: dict) -> None:
  """Saves a TrainState at its step; `meta['val_loss']` ranks it for best-keeping."""
  step = int(state.step)
  metrics = {"val_loss": meta["val_loss"]} if meta.get("val_loss") is not None else None
  mngr.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      train_state=ocp.args.StandardSave(
          {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}),
      config=ocp.args.JsonSave(config_dict),
      vocab=ocp.args.JsonSave(vocab),
      meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()


def restore_json(mngr: ocp.CheckpointManager, step: int) -> tuple[dict, dict, dict]:
  """The (config, vocab, meta) saved with a step."""
  items = mngr.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore(), vocab=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  return items["config"], items["vocab"], items["meta"]


def check_fits(saved_config: dict, saved_vocab: dict, config, vocab: dict,
               where: str) -> None:
  """Raises UserError naming the first model field or vocabulary that differs."""
  for field in _MODEL_FIELDS:
    saved, now = saved_config["model"][field], config.model[field]
    if saved != now:
      raise UserError(
          f"checkpoint in {where} has config.model.{field}={saved!r} but this "
          f"config has {now!r}; pass --config.model.{field}={saved!r} or use a new --workdir")
  if saved_vocab["chars"] != vocab["chars"]:
    raise UserError(
        f"checkpoint in {where} was trained on a text with a different vocabulary "
        f"({len(saved_vocab['chars'])} vs {len(vocab['chars'])} characters); "
        "train on the same corpus or use a new --workdir")


def _abstract(tree):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def restore_state(mngr: ocp.CheckpointManager, step: int, state):
  """Restores the full TrainState saved at `step` into the shapes of `state`."""
  items = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(state.params)),
      train_state=ocp.args.StandardRestore(_abstract(
          {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}))))
  rest = items["train_state"]
  return state.replace(params=items["params"], opt_state=rest["opt_state"],
                       step=rest["step"], rng=rest["rng"])


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params):
  return mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params)))["params"]


def best_step(mngr: ocp.CheckpointManager) -> int | None:
  """The kept step with the lowest val loss, from each step's saved meta."""
  best = None
  for step in mngr.all_steps():
    val = restore_json(mngr, step)[2].get("val_loss")
    if val is not None and (best is None or val < best[0]):
      best = (val, step)
  return None if best is None else best[1]


def load_for_sampling(workdir: str | Path, step: int | None = None, best: bool = False):
  """(model_cfg, params, tokenizer, step) from a workdir's checkpoint alone."""
  if not (Path(workdir) / "checkpoints").is_dir():
    raise UserError(f"no checkpoints in {workdir}; train first with "
                    f"python launch/train.py --config=CONFIG --workdir={workdir}")
  mngr = manager(workdir)
  steps = mngr.all_steps()
  if not steps:
    raise UserError(f"no finished checkpoint in {workdir}; train longer (checkpoints "
                    "are saved at every evaluation)")
  if best:
    step = best_step(mngr)
    if step is None:
      raise UserError(f"no checkpoint in {workdir} has a val loss; drop --best")
  elif step is None:
    step = mngr.latest_step()
  elif step not in steps:
    raise UserError(f"no checkpoint at step {step} in {workdir}; available steps: "
                    f"{', '.join(map(str, steps))}")
  config_dict, vocab, _ = restore_json(mngr, step)
  model_cfg = ModelConfig.from_config(config_dict["model"], len(vocab["chars"]))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      jax.eval_shape(lambda: init_params(build_model(model_cfg), jax.random.PRNGKey(0))))
  params = restore_params(mngr, step, abstract)
  mngr.close()
  return model_cfg, params, CharTokenizer.from_json(vocab), step
