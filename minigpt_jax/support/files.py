"""Small, safe file writes for run folders: atomic text and strict JSON, one-line write errors.

No JAX here, so readers of a workdir (plot.py) stay cheap to import.

Owns: `write_text`, `write_json`, `finite_or_none`, `write_error`. May import: errors.
"""

import json
import math
import os
from pathlib import Path

from minigpt_jax.errors import UserError


def finite_or_none(obj):
  """`obj` with every NaN/inf float replaced by None: strict JSON has no NaN."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_or_none(v) for v in obj]
  return obj


def write_text(path: Path, text: str) -> None:
  """Atomic write: a kill mid-write leaves the old file, never half a file.

  A write that fails (a full disk, a read-only folder) removes its temporary
  file and raises UserError naming the path and the cause.
  """
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise write_error(path, e) from None


def write_json(path: Path, obj) -> None:
  """`write_text` of strict JSON: non-finite floats become null."""
  write_text(path, json.dumps(finite_or_none(obj), indent=2, sort_keys=True,
                              allow_nan=False) + "\n")


def write_error(path, error: OSError) -> UserError:
  return UserError(f"could not write {path}: {error.strerror or error}; free disk space "
                   "or make the folder writable, then rerun the same command to resume")
