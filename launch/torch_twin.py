"""Time the project's PyTorch twin of our GPT alone: one JSON line on stdout.

  python launch/torch_twin.py --corpus=shakespeare --preset=nanogpt_cpu --steps=2000 --eval_iters=200
  python launch/torch_twin.py --text=poems.txt --preset=frost_t4 --steps=20 --bf16

The model, its options and its flags are in minigpt_jax/tools/torch_twin.py
(`--help`); `launch/benchmark.py --compare-torch` runs it beside ours, built
from the same config. It needs PyTorch (a CPU build is enough:
`pip install -r tests/requirements.txt` installs it).
"""

import importlib.util
import sys

import _preamble  # noqa: F401  first: the installed package, or one error line

if importlib.util.find_spec("torch") is None:
  print("error: the PyTorch twin needs PyTorch, which is not installed here; "
        "pip install -r tests/requirements.txt", file=sys.stderr)
  sys.exit(2)

from minigpt_jax.tools import torch_twin  # noqa: E402

if __name__ == "__main__":
  torch_twin.main()
