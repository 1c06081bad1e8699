"""Every `python launch/...` command in the README runs (shrunk to a few steps)."""

import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TORCH_REF

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--config.model.block_size=16", "--config.model.n_embed=32",
         "--config.model.n_heads=2", "--config.model.n_layer=1"]
SHRINK = MODEL + ["--config.train.batch_size=4", "--config.train.steps=2",
                  "--config.train.eval_interval=1", "--config.train.eval_iters=1",
                  "--config.train.sample_tokens=0",
                  "--config.train.warmup_steps=0"]  # the recipes' warmup outlasts 2 steps
BENCH_SHRINK = MODEL + ["--config.train.batch_size=4", "--steps=2", "--sample_tokens=4",
                        "--repeats=1"]
ORDER = ("prepare.py", "import_torch.py", "train.py", "sweep.py", "benchmark.py", "plot.py",
         "sample.py", "evaluate.py")


def readme_commands() -> list[list[str]]:
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
  lines = [line.strip() for block in blocks for line in block.splitlines()]
  lines += re.findall(r"`(python launch/[^`]*)`", readme)  # inline, e.g. the results table
  return [shlex.split(line) for line in lines if line.startswith("python launch/")]


def _script(args) -> str:
  return Path(args[1]).name


def _flag(args, name):
  return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)


def _replace(args, name, value):
  return [f"--{name}={value}" if a.startswith(f"--{name}=") else a for a in args]


def _drop(args, *names):
  return [a for a in args if a.split("=", 1)[0] not in {f"--{n}" for n in names}]


def _lecture_state_dict(text: str) -> dict:
  """Random weights in the lecture's gpt.py layout, at the MODEL sizes."""
  torch = pytest.importorskip("torch")
  V, T, C, H, L = len(set(text)), 16, 32, 2, 1
  r = lambda *shape: torch.randn(*shape) * 0.02
  sd = {"token_embedding_table.weight": r(V, C), "position_embedding_table.weight": r(T, C),
        "ln_f.weight": torch.ones(C), "ln_f.bias": torch.zeros(C),
        "lm_head.weight": r(V, C), "lm_head.bias": torch.zeros(V)}
  for i in range(L):
    b = f"blocks.{i}."
    for j in range(H):
      for kind in ("key", "query", "value"):
        sd[f"{b}sa.heads.{j}.{kind}.weight"] = r(C // H, C)
      sd[f"{b}sa.heads.{j}.tril"] = torch.tril(torch.ones(T, T))
    sd.update({f"{b}sa.proj.weight": r(C, C), f"{b}sa.proj.bias": torch.zeros(C),
               f"{b}ffwd.net.0.weight": r(4 * C, C), f"{b}ffwd.net.0.bias": torch.zeros(4 * C),
               f"{b}ffwd.net.2.weight": r(C, 4 * C), f"{b}ffwd.net.2.bias": torch.zeros(C)})
    for ln in ("ln1", "ln2"):
      sd[f"{b}{ln}.weight"], sd[f"{b}{ln}.bias"] = torch.ones(C), torch.zeros(C)
  return sd


def _nanogpt_ckpt(text: str) -> dict:
  """nanoGPT's ckpt.pt at the MODEL sizes: random weights, bias=False, lm_head tied to wte."""
  torch = pytest.importorskip("torch")
  V, T, C, L = len(set(text)), 16, 32, 1
  r = lambda *shape: torch.randn(*shape) * 0.02
  wte = r(V, C)
  sd = {"transformer.wte.weight": wte, "transformer.wpe.weight": r(T, C),
        "transformer.ln_f.weight": torch.ones(C), "lm_head.weight": wte}
  for i in range(L):
    b = f"transformer.h.{i}."
    sd.update({f"{b}ln_1.weight": torch.ones(C), f"{b}ln_2.weight": torch.ones(C),
               f"{b}attn.c_attn.weight": r(3 * C, C), f"{b}attn.c_proj.weight": r(C, C),
               f"{b}mlp.c_fc.weight": r(4 * C, C), f"{b}mlp.c_proj.weight": r(C, 4 * C)})
  return {"model": sd, "optimizer": {}, "iter_num": 0,
          "model_args": dict(n_layer=L, n_head=2, n_embd=C, block_size=T, bias=False,
                             vocab_size=V, dropout=0.0)}


def _shrunk(args, tmp_path, workdirs):
  """The command with tmp workdirs and files, at a size that runs in seconds."""
  script = _script(args)
  if script == "prepare.py":  # a token folder, which a train.py command may name
    out = _flag(args, "out")
    workdirs[out] = tmp_path / f"tokens_{Path(out).name}"
    return _replace(args, "out", workdirs[out])
  tokens = _flag(args, "config.data.tokens")
  if tokens is not None:
    args = _replace(args, "config.data.tokens", workdirs[tokens])
  if script in ("train.py", "import_torch.py", "sweep.py"):
    workdir = _flag(args, "workdir")
    workdirs[workdir] = tmp_path / Path(workdir).name
    args = _replace(args, "workdir", workdirs[workdir])
  if script == "train.py":
    return args + SHRINK
  if script == "sweep.py":  # each sweep's first value: one run
    return [a.split(",")[0] if a.startswith("--sweep=") else a for a in args] + SHRINK
  if script == "import_torch.py":
    text = "ROMEO: But soft, what light through yonder window breaks?\n"
    import torch
    if _flag(args, "ckpt"):  # nanoGPT: model_args give the sizes
      torch.save(_nanogpt_ckpt(text), tmp_path / "ckpt.pt")
      chars = sorted(set(text))
      (tmp_path / "meta.pkl").write_bytes(pickle.dumps({
          "vocab_size": len(chars), "itos": dict(enumerate(chars)),
          "stoi": {c: i for i, c in enumerate(chars)}}))
      return _replace(_replace(args, "ckpt", tmp_path / "ckpt.pt"), "meta", tmp_path / "meta.pkl")
    (tmp_path / "input.txt").write_text(text)
    torch.save(_lecture_state_dict(text), tmp_path / "model.pt")
    args = _replace(_replace(args, "text", tmp_path / "input.txt"),
                    "state_dict", tmp_path / "model.pt")
    return args + MODEL
  if script == "benchmark.py":
    extra = ["--torch_preset=frost_cpu"] if "--compare-torch" in args else []
    if not TORCH_REF.is_file():  # without ../shared/bench: our half of the command only
      args, extra = _drop(args, "compare-torch", "torch_preset"), []
    return _drop(args, "steps", "sample_tokens", "repeats") + BENCH_SHRINK + extra
  if script == "plot.py":
    args = [f"--workdir={workdirs[a.split('=', 1)[1]]}" if a.startswith("--workdir=") else a
            for a in args]
    return _replace(args, "out", tmp_path / Path(_flag(args, "out")).name)
  if script == "evaluate.py":
    return _replace(args, "workdir", workdirs[_flag(args, "workdir")])
  if script == "sample.py":
    args = _replace(args, "workdir", workdirs[_flag(args, "workdir")])
    return _drop(args, "num_tokens") + ["--num_tokens=5"]
  raise AssertionError(f"test_readme does not know how to shrink {script}")


def test_readme_commands_run(tmp_path):
  commands = readme_commands()
  for script in ORDER:
    assert any(_script(c) == script for c in commands), f"no {script} command in the README"
  workdirs = {}
  for args in sorted(commands, key=lambda c: ORDER.index(_script(c))):
    argv = _shrunk(args, tmp_path, workdirs)
    result = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{shlex.join(args)}\n{result.stderr[-2000:]}"
