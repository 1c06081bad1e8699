"""Import a PyTorch model of the lecture into a workdir that launch/sample.py reads.

  python launch/import_torch.py --state_dict=model.pt --text=input.txt \
      --config=configs/shakespeare_char.py --workdir=runs/imported
  python launch/sample.py --workdir=runs/imported --prompt="ROMEO:"

The .pt file is what `torch.save(model.state_dict(), path)` writes for the
lecture's gpt.py or bigram.py, or for ../shared/bench/torch_ref.py. The
vocabulary is the sorted characters of --text (as the lecture builds it) or a
vocab.json written by our training (--vocab); the config gives the sizes. The
checkpoint is saved at step 0, so launch/train.py on the same workdir and
config fine-tunes it. Reading the file needs PyTorch (a CPU build is enough).
"""

import json
import sys
from pathlib import Path

import _preamble  # noqa: F401  first: the repo on sys.path

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from minigpt_jax import (checkpoint, cli, config as config_lib, data, files, torch_import,  # noqa: E402
                         train, workdir_lock)
from minigpt_jax.errors import UserError  # noqa: E402
from minigpt_jax.model import ModelConfig, count_params  # noqa: E402

_STATE_DICT = flags.DEFINE_string(
    "state_dict", None, "File written by torch.save(model.state_dict(), path).")
_TEXT = flags.DEFINE_string("text", None, "The text the model was trained on (its vocabulary).")
_VOCAB = flags.DEFINE_string("vocab", None, "Or a vocab.json written by launch/train.py.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file giving the model sizes.")
_WORKDIR = flags.DEFINE_string("workdir", None, "New run folder for the imported checkpoint.")
flags.mark_flags_as_required(["state_dict", "config", "workdir"])


def _tokenizer(text_path: str | None, vocab_path: str | None) -> data.CharTokenizer:
  if bool(text_path) == bool(vocab_path):
    raise UserError("pass exactly one of --text=FILE (the text the PyTorch model was "
                    "trained on) and --vocab=vocab.json")
  if text_path:
    if not Path(text_path).is_file():
      raise UserError(f"--text file {text_path} does not exist; pass the text the "
                      "PyTorch model was trained on")
    return data.CharTokenizer.from_text(data.read_text(text_path))
  path = Path(vocab_path)
  if not path.is_file():
    raise UserError(f"--vocab file {path} does not exist; pass a vocab.json from a "
                    "workdir, or --text=FILE")
  try:
    vocab = json.loads(path.read_text(encoding="utf-8"))
    ok = isinstance(vocab["chars"], str) and vocab["chars"]
  except (ValueError, KeyError, TypeError):
    ok = False
  if not ok:
    raise UserError(f"--vocab file {path} is not a vocab.json ({{\"chars\": \"...\"}}); "
                    "pass one written by launch/train.py, or --text=FILE")
  return data.CharTokenizer.from_json(vocab)


def _load_state_dict(path: Path) -> dict[str, np.ndarray]:
  """The .pt file's tensors as float32 numpy arrays; torch is imported only here."""
  if not path.is_file():
    raise UserError(f"--state_dict file {path} does not exist; write one with "
                    "torch.save(model.state_dict(), path)")
  try:
    import torch
  except ImportError:
    raise UserError("reading a PyTorch file needs torch; pip install -r "
                    "tests/requirements.txt") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception:  # torch's own message is many lines of advice on unsafe loading
    raise UserError(f"torch.load(weights_only=True) cannot read {path}: not a PyTorch file, "
                    "or it holds Python objects besides tensors (a whole model?); save only "
                    "the weights, with torch.save(model.state_dict(), path)") from None
  if not isinstance(obj, dict):
    raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict; save it with "
                    "torch.save(model.state_dict(), path)")
  for name, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise UserError(f"{path} holds {type(value).__name__} {name!r}, not a tensor; save "
                      "model.state_dict() alone, not a checkpoint dict around it")
  return {name: value.detach().to(torch.float32).numpy() for name, value in obj.items()}


def main():
  config, workdir = _CONFIG.value, Path(_WORKDIR.value)
  state_dict_path = Path(_STATE_DICT.value)
  # -- Everything that can be wrong is checked before the workdir is touched.
  config_lib.validate(config)
  tokenizer = _tokenizer(_TEXT.value, _VOCAB.value)
  checkpoints = workdir / "checkpoints"
  if checkpoints.is_dir() and any(checkpoints.iterdir()):
    raise UserError(f"{workdir} already holds checkpoints; import into a new --workdir")
  state_dict = _load_state_dict(state_dict_path)
  model_cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size)
  params = torch_import.convert(state_dict, model_cfg)

  # -- A step-0 TrainState holding the imported params, saved as training saves.
  state = train.create_train_state(config, tokenizer.vocab_size)
  state = state.replace(params=jax.tree_util.tree_map(jnp.asarray, params))
  config_dict, vocab = config.to_dict(), tokenizer.to_json()
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.WorkdirLock(workdir):  # a training run may not write here meanwhile
    mngr = checkpoint.manager(workdir, keep=config.checkpoint.keep)
    checkpoint.save(mngr, state, config_dict, vocab,
                    {"step": 0, "val_loss": None, "imported_from": str(state_dict_path)})
    mngr.close()
    files.write_json(workdir / "config.json", config_dict)
    files.write_json(workdir / "vocab.json", vocab)
  print(f"imported {state_dict_path} ({torch_import.layout(state_dict)} layout, "
        f"{config.model.name}, {count_params(params):,} params, vocab {tokenizer.vocab_size}) "
        f"into {workdir} at step 0; sample with python launch/sample.py --workdir={workdir}",
        file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
