"""Every `python launch/...` command in the README runs (shrunk to a few steps)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHRINK = ["--config.model.block_size=16", "--config.model.n_embed=32",
          "--config.model.n_heads=2", "--config.model.n_layer=1",
          "--config.train.batch_size=4", "--config.train.steps=2",
          "--config.train.eval_interval=1", "--config.train.eval_iters=1",
          "--config.train.sample_tokens=0"]


def readme_commands() -> list[list[str]]:
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
  lines = [line.strip() for block in blocks for line in block.splitlines()]
  lines += re.findall(r"`(python launch/[^`]*)`", readme)  # inline, e.g. the results table
  return [shlex.split(line) for line in lines if line.startswith("python launch/")]


def _with_workdir(args, workdir):
  return [f"--workdir={workdir}" if a.startswith("--workdir=") else a for a in args]


def test_readme_commands_run(tmp_path):
  commands = readme_commands()
  assert any("train.py" in c[1] for c in commands) and any("sample.py" in c[1] for c in commands)
  trained = {}
  for args in sorted(commands, key=lambda c: "sample.py" in c[1]):  # train first
    workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
    if "train.py" in args[1]:
      trained[workdir] = tmp_path / Path(workdir).name
      argv = _with_workdir(args, trained[workdir]) + SHRINK
    else:
      argv = _with_workdir(args, trained[workdir])
      argv = [a for a in argv if not a.startswith("--num_tokens=")] + ["--num_tokens=5"]
    result = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{shlex.join(args)}\n{result.stderr[-2000:]}"
