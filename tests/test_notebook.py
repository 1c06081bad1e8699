"""launch/colab.ipynb: committed clean, pins in step, and runs end to end (tiny, 20 steps).

The run executes every cell in a python3 kernel on this interpreter, from the
repo root, with the parameters cell overridden the way papermill would.
"""

import ast
import importlib.util
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab.ipynb"
TINY_FLAGS = ("--config.train.eval_interval=10 --config.train.eval_iters=2 "
              "--config.model.n_embed=32 --config.model.n_layer=1 "
              "--config.model.block_size=32 --config.train.batch_size=8 "
              "--config.train.sample_tokens=0")


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _cell(nb, cell_id):
  return next(c for c in nb.cells if c.get("id") == cell_id)


def test_notebook_is_committed_without_outputs_and_opens_with_the_badge():
  nb = _read()
  nbformat.validate(nb)
  assert "colab-badge.svg" in nb.cells[0].source
  assert "launch/colab.ipynb" in nb.cells[0].source
  assert nb.metadata.kernelspec.name == "python3"
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"cell {cell.id} has outputs: clear them before committing")
  assert 'REPO_URL = "https://github.com/<owner>/minigpt_jax"' in _cell(nb, "repo-url").source


def test_install_cell_pins_jax_as_the_package_does():
  dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  jax_range = next(d[len("jax"):] for d in dependencies if re.match(r"jax[<>=!~]", d))
  text = "\n".join(cell.source for cell in _read().cells)
  pins = re.findall(r"jax\[cuda12\]([^\"'\s]+)", text)
  assert pins, "the notebook no longer installs jax[cuda12]; update this test"
  assert set(pins) == {jax_range}, f"notebook pins {pins}, pyproject.toml has jax{jax_range}"
  for name in ("requirements.txt", "pyproject.toml"):  # their GPU install hints
    assert set(re.findall(r"jax\[cuda12\]([^\"'\s]+)", (ROOT / name).read_text())) <= {jax_range}


@pytest.fixture
def kernel_on_this_python(tmp_path, monkeypatch):
  """A python3 kernel spec that runs sys.executable, whatever else is installed."""
  pytest.importorskip("ipykernel")
  from ipykernel.kernelspec import install
  from jupyter_client.kernelspec import KernelSpecManager

  prefix = tmp_path / "jupyter"
  install(kernel_name="python3", prefix=str(prefix))
  monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
  assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable
  return "python3"


def _parameters(nb, overrides):
  """Appends assignments to the tagged cell, after checking each name is one of its own."""
  cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  names = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
           for t in node.targets}
  assert set(overrides) <= names, f"not in the parameters cell: {set(overrides) - names}"
  cell.source += "\n# tests/test_notebook.py\n" + "".join(
      f"{k} = {v!r}\n" for k, v in overrides.items())


def _text(cell):
  return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def test_notebook_runs_end_to_end(tmp_path, monkeypatch, kernel_on_this_python):
  nbclient = pytest.importorskip("nbclient")
  if os.environ.get("MINIGPT_DATA_DIR"):  # CI passes a path relative to the repo root
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(Path(os.environ["MINIGPT_DATA_DIR"]).resolve()))
  workdir = tmp_path / "runs" / "frost_t4"
  nb = _read()
  _parameters(nb, {"WORKDIR": str(workdir), "STEPS": 20, "EXTRA_FLAGS": TINY_FLAGS,
                   "NUM_TOKENS": 40,
                   # Keep the graceful-skip path where tensorboard is missing (CI);
                   # elsewhere don't leave a TensorBoard server behind.
                   "WATCH_TENSORBOARD": importlib.util.find_spec("tensorboard") is None})
  nbclient.NotebookClient(nb, kernel_name=kernel_on_this_python, timeout=300,
                          resources={"metadata": {"path": str(ROOT)}}).execute()

  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.execution_count is not None, cell.id
      assert not [o for o in cell.outputs if o.output_type == "error"], cell.id
  assert "installing nothing" in _text(_cell(nb, "install"))
  assert re.search(r"backend cpu", _text(_cell(nb, "install")))
  assert re.search(r"TensorBoard|tensorboard", _text(_cell(nb, "tensorboard")))
  train = _text(_cell(nb, "train"))
  assert re.search(r"step 20: train_loss \d+\.\d+, val_loss \d+\.\d+", train), train[-2000:]
  assert re.search(r"done: step 20, .* val loss \d+\.\d+", train)
  assert (workdir / "summary.json").is_file()
  png = workdir / "curves.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert any("image/png" in o.get("data", {}) for o in _cell(nb, "plot").outputs)
  sample = _text(_cell(nb, "sample"))
  assert "sampling 1 x 40 characters from step" in sample
  assert re.search(r"^Two roads diverged(.{40})", sample, re.M | re.S), sample  # prompt + 40
