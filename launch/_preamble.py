"""What every launcher does first: `import _preamble` (launch/ is on sys.path for its scripts).

It puts the repo on sys.path, so `minigpt_jax` and `configs` import from a
checkout. `start(__name__)` then restarts a launcher run as a program with
glibc's huge-page tunable, once, before JAX loads (faster XLA:CPU buffers,
see minigpt_jax/hugepages.py); it does nothing when the launcher is imported.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def start(module_name: str, huge_pages: bool = True) -> None:
  if module_name == "__main__" and huge_pages:
    from minigpt_jax import hugepages
    hugepages.restart_with_huge_pages()
