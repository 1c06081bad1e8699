"""JAX's persistent compilation cache for the launchers: compile once per machine, not per run.

A launcher's start-up is mostly XLA compiling the same few programs (the
train step, the KV decoder) that the last run compiled; with the cache on,
a second run loads them from disk instead (figures: docs/speed.md, "Compile cache").

Where: `$MINIGPT_CACHE_DIR`, else `$XDG_CACHE_HOME/minigpt_jax/xla` (by
default `~/.cache/minigpt_jax/xla`); JAX's own `JAX_COMPILATION_CACHE_DIR`
wins over both, as the tests set it. `--compile_cache=false` turns it off.

Thresholds: JAX caches only programs that took 1 s or more to compile. Ours
mostly take 0.1-3 s on a CPU, and loading one from disk costs milliseconds,
so the minimum is 0.05 s (below it, the tiny helper programs JAX jits for
array creation would cost a file each for no gain), and there is no size
minimum. JAX's `JAX_PERSISTENT_CACHE_MIN_*` environment variables win.

Multi-process runs: JAX itself writes cache entries from process 0 only
(`jax._src.compiler._cache_write`), and the launchers join the run
(`parallel.initialize_distributed`) before anything compiles, so the other
processes only read (tests/test_parallel.py gives each process a folder of
its own and finds process 1's empty). On an x86 CPU, XLA:CPU checks an
entry's machine features when it loads one; tests/test_launch.py checks
that the KV decoder's entry is a hit on the second run.

Owns: turning the cache on or off, and its folder. May import: the standard
library; it sets JAX's options through `sys.modules` or the environment.
"""

import os
import sys
from pathlib import Path

DIR_ENV = "MINIGPT_CACHE_DIR"
JAX_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
MIN_COMPILE_TIME_SECS = 0.05
_MIN_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_MIN_SIZE_ENV = "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"


def default_dir(environ=os.environ) -> Path:
  """The cache folder: JAX's variable, ours, then the user's cache folder."""
  for name in (JAX_DIR_ENV, DIR_ENV):
    if environ.get(name):
      return Path(environ[name]).expanduser()
  base = environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base).expanduser() / "minigpt_jax" / "xla"


def _set(settings: dict) -> None:
  """JAX options now if JAX is loaded, else as the environment variables it reads on import."""
  jax = sys.modules.get("jax")
  for name, value in settings.items():
    if jax is not None:
      jax.config.update(name, value)
    else:  # a launcher that may never load JAX (plot.py) need not pay for its import
      os.environ[name.upper()] = str(value)


def enable(path: str | Path | None = None) -> Path:
  """Turns the persistent cache on in `path` (default: `default_dir()`); call before any compile."""
  path = Path(path) if path is not None else default_dir()
  settings = {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": str(path)}
  if _MIN_TIME_ENV not in os.environ:
    settings["jax_persistent_cache_min_compile_time_secs"] = MIN_COMPILE_TIME_SECS
  if _MIN_SIZE_ENV not in os.environ:
    settings["jax_persistent_cache_min_entry_size_bytes"] = -1  # -1: no minimum
  _set(settings)
  return path


def disable() -> None:
  """Turns the cache off, even where JAX_COMPILATION_CACHE_DIR asks for it."""
  _set({"jax_enable_compilation_cache": False})
