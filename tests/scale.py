"""Scale, measured: prepare a big text, then train 50 steps from its token files on the host path.

Not a test (pytest does not collect it); the scale figures of docs/tokens.md come from
it, and CI runs a small version (`--mb=20`):

  python tests/scale.py --mb=2000 --dir=/tmp/scale   # 2 GB of text; never commit it

It writes DIR/text.txt (lines of frost and tinyshakespeare drawn at random,
seed 0; corpora from $MINIGPT_DATA_DIR or their download), then runs, as a
user would, `launch/prepare.py --tokenizer=char` and `launch/train.py` with
`--config.data.tokens` and `--config.data.on_device=False` for 50 steps of
frost_cpu's model. It prints one JSON line: the wall time, MB/s and peak RSS
of each (from wait4, the process and the launcher's huge-page restart), and
exits 1 if prepare's peak RSS reaches --max_rss_mb (1024, the issue's target)
or training's reaches --max_train_rss_mb (1536: JAX and XLA alone take about
700 MB, and vary by machine): memory must not grow with the text.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from minigpt_jax import data

ROOT = Path(__file__).resolve().parents[1]


def write_text(path: Path, num_bytes: int) -> None:
  lines = []
  for name in ("frost", "shakespeare"):
    text = data.read_text(data.resolve_corpus(name))
    lines += [line.encode() + b"\n" for line in text.split("\n") if line.strip()]
  rng = np.random.default_rng(0)
  written = 0
  with open(path, "wb") as f:
    while written < num_bytes:
      chunk = b"".join(lines[i] for i in rng.integers(0, len(lines), 20_000))[:num_bytes - written]
      f.write(chunk)
      written += len(chunk)


def timed(args: list[str]) -> tuple[float, float]:
  """Runs a launcher; its wall seconds and peak RSS in MB (its own, or its restart's)."""
  start = time.perf_counter()
  process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL)
  _, status, usage = os.wait4(process.pid, 0)
  if os.waitstatus_to_exitcode(status):
    sys.exit(f"error: {' '.join(args[:1])} failed (status {os.waitstatus_to_exitcode(status)})")
  return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mb", type=float, default=2000, help="Size of the text, in MB.")
  parser.add_argument("--dir", type=Path, required=True, help="Folder for the text and runs.")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--max_rss_mb", type=float, default=1024)
  parser.add_argument("--max_train_rss_mb", type=float, default=1536)
  args = parser.parse_args()
  args.dir.mkdir(parents=True, exist_ok=True)
  text = args.dir / "text.txt"
  if not text.is_file() or text.stat().st_size != int(args.mb * 1e6):
    write_text(text, int(args.mb * 1e6))
  folder, workdir = args.dir / "char", args.dir / "run"
  subprocess.run(["rm", "-rf", str(folder), str(workdir)], check=True)
  prepare_s, prepare_rss = timed(["launch/prepare.py", f"--path={text}", "--tokenizer=char",
                                  f"--out={folder}"])
  train_s, train_rss = timed([
      "launch/train.py", "--config=configs/frost_cpu.py", f"--workdir={workdir}",
      f"--config.data.tokens={folder}", "--config.data.on_device=False",
      f"--config.train.steps={args.steps}", f"--config.train.eval_interval={args.steps}",
      "--config.train.eval_iters=10", "--config.train.log_every=10",
      "--config.train.sample_tokens=0"])
  summary = json.loads((workdir / "summary.json").read_text())
  meta = json.loads((folder / "meta.json").read_text())
  result = {"text_mb": round(text.stat().st_size / 1e6, 1),
            "tokens": meta["train"]["tokens"] + meta["val"]["tokens"],
            "prepare_s": round(prepare_s, 1),
            "prepare_mb_per_s": round(text.stat().st_size / 1e6 / prepare_s, 1),
            "prepare_peak_rss_mb": round(prepare_rss),
            "train_s": round(train_s, 1), "train_peak_rss_mb": round(train_rss),
            "train_steps_per_s": summary["steps_per_s"],
            "data_on_device": summary["data_on_device"], "val_loss": summary["val_loss"]}
  print(json.dumps(result))
  if prepare_rss >= args.max_rss_mb:
    sys.exit(f"error: prepare's peak RSS {prepare_rss:.0f} MB reached {args.max_rss_mb:.0f}")
  if train_rss >= args.max_train_rss_mb:
    sys.exit(f"error: training's peak RSS {train_rss:.0f} MB reached {args.max_train_rss_mb:.0f}")
  if summary["data_on_device"]:
    sys.exit("error: the batches did not come from the host")


if __name__ == "__main__":
  main()
