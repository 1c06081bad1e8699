"""Data parallelism: 1 vs 4 devices, checkpoints across device counts, two processes.

Devices are faked on the CPU (XLA_FLAGS=--xla_force_host_platform_device_count=4)
in subprocesses, since a process fixes its device count when JAX starts.
"""

import json
import os
import random
import socket
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import TINY_FLAGS, assert_one_line_error
from minigpt_jax import config as config_lib, cpu_tricks, parallel
from minigpt_jax.errors import UserError
from minigpt_jax.tools import evaluate

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_FLAGS


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  return env


def _train(workdir, steps, devices=1, *extra, check=True):
  result = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "train.py"), *TINY, f"--workdir={workdir}",
       f"--config.train.steps={steps}", *extra],
      cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=300)
  if check and result.returncode != 0:
    raise AssertionError(f"train.py on {devices} devices failed:\n{result.stderr[-3000:]}")
  return result


def _losses(workdir):
  """(kind, step, loss...) of every record, in order."""
  records = map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())
  return [(r["kind"], r["step"], r.get("loss"), r.get("train_loss"), r.get("val_loss"))
          for r in records]


def _assert_same_losses(a, b):
  assert [r[:2] for r in a] == [r[:2] for r in b]
  values = lambda rs: [x for r in rs for x in r[2:] if x is not None]
  np.testing.assert_allclose(values(a), values(b), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The reference: 20 steps on one device, evaluated at 0, 10, 20."""
  workdir = tmp_path_factory.mktemp("parallel") / "one_device"
  _train(workdir, 20)
  return workdir


def test_the_batch_must_divide_by_the_data_shards():
  config = config_lib.get_config()
  config.train.batch_size = 6
  with pytest.raises(UserError, match=r"train.batch_size \(6\) does not divide by the 4 "
                                      r"devices of the 4 x 1 \(data x fsdp\) mesh; use a "
                                      r"multiple of 4"):
    config_lib.validate_for_devices(config, 4)
  config.parallel.data = 3
  assert config_lib.validate_for_devices(config, 4) == (3, 1)
  config.parallel.data = 8
  with pytest.raises(UserError, match=r"parallel.data is 8 but there are 4 devices"):
    config_lib.validate_for_devices(config, 4)


def test_a_mesh_that_does_not_fit_is_a_one_line_error():
  """fsdp must divide the devices (with data -1), the batch all of them; -1 is the rest."""
  config = config_lib.get_config()
  config.train.batch_size = 8
  config.parallel.update(data=-1, fsdp=2)
  assert config_lib.validate_for_devices(config, 4) == (2, 2)
  config.parallel.update(data=1, fsdp=-1)
  assert config_lib.validate_for_devices(config, 4) == (1, 4)
  config.parallel.update(data=-1, fsdp=3)
  with pytest.raises(UserError, match=r"parallel.fsdp \(3\) does not divide the 4 devices"):
    config_lib.validate_for_devices(config, 4)
  config.parallel.update(data=1, fsdp=3)  # 3 of the 4 devices: fsdp must divide them all
  with pytest.raises(UserError, match=r"parallel.fsdp \(3\) does not divide the 4 devices"):
    config_lib.validate_for_devices(config, 4)
  config.parallel.update(data=-1, fsdp=-1)
  with pytest.raises(UserError, match=r"both -1; set one of them"):
    config_lib.validate_for_devices(config, 4)
  config.parallel.update(data=2, fsdp=2)
  config.train.batch_size = 6
  with pytest.raises(UserError, match=r"batch_size \(6\) does not divide by the 4 devices of "
                                      r"the 2 x 2 \(data x fsdp\) mesh"):
    config_lib.validate_for_devices(config, 4)
  config.train.batch_size = 8
  config.parallel.update(data=1, fsdp=2)
  with pytest.raises(UserError, match=r"2 processes hold 4 devices"):
    config_lib.validate_for_devices(config, 4, num_processes=2)


def test_an_uneven_batch_fails_in_one_line_before_compiling(tmp_path):
  result = _train(tmp_path, 10, 4, "--config.train.batch_size=6", check=False)
  assert_one_line_error(result, "error: config.train.batch_size (6)")
  assert not (tmp_path / "checkpoints").exists()


def test_four_devices_then_one_match_one_device(one_device, tmp_path):
  """4 devices train to step 10 and save; 1 device resumes to 20: same losses."""
  _train(tmp_path, 10, 4)
  _train(tmp_path, 20, 1)
  _assert_same_losses(_losses(tmp_path), _losses(one_device))
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["devices"] == 1


def test_one_device_then_four_match_one_device(one_device, tmp_path):
  """1 device saves at step 10; 4 devices resume to 20: same losses."""
  _train(tmp_path, 10, 1)
  _train(tmp_path, 20, 4)
  _assert_same_losses(_losses(tmp_path), _losses(one_device))
  assert json.loads((tmp_path / "summary.json").read_text())["devices"] == 4


def test_four_devices_of_two_micro_batches_each_match_one_device(one_device, tmp_path):
  """Gradient accumulation on several devices: the same dropout masks, the same losses."""
  _train(tmp_path, 20, 4, "--config.train.grad_accum_steps=2")
  _assert_same_losses(_losses(tmp_path), _losses(one_device))


def test_cpu_devices_flag_matches_one_device(one_device, tmp_path):
  """--cpu_devices=2 splits the CPU without XLA_FLAGS; one step per call: same losses."""
  _train(tmp_path, 20, 1, "--cpu_devices=2", "--config.train.steps_per_dispatch=1")
  _assert_same_losses(_losses(tmp_path), _losses(one_device))
  assert json.loads((tmp_path / "summary.json").read_text())["devices"] == 2


def test_cpu_devices_after_jax_started_is_a_one_line_error():
  jax.devices()  # JAX has started in this process
  with pytest.raises(UserError, match=r"--cpu_devices came after JAX had started"):
    parallel.set_cpu_devices(2)
  with pytest.raises(UserError, match=r"--cpu_devices is 0; use a positive integer"):
    parallel.set_cpu_devices(0)


def test_only_several_cpu_devices_wait_for_each_call():
  """Queued calls over several CPU devices can deadlock XLA's all-reduce."""
  assert not cpu_tricks.wait_each_call(None)
  assert not cpu_tricks.wait_each_call(parallel.make_mesh(1))
  two_cpus = types.SimpleNamespace(devices=np.array(jax.devices("cpu")[:1] * 2))
  assert cpu_tricks.wait_each_call(two_cpus)


def _free_port(candidates=(0,)) -> int:
  """The first of `candidates` that binds on 127.0.0.1 (0: any the OS picks)."""
  for port in candidates:
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return s.getsockname()[1]
  raise RuntimeError("no free port")


def _two_processes(workdir, steps, *extra, caches=None, devices=1):
  """train.py as two processes of `devices` each (jax.distributed on 127.0.0.1): outputs."""
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, str(ROOT / "launch" / "train.py"), *TINY, f"--workdir={workdir}",
       f"--config.train.steps={steps}", f"--coordinator_address={address}",
       "--num_processes=2", f"--process_id={i}", *extra],
      cwd=ROOT, env={**_env(devices), **({"JAX_COMPILATION_CACHE_DIR": str(caches[i])} if caches
                                   else {})},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{err[-3000:]}"
  return outputs


