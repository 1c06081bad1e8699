"""The one place metrics go: a log line, `metrics.jsonl` and TensorBoard events.

All three live in the workdir. A resumed run drops the JSON records past its
checkpoint's step before appending, so the file never holds a step twice and
never loses one; its TensorBoard events file starts with a purge marker at the
step after the checkpoint, so TensorBoard hides the points the killed run wrote
past it. A fresh run starts both afresh. TensorBoard events are written by
tensorboardX, which needs no TensorFlow; the run's config goes to its Text tab.

With a `wandb_project`, the same scalars, the config and the final sample also
go to Weights & Biases (an optional package: `config.validate` names the
install command before a run starts when it is missing). Each launch is one
W&B run, named after the workdir, its files in `<workdir>/wandb/` unless
$WANDB_DIR says otherwise; it does not capture the console. A resumed launch
is a new W&B run that starts at the checkpoint's step, in the same group (the
workdir's name), with job type `resume`.

The JSON is strict: a non-finite value is written as `null` (TensorBoard still
gets the NaN, so a diverging run shows). The resume rewrite is atomic, and a
failed write (a full disk) is a UserError naming the file.

Owns: `MetricsWriter`, `bits_per_char`. May import: files, errors, tensorboardX, wandb; no JAX.
"""

import html
import itertools
import json
import math
import os
import sys
from pathlib import Path

from minigpt_jax.errors import UserError
from minigpt_jax.support.files import finite_or_none, write_error, write_text

EVENTS_GLOB = "events.out.tfevents.*"
_writers_made = itertools.count()  # orders the events files of one process and second


def bits_per_char(loss: float | None, tokens_per_char: float = 1.0) -> float | None:
  """A loss in nats per token as bits per character, comparable across tokenizers."""
  if loss is None:
    return None
  return round(loss * tokens_per_char / math.log(2), 4)


def _fmt(value) -> str:
  return f"{value:.4f}" if isinstance(value, float) else str(value)


def _is_scalar(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_code_block(text: str) -> str:
  """TensorBoard renders text as Markdown; an indented block keeps newlines and spaces."""
  return "\n".join("    " + line for line in text.splitlines()) or "    (empty)"


def _start_wandb(workdir: Path, project: str, config: dict | None, resume_step: int):
  import wandb  # optional, and slow to import

  try:
    return wandb.init(
        project=project, name=workdir.resolve().name, group=workdir.resolve().name,
        job_type="resume" if resume_step else "train", dir=os.environ.get("WANDB_DIR", workdir),
        config={**(config or {}), "workdir": str(workdir), "resume_step": resume_step},
        reinit="finish_previous",
        settings=wandb.Settings(console="off", silent=True, disable_git=True))
  except Exception as e:  # no login, no network, a bad project name: wandb's own errors
    raise UserError(f"could not start a W&B run in project {project!r}: "
                    f"{' '.join(str(e).split())}; run `wandb login`, or set WANDB_MODE=offline, "
                    "or drop --config.metrics.wandb_project") from None


class MetricsWriter:
  """Appends one JSON object per record; prints evaluation records as log lines.

  Every numeric field of a record also goes to TensorBoard as `<kind>/<field>`
  (e.g. `train/loss`, `eval/val_loss`). With `enabled=False` (any process but
  the first of a multi-process run) nothing is written, printed or deleted.
  """

  def __init__(self, workdir: str | Path, resume_step: int = 0, log=None,
               enabled: bool = True, config: dict | None = None, wandb_project: str = ""):
    self.enabled = enabled
    self.path = Path(workdir) / "metrics.jsonl"
    self.log = log or (lambda line: print(line, file=sys.stderr))
    self._tb = self._wandb = None
    if not enabled:
      return
    kept = []
    if resume_step > 0 and self.path.exists():  # a fresh run starts a fresh file
      for line in self.path.read_text().splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by a kill
        if record.get("step", 0) <= resume_step:
          kept.append(line)
    elif resume_step == 0:
      for old in Path(workdir).glob(EVENTS_GLOB):
        old.unlink()
    write_text(self.path, "".join(line + "\n" for line in kept))  # atomic

    from tensorboardX import SummaryWriter  # imported here: it is slow to import

    # Records up to resume_step were kept, so the purge starts one step later.
    # Name order is TensorBoard's read order: timestamp, host, then this suffix.
    self._tb = SummaryWriter(
        str(workdir), purge_step=resume_step + 1 if resume_step > 0 else None,
        flush_secs=30, filename_suffix=f".{os.getpid()}.{next(_writers_made):04d}")
    if config is not None:
      self._tb.add_text("config", _as_code_block(json.dumps(config, indent=2)), resume_step)
    if wandb_project:
      self._wandb = _start_wandb(Path(workdir), wandb_project, config, resume_step)
      self.log(f"logging to W&B project {wandb_project}, run {self._wandb.name} "
               f"({self._wandb.settings.mode}, in {self._wandb.dir})")

  def write(self, kind: str, step: int, **scalars) -> None:
    """`kind` is "eval" (printed, flushed at once) or "train" (file only)."""
    if not self.enabled:
      return
    record = finite_or_none({"kind": kind, "step": step, **scalars})
    try:
      with self.path.open("a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
    except OSError as e:
      raise write_error(self.path, e) from None
    for name, value in scalars.items():
      if _is_scalar(value):  # NaN included: a diverging run should show
        self._tb.add_scalar(f"{kind}/{name}", value, step)
    if self._wandb is not None:
      self._wandb.log({f"{kind}/{k}": v for k, v in scalars.items() if _is_scalar(v)},
                      step=step)
    if kind == "eval":
      self._tb.flush()
      self.log(f"step {step}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in scalars.items()))

  def write_text(self, tag: str, step: int, text: str) -> None:
    """Text for TensorBoard's Text tab (a sample, the config), kept verbatim."""
    if self.enabled:
      self._tb.add_text(tag, _as_code_block(text), step)
      self._tb.flush()
      if self._wandb is not None:
        import wandb
        self._wandb.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)
        self._wandb.summary[f"{tag}_text"] = text  # the HTML's own summary entry is a file

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the events file; later writes are ignored."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None
    self.enabled = False

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()
