"""The one place metrics go: a log line on stderr and `metrics.jsonl` in the workdir.

A resumed run drops the records past its checkpoint's step before appending,
so the file never holds a step twice and never loses one.
"""

import json
import sys
from pathlib import Path


def _fmt(value) -> str:
  return f"{value:.4f}" if isinstance(value, float) else str(value)


class MetricsWriter:
  """Appends one JSON object per record; prints evaluation records as log lines."""

  def __init__(self, workdir: str | Path, resume_step: int = 0, log=None):
    self.path = Path(workdir) / "metrics.jsonl"
    self.log = log or (lambda line: print(line, file=sys.stderr))
    kept = []
    if resume_step > 0 and self.path.exists():  # a fresh run starts a fresh file
      for line in self.path.read_text().splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by a kill
        if record.get("step", 0) <= resume_step:
          kept.append(line)
    self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, kind: str, step: int, **scalars) -> None:
    """`kind` is "eval" (printed) or "train" (file only)."""
    record = {"kind": kind, "step": step, **scalars}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if kind == "eval":
      self.log(f"step {step}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in scalars.items()))
