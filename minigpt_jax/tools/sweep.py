"""Hyperparameter sweeps: every combination of a few config fields' values, one run each.

`parse_sweeps` turns `--sweep=train.learning_rate=1e-3,3e-3` flags into typed
values, `grid` into runs (one config and one subfolder each, all validated),
and `run_sweep` trains them one after another in this process, so JAX's
compile caches serve every run. A sweep folder holds `sweep.json` (what it
sweeps, so a different sweep cannot mix into it), one run folder per
combination, and the results: `results.json`, `results.md`, `curves.png`.
`rows` and `to_markdown` are pure: summaries in, table out.

Owns: sweep flags, the grid and its folder names, `sweep.json`, the results
table, `run_sweep`. May import: loop, config, plotting, files, errors.
"""

import difflib
import hashlib
import itertools
import json
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

import ml_collections

from minigpt_jax import config as config_lib, loop
from minigpt_jax.support import files
from minigpt_jax.tools import finish, plotting
from minigpt_jax.errors import UserError

SWEEP_FILE = "sweep.json"
_USAGE = "write it as --sweep=SECTION.FIELD=v1,v2,... e.g. --sweep=train.learning_rate=1e-3,3e-3"
_TRUE, _FALSE = ("True", "true", "1"), ("False", "false", "0")
_MAX_NAME = 120  # folder names stay well below the usual 255-byte limit


class Sweep(NamedTuple):
  field: str  # dotted path into the config, e.g. "train.learning_rate"
  values: tuple  # parsed to the type of the field's default


class Run(NamedTuple):
  """One combination: its place in the grid, folder name, swept values and config."""
  index: int  # 1-based, in grid order
  name: str
  values: tuple  # ((field, value), ...) in the order of the sweeps
  config: ml_collections.ConfigDict

  def describe(self) -> str:
    return " ".join(f"{field}={format_value(v)}" for field, v in self.values)


# -- Flags -----------------------------------------------------------------------------------

def _fields(config, prefix=""):
  """Every leaf field's dotted path, for suggestions."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield prefix + key


def _default(config, field: str, flag: str):
  """The current value of `field`; UserError naming the flag if there is no such field."""
  node = config
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      close = difflib.get_close_matches(field, list(_fields(config)), n=1, cutoff=0.8)
      hint = f"did you mean {close[0]}?" if close else "check its spelling against the config file"
      raise UserError(f"--sweep={flag}: no config field {field}; {hint}")
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise UserError(f"--sweep={flag}: {field} is a section of the config, not a field; "
                    f"sweep one of its fields, e.g. --sweep={field}.{next(iter(node.keys()))}=...")
  return node


def _parse_value(raw: str, default, field: str, flag: str):
  """`raw` as the type of `default`: bool, int, float or str."""
  kind = type(default)
  if kind not in (bool, int, float, str):
    raise UserError(f"--sweep={flag}: config.{field} is a {kind.__name__} and cannot be "
                    "swept; sweep an int, float, bool or str field")
  if kind is str:
    return raw
  if kind is bool and raw in _TRUE + _FALSE:
    return raw in _TRUE
  if kind is not bool:
    try:
      return kind(raw)
    except ValueError:
      pass
  what, allowed = {bool: ("a bool", "True or False"), int: ("an int", "integers"),
                   float: ("a float", "numbers")}[kind]
  raise UserError(f"--sweep={flag}: {raw!r} is not {what} like config.{field} ({default!r}); "
                  f"give {allowed}")


def parse_sweep(flag: str, config) -> Sweep:
  """One `--sweep` value, `FIELD=v1,v2,...`, checked against the config."""
  field, sep, raw = flag.partition("=")
  if not sep or not field:
    raise UserError(f"--sweep={flag}: {_USAGE}")
  default = _default(config, field, flag)
  values = tuple(_parse_value(v.strip(), default, field, flag) for v in raw.split(","))
  seen = set()
  for v in values:
    if v in seen:
      raise UserError(f"--sweep={flag}: the value {format_value(v)} is given twice; list each "
                      "value once")
    seen.add(v)
  return Sweep(field, values)


def parse_sweeps(flags: list[str], config, overrides=()) -> list[Sweep]:
  """Every `--sweep` flag; each field once, and none also set by a `--config.FIELD` override."""
  sweeps = []
  for flag in flags:
    sweep = parse_sweep(flag, config)
    if any(s.field == sweep.field for s in sweeps):
      raise UserError(f"--sweep={flag}: {sweep.field} is already swept by an earlier --sweep; "
                      f"give all its values in one, e.g. --sweep={sweep.field}=v1,v2,v3")
    if sweep.field in overrides:
      raise UserError(f"--sweep={flag}: --config.{sweep.field} also sets this field and the "
                      "sweep would override it; drop one of the two")
    sweeps.append(sweep)
  if not sweeps:
    raise UserError(f"nothing to sweep; {_USAGE}")
  return sweeps


# -- The grid --------------------------------------------------------------------------------

def format_value(value) -> str:
  """How a value reads in folder names, log lines and tables: 1e-3 -> 0.001, 0.0 -> 0."""
  if isinstance(value, float):
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text
  return str(value)


def labels(sweeps: list[Sweep]) -> list[str]:
  """Each field's name in folder names: the last part, dotted where two sweeps share it."""
  short = [s.field.rsplit(".", 1)[-1] for s in sweeps]
  return [s.field if short.count(name) > 1 else name for s, name in zip(sweeps, short)]


