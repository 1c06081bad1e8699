"""Shared fixtures: local corpora, an isolated compile cache, a tiny config, a one-line-error check.

Run from the repo root (`python -m pytest -q tests`), which puts the root on
sys.path for this process. The launchers the tests start as subprocesses
import the package from PYTHONPATH, set here to the same root, so they run
the code under test even where another copy of the package is installed.
"""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
# Corpora: $MINIGPT_DATA_DIR when set (CI: local copies), else each
# corpus's pinned download (minigpt_jax/data.py), kept in the user's cache.
# Compiled programs persist across tests and the CLI subprocesses they start,
# in a cache of their own, whatever $MINIGPT_CACHE_DIR the user has.
_CACHE = str(ROOT / ".pytest_cache" / "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def assert_one_line_error(result, *needles):
  """A launcher's user error: exit status 2 and one `error: ...` line holding every needle."""
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


# A tiny frost_cpu run as launcher flags, for tests that start launch/train.py.
TINY_FLAGS = ["--config=configs/frost_cpu.py", "--config.model.block_size=16",
              "--config.model.n_embed=32", "--config.model.n_heads=2",
              "--config.model.n_layer=2", "--config.model.dropout=0.1",
              "--config.train.batch_size=8", "--config.train.eval_iters=4",
              "--config.train.eval_interval=10", "--config.train.log_every=5",
              "--config.train.sample_tokens=0"]


def config_from_flags(flags):
  """The config that `--config=configs/NAME.py --config.a.b=v ...` builds, in-process."""
  import importlib
  name = Path(flags[0].split("=", 1)[1]).stem
  config = importlib.import_module(f"configs.{name}").get_config()
  for flag in flags[1:]:
    field, value = flag[len("--config."):].split("=", 1)
    section, key = field.split(".")
    config[section][key] = type(config[section][key])(value)
  return config


def tiny(config):
  """Shrinks a real config to something that compiles and runs in seconds."""
  config.model.update(block_size=16, n_embed=32, n_heads=2, n_layer=2)
  config.train.update(batch_size=8, steps=40, eval_interval=20, eval_iters=4,
                      log_every=10, sample_tokens=0,
                      # frost_cpu's several steps per call still run, within a log interval
                      steps_per_dispatch=min(config.train.steps_per_dispatch, 10))
  config.checkpoint.keep = 2
  return config


def frost_ids_and_vocab():
  """Frost's whole text as ids on device, and its vocabulary size."""
  import jax.numpy as jnp
  from minigpt_jax import data
  text = data.read_text(data.resolve_corpus("frost"))
  tokenizer = data.CharTokenizer.from_text(text)
  return jnp.asarray(tokenizer.encode(text)), tokenizer.vocab_size


@pytest.fixture
def tiny_config():
  """configs/frost_cpu.py on frost, shrunk: 2 layers, width 32, 40 steps."""
  from configs import frost_cpu
  return tiny(frost_cpu.get_config())


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "multiprocess: starts several JAX processes on 127.0.0.1 (CI runs it; "
      "skip locally with -m 'not multiprocess')")
  config.addinivalue_line(
      "markers", "gpu: needs a GPU and skips elsewhere, saying so; run the tier with "
      "`python -m pytest -q -m gpu tests` (docs/scale.md)")
