"""Orbax checkpoints in a workdir: save, keep latest N + best, verify, restore.

Each step directory holds the items `params`, `train_state` (optimizer state,
step, PRNG key), `config`, `vocab` and `meta` (losses). Sampling restores
`params`, `config` and `vocab` only, so it needs neither the corpus nor the
optimizer. `config.json` and `vocab.json` are also written beside the step
directories for people to read.

Integrity: orbax checks no checksums, so every save also writes `digests.json`
(size and sha256 of each file of the step), and every restore verifies the
files of the items it reads first. A step that fails (a digest, or orbax
itself) raises `Damaged`; `restore_newest` then falls back to the step before.
A step saved without digests (by an older version, or killed between orbax's
commit and the digest write) is complete as far as orbax knows, and restores
unverified.

Owns: checkpoint I/O only (the fit of a checkpoint to a config is
`config.check_fits`; reading a checkpoint back is `support.restore`).
May import: orbax, JAX, parallel, files, errors.
"""

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from minigpt_jax import parallel
from minigpt_jax.errors import UserError
from minigpt_jax.support.files import finite_or_none


DIGESTS = "digests.json"
_TMP_MARK = ".orbax-checkpoint-tmp"  # orbax writes a step into `<step>.orbax-checkpoint-tmp*`


class Damaged(Exception):
  """A step that does not restore: a file fails its digest, or orbax fails to read it."""

  def __init__(self, step: int, cause: str):
    super().__init__(f"checkpoint step {step} is damaged: {cause}")
    self.step, self.cause = step, cause


def manager(workdir: str | Path, keep: int = 3) -> ocp.CheckpointManager:
  """A manager keeping the `keep` latest checkpoints plus the best by val loss."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
          keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, create=True,
      enable_async_checkpointing=False)  # a save is on disk before training goes on
  return ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints", options=options)


def save(mngr: ocp.CheckpointManager, state, config_dict: dict, vocab: dict,
         meta: dict) -> None:
  """Saves a TrainState at its step, then its digests; a finite `meta['val_loss']` ranks it.

  An OSError underneath (a full disk, a read-only folder) removes the
  unfinished step and raises UserError naming the path and the cause; the
  steps saved before are untouched. Orbax reports such errors as ValueErrors
  carrying `os_error_code`, after logging them: those logs are muted.
  """
  step = int(state.step)
  val = meta.get("val_loss")
  metrics = {"val_loss": val} if val is not None and math.isfinite(val) else None
  _check_free_space(mngr, state, step)
  try:
    with _orbax_logs_muted():
      mngr.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state.params),
          train_state=ocp.args.StandardSave(
              {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}),
          config=ocp.args.JsonSave(config_dict),
          vocab=ocp.args.JsonSave(vocab),
          meta=ocp.args.JsonSave(finite_or_none(meta))))
      mngr.wait_until_finished()
    if jax.process_index() == 0:
      write_digests(Path(mngr.directory) / str(step))
  except Exception as e:
    error = _os_error(e)
    if error is None:
      raise
    _remove_after_failed_save(mngr)
    raise _save_error(mngr, step, f"{error.strerror or error}", "or make the folder writable")


def _check_free_space(mngr: ocp.CheckpointManager, state, step: int) -> None:
  """Refuses a save that cannot fit, before orbax starts writing it.

  Cheaper and quieter than a failed write: orbax's threads report one of
  those with many tracebacks. Every process agrees, as the save is collective.
  """
  need = sum(x.nbytes for x in jax.tree_util.tree_leaves((state.params, state.opt_state)))
  free = shutil.disk_usage(Path(mngr.directory)).free
  if parallel.any_process(need > free):
    raise _save_error(mngr, step, f"{os.strerror(errno.ENOSPC)} (it needs about "
                      f"{need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free)")


def _save_error(mngr: ocp.CheckpointManager, step: int, cause: str, fix: str = "") -> UserError:
  return UserError(f"could not save checkpoint step {step} in {mngr.directory}: {cause}; "
                   f"free disk space{' ' + fix if fix else ''}, then rerun the same command "
                   "to resume from the last checkpoint")


def _remove_after_failed_save(mngr: ocp.CheckpointManager) -> None:
  """Removes a failed save's temp folder, once orbax's writer threads have let go of it."""
  with _orbax_logs_muted():
    try:
      mngr.wait_until_finished()
    except Exception:  # the same failure again
      pass
  for _ in range(50):  # writes still in flight can recreate files under a first rmtree
    if not remove_unfinished(Path(mngr.directory)):
      return
    time.sleep(0.02)


@contextlib.contextmanager
def _orbax_logs_muted():
  """Mutes orbax's logs of an error we report ourselves (absl, and asyncio's task GC)."""
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _os_error(error: BaseException) -> OSError | None:
  """The OSError behind `error`: in its chain, or in orbax's `os_error_code=N` text."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError):
      return seen
    match = re.search(r"os_error_code='?(\d+)", str(seen))
    if match:
      code = int(match.group(1))
      return OSError(code, os.strerror(code))
    seen = seen.__cause__ or seen.__context__
  return None


def remove_unfinished(checkpoints_dir: Path) -> list[str]:
  """Deletes what a save cut short leaves: orbax's temp folders, half-written digests."""
  removed = []
  if not Path(checkpoints_dir).is_dir():
    return removed
  for path in Path(checkpoints_dir).iterdir():
    if _TMP_MARK in path.name:
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path.name)
    elif path.is_dir():
      for tmp in path.glob(f".{DIGESTS}.tmp*"):
        tmp.unlink(missing_ok=True)
        removed.append(f"{path.name}/{tmp.name}")
  return removed