def run_name(names: list[str], values) -> str:
  """A filesystem-safe folder name, e.g. `learning_rate=0.001,dropout=0.1`."""
  name = ",".join(f"{n}={format_value(v)}" for n, v in zip(names, values))
  name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
  if len(name) > _MAX_NAME:  # a long path value: keep a readable start, and a digest
    name = name[:_MAX_NAME - 9] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
  return name


def _with(config, values) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  for field, value in values:
    *sections, key = field.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[key] = value
  return config


def grid(config, sweeps: list[Sweep]) -> list[Run]:
  """Every combination, the last sweep varying fastest; each config validated, names unique."""
  names, runs, folders = labels(sweeps), [], {}
  for i, combo in enumerate(itertools.product(*(s.values for s in sweeps)), 1):
    values = tuple(zip((s.field for s in sweeps), combo))
    run = Run(i, run_name(names, combo), values, _with(config, values))
    try:
      config_lib.validate(run.config)
    except UserError as e:
      raise UserError(f"run {run.describe()} of the sweep: {e}") from None
    if run.name in folders:
      raise UserError(f"runs {folders[run.name].describe()} and {run.describe()} would share "
                      f"the folder {run.name}; use values that differ in letters or digits")
    folders[run.name] = run
    runs.append(run)
  return runs


# -- The sweep folder ------------------------------------------------------------------------

def definition(config_file: str, sweeps: list[Sweep], overrides: dict, runs: list[Run]) -> dict:
  """What `sweep.json` holds: the config file, the sweeps, the overrides, and the run folders."""
  return json.loads(json.dumps(files.finite_or_none({
      "config": config_file,
      "sweeps": [{"field": s.field, "values": list(s.values)} for s in sweeps],
      "overrides": dict(overrides),
      "runs": [run.name for run in runs]})))


def _sweep_flags(d: dict) -> str:
  return " ".join(f"--sweep={s['field']}=" + ",".join(map(format_value, s["values"]))
                  for s in d.get("sweeps") or [])


def _differences(found: dict, wanted: dict) -> list[str]:
  """What differs between two sweep definitions, as flags: 'X there, Y here'."""
  diffs = []
  if found.get("config") != wanted["config"]:
    diffs.append(f"--config={found.get('config')} there, --config={wanted['config']} here")
  if found.get("sweeps") != wanted["sweeps"]:
    diffs.append(f"{_sweep_flags(found)} there, {_sweep_flags(wanted)} here")
  old, new = found.get("overrides") or {}, wanted["overrides"]
  flag = lambda d, k: f"--config.{k}={format_value(d[k])}" if k in d else f"no --config.{k}"
  diffs += [f"{flag(old, k)} there, {flag(new, k)} here"
            for k in sorted(set(old) | set(new)) if old.get(k, ...) != new.get(k, ...)]
  return diffs


def claim(workdir: Path, wanted: dict) -> None:
  """Writes `sweep.json`, or checks that the one there describes this same sweep."""
  path = workdir / SWEEP_FILE
  if (workdir / "metrics.jsonl").exists():
    raise UserError(f"{workdir} holds a training run (metrics.jsonl), not a sweep; pass a new "
                    "--workdir for the sweep")
  if path.exists():
    try:
      found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"{path} cannot be read ({e}); pass a new --workdir") from None
    diffs = _differences(found if isinstance(found, dict) else {}, wanted)
    if diffs:
      raise UserError(f"{workdir} holds a different sweep ({'; '.join(diffs)}), and its runs "
                      "would mix with this one's in the results; pass a new --workdir, or "
                      "rerun that sweep's own command")
    return
  workdir.mkdir(parents=True, exist_ok=True)
  files.write_json(path, wanted)


def read_summary(run_dir: Path) -> dict | None:
  """A run's summary.json, or None where there is none (not finished) or it cannot be read."""
  try:
    summary = json.loads((run_dir / "summary.json").read_text())
  except (OSError, json.JSONDecodeError):
    return None
  return summary if isinstance(summary, dict) else None


