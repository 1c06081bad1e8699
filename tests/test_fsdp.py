"""FSDP: data x fsdp meshes against one device, sharded state, checkpoints across meshes.

The meshes run in one subprocess of 4 CPU devices (XLA_FLAGS), in-process
one after the other (`_runs`, run as this file's main), so JAX starts once;
a mesh of 1 device in it is the reference. Tests read its workdirs.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_FLAGS, config_from_flags
from test_parallel import ROOT, _assert_same_losses, _env, _losses, _two_processes

MESHES = {"4x1": (4, 1), "2x2": (2, 2), "1x4": (1, 4)}


def _train(workdir, steps, data=1, fsdp=1, init_from=""):
  from minigpt_jax import loop
  config = config_from_flags(TINY_FLAGS)
  config.train.update(steps=steps, init_from=str(init_from))
  config.parallel.update(data=data, fsdp=fsdp)
  return loop.train_and_evaluate(config, workdir, log=lambda line: None, show_progress=False)


def _runs(out: Path) -> None:
  """Every workdir the tests read, in one process of 4 devices."""
  _train(out / "one", 10)
  shutil.copytree(out / "one", out / "one_then_2x2")
  _train(out / "one", 20)  # the reference, resumed on its own mesh
  _train(out / "one_then_2x2", 20, 2, 2)
  for name, (data, fsdp) in MESHES.items():
    _train(out / name, 10, data, fsdp)
    if name == "1x4":
      shutil.copytree(out / name, out / "1x4_then_one")
      _train(out / "1x4_then_one", 20)
    _train(out / name, 20, data, fsdp)
  for name, (data, fsdp) in {"transfer_one": (1, 1), "transfer_1x4": (1, 4)}.items():
    _train(out / name, 10, data, fsdp, init_from=out / "one")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("fsdp")
  result = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=_env(4),
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return out


@pytest.mark.parametrize("mesh", MESHES)
def test_a_mesh_of_4_devices_matches_one_device(runs, mesh):
  """20 steps with dropout, evaluated at 0, 10 and 20, resumed at 10: losses to 1e-5."""
  _assert_same_losses(_losses(runs / mesh), _losses(runs / "one"))
  summary = json.loads((runs / mesh / "summary.json").read_text())
  assert summary["mesh"] == dict(zip(("data", "fsdp"), MESHES[mesh]))


def test_fsdp_splits_params_and_optimizer_state(runs):
  """At fsdp 4 a device holds about a quarter of the params and AdamW's moments."""
  held = {name: json.loads((runs / name / "summary.json").read_text())["state_bytes_per_device"]
          for name in ("one", "2x2", "1x4")}
  assert 0.25 <= held["1x4"] / held["one"] < 0.3, held
  assert 0.5 <= held["2x2"] / held["one"] < 0.55, held


def test_a_run_starts_from_another_runs_weights_split_over_fsdp(runs):
  """init_from grafts the source's params shard by shard: the losses of one device."""
  _assert_same_losses(_losses(runs / "transfer_1x4"), _losses(runs / "transfer_one"))
  assert json.loads((runs / "transfer_1x4" / "summary.json").read_text())["init_from"]["step"] == 20


@pytest.mark.parametrize("workdir", ["one_then_2x2", "1x4_then_one"])
def test_a_checkpoint_resumes_on_another_mesh(runs, workdir):
  """1 device -> (2, 2), and fsdp 4 -> 1 device, at step 10: the losses of an unbroken run."""
  _assert_same_losses(_losses(runs / workdir), _losses(runs / "one"))


def test_one_device_samples_and_evaluates_an_fsdp_checkpoint(runs):
  import jax
  from minigpt_jax import sampling
  from minigpt_jax.support import restore
  from minigpt_jax.tools import evaluate
  loaded = restore.load(runs / "1x4", step=20)
  fsdp_val = [r["val_loss"] for r in map(json.loads, (runs / "1x4" / "metrics.jsonl")
                                         .read_text().splitlines())
              if r["kind"] == "eval" and r["step"] == 20][0]
  assert evaluate.evaluate(runs / "1x4", step=20)["val_loss"] == pytest.approx(
      fsdp_val, abs=1e-5)  # the sampled estimate's batches of step 20, on one device
  generate = sampling.make_generate(loaded.model_cfg)
  out = generate(loaded.params, np.zeros((1, 1), np.int32), jax.random.PRNGKey(0), 8)
  assert out.shape == (1, 8)


@pytest.mark.multiprocess
def test_two_processes_with_fsdp_match_one_device_and_resume_on_one(runs, tmp_path):
  """2 processes x 2 devices at fsdp 2 (fsdp within a process), saved at 10 and resumed by
  them to 20; the step-10 copy resumed by this process on 1 device: both as unbroken."""
  fsdp = ["--config.parallel.fsdp=2"]
  _two_processes(tmp_path / "two", 10, *fsdp, devices=2)
  shutil.copytree(tmp_path / "two", tmp_path / "two_then_one")
  _two_processes(tmp_path / "two", 20, *fsdp, devices=2)
  _assert_same_losses(_losses(tmp_path / "two"), _losses(runs / "one"))
  assert json.loads((tmp_path / "two" / "summary.json").read_text())["mesh"] == {
      "data": 2, "fsdp": 2}
  _train(tmp_path / "two_then_one", 20)
  _assert_same_losses(_losses(tmp_path / "two_then_one"), _losses(runs / "one"))


def _gpus() -> int:
  import jax
  return jax.device_count() if jax.default_backend() == "gpu" else 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 or more GPUs (the fsdp tests on real devices)")
def test_fsdp_on_gpus_matches_one_gpu_and_moves_between_meshes(tmp_path):
  """On real GPUs, in float32 products (no TF32): fsdp over 2 GPUs and data x fsdp over all
  of them match one GPU, and checkpoints move from 1 GPU to fsdp 2 and back."""
  import jax
  with jax.default_matmul_precision("float32"):
    _train(tmp_path / "one", 10)
    shutil.copytree(tmp_path / "one", tmp_path / "one_then_fsdp2")
    _train(tmp_path / "one", 20)
    _train(tmp_path / "one_then_fsdp2", 20, 1, 2)
    _train(tmp_path / "fsdp2", 10, 1, 2)
    shutil.copytree(tmp_path / "fsdp2", tmp_path / "fsdp2_then_one")
    _train(tmp_path / "fsdp2", 20, 1, 2)
    _train(tmp_path / "fsdp2_then_one", 20)
    meshes = ["one_then_fsdp2", "fsdp2", "fsdp2_then_one"]
    if jax.device_count() in (4, 8):  # data x fsdp over all of them; the batch of 8 divides
      _train(tmp_path / "all", 20, -1, 2)
      meshes.append("all")
  for name in meshes:
    _assert_same_losses(_losses(tmp_path / name), _losses(tmp_path / "one"))


if __name__ == "__main__":
  _runs(Path(sys.argv[1]))
