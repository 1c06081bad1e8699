"""Every `python launch/...` command in README.md and docs/*.md runs (shrunk to a few steps),
every relative link there resolves, and the README stays short."""

import importlib.util
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt_jax import data

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--config.model.block_size=16", "--config.model.n_embed=32",
         "--config.model.n_heads=2", "--config.model.n_layer=1"]
SHRINK = MODEL + ["--config.train.batch_size=4", "--config.train.steps=2",
                  "--config.train.eval_interval=1", "--config.train.eval_iters=1",
                  "--config.train.sample_tokens=0",
                  "--config.train.warmup_steps=0"]  # the recipes' warmup outlasts 2 steps
BENCH_SHRINK = MODEL + ["--config.train.batch_size=4", "--steps=2", "--sample_tokens=4",
                        "--repeats=1"]
TWIN_SHRINK = ["--steps=2", "--warmup=1", "--sample_tokens=4", "--n_layer=1"]
ORDER = ("prepare.py", "import_torch.py", "train.py", "sweep.py", "export_hf.py", "import_hf.py",
         "benchmark.py", "torch_twin.py", "plot.py", "sample.py", "evaluate.py")
# Files the docs name as a user's own (`--path=poems.txt`), and the named corpus that
# stands for each here, so the command runs on what the run was trained on.
USER_FILES = {"poems.txt": "frost"}
HAS_TORCH = importlib.util.find_spec("torch") is not None


README_MAX_LINES = 300


def pages() -> list[Path]:
  return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands() -> list[list[str]]:
  """The commands of every page, each once (a command on several pages runs once)."""
  lines = []
  for page in pages():
    text = page.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines += [line.strip() for block in blocks for line in block.splitlines()]
    lines += re.findall(r"`(python launch/[^`]*)`", text)  # inline, e.g. a results table
  commands = [shlex.split(line) for line in lines if line.startswith("python launch/")]
  return list({tuple(c): c for c in commands}.values())


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
  """The command with tmp workdirs and files, at a size that runs in seconds, and the
  folder to run it in. A train.py, sample.py or evaluate.py command without --workdir
  names its run by its config (runs/<config stem> in the current folder): it runs in
  tmp_path/cwd with the config file's absolute path, so that is never the repo's runs/."""
  if _script(args) in ("train.py", "sample.py", "evaluate.py") and not _flag(args, "workdir"):
    config = _flag(args, "config")
    run, cwd = f"runs/{Path(config).stem}", tmp_path / "cwd"
    if _script(args) == "train.py":
      cwd.mkdir(exist_ok=True)
      workdirs[run] = cwd / run
    assert workdirs.get(run) == cwd / run, f"{shlex.join(args)}: no train.py --config={config}"
    return _shrunk_in_place(_replace(args, "config", ROOT / config), tmp_path, workdirs), cwd
  return _shrunk_in_place(args, tmp_path, workdirs), ROOT


def _shrunk_in_place(args, tmp_path, workdirs):
  script = _script(args)
  if script == "prepare.py":  # a token folder, which a train.py command may name
    out = _flag(args, "out")
    workdirs[out] = tmp_path / f"tokens_{Path(out).name}"
    return _replace(args, "out", workdirs[out])
  for field in ("config.data.tokens", "config.train.init_from"):  # a folder made above
    if _flag(args, field) is not None:
      args = _replace(args, field, workdirs[_flag(args, field)])
  workdir = _flag(args, "workdir")
  if script in ("train.py", "import_torch.py", "import_hf.py", "sweep.py") and workdir:
    workdirs.setdefault(workdir, tmp_path / Path(workdir).name)  # maybe a bare run's folder
  if workdir and script != "plot.py":
    args = _replace(args, "workdir", workdirs[workdir])
  if script == "train.py":
    return args + SHRINK
  if script == "export_hf.py":  # a Hugging Face folder, which an import_hf.py command may name
    out = _flag(args, "out")
    workdirs[out] = tmp_path / f"hf_{Path(out).name}"
    return _replace(args, "out", workdirs[out])
  if script == "import_hf.py":
    return _replace(args, "model", workdirs[_flag(args, "model")])
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
    if not HAS_TORCH:  # without PyTorch: our half of the command only
      args = _drop(args, "compare-torch")
    return _drop(args, "steps", "sample_tokens", "repeats") + BENCH_SHRINK
  if script == "torch_twin.py":
    if not HAS_TORCH:
      pytest.skip("the docs run launch/torch_twin.py, which needs PyTorch")
    if _flag(args, "text"):
      args = _replace(args, "text", _user_file(_flag(args, "text")))
    args = _drop(args, "steps", "warmup", "sample_tokens", "n_layer")
    return (_replace(args, "eval_iters", 1) if _flag(args, "eval_iters") else args) + TWIN_SHRINK
  if script == "plot.py":
    args = [f"--workdir={workdirs[a.split('=', 1)[1]]}" if a.startswith("--workdir=") else a
            for a in args]
    return _replace(args, "out", tmp_path / Path(_flag(args, "out")).name)
  if script == "evaluate.py":  # a stride within the shrunk block; a --path from the repo's root
    if _flag(args, "stride"):
      args = _replace(args, "stride", 8)
    if _flag(args, "path"):
      args = _replace(args, "path", _user_file(_flag(args, "path")))
    return args
  if script == "sample.py":
    return _drop(args, "num_tokens") + ["--num_tokens=5"]
  raise AssertionError(f"test_readme does not know how to shrink {script}")


def _user_file(name: str) -> Path:
  """A file the docs name as the user's: the named corpus that stands for it."""
  assert name in USER_FILES, f"the docs name {name}; add it to USER_FILES or name a corpus"
  return data.resolve_corpus(USER_FILES[name])


def test_readme_commands_run(tmp_path):
  commands = readme_commands()
  for script in ORDER:
    assert any(_script(c) == script for c in commands), f"no {script} command in the docs"
  workdirs = {}
  env = dict(os.environ)  # a relative MINIGPT_DATA_DIR (CI's) names the same folder from tmp
  if env.get("MINIGPT_DATA_DIR"):
    env["MINIGPT_DATA_DIR"] = str(Path(env["MINIGPT_DATA_DIR"]).resolve())
  for args in sorted(commands, key=lambda c: ORDER.index(_script(c))):
    argv, cwd = _shrunk(args, tmp_path, workdirs)
    result = subprocess.run([sys.executable, ROOT / argv[1], *argv[2:]], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{shlex.join(args)}\n{result.stderr[-2000:]}"
    if _script(args) == "train.py" and not _flag(args, "workdir"):  # runs/<config stem>
      run = cwd / "runs" / Path(_flag(args, "config")).stem
      assert (run / "summary.json").is_file(), f"{shlex.join(args)} did not train into {run}"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
  """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to -."""
  text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
  return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
          for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_relative_links_resolve():
  """Every relative link (and image) in README.md and docs/*.md names a file that exists,
  and a #fragment of a markdown page names one of its headings."""
  broken = []
  for page in pages():
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in LINK.findall(text):
      if re.match(r"[a-z]+:", target):  # https:, mailto:
        continue
      path, _, fragment = target.partition("#")
      file = (page.parent / path).resolve() if path else page
      if not file.exists():
        broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
      elif fragment and file.suffix == ".md" and fragment not in _anchors(file):
        broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
  assert not broken, "\n".join(broken)


def test_readme_is_short():
  lines = len((ROOT / "README.md").read_text().splitlines())
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"