def is_finished(summary: dict | None, config) -> bool:
  """At its last step, or stopped early (a rerun would stop again at once)."""
  return summary is not None and (summary.get("step") == config.train.steps
                                  or bool(summary.get("early_stopped")))


# -- The results table -----------------------------------------------------------------------

_OPTIONAL = ("val_bpc", "best_val_bpc")  # newer summaries only


def _number(x):
  return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) \
      else None


def rows(results: list[tuple[Run, dict | None]]) -> list[dict]:
  """One row per run, by best val loss (runs without one last): swept values, then results."""
  optional = [k for k in _OPTIONAL if any(s and k in s for _, s in results)]
  table = []
  for run, summary in results:
    s = summary or {}
    row = {field: value for field, value in run.values}
    row.update(best_val_loss=_number(s.get("best_val_loss")), best_step=s.get("best_step"),
               val_loss=_number(s.get("val_loss")))
    row.update({k: _number(s.get(k)) for k in optional})
    row.update(steps=s.get("step"), wall_s=s.get("wall_s"), folder=run.name)
    table.append(row)
  best = lambda row: (0, row["best_val_loss"]) if row["best_val_loss"] is not None else (1, 0)
  return sorted(table, key=best)


def _cell(key: str, value) -> str:
  if value is None:
    return "n/a"
  if key == "folder":
    return f"`{value}`"
  if isinstance(value, float) and ("loss" in key or "bpc" in key):
    return f"{value:.4f}"
  return format_value(value).replace("|", "\\|")


def to_markdown(table: list[dict]) -> str:
  """A GitHub table of `rows`, one line per run."""
  if not table:
    return ""
  keys = list(table[0])
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(_cell(k, row[k]) for k in keys) + " |" for row in table]
  return "\n".join(lines) + "\n"


# -- Running ---------------------------------------------------------------------------------

def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _train_each(runs: list[Run], workdir: Path, log) -> list[Run]:
  """Trains the unfinished runs in order; returns those that failed (each logged in one line)."""
  failed = []
  for run in runs:
    where, head = workdir / run.name, f"run {run.index}/{len(runs)}: {run.describe()}"
    summary = read_summary(where)
    if is_finished(summary, run.config):
      log(f"{head} finished at step {summary['step']}; skipped ({where})")
      continue
    log(f"{head} in {where}")
    try:
      summary = loop.train_and_evaluate(  # each run's loss.png; its sample to TensorBoard only
          run.config, where,
          on_end=lambda end, n=run.config.train.sample_tokens: finish.plot_and_sample(end, n))
    except UserError as e:  # e.g. a learning rate that diverges: the other runs go on
      log(f"run {run.index}/{len(runs)} failed: error: {' '.join(str(e).split())}")
      failed.append(run)
      continue
    log(finish.done_line(summary, where))
  return failed


def write_results(workdir: Path, runs: list[Run]) -> tuple[list[dict], Path | None]:
  """results.json, results.md and curves.png (of the finished runs, if any) from the run folders."""
  results = [(run, read_summary(workdir / run.name)) for run in runs]
  table = rows(results)
  files.write_json(workdir / "results.json", table)
  files.write_text(workdir / "results.md", to_markdown(table))
  finished = [workdir / run.name for run, s in results if is_finished(s, run.config)]
  curves = plotting.plot_runs(finished, workdir / "curves.png") if finished else None
  return table, curves


def _stdout(text: str) -> None:
  print(text, end="", flush=True)


def run_sweep(config, workdir, sweeps: list[Sweep], config_file: str = "",
              overrides: dict | None = None, log=_stderr, show=_stdout) -> list[dict]:
  """Trains every combination into `workdir/<name>`, skipping finished ones; returns the table.

  Every config is validated and `sweep.json` claimed before the first run. A
  Ctrl-C ends the sweep (the run saves first); a run that fails with a user
  error is logged and the rest go on, then the table is shown and the sweep
  ends in one error, so a rerun retries just the failed runs.
  """
  workdir = Path(workdir)
  runs = grid(config, sweeps)
  claim(workdir, definition(config_file, sweeps, overrides or {}, runs))
  failed = _train_each(runs, workdir, log)
  table, curves = write_results(workdir, runs)
  show(to_markdown(table))
  log(f"results of {len(runs)} runs in {workdir}/results.md and results.json"
      + (f", curves in {curves}" if curves else ""))
  if failed:
    raise UserError(
        f"{len(failed)} of {len(runs)} runs failed ({', '.join(r.name for r in failed)}; their "
        f"error lines are above, the others' results in {workdir}/results.md); fix the cause "
        "and rerun the same command to retry them")
  return table