def _item_files(step_dir: Path):
  """(relative path, path) of every file of a step, digests aside, in a fixed order."""
  for path in sorted(step_dir.rglob("*")):
    rel = path.relative_to(step_dir).as_posix()
    if path.is_file() and rel != DIGESTS and not rel.startswith(f".{DIGESTS}"):
      yield rel, path


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def write_digests(step_dir: Path) -> None:
  """`digests.json` in a committed step: {relative path: [bytes, sha256]} of every file."""
  files = {rel: [path.stat().st_size, _sha256(path)] for rel, path in _item_files(step_dir)}
  tmp = step_dir / f".{DIGESTS}.tmp"
  with tmp.open("w") as f:
    json.dump({"files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, step_dir / DIGESTS)


def verify(step_dir: Path, items=None) -> str | None:
  """Why the files of `items` (default: all) in a step fail their digests, or None.

  None also for a step without `digests.json`: it restores unverified.
  """
  try:
    recorded = json.loads((step_dir / DIGESTS).read_text())["files"]
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{DIGESTS} is unreadable ({type(e).__name__})"
  wanted = lambda rel: items is None or rel.split("/", 1)[0] in items
  present = dict(_item_files(step_dir))
  for rel, (size, sha) in sorted(recorded.items()):
    if not wanted(rel):
      continue
    path = present.get(rel)
    if path is None:
      return f"{rel} is missing"
    if path.stat().st_size != size:
      return f"{rel} has {path.stat().st_size} bytes where {size} were saved"
    if _sha256(path) != sha:
      return f"{rel} does not match its sha256"
  extra = [rel for rel in present if wanted(rel) and rel not in recorded]
  return f"{extra[0]} was not part of the save" if extra else None


def _restore(mngr: ocp.CheckpointManager, step: int, **items):
  """orbax's restore of `items`, after verifying their files; raises Damaged."""
  cause = verify(Path(mngr.directory) / str(step), set(items) | {"_CHECKPOINT_METADATA"})
  if cause is not None:
    raise Damaged(step, cause)
  try:
    with _orbax_logs_muted():
      return mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax, tensorstore and json raise many types for bad bytes
    first_line = (str(e).strip().splitlines() or [""])[0][:200]
    raise Damaged(step, f"orbax could not read it ({type(e).__name__}: {first_line})") from None


def restore_newest(mngr: ocp.CheckpointManager, load, warn, steps=None,
                   newest_first: bool = True):
  """(step, load(step)) for the newest step in `steps` (default: all) that restores.

  Each damaged step costs one `warn` line naming it and the cause; `load`
  raises Damaged for those. None restoring is a UserError. With
  `newest_first=False` the steps are tried in the order given (best first).
  """
  steps = list(mngr.all_steps() if steps is None else steps)
  if newest_first:
    steps.sort(reverse=True)
  for i, step in enumerate(steps):
    try:
      return step, load(step)
    except Damaged as e:
      nxt = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "none left"
      warn(f"warning: {e} (in {mngr.directory}); {nxt}")
  raise UserError(f"no checkpoint in {mngr.directory} restores (damaged steps: "
                  f"{', '.join(map(str, steps))}); restore them from a backup, or train "
                  "again in a new --workdir")


def quarantine(mngr: ocp.CheckpointManager, step: int) -> Path:
  """Moves a damaged step out of the manager's folder, into `<workdir>/damaged/`.

  Kept for a post-mortem, and out of the way of the step's next save.
  """
  dest_dir = Path(mngr.directory).parent / "damaged"
  dest_dir.mkdir(exist_ok=True)
  dest = dest_dir / f"step_{step}.{time.strftime('%Y%m%d-%H%M%S')}"
  os.replace(Path(mngr.directory) / str(step), dest)
  return dest


def restore_json(mngr: ocp.CheckpointManager, step: int) -> tuple[dict, dict, dict]:
  """The (config, vocab, meta) saved with a step."""
  items = _restore(mngr, step, config=ocp.args.JsonRestore(), vocab=ocp.args.JsonRestore(),
                   meta=ocp.args.JsonRestore())
  return items["config"], items["vocab"], items["meta"]


def _abstract(tree):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def restore_state(mngr: ocp.CheckpointManager, step: int, state):
  """Restores the full TrainState saved at `step` into the shapes of `state`."""
  items = _restore(
      mngr, step, params=ocp.args.StandardRestore(_abstract(state.params)),
      train_state=ocp.args.StandardRestore(_abstract(
          {"opt_state": state.opt_state, "step": state.step, "rng": state.rng})))
  rest = items["train_state"]
  return state.replace(params=items["params"], opt_state=rest["opt_state"],
                       step=rest["step"], rng=rest["rng"])


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params):
  return _restore(mngr, step, params=ocp.args.StandardRestore(abstract_params))["params"]


def steps_by_val_loss(mngr: ocp.CheckpointManager, warn=None) -> list[int]:
  """Kept steps with a finite val loss in their meta, best first; damaged ones skipped."""
  ranked = []
  for step in mngr.all_steps():
    try:
      val = restore_json(mngr, step)[2].get("val_loss")
    except Damaged as e:
      if warn:
        warn(f"warning: {e} (in {mngr.directory}); skipping it")
      continue
    if isinstance(val, (int, float)) and math.isfinite(val):
      ranked.append((val, step))
  return [step for _, step in sorted(ranked)]


def best_step(mngr: ocp.CheckpointManager, warn=None) -> int | None:
  """The kept step with the lowest finite val loss, from each step's saved meta."""
  ranked = steps_by_val_loss(mngr, warn)
  return ranked[0] if ranked else None
