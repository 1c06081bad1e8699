"""Checkpoints back into memory: resuming a run, and loading one for decoding or evaluation.

`load` is the one way to read a checkpoint for decoding or evaluation: its
config, vocabulary and params, no optimizer state, so it needs neither the
corpus nor the optimizer. `resume` restores a run's whole state, checking
that the checkpoint fits the config first. Both skip damaged steps (one
warning each) for the newest that restores.

Owns: `Loaded`, `load`, `resume`, `clean_unfinished`. May import: model,
precision, config, tokenizer, parallel, errors, support.checkpoint.
"""

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax

from minigpt_jax import config as config_lib, parallel, precision, tokenizer as tokenizer_lib
from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig, build_model, init_params
from minigpt_jax.support import checkpoint


class Loaded(NamedTuple):
  """A checkpoint without its optimizer state: what decoding and evaluation need."""
  config: dict  # the run's config, as saved
  model_cfg: ModelConfig
  params: Any  # on this process' first device
  tokenizer: Any  # tokenizer.CharTokenizer or BpeTokenizer
  step: int


def load(workdir: str | Path, step: int | None = None, best: bool = False,
         warn=None) -> Loaded:
  """A workdir's checkpoint: its config, vocabulary and params, no optimizer state.

  Without `step`, the newest (or with `best`, the best) step that restores:
  each damaged one is a `warn` line. An explicit damaged `step` is a UserError.
  """
  warn = warn or (lambda line: print(line, file=sys.stderr))
  if not (Path(workdir) / "checkpoints").is_dir():
    raise UserError(f"no checkpoints in {workdir}; train first with "
                    f"python launch/train.py --config=CONFIG --workdir={workdir}")
  mngr = checkpoint.manager(workdir)
  steps = mngr.all_steps()
  if not steps:
    raise UserError(f"no finished checkpoint in {workdir}; train longer (checkpoints "
                    "are saved at every evaluation)")
  if best:
    candidates = checkpoint.steps_by_val_loss(mngr, warn)
    if not candidates:
      raise UserError(f"no checkpoint in {workdir} has a val loss; drop --best")
  elif step is None:
    candidates = steps
  elif step not in steps:
    raise UserError(f"no checkpoint at step {step} in {workdir}; available steps: "
                    f"{', '.join(map(str, steps))}")

  def load_step(step):
    config_dict, vocab, _ = checkpoint.restore_json(mngr, step)
    vocab = tokenizer_lib.from_json(vocab)
    model_cfg = ModelConfig.from_config(config_dict["model"], vocab.vocab_size)
    if config_dict["model"].get("dtype") == "auto":  # loaded to decode: the decoding choice
      model_cfg = dataclasses.replace(
          model_cfg, dtype=precision.choose_decode(config_dict["model"]["dtype"]).dtype)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(lambda: init_params(build_model(model_cfg), jax.random.PRNGKey(0))))
    params = checkpoint.restore_params(mngr, step, abstract)
    return Loaded(config_dict, model_cfg, params, vocab, step)

  try:
    if step is not None:  # an explicit step: no fallback
      try:
        return load_step(step)
      except checkpoint.Damaged as e:
        others = [s for s in steps if s != step]
        raise UserError(f"{e} (in {workdir}); pick another with --step "
                        f"({', '.join(map(str, others)) or 'none left'}) or drop --step "
                        "for the newest good one") from None
    # newest first, or best first: the order of `candidates`
    return checkpoint.restore_newest(mngr, load_step, warn, candidates,
                                     newest_first=not best)[1]
  finally:
    mngr.close()


def resume(mngr, state, config, corpus, workdir: Path, is_main: bool, log):
  """(state, meta) of the newest checkpoint that restores, or (state, {}) with none.

  Each step must fit `config` and the corpus's vocabulary (`config.check_fits`:
  a one-line error naming the flag to pass) and have been trained on the same
  text (`config.check_same_corpus`). Damaged newer steps are one warning each,
  and move to `<workdir>/damaged/`.
  """
  if not mngr.all_steps():
    return state, {}

  def load_step(step):
    saved_config, saved_vocab, meta = checkpoint.restore_json(mngr, step)
    config_lib.check_same_corpus(meta, corpus.name, corpus.sha256, str(workdir))
    config_lib.check_fits(saved_config, saved_vocab, config, corpus.tokenizer.to_json(),
                          str(workdir))
    return checkpoint.restore_state(mngr, step, state), meta

  step, (state, meta) = checkpoint.restore_newest(mngr, load_step, warn=log)
  damaged = [s for s in mngr.all_steps() if s > step]
  if damaged:
    if is_main:
      for s in damaged:
        log(f"moved damaged step {s} to {checkpoint.quarantine(mngr, s)}")
    parallel.barrier("minigpt_jax.quarantine")
    mngr.reload()
  return state, meta


def best_of(meta: dict) -> tuple[float | None, int | None]:
  """(best val loss, its step) saved in a checkpoint's meta; older versions saved NaN."""
  best = (meta.get("best_val_loss"), meta.get("best_step"))
  finite = isinstance(best[0], (int, float)) and math.isfinite(best[0])
  return best if finite else (None, None)


def clean_unfinished(workdir: Path, log) -> None:
  """Removes what a kill or a full disk left half-written: orbax temp folders, JSON temp files."""
  removed = checkpoint.remove_unfinished(workdir / "checkpoints")
  for tmp in workdir.glob(".*.tmp"):
    tmp.unlink(missing_ok=True)
    removed.append(tmp.name)
  if removed:
    log(f"removed {len(removed)} unfinished write(s) of an earlier run: {', '.join(removed)}")
