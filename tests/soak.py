"""Soak test: SIGKILL a training run at random moments, resuming after each kill.

  python tests/soak.py --kills=20 [--steps=3000] [--seed=0] [--workdir=/tmp/soak]

Kills come in three kinds, in turn: at a random moment after the launch
(imports, compilation, restore), at a random moment of training once the run
has saved a new checkpoint, and during a save (as soon as orbax's temp
folder, or a step not yet digested, appears).
After each kill the same command runs again. Then the run is left to finish,
and its final parameters, optimizer state and evaluations must equal, bit for
bit, those of an unbroken run of the same command.

Also checked after every kill: the rerun resumes from the newest checkpoint
that was complete before the kill (none lost). Prints a JSON report to stdout;
exits 1 on any mismatch. tests/test_faults.py runs a short version.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import TINY_FLAGS, config_from_flags  # tests/, this script's folder

ROOT = Path(__file__).resolve().parents[1]
FLAGS = TINY_FLAGS + ["--config.checkpoint.keep=2"]  # eval_interval: set per soak
KINDS = ("launch", "training", "save")
_START_LINE = ("training from scratch", "resuming from step")


def _command(workdir: Path, steps: int, eval_interval: int) -> list[str]:
  return [sys.executable, str(ROOT / "launch" / "train.py"), *FLAGS, f"--workdir={workdir}",
          f"--config.train.steps={steps}", f"--config.train.eval_interval={eval_interval}"]


def _complete_steps(workdir: Path) -> list[int]:
  """Steps whose save finished, digests included."""
  ckpts = workdir / "checkpoints"
  if not ckpts.is_dir():
    return []
  return sorted(int(p.name) for p in ckpts.iterdir()
                if p.name.isdigit() and (p / "digests.json").is_file())


def _saving(workdir: Path) -> bool:
  ckpts = workdir / "checkpoints"
  try:
    entries = list(ckpts.iterdir())
  except FileNotFoundError:
    return False
  return any(".orbax-checkpoint-tmp" in p.name or
             (p.name.isdigit() and not (p / "digests.json").exists()) for p in entries)


def _started(log: Path) -> bool:
  try:
    text = log.read_text(errors="replace")
  except FileNotFoundError:
    return False
  return any(line in text for line in _START_LINE)


def _resume_step(log_text: str) -> int:
  for line in log_text.splitlines():
    if "resuming from step" in line:
      return int(line.split("resuming from step", 1)[1].split()[0])
  return 0


def _run_once(cmd, log: Path, kind: str | None, rng: random.Random, workdir: Path,
              env: dict, times=(5.0, 2.0), kills: int = 3, timeout: float = 300.0):
  """Runs `cmd` until it ends or a kill of `kind` (None: no kill) fires.

  `times` is (seconds to the start line, seconds after it) of an unbroken run.
  A training kill waits for the run to save one new checkpoint, so the soak
  makes progress, then lands within 1/`kills` of the training time, so that
  all the kills land before the run ends. Returns (killed, mid_save, exit
  status, (seconds to the start line, seconds after it)).
  """
  newest_before = max(_complete_steps(workdir), default=-1)
  with log.open("w") as err:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
  start = time.monotonic()
  started_at = deadline = None
  if kind == "launch":
    deadline = start + rng.uniform(0.1, times[0])
  while proc.poll() is None:
    now = time.monotonic()
    if now - start > timeout:
      proc.kill()
      raise RuntimeError(f"run timed out; log in {log}")
    if started_at is None and _started(log):
      started_at = now
    if (kind == "training" and deadline is None and started_at is not None
        and max(_complete_steps(workdir), default=-1) > newest_before):
      deadline = now + rng.uniform(0.0, times[1] / max(kills, 1))
    if kind == "save":
      fire = started_at is not None and _saving(workdir)
    else:
      fire = deadline is not None and now >= deadline
    if fire:
      mid_save = _saving(workdir)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True, mid_save, proc.returncode, None
    time.sleep(0.001 if kind == "save" else 0.01)
  end = time.monotonic()
  started_at = started_at or end
  return False, False, proc.returncode, (started_at - start, end - started_at)


def _final_state(workdir: Path, steps: int, eval_interval: int):
  """(params and optimizer state leaves, eval records) of a finished workdir."""
  import jax

  from minigpt_jax import train
  from minigpt_jax.support import checkpoint

  config = config_from_flags(FLAGS)
  config.train.update(steps=steps, eval_interval=eval_interval)
  vocab_size = len(json.loads((workdir / "vocab.json").read_text())["chars"])
  template = train.create_train_state(config, vocab_size)
  mngr = checkpoint.manager(workdir)
  state = checkpoint.restore_state(mngr, steps, template)
  mngr.close()
  leaves = [jax.device_get(x) for x in jax.tree_util.tree_leaves(
      (state.params, state.opt_state, state.step, jax.random.key_data(state.rng)
       if jax.dtypes.issubdtype(state.rng.dtype, jax.dtypes.prng_key) else state.rng))]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [{k: v for k, v in r.items() if k != "wall_s"} for r in records if r["kind"] == "eval"]
  return leaves, evals


def soak(kills: int, steps: int, eval_interval: int, seed: int, workdir: Path) -> dict:
  """Runs the soak; returns its report (`ok` says whether everything matched)."""
  import numpy as np

  rng = random.Random(seed)
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "soak_jax"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  unbroken, soaked = workdir / "unbroken", workdir / "soaked"
  for d in (unbroken, soaked):
    d.mkdir(parents=True, exist_ok=False)
  started = time.monotonic()
  _, _, rc, times = _run_once(_command(unbroken, steps, eval_interval),
                              workdir / "unbroken.log", None, rng, unbroken, env)
  assert rc == 0, (workdir / "unbroken.log").read_text()[-2000:]

  report = {"unbroken_s": [round(t, 2) for t in times], "kills": 0, "by_kind": {k: 0 for k in KINDS}, "mid_save": 0, "runs": 0,
            "resumed_from_newest_complete": 0, "checkpoints_lost": 0, "warnings": 0}
  cmd = _command(soaked, steps, eval_interval)
  complete_before = []
  for i in range(kills + 1):
    kind = KINDS[i % len(KINDS)] if i < kills else None
    log = workdir / f"run{i:02d}.log"
    killed, mid_save, rc, _ = _run_once(cmd, log, kind, rng, soaked, env, times, kills)
    report["runs"] += 1
    text = log.read_text(errors="replace")
    report["warnings"] += text.count("warning: checkpoint step")
    if complete_before and _started(log):  # a run killed before it logged has not resumed yet
      if _resume_step(text) >= complete_before[-1]:
        report["resumed_from_newest_complete"] += 1
      else:
        report["checkpoints_lost"] += 1
    if killed:
      report["kills"] += 1
      report["by_kind"][kind] += 1
      report["mid_save"] += mid_save
    elif rc != 0:
      raise AssertionError(f"run {i} failed with status {rc}:\n{text[-2000:]}")
    else:
      break  # finished before its kill fired: nothing left to kill
    complete_before = _complete_steps(soaked) or complete_before
  if not (soaked / "summary.json").exists():  # the last kill left it unfinished
    _, _, rc, _ = _run_once(cmd, workdir / "final.log", None, rng, soaked, env)
    report["runs"] += 1
    assert rc == 0, (workdir / "final.log").read_text()[-2000:]

  a, evals_a = _final_state(unbroken, steps, eval_interval)
  b, evals_b = _final_state(soaked, steps, eval_interval)
  report["params_bit_identical"] = len(a) == len(b) and all(
      x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))
  report["evals_identical"] = evals_a == evals_b
  report["ok"] = (report["params_bit_identical"] and report["evals_identical"]
                  and report["checkpoints_lost"] == 0)
  report["seconds"] = round(time.monotonic() - started, 1)
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--eval_interval", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=None, help="Empty folder for the runs (default: a "
                      "new temporary one).")
  args = parser.parse_args(argv)
  workdir = Path(args.workdir or tempfile.mkdtemp(prefix="soak_"))
  report = soak(args.kills, args.steps, args.eval_interval, args.seed, workdir)
  print(json.dumps({**report, "workdir": str(workdir)}, indent=1))
  return 0 if report["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
