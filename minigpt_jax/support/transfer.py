"""Starting a run from another run's weights (`config.train.init_from`): transfer.

A run whose workdir holds no checkpoint yet, with `config.train.init_from`
naming another run's workdir (ours, or one that launch/import_torch.py or
import_hf.py wrote), starts from that run's params at `init_from_step`
("best", "latest" or a step number). Everything else starts fresh: step 0, the
optimizer state, the schedule, the seed's streams and the corpus.

The corpus is encoded with the source's vocabulary, so ids keep their meaning:
a character vocabulary grows by the characters the source never saw, after its
own (`CharTokenizer.extended`), and their rows in the token embedding (and in
an untied head) keep the fresh init; a BPE tokenizer is used as it is. Once
the run has saved a checkpoint, a rerun resumes that, with the vocabulary it
saved, and never reads the source again.

Owns: `Source`, `find_source`, `saved_tokenizer`, `vocabulary_base`, `graft`,
`start_from`, `describe`. May import: config, tokenizer, tokens, support
(checkpoint, restore), errors.
"""

import json
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from minigpt_jax import config as config_lib, tokenizer as tokenizer_lib, tokens
from minigpt_jax.errors import UserError
from minigpt_jax.support import checkpoint, restore


class Source(NamedTuple):
  """The checkpoint a run starts from."""
  workdir: Path  # resolved
  step: int
  val_loss: float | None  # at that step, as its run measured it
  corpus: str  # what the source trained on
  why: str  # how the step was chosen (config.train.init_from_step), for the start-up line
  loaded: restore.Loaded

  def record(self, tokenizer) -> dict:
    """What summary.json and each checkpoint's meta keep of the source."""
    base = self.loaded.tokenizer
    new = tokenizer.chars[base.vocab_size:] if tokenizer.kind == "char" else ""
    return {"workdir": str(self.workdir), "step": self.step, "chosen": self.why,
            "val_loss": self.val_loss, "corpus": self.corpus, "vocab_size": base.vocab_size,
            "new_chars": new}


def _saved_corpus(saved_config: dict, meta: dict) -> str:
  if meta.get("corpus"):
    return meta["corpus"]
  if meta.get("imported_from"):
    return f"imported from {meta['imported_from']}"
  data = saved_config.get("data", {})
  return data.get("tokens") or data.get("path") or data.get("corpus") or "unknown"


def own_steps(workdir: Path) -> bool:
  """Whether the run's own workdir holds a finished checkpoint (then it resumes that)."""
  folder = Path(workdir) / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def find_source(config, warn) -> Source:
  """The checkpoint `config.train.init_from` names, loaded and checked against `config`."""
  t = config.train
  where = Path(t.init_from)
  if not own_steps(where):
    raise UserError(f"config.train.init_from is {t.init_from}, which holds no checkpoint; "
                    "train that run first (its config's docstring gives the command), or "
                    "point init_from at a workdir of launch/train.py, import_torch.py or "
                    "import_hf.py")
  mngr = checkpoint.manager(where)
  try:
    steps = mngr.all_steps()
    chosen = str(t.init_from_step)
    step, best, why = None, False, chosen
    if chosen == "best":
      best = bool(checkpoint.steps_by_val_loss(mngr, warn))
      why = "best" if best else "latest: no step there has a val loss"
    elif chosen.isdigit():
      step = int(chosen)
      if step not in steps:
        raise UserError(f"config.train.init_from_step is {step} but {where} has steps "
                        f"{', '.join(map(str, steps))}; pick one of them, \"best\" or "
                        "\"latest\"")
      why = "config.train.init_from_step"
    loaded = restore.load(where, step=step, best=best, warn=warn)
    meta = checkpoint.restore_json(mngr, loaded.step)[2]
  finally:
    mngr.close()
  config_lib.check_source_fits(loaded.config, config, str(where))
  val = meta.get("val_loss")
  return Source(where.resolve(), loaded.step, val if isinstance(val, (int, float)) else None,
                _saved_corpus(loaded.config, meta), why, loaded)


