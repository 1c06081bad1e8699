"""Export a trained run to a folder that Hugging Face transformers loads and generates from.

  python launch/export_hf.py --workdir=runs/frost_t4 --out=hf/frost_t4
  python launch/export_hf.py --config=configs/frost_t4.py --best --out=hf/frost_t4_best

The folder holds model.safetensors, config.json, generation_config.json,
tokenizer.json, tokenizer_config.json and a model card (README.md). A model
GPT-2's architecture holds (learned positions, a head without a bias) loads
as `model_type: "gpt2"`; any other (the lecture's head with a bias, rotary
positions, the bigram) also gets modeling_minigpt.py and loads with
`trust_remote_code=True`. Needs safetensors: pip install -e ".[hf]".
See docs/huggingface.md.
"""

import shlex
import sys
from pathlib import Path

import _preamble  # noqa: F401  first: the installed package, or one error line

from absl import flags  # noqa: E402

from minigpt_jax.errors import UserError  # noqa: E402
from minigpt_jax.support import cli  # noqa: E402

_WORKDIR, _CONFIG, _STEP, _BEST = cli.define_checkpoint_flags(
    "Export the checkpoint with the lowest val loss.")
_OUT = flags.DEFINE_string("out", None, "New (or empty) folder to write.")
flags.mark_flag_as_required("out")


def main():
  from minigpt_jax.tools import hf_deps
  hf_deps.require("safetensors.numpy", "launch/export_hf.py")
  if _BEST.value and _STEP.value is not None:
    raise UserError("--step and --best pick different checkpoints; pass only one")
  workdir = cli.run_folder(_WORKDIR.value)
  from minigpt_jax.tools import hf_export
  command = "python " + shlex.join(["launch/export_hf.py", *sys.argv[1:]])
  done = hf_export.export(workdir, Path(_OUT.value), _STEP.value, _BEST.value, command)
  how = ("AutoModelForCausalLM.from_pretrained(DIR)" if done.native else
         "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)")
  print(f"exported step {done.step} of {workdir} to {done.out} "
        f"({'gpt2' if done.native else 'minigpt, with modeling_minigpt.py'}); "
        f"load it with {how}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
