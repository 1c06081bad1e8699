"""Import a PyTorch model of the lecture or nanoGPT into a workdir that launch/sample.py reads.

  python launch/import_torch.py --state_dict=model.pt --text=input.txt \
      --config=configs/shakespeare_char.py --workdir=runs/imported
  python launch/import_torch.py --ckpt=out-shakespeare-char/ckpt.pt \
      --meta=data/shakespeare_char/meta.pkl --config=configs/shakespeare_char.py \
      --workdir=runs/nanogpt
  python launch/sample.py --workdir=runs/imported --prompt="ROMEO:"

--state_dict is what `torch.save(model.state_dict(), path)` writes for the
lecture's gpt.py or bigram.py, a fused one-file GPT (`tok`,
`blocks.{i}.att.qkv`, ...), or nanoGPT's model.py; the config gives the sizes
and options. --ckpt is the ckpt.pt that nanoGPT's train.py writes: its model_args give the sizes, bias and dropout,
and nanoGPT's model the rest (gelu, tied head, learned positions); the config
gives the training settings. Only character-level nanoGPT models import (its
vocab_size must be the vocabulary's). The vocabulary is the sorted characters
of --text (as the lecture builds it), a vocab.json written by our training
(--vocab; a BPE one, or the tokenizer.json of a launch/prepare.py folder, works
too), or the meta.pkl of nanoGPT's data/shakespeare_char/prepare.py
(--meta; read without running any code it names). The checkpoint is saved at
step 0, so launch/train.py on the same workdir and config fine-tunes it (with
--ckpt: and the printed config.model values as --config.model.* flags). The
run keeps dtype float32, so its greedy text is PyTorch's on every machine,
unless --config.model.dtype asks for another.
Reading the .pt file needs PyTorch (a CPU build is enough).
"""

import json
import sys
from pathlib import Path

import _preamble  # noqa: F401  first: the installed package, or one error line

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from minigpt_jax import config as config_lib, data, tokenizer as tokenizer_lib  # noqa: E402
from minigpt_jax.support import cli  # noqa: E402
from minigpt_jax.tools import imported, torch_import  # noqa: E402
from minigpt_jax.errors import UserError  # noqa: E402
from minigpt_jax.model import ModelConfig, count_params  # noqa: E402

_STATE_DICT = flags.DEFINE_string(
    "state_dict", None, "File written by torch.save(model.state_dict(), path).")
_CKPT = flags.DEFINE_string("ckpt", None, "Or the ckpt.pt nanoGPT's train.py writes.")
_TEXT = flags.DEFINE_string("text", None, "The text the model was trained on (its vocabulary).")
_VOCAB = flags.DEFINE_string("vocab", None, "Or a vocab.json written by launch/train.py.")
_META = flags.DEFINE_string("meta", None, "Or nanoGPT's meta.pkl (data/shakespeare_char).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file giving the model sizes (with --ckpt: the training settings).")
_WORKDIR = flags.DEFINE_string("workdir", None, "New run folder for the imported checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])


def _tokenizer(text_path: str | None, vocab_path: str | None,
               meta_path: str | None = None):
  if sum(map(bool, (text_path, vocab_path, meta_path))) != 1:
    raise UserError("pass exactly one of --text=FILE (the text the PyTorch model was "
                    "trained on), --vocab=vocab.json and --meta=meta.pkl (nanoGPT's)")
  if meta_path:
    return torch_import.read_meta(Path(meta_path))
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
    return tokenizer_lib.from_json(json.loads(path.read_text(encoding="utf-8")))
  except (ValueError, UserError):
    raise UserError(f"--vocab file {path} is not a vocab.json ({{\"chars\": \"...\"}} or "
                    "a BPE one); pass one written by launch/train.py (or a tokenizer.json of "
                    "launch/prepare.py), or --text=FILE") from None


def _torch_load(path: Path, flag: str, fix: str):
  """torch.load(weights_only=True) of a file, and torch; torch is imported only here."""
  if not path.is_file():
    raise UserError(f"--{flag} file {path} does not exist; {fix}")
  try:
    import torch
  except ImportError:
    raise UserError("reading a PyTorch file needs torch; pip install -r "
                    "tests/requirements.txt") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True), torch
  except Exception:  # torch's own message is many lines of advice on unsafe loading
    raise UserError(f"torch.load(weights_only=True) cannot read {path}: not a PyTorch file, "
                    "or it holds Python objects besides tensors (a whole model?); save only "
                    "the weights, with torch.save(model.state_dict(), path)") from None


