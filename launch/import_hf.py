"""Import a Hugging Face GPT-2-family model into a workdir that sample.py, evaluate.py and train.py read.

  python launch/import_hf.py --model=hf/frost_t4 --workdir=runs/frost_t4_back
  python launch/import_hf.py --model=gpt2 --workdir=runs/gpt2 --text=input.txt

--model is a folder that save_pretrained or launch/export_hf.py wrote, or a
Hub id (gpt2, distilgpt2, ...) that huggingface_hub downloads: config.json,
the tokenizer and the safetensors weights only (a pytorch_model.bin is
refused: unpickling can run code). GPT-2's gelu_new is
config.model.activation="gelu_tanh". The checkpoint is saved at step 0 with
the model's tokenizer (GPT-2's byte-level BPE, or our characters).

--text=FILE tokenizes that text with the model's tokenizer into WORKDIR/tokens
(config.data.tokens), so launch/evaluate.py scores it and launch/train.py
fine-tunes on it: python launch/train.py --config=WORKDIR/config.py
--workdir=WORKDIR (config.py reads the config.json written beside it).
--config gives the training settings (default: minigpt_jax/config.py's).
Needs safetensors (and huggingface_hub for a Hub id): pip install -e ".[hf]".
See docs/huggingface.md.
"""

import sys
from pathlib import Path

import _preamble  # noqa: F401  first: the installed package, or one error line

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from minigpt_jax import config as config_lib, prepare  # noqa: E402
from minigpt_jax.support import cli, files  # noqa: E402
from minigpt_jax.tools import hf_deps, hf_import, imported  # noqa: E402
from minigpt_jax.model import count_params  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "A Hugging Face folder, or a Hub id such as gpt2.")
_WORKDIR = flags.DEFINE_string("workdir", None, "New run folder for the imported checkpoint.")
_TEXT = flags.DEFINE_string("text", None, "A UTF-8 text to tokenize with the model's tokenizer "
                            "into WORKDIR/tokens, for evaluate.py and fine-tuning.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file of the training settings (default: the package's defaults).")
flags.mark_flags_as_required(["model", "workdir"])

# A config file that train.py takes, reading the config.json beside it.
_CONFIG_PY = '''"""The config of this run, as launch/import_hf.py wrote it into config.json beside this file.

  python launch/train.py --config={workdir}/config.py --workdir={workdir}
"""

import json
from pathlib import Path

import ml_collections


def get_config():
  return ml_collections.ConfigDict(json.loads((Path(__file__).parent / "config.json").read_text()))
'''


def main():
  hf_deps.require("safetensors.numpy", "launch/import_hf.py")
  workdir = Path(_WORKDIR.value)
  imported.check_new(workdir)
  folder = hf_import.locate(_MODEL.value)
  model = hf_import.read(folder, _MODEL.value)
  config = _CONFIG.value or config_lib.get_config()
  config.model.update(model.fields)
  # float32 unless asked otherwise: transformers' greedy text, whatever "auto" would pick
  config.model.dtype = imported.imported_dtype(config.model.dtype)
  tok = model.tokenizer
  config.data.update(tokenizer=tok.kind, vocab_size=tok.vocab_size if tok.kind == "bpe" else 0)
  config_lib.validate(config)
  if _TEXT.value:
    text = Path(_TEXT.value)
    prepare.check_source(text)
    tokens = (workdir / "tokens").resolve()
    prepare.prepare(prepare.Source(text, str(text)), tokens, train_fraction=
                    config.data.train_fraction, tokenizer=tok)
    config.data.tokens = str(tokens)
  imported.save_step0(config, tok, model.params, workdir, _MODEL.value)
  files.write_text(workdir / "config.py", _CONFIG_PY.format(workdir=workdir))
  fine_tune = (f"; fine-tune with python launch/train.py --config={workdir}/config.py "
               f"--workdir={workdir}" if _TEXT.value else "")
  print(f"imported {_MODEL.value} ({'gpt2' if model.native else 'minigpt'}, "
        f"{count_params(model.params):,} params, {tok.describe()}) into {workdir} at step 0; "
        f"sample with python launch/sample.py --workdir={workdir}{fine_tune}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
