"""An imported model as a workdir at step 0: what launch/import_torch.py and import_hf.py write.

The checkpoint is the one training saves (a step-0 TrainState holding the
imported params, its config and vocabulary), plus config.json and
vocab.json, so launch/sample.py and evaluate.py read the folder and
launch/train.py on it fine-tunes from step 0.

Owns: `imported_dtype`, `check_new`, `save_step0`. May import: train, checkpoint, files,
workdir_lock, errors.
"""

from pathlib import Path

import jax
import jax.numpy as jnp

from minigpt_jax import train
from minigpt_jax.errors import UserError
from minigpt_jax.support import checkpoint, files, workdir_lock


def imported_dtype(setting: str) -> str:
  """The dtype an imported model keeps: float32 unless one was asked for.

  PyTorch's model ran in float32; "auto" could pick bfloat16 on a CPU or GPU
  with bfloat16 units, and then greedy text would drift from PyTorch's.
  """
  return "float32" if setting == "auto" else setting


def check_new(workdir: Path) -> None:
  """A UserError when `workdir` already holds checkpoints (an import never overwrites)."""
  checkpoints = Path(workdir) / "checkpoints"
  if checkpoints.is_dir() and any(checkpoints.iterdir()):
    raise UserError(f"{workdir} already holds checkpoints; import into a new --workdir")


def save_step0(config, tokenizer, params, workdir: Path, source: str) -> None:
  """Saves `params` (the tree of `model.init_params`) as step 0 of a new run in `workdir`."""
  state = train.create_train_state(config, tokenizer.vocab_size)
  state = state.replace(params=jax.tree_util.tree_map(jnp.asarray, params))
  config_dict, vocab = config.to_dict(), tokenizer.to_json()
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.WorkdirLock(workdir):  # a training run may not write here meanwhile
    mngr = checkpoint.manager(workdir, keep=config.checkpoint.keep)
    checkpoint.save(mngr, state, config_dict, vocab,
                    {"step": 0, "val_loss": None, "imported_from": source})
    mngr.close()
    files.write_json(workdir / "config.json", config_dict)
    files.write_json(workdir / "vocab.json", vocab)