def _numpy(obj, path: Path, torch, what: str = "") -> dict[str, np.ndarray]:
  """A state_dict's tensors as float32 numpy arrays."""
  if not isinstance(obj, dict):
    raise UserError(f"{path} holds a {type(obj).__name__}{what}, not a state_dict; save it "
                    "with torch.save(model.state_dict(), path)")
  for name, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise UserError(f"{path} holds {type(value).__name__} {name!r}{what}, not a tensor; "
                      "save model.state_dict() alone, or pass nanoGPT's ckpt.pt with --ckpt")
  return {name: value.detach().to(torch.float32).numpy() for name, value in obj.items()}


def _load_state_dict(path: Path) -> dict[str, np.ndarray]:
  obj, torch = _torch_load(path, "state_dict", "write one with torch.save(model.state_dict(), "
                           "path)")
  return _numpy(obj, path, torch)


def _load_ckpt(path: Path) -> tuple[dict[str, np.ndarray], dict]:
  """(state_dict, model_args) of nanoGPT's ckpt.pt; its optimizer state is not used."""
  obj, torch = _torch_load(path, "ckpt", "pass the ckpt.pt nanoGPT's train.py wrote "
                           "(in its out_dir)")
  if not (isinstance(obj, dict) and "model" in obj and isinstance(obj.get("model_args"), dict)):
    raise UserError(f"{path} has no 'model' and 'model_args' entries, so it is not nanoGPT's "
                    "ckpt.pt; pass a plain state_dict with --state_dict instead")
  return _numpy(obj["model"], path, torch, " in 'model'"), obj["model_args"]


def main():
  config, workdir = _CONFIG.value, Path(_WORKDIR.value)
  if bool(_STATE_DICT.value) == bool(_CKPT.value):
    raise UserError("pass exactly one of --state_dict=model.pt (torch.save(model.state_dict(), "
                    "path)) and --ckpt=ckpt.pt (nanoGPT's train.py)")
  state_dict_path = Path(_STATE_DICT.value or _CKPT.value)
  # -- Everything that can be wrong is checked before the workdir is touched.
  tokenizer = _tokenizer(_TEXT.value, _VOCAB.value, _META.value)
  if tokenizer.kind == "bpe":  # the saved config says what the vocabulary is
    config.data.update(tokenizer="bpe", vocab_size=tokenizer.vocab_size)
  imported.check_new(workdir)
  if _CKPT.value:
    state_dict, model_args = _load_ckpt(state_dict_path)
    taken = torch_import.nanogpt_model(model_args, tokenizer.vocab_size, str(state_dict_path))
    config.model.update(taken)  # printed: it overrides --config
    print(f"config.model from {state_dict_path}'s model_args and nanoGPT's model.py: "
          + ", ".join(f"{k}={v!r}" for k, v in taken.items()), file=sys.stderr)
    config_lib.validate(config)
  else:
    config_lib.validate(config)
    state_dict = _load_state_dict(state_dict_path)
  config.model.dtype = imported.imported_dtype(config.model.dtype)  # torch's greedy text
  model_cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size)
  params = torch_import.convert(state_dict, model_cfg)

  imported.save_step0(config, tokenizer, params, workdir, str(state_dict_path))
  print(f"imported {state_dict_path} ({torch_import.layout(state_dict)} layout, "
        f"{config.model.name}, {count_params(params):,} params, vocab {tokenizer.vocab_size}) "
        f"into {workdir} at step 0; sample with python launch/sample.py --workdir={workdir}",
        file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
