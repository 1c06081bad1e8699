"""The command-line entry points, run as a user would: train, kill, resume, sample, errors."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import assert_one_line_error
from minigpt_jax.support import checkpoint, restore

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.model.block_size=16", "--config.model.n_embed=32", "--config.model.n_heads=2",
        "--config.model.n_layer=2", "--config.train.batch_size=8", "--config.train.eval_iters=4",
        "--config.train.log_every=10", "--config.checkpoint.keep=2"]


def _cli(script, *args, check=True, cwd=ROOT, **kwargs):
  result = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, **kwargs)
  if check and result.returncode != 0:
    raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-3000:]}")
  return result


def _train_args(workdir, steps, eval_interval, *extra):
  return ["--config=configs/frost_cpu.py", f"--workdir={workdir}",
          f"--config.train.steps={steps}", f"--config.train.eval_interval={eval_interval}",
          *TINY, *extra]


def _evals(workdir):
  records = map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())
  return [(r["step"], r["train_loss"], r["val_loss"]) for r in records if r["kind"] == "eval"]


def _params(workdir, step):
  return restore.load(workdir, step=step).params


def _assert_same_params(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    assert np.array_equal(x, y)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny model trained through the CLI, uninterrupted: 300 steps, eval every 20."""
  workdir = tmp_path_factory.mktemp("runs") / "tiny"
  result = _cli("train.py", *_train_args(workdir, 300, 20, "--config.train.sample_tokens=50"))
  return workdir, result


def test_train_cli_writes_summary_checkpoints_and_a_sample(trained):
  workdir, result = trained
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == 300 and summary["val_loss"] < math.log(summary["vocab_size"]) - 1
  assert "step 300: train_loss" in result.stderr  # one log line per evaluation
  assert "step/s" in result.stderr  # the progress bar
  assert len(result.stdout.strip()) > 10  # the sample printed at the end
  kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept[-2:] == [280, 300] and len(kept) <= 3


def test_kill_9_mid_run_then_rerun_resumes_bit_identically(trained, tmp_path):
  reference, _ = trained
  workdir = tmp_path / "killed"
  args = _train_args(workdir, 300, 20, "--config.train.sample_tokens=50")
  proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *args], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not (workdir / "checkpoints" / "60").exists():
    assert proc.poll() is None and time.time() < deadline, "run ended before step 60"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "summary.json").exists(), "killed too late to test a resume"
  result = _cli("train.py", *args)
  assert "resuming from step" in result.stderr
  assert _evals(workdir) == _evals(reference)  # no step lost, none twice, same losses
  _assert_same_params(_params(workdir, 300), _params(reference, 300))
  assert result.stdout == trained[1].stdout  # the same sample


def test_ctrl_c_saves_then_the_same_command_resumes(trained, tmp_path):
  reference, _ = trained
  workdir = tmp_path / "interrupted"
  args = _train_args(workdir, 300, 100)
  proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not (workdir / "metrics.jsonl").exists() or '"train"' not in (
      workdir / "metrics.jsonl").read_text():
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr[-2000:]
  assert "checkpoint saved" in stderr and "Traceback" not in stderr
  steps = checkpoint.manager(workdir).all_steps()
  assert steps and steps[-1] < 300
  _cli("train.py", *args)
  _assert_same_params(_params(workdir, 300), _params(reference, 300))


def test_sample_cli_prints_only_text_and_is_reproducible(trained):
  workdir, _ = trained
  args = [f"--workdir={workdir}", "--prompt=The ", "--num_tokens=40", "--seed=3"]
  first, again = _cli("sample.py", *args), _cli("sample.py", *args)
  assert first.stdout == again.stdout
  assert first.stdout.startswith("The ") and len(first.stdout) == len("The ") + 40 + 1
  other = _cli("sample.py", *args[:-1], "--seed=4")
  assert other.stdout != first.stdout
  two = _cli("sample.py", f"--workdir={workdir}", "--num_tokens=30", "--num_samples=2",
             "--best", "--top_k=1", "--temperature=0.8")
  assert two.stdout.count("---------------") == 1
  greedy = two.stdout.split("\n---------------\n")
  assert greedy[0] == greedy[1].rstrip("\n")  # top_k=1 is greedy: both rows agree


def test_sample_cli_errors(trained, tmp_path):
  workdir, _ = trained
  assert_one_line_error(_cli("sample.py", f"--workdir={workdir}", "--prompt=Zé€ab", check=False),
                  "outside", "é€")
  assert_one_line_error(_cli("sample.py", f"--workdir={tmp_path}", check=False), "train first")
  assert_one_line_error(_cli("sample.py", f"--workdir={workdir}", "--step=7", check=False),
                  "available steps")
  assert_one_line_error(_cli("sample.py", f"--workdir={workdir}", "--temperature=0", check=False),
                  "--temperature")