def _adopt_tokenizer(config, tok) -> None:
  """The source's tokenizer decides config.data's tokenizer fields (as a token folder does)."""
  tokens.adopt_settings(config, tokens.tokenizer_settings(tok),
                        f"the run in config.train.init_from ({tok.describe()})",
                        " (a transfer keeps the source's tokenizer)")


def saved_tokenizer(workdir: str | Path):
  """The vocabulary a run saved beside its checkpoints (vocab.json), for launch/prepare.py."""
  path = Path(workdir) / "vocab.json"
  try:
    return tokenizer_lib.from_json(json.loads(path.read_text(encoding="utf-8")))
  except (OSError, ValueError, UserError):
    raise UserError(f"{workdir} has no readable vocab.json; point --init_from at a workdir "
                    "of launch/train.py, import_torch.py or import_hf.py") from None


def vocabulary_base(config, workdir: Path, warn):
  """(tokenizer the corpus is encoded with, Source to start from), or (None, None).

  A run that has its own checkpoint keeps the vocabulary it saved, and needs
  no source; one that has none reads the source now, before anything compiles.
  """
  if not config.train.init_from:
    return None, None
  if Path(config.train.init_from).resolve() == Path(workdir).resolve():
    raise UserError(f"config.train.init_from is the run's own --workdir ({workdir}); name "
                    "another run's workdir, or drop init_from to resume this one")
  if own_steps(workdir):
    try:
      own = saved_tokenizer(workdir)
    except UserError:
      pass  # no readable vocab.json: the source's vocabulary gives the same ids
    else:
      _adopt_tokenizer(config, own)
      return own, None
  source = find_source(config, warn)
  _adopt_tokenizer(config, source.loaded.tokenizer)
  return source.loaded.tokenizer, source


def graft(fresh, source_params):
  """`source_params` in the shapes of `fresh` (a new run's init, laid out as it will train).

  Equal shapes are copied; an axis that grew (a vocabulary grown by new
  tokens) keeps `fresh`'s values past the source's size. Works per shard, so
  a tree laid out over many devices or processes is never gathered.
  """
  def one(path, new, old):
    old = np.asarray(old)
    if old.ndim != new.ndim or any(o > n for o, n in zip(old.shape, new.shape)):
      raise UserError(f"the init_from params {jax.tree_util.keystr(path)} of shape "
                      f"{old.shape} do not fit this run's {new.shape}; use a new "
                      "--workdir with a config of that run's model")
    shards = {tuple((s.start, s.stop) for s in shard.index): shard.data
              for shard in new.addressable_shards}

    def block(index):
      value = np.array(shards[tuple((s.start, s.stop) for s in index)])
      src, dst = [], []
      for s, o, n in zip(index, old.shape, new.shape):
        start, stop, _ = s.indices(n)
        if min(stop, o) <= start:
          return value  # this shard lies wholly in the grown part
        src.append(slice(start, min(stop, o)))
        dst.append(slice(0, min(stop, o) - start))
      value[tuple(dst)] = old[tuple(src)].astype(value.dtype)
      return value

    return jax.make_array_from_callback(new.shape, new.sharding, block)

  return jax.tree_util.tree_map_with_path(one, fresh, source_params)


def start_from(state, source: Source, tokenizer):
  """`state` (fresh, step 0) with the source's params grafted in; and its record."""
  params = graft(state.params, jax.device_get(source.loaded.params))
  return state.replace(params=params), source.record(tokenizer)


def describe(record: dict, vocab_size: int) -> str:
  """The start-up line's words for the source of a run."""
  val = record.get("val_loss")
  chosen = f"{record['chosen']}, " if record.get("chosen") else ""
  text = (f"from {record['workdir']} step {record['step']} ({chosen}val loss "
          f"{'n/a' if val is None else f'{val:.4f}'} on {record['corpus']})")
  new = record.get("new_chars", "")
  if new:
    text += (f", with {len(new)} new character{'s' if len(new) > 1 else ''} {new!r} "
             f"(vocab {record['vocab_size']} -> {vocab_size})")
  return text
