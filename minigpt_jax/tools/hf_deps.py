"""The optional Hugging Face packages, imported only where a launcher needs them.

Training and sampling never import them; launch/export_hf.py and
launch/import_hf.py call `require` first, so a missing package is one line
naming the install command, not a traceback.

Owns: `require`, `INSTALL`. May import: errors.
"""

import importlib

from minigpt_jax.errors import UserError

INSTALL = 'pip install -e ".[hf]"'


def require(module: str, who: str):
  """The module, or a UserError saying what to install."""
  try:
    return importlib.import_module(module)
  except ImportError:
    package = module.split(".")[0].replace("_", "-")
    raise UserError(f"{who} needs the {package} package, which is not installed; run "
                    f"{INSTALL} (or pip install {package}) in the repo's root") from None