def test_train_cli_errors_are_one_line(tmp_path):
  empty, latin1 = tmp_path / "empty.txt", tmp_path / "latin1.txt"
  empty.write_text("")
  latin1.write_bytes("caf\xe9 ".encode("latin-1") * 100)
  cases = [
      (["--config.model.n_heads=3"], ["config.model.n_embed", "n_heads"]),
      (["--config.data.corpus=nope"], ["config.data.corpus"]),
      (["--config.model.name=rnn"], ["config.model.name"]),
      (["--config.train.batch_size=0"], ["config.train.batch_size"]),
      (["--config.model.block_size=6000"], ["config.model.block_size", "val split"]),
      ([f"--config.data.path={tmp_path / 'missing.txt'}"], ["does not exist"]),
      ([f"--config.data.path={empty}"], ["is empty"]),
      ([f"--config.data.path={latin1}"], ["not UTF-8"]),
      (["--config.train.nope=1"], ["--config.train.nope=1", "no such config field"]),
      (["--config.train.steps=many"], ["--config.train.steps"]),
  ]
  for extra, needles in cases:
    result = _cli("train.py", "--config=configs/frost_cpu.py", f"--workdir={tmp_path / 'w'}",
                  *extra, check=False)
    assert_one_line_error(result, *needles)
  assert_one_line_error(_cli("train.py", "--config=configs/nope.py", f"--workdir={tmp_path}",
                       check=False), "configs/nope.py")
  # An override makes ml_collections read the file while flags are parsed.
  assert_one_line_error(_cli("train.py", "--config=configs/nope.py", "--config.train.steps=3",
                       f"--workdir={tmp_path}", check=False), "configs/nope.py does not exist")


def test_the_bare_config_command_uses_runs_stem_resumes_and_samples(tmp_path):
  """The brief's command has no --workdir: the folder is runs/<config stem> in the current
  folder, the same command resumes there, and sample.py finds it from the config alone."""
  shutil.copytree(ROOT / "configs", tmp_path / "configs")
  env = dict(os.environ)
  if env.get("MINIGPT_DATA_DIR"):  # relative to the repo root, where pytest runs
    env["MINIGPT_DATA_DIR"] = str(Path(env["MINIGPT_DATA_DIR"]).resolve())
  args = ["--config=configs/frost_cpu.py", "--config.train.steps=20",
          "--config.train.eval_interval=20", "--config.train.sample_tokens=0", *TINY]
  first = _cli("train.py", *args, cwd=tmp_path, env=env)
  assert first.stderr.splitlines()[0].startswith("training from scratch in runs/frost_cpu:")
  assert (tmp_path / "runs" / "frost_cpu" / "summary.json").is_file()
  again = _cli("train.py", *args, cwd=tmp_path, env=env)
  assert again.stderr.splitlines()[0].startswith("resuming from step 20 in runs/frost_cpu:")
  sample = _cli("sample.py", "--config=configs/frost_cpu.py", "--num_tokens=10", cwd=tmp_path,
                env=env)
  assert "of runs/frost_cpu" in sample.stderr and len(sample.stdout) == 1 + 10 + 1
  assert_one_line_error(_cli("evaluate.py", cwd=tmp_path, env=env, check=False),
                        "--workdir", "--config")


def test_resuming_with_a_config_that_does_not_fit_names_the_field(trained):
  workdir, _ = trained
  result = _cli("train.py", *_train_args(workdir, 300, 20), "--config.model.n_layer=3",
                check=False)
  assert_one_line_error(result, "config.model.n_layer=2")


def test_an_empty_prompt_starts_from_a_newline(trained):
  workdir, _ = trained
  result = _cli("sample.py", f"--workdir={workdir}", "--num_tokens=20")
  assert result.stdout.startswith("\n") and len(result.stdout) == 1 + 20 + 1


def test_a_second_sample_loads_the_decoder_from_the_compile_cache(trained, tmp_path):
  """On by default in $MINIGPT_CACHE_DIR, JAX's thresholds lowered; this CPU accepts the
  entries it wrote (JAX logs each hit as a warning under JAX_LOG_COMPILES)."""
  workdir, _ = trained
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}  # conftest's cache
  env.update(MINIGPT_CACHE_DIR=str(tmp_path / "xla"), JAX_LOG_COMPILES="1")
  args = (f"--workdir={workdir}", "--num_tokens=20")
  cold = _cli("sample.py", *args, env=env)
  assert "Persistent compilation cache hit for 'jit__generate_kv'" not in cold.stderr
  assert any(p.name.startswith("jit__generate_kv-") for p in (tmp_path / "xla").iterdir())
  warm = _cli("sample.py", *args, env=env)
  assert "Persistent compilation cache hit for 'jit__generate_kv'" in warm.stderr
  assert warm.stdout == cold.stdout


def test_data_dir_env_is_respected(tmp_path):
  env = {**os.environ, "MINIGPT_DATA_DIR": str(tmp_path)}
  (tmp_path / "frost.txt").write_text("not the poems")
  result = _cli("train.py", "--config=configs/frost_cpu.py", f"--workdir={tmp_path / 'w'}",
                check=False, env=env)
  assert_one_line_error(result, "sha256", "frost.txt")


@pytest.mark.parametrize("script", ["train.py", "sweep.py", "sample.py", "benchmark.py",
                                    "plot.py", "import_torch.py"])
def test_help_prints_usage_and_flags(script):
  result = _cli(script, "--help")
  assert f"python launch/{script}" in result.stdout
  assert "--workdir" in result.stdout or "--config" in result.stdout
