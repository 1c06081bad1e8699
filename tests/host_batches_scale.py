"""Host-side batches at scale: 50 steps from a big uint16 memmap, peak memory and speed.

Not a test (pytest does not collect it); the README's figures come from it:

  python tests/host_batches_scale.py generate /tmp/host-scale 1e9   # 2 GB of random ids < 65
  python tests/host_batches_scale.py train /tmp/host-scale           # host path, from the memmap
  python tests/host_batches_scale.py device                          # the same model on frost

`generate` writes tokens.bin (never commit it). `train` maps it (90% train,
10% val), trains the tiny test model 50 steps with config.data.on_device=False
and prints one JSON line: steps/s (summary.json's, compilation and evaluations
left out), peak RSS (VmHWM, which counts the file pages read through the map)
and the peak of RssAnon (the process's own memory, sampled every 20 ms).
`device` runs the same model and steps on frost, on device (`host-frost`:
from the host). STEPS=500 in the environment trains longer, for steadier steps/s.
"""

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

VOCAB = 65


def _status_kb(field: str) -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  return 0


class _PeakAnon:
  def __init__(self):
    self.peak_kb, self._stop = 0, threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._thread.start()

  def _watch(self):
    while not self._stop.wait(0.02):
      self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return max(self.peak_kb, _status_kb("RssAnon"))


def generate(out: Path, num_tokens: int) -> None:
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  with open(out / "tokens.bin", "wb") as f:
    for lo in range(0, num_tokens, 10**8):
      rng.integers(0, VOCAB, min(10**8, num_tokens - lo), dtype=np.uint16).tofile(f)
  print(f"wrote {num_tokens:,} tokens to {out / 'tokens.bin'} in "
        f"{time.perf_counter() - start:.1f} s")


def _config(on_device: bool):
  from configs import frost_cpu
  from conftest import tiny
  config = tiny(frost_cpu.get_config())
  steps = int(os.environ.get("STEPS", 50))
  config.train.update(steps=steps, eval_interval=steps, log_every=10)
  config.data.on_device = on_device
  return config


def run(config, corpus=None) -> dict:
  from minigpt_jax import loop
  if corpus is not None:
    loop.load_corpus = lambda config: corpus
  watch = _PeakAnon()
  with tempfile.TemporaryDirectory() as workdir:
    summary = loop.train_and_evaluate(config, workdir, show_progress=False,
                                      log=lambda line: print(line, file=sys.stderr))
  peak_anon_kb = watch.stop()
  return {"data_on_device": summary["data_on_device"], "steps": summary["step"],
          "steps_per_s": summary["steps_per_s"], "wall_s": summary["wall_s"],
          "peak_rss_mb": round(_status_kb("VmHWM") / 1024),
          "peak_rss_anon_mb": round(peak_anon_kb / 1024),
          "rss_file_mb_at_end": round(_status_kb("RssFile") / 1024)}


def train_from_memmap(out: Path) -> dict:
  from minigpt_jax import data, loop
  ids = np.memmap(out / "tokens.bin", np.uint16, "r")
  train_ids, val_ids = data.split(ids)  # views of the map: nothing is read
  tokenizer = data.CharTokenizer("".join(chr(33 + i) for i in range(VOCAB)))
  corpus = loop.Corpus(tokenizer, str(out / "tokens.bin"), train_ids, val_ids)
  return {"tokens": len(ids), **run(_config(False), corpus)}


if __name__ == "__main__":
  mode = sys.argv[1]
  if mode == "generate":
    generate(Path(sys.argv[2]), int(float(sys.argv[3])))
  elif mode == "train":
    print(json.dumps(train_from_memmap(Path(sys.argv[2]))))
  elif mode == "device":
    print(json.dumps({"corpus": "frost", **run(_config(True))}))
  elif mode == "host-frost":
    print(json.dumps({"corpus": "frost", **run(_config(False))}))
  else:
    sys.exit(f"usage: {sys.argv[0]} generate DIR N | train DIR | device | host-frost")
