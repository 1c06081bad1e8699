"""What every launcher does first: `import _preamble` (launch/ is on sys.path for its scripts).

The launchers import `minigpt_jax` and `configs` as an installed package
(`pip install -e .`, which `pip install -r requirements.txt` does); without
it, this ends the run with one line naming the install command. `start(__name__)`
then restarts a launcher run as a program with glibc's huge-page tunable,
once, before JAX loads (faster XLA:CPU buffers, see minigpt_jax/support/hugepages.py);
it does nothing when the launcher is imported.
"""

import sys

try:
  import minigpt_jax  # noqa: F401
except ImportError:
  print("error: the minigpt_jax package is not installed in this Python; run "
        "`pip install -r requirements.txt` (or `pip install -e .`) in the repo's root",
        file=sys.stderr)
  sys.exit(2)


def start(module_name: str, huge_pages: bool = True) -> None:
  if module_name == "__main__" and huge_pages:
    from minigpt_jax.support import hugepages
    hugepages.restart_with_huge_pages()
