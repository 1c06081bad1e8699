"""A Hugging Face folder (or Hub id) of GPT-2's family as our config, params and tokenizer.

`locate(model)` is a local folder, or a Hub id downloaded through
`huggingface_hub` (only the configs, tokenizer files and safetensors
weights: never a pickle or code). `read(folder)` then reads config.json
(`hf_config.model_fields`), the safetensors weights (one file or an index of
shards; a folder with only pytorch_model.bin is refused: unpickling it can
run any code) and the tokenizer (`hf_tokenizer.from_folder`), whose vocabulary
must be the model's: GPT-2's 50257 tokens are 50257 rows of tok_embed, with no
padding.

Owns: `locate`, `read`, `Imported`. May import: model, hf_config, hf_weights,
hf_tokenizer, hf_deps, errors.
"""

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax

from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig, build_model, init_params
from minigpt_jax.tools import hf_config, hf_deps, hf_tokenizer, hf_weights

WHO = "launch/import_hf.py"
_HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "vocab.json", "merges.txt", "*.safetensors", "model.safetensors.index.json"]


class Imported(NamedTuple):
  fields: dict  # config.model fields
  params: Any  # float32 numpy, the tree of model.init_params
  tokenizer: Any
  native: bool  # a gpt2 config.json (else minigpt)


def locate(model: str) -> Path:
  """A local folder as it is; otherwise a Hub id, downloaded into the Hub's cache."""
  path = Path(model)
  if path.is_dir():
    return path
  if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
    raise UserError(f"--model {model} is not a folder; pass a folder that save_pretrained or "
                    "launch/export_hf.py wrote, or a Hub id such as gpt2")
  hub = hf_deps.require("huggingface_hub", f"{WHO} with a Hub id")
  try:
    return Path(hub.snapshot_download(model, allow_patterns=_HUB_FILES))
  except Exception as e:  # the library's many network and not-found errors
    reason = " ".join(str(e).split())[:200]
    raise UserError(f"could not download {model} from the Hugging Face Hub ({reason}); check "
                    "the id and the network, or pass a local folder") from None


def _tensors(folder: Path) -> dict:
  """Every tensor of the folder's safetensors weights, as numpy arrays."""
  load_file = hf_deps.require("safetensors.numpy", WHO).load_file
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (folder / "model.safetensors").is_file():
    shards = ["model.safetensors"]
  elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
    raise UserError(f"{folder} has only PyTorch pickle weights (pytorch_model.bin), which are "
                    "refused: unpickling a file can run any code it holds; convert them to "
                    "model.safetensors first (transformers: model.save_pretrained(DIR), whose "
                    "default is safetensors), or download a revision that has them")
  else:
    raise UserError(f"{folder} has no model.safetensors; pass a folder that save_pretrained or "
                    "launch/export_hf.py wrote")
  tensors = {}
  for shard in shards:
    try:
      tensors.update(load_file(str(folder / shard)))
    except Exception as e:  # a damaged file, or a dtype numpy lacks (bfloat16)
      raise UserError(f"could not read {folder / shard} ({' '.join(str(e).split())[:120]}); "
                      "save the model again in float32 or float16") from None
  return tensors


def read(folder: Path, where: str | None = None) -> Imported:
  """The model of a Hugging Face folder (see the module docstring)."""
  where = where or str(folder)
  config_path = folder / "config.json"
  if not config_path.is_file():
    raise UserError(f"{where} has no config.json; pass a folder that save_pretrained or "
                    "launch/export_hf.py wrote, or a Hub id such as gpt2")
  try:
    config = json.loads(config_path.read_text())
  except ValueError:
    raise UserError(f"{config_path} is not JSON; save the model again") from None
  fields, vocab_size = hf_config.model_fields(config, where)
  tok = hf_tokenizer.from_folder(folder)
  if tok.vocab_size != vocab_size:
    raise UserError(f"{where}'s tokenizer has {tok.vocab_size} tokens but its model "
                    f"{vocab_size} (a padded vocabulary?); only a model whose vocabulary is "
                    "its tokenizer's imports")
  cfg = ModelConfig(vocab_size=vocab_size, **fields)
  tensors = _tensors(folder)
  native = config.get("model_type") == "gpt2"
  if native:
    params = hf_weights.from_gpt2(tensors, cfg, where)
  else:
    shapes = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(0)))
    params = hf_weights.from_minigpt(tensors, shapes, where)
  return Imported(fields, params, tok, native)
