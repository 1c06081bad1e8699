"""Loss curves from run folders: train and val loss against step, runs overlaid.

Reads only what training leaves in a workdir (`metrics.jsonl`, `config.json`),
so it needs no JAX and works on runs copied from another machine. A sweep's
folder (`sweep.json`, written by launch/sweep.py) stands for its runs. Figures are
drawn on matplotlib's Agg canvas directly: headless, and no pyplot state is
touched in the caller's process.

Owns: reading runs' metrics, expanding sweep folders, drawing the curves. May import: matplotlib,
errors; no JAX.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from minigpt_jax.errors import UserError

FIGSIZE_IN = (8, 4.5)
DPI = 100
_TRAIN_CMD = "python launch/train.py --config=configs/NAME.py --workdir={}"


@dataclass
class Run:
  """One workdir's curves: eval estimates and, if logged, per-batch train loss."""
  workdir: Path
  config: dict
  eval_steps: list[int] = field(default_factory=list)
  train_loss: list[float] = field(default_factory=list)  # eval estimate, eval_iters batches
  val_loss: list[float] = field(default_factory=list)
  batch_steps: list[int] = field(default_factory=list)
  batch_loss: list[float] = field(default_factory=list)  # one batch, every log_every steps


def _read_records(path: Path) -> dict:
  """{(kind, step): record}; a line cut short by a kill is skipped, a later step wins."""
  records = {}
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and "step" in record:
      records[record.get("kind"), record["step"]] = record
  return records


def load_run(workdir: str | Path) -> Run:
  """Reads a run folder; UserError if it holds no evaluation to plot yet."""
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise UserError(f"{workdir}: no such run folder; pass a workdir written by launch/train.py")
  metrics = workdir / "metrics.jsonl"
  if not metrics.is_file():
    raise UserError(f"{workdir} has no metrics.jsonl; train first: "
                    + _TRAIN_CMD.format(workdir))
  try:
    config = json.loads((workdir / "config.json").read_text())
  except (OSError, json.JSONDecodeError):
    config = {}  # still plottable, labelled by folder name only
  run = Run(workdir, config)
  value = lambda x: float("nan") if x is None else x  # metrics.jsonl writes NaN as null
  for (kind, step), record in sorted(_read_records(metrics).items(), key=lambda kv: kv[0][1]):
    if kind == "eval" and "val_loss" in record:
      run.eval_steps.append(step)
      run.train_loss.append(value(record.get("train_loss")))
      run.val_loss.append(value(record["val_loss"]))
    elif kind == "train" and "loss" in record:
      run.batch_steps.append(step)
      run.batch_loss.append(value(record["loss"]))
  if not run.eval_steps:
    raise UserError(f"{metrics} has no eval records yet; train until the first evaluation: "
                    + _TRAIN_CMD.format(workdir))
  return run


def expand_sweeps(workdirs) -> list[Path]:
  """Each workdir, with a sweep folder (sweep.json, no metrics.jsonl) replaced by its runs.

  The runs come in the sweep's order; those not started yet are left out.
  """
  expanded = []
  for workdir in map(Path, workdirs):
    sweep_file = workdir / "sweep.json"
    if (workdir / "metrics.jsonl").exists() or not sweep_file.is_file():
      expanded.append(workdir)
      continue
    try:
      names = json.loads(sweep_file.read_text())["runs"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
      raise UserError(f"{sweep_file} cannot be read; pass the run folders under {workdir} "
                      "as --workdir one by one") from None
    runs = [workdir / name for name in names if (workdir / name / "metrics.jsonl").is_file()]
    if not runs:
      raise UserError(f"the sweep in {workdir} has no run with metrics yet; start it with "
                      "launch/sweep.py first")
    expanded += runs
  return expanded


def describe(config: dict) -> str:
  """A short name for a run's model and data, e.g. 'gpt 4L×64d, 4 heads, ctx 32, frost'."""
  model, data = config.get("model", {}), config.get("data", {})
  parts = []
  if model.get("name") == "gpt":
    parts += [f"gpt {model.get('n_layer')}L×{model.get('n_embed')}d",
              f"{model.get('n_heads')} heads", f"ctx {model.get('block_size')}"]
  elif model.get("name"):
    parts.append(str(model["name"]))
  corpus = Path(data["path"]).stem if data.get("path") else data.get("corpus")
  if corpus:
    parts.append(str(corpus))
  return ", ".join(parts)


def _labels(runs: list[Run]) -> list[str]:
  """Folder name (the path where two names clash), config, final val loss."""
  names = [r.workdir.name or str(r.workdir) for r in runs]
  if len(set(names)) < len(names):
    names = [str(r.workdir) for r in runs]
  labels = []
  for name, run in zip(names, runs):
    what = describe(run.config)
    labels.append(f"{name}: {what + ', ' if what else ''}val {run.val_loss[-1]:.3f} "
                  f"@ {run.eval_steps[-1]:,}")
  return labels


def plot_runs(workdirs, out_path: str | Path) -> Path:
  """Draws every run's train (solid) and val (dashed) loss into one PNG (or .pdf/.svg).

  The faint line, where train records exist, is the loss of single batches.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.lines import Line2D
  from matplotlib.ticker import StrMethodFormatter

  workdirs = list(workdirs)
  if not workdirs:
    raise UserError("no run folders to plot; pass at least one workdir")
  runs = [load_run(w) for w in workdirs]
  out_path = Path(out_path)

  fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)
  canvas = FigureCanvasAgg(fig)
  formats = canvas.get_supported_filetypes()
  suffix = out_path.suffix.lstrip(".").lower() or "png"
  if suffix not in formats:
    raise UserError(f"cannot write a plot to {out_path}: use a .png, .pdf or .svg name")
  ax = fig.add_subplot()
  colors = [f"C{i % 10}" for i in range(len(runs))]
  for run, color, label in zip(runs, colors, _labels(runs)):
    if run.batch_steps:
      ax.plot(run.batch_steps, run.batch_loss, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(run.eval_steps, run.train_loss, color=color, linewidth=1.8, label=label)
    ax.plot(run.eval_steps, run.val_loss, color=color, linewidth=1.8, linestyle="--",
            marker="o", markersize=3)

  # One legend: a line per run (its colour), then what each line style means.
  styles = [Line2D([], [], color="0.4", linewidth=1.8, label="train loss (eval estimate)"),
            Line2D([], [], color="0.4", linewidth=1.8, linestyle="--", marker="o",
                   markersize=3, label="val loss")]
  if any(run.batch_steps for run in runs):
    styles.append(Line2D([], [], color="0.4", alpha=0.35, linewidth=0.8,
                         label="train loss (single batch)"))
  handles, _ = ax.get_legend_handles_labels()
  ax.legend(handles=handles + styles, loc="best", fontsize=8, framealpha=0.9)

  title = runs[0].workdir.name if len(runs) == 1 else f"{len(runs)} runs"
  ax.set_title(f"{title}: loss against step", fontsize=11)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy loss (nats/char)")
  ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
  ax.set_xlim(left=0)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  try:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format=suffix)
  except OSError as e:
    raise UserError(f"cannot write {out_path}: {e.strerror or e}") from None
  return out_path


def save_loss_plot(workdir: str | Path) -> Path:
  """Writes `<workdir>/loss.png` for one run; training calls it when it ends."""
  return plot_runs([workdir], Path(workdir) / "loss.png")