@pytest.mark.multiprocess
@pytest.mark.parametrize("batches", ["device", "host"])
def test_two_processes_match_one_process(one_device, tmp_path, batches):
  """jax.distributed on 127.0.0.1, CPU collectives, 1 device each: same losses.

  With host batches each process gathers only its own rows of each global batch.
  Each process gets a compile cache folder of its own: only process 0 writes.
  """
  host = ["--config.data.on_device=False"] if batches == "host" else []
  caches = [tmp_path / f"xla{i}" for i in range(2)]
  outputs = _two_processes(tmp_path, 20, *host, caches=caches)
  _assert_same_losses(_losses(tmp_path), _losses(one_device))
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert (summary["devices"], summary["processes"]) == (2, 2)
  assert summary["data_on_device"] is (batches == "device")
  assert "done: step 20" in outputs[0][1] and "done:" not in outputs[1][1]
  assert any(caches[0].glob("jit_train_steps*"))  # the one train function, either batch path
  assert not caches[1].exists() or not any(caches[1].glob("jit_*"))


@pytest.mark.multiprocess
def test_full_evaluation_is_one_number_on_1_or_4_devices_and_2_processes(tmp_path):
  """eval_mode "full": the untrained model's val loss (the same params everywhere) on 1
  device, 4 devices and 2 processes with host batches, and each run's step-10 checkpoint
  evaluated again on 1 device (evaluate.py), agree to 1e-6."""
  full = ["--config.train.eval_mode=full", "--config.train.eval_stride=8"]
  runs = {"one": tmp_path / "one", "four": tmp_path / "four", "two": tmp_path / "two"}
  _train(runs["one"], 10, 1, *full)
  _train(runs["four"], 10, 4, *full)
  _two_processes(runs["two"], 10, *full, "--config.data.on_device=False")
  evals = {name: {r["step"]: r for r in map(json.loads, (w / "metrics.jsonl").read_text()
                                             .splitlines()) if r["kind"] == "eval"}
           for name, w in runs.items()}
  for name, workdir in runs.items():
    assert evals[name][0]["val_loss"] == pytest.approx(evals["one"][0]["val_loss"], rel=1e-6)
    again = evaluate.evaluate(workdir, step=10)
    assert again["eval_mode"] == "full"
    assert again["val_loss"] == pytest.approx(evals[name][10]["val_loss"], rel=1e-6)


_FAKE_SRUN = """#!/bin/bash
# Stands in for Slurm's srun: two tasks on this host, with Slurm's variables.
for i in 0 1; do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$FAKE_SRUN_LOGS/task$i.log" 2>&1 &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
exit $status
"""


@pytest.mark.multiprocess
def test_slurm_script_trains_with_detected_processes(one_device, tmp_path):
  """launch/slurm_train.sh under a fake srun: --distributed finds 2 processes from Slurm's env."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(_FAKE_SRUN)
  (bin_dir / "srun").chmod(0o755)
  (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  (bin_dir / "python").chmod(0o755)  # this interpreter, venv included
  # JAX derives the coordinator's port from the job id, in 61440..65535.
  port = _free_port(random.Random(os.getpid()).sample(range(61440, 65536), 50))
  env = {**_env(1), "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SRUN_LOGS": str(tmp_path),
         "SLURM_JOB_ID": str(port - 61440), "SLURM_NTASKS": "2",
         "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_SUBMIT_DIR": str(ROOT)}
  workdir = tmp_path / "run"
  result = subprocess.run(
      ["bash", str(ROOT / "launch" / "slurm_train.sh"), TINY[0].split("=", 1)[1], str(workdir),
       *TINY[1:], "--config.train.steps=20"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  logs = [(tmp_path / f"task{i}.log").read_text() for i in range(2)]
  assert result.returncode == 0, logs[0][-2000:] + logs[1][-2000:]
  _assert_same_losses(_losses(workdir), _losses(one_device))
  summary = json.loads((workdir / "summary.json").read_text())
  assert (summary["devices"], summary["processes"]) == (2, 2)
