"""Reading token folders, and choosing the one a training config reads.

A token folder is what `prepare.prepare` writes (its docstring gives the
format). `open_tokens` checks a folder and memory-maps its splits.

`for_config(config)` is the folder a training config reads: `config.data.tokens`,
or one prepared on the fly into the cache `~/.cache/minigpt_jax/tokens/<key>` (`cache_dir()`), the
key being the source's sha256, the tokenizer settings and `train_fraction`, so
a second run reuses it; a `path` text's sha256 is remembered there too
(`source_sha256`), so it is read once, not at every start.

`load_corpus(config)` is what training reads: the config checked against the
data, and the folder's splits as a `Corpus`.

Owns: `open_tokens`, the cache, which folder a config reads (`for_config`), a
folder in another run's vocabulary (`remap_chars`), `Corpus` and `load_corpus`.
May import: numpy, config, data, prepare, tokenizer, errors, support.files.
"""

import hashlib
import json
import re
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minigpt_jax import config as config_lib, data, prepare, tokenizer as tokenizer_lib
from minigpt_jax.support import files
from minigpt_jax.errors import UserError


def cache_dir() -> Path:
  """Where `for_config` prepares: beside the downloaded corpora, in the user's cache."""
  return data.user_cache_dir() / "tokens"


# -- Reading a folder ----------------------------------------------------------------------


class Tokens(NamedTuple):
  tokenizer: tokenizer_lib.CharTokenizer | tokenizer_lib.BpeTokenizer
  meta: dict
  train: np.ndarray  # read-only memmaps of uint16 or uint32 ids
  val: np.ndarray

  def tokens_per_char(self, split: str) -> float:
    chars = self.meta[split]["chars"]
    return self.meta[split]["tokens"] / chars if chars else 1.0


def _bad(folder: Path, problem: str) -> UserError:
  return UserError(f"token folder {folder} {problem}; prepare it again with python "
                   f"launch/prepare.py --corpus=NAME (or --path=FILE) --out={folder}")


def open_tokens(folder: str | Path) -> Tokens:
  """Checks a prepared folder (files, meta, sizes, dtype) and memory-maps its splits."""
  folder = Path(folder)
  if not folder.is_dir():
    raise UserError(f"token folder {folder} does not exist; check config.data.tokens, or "
                    f"write it with python launch/prepare.py --corpus=NAME --out={folder}")
  missing = [f for f in prepare.FILES if not (folder / f).is_file()]
  if missing:
    raise _bad(folder, f"has no {', '.join(missing)}")
  try:
    meta = json.loads((folder / "meta.json").read_text())
    tok = tokenizer_lib.from_json(json.loads((folder / "tokenizer.json").read_text(
        encoding="utf-8")))
    dtype = np.dtype(meta["dtype"])
    counts = {s: int(meta[s]["tokens"]) for s in prepare.SPLITS}
    [int(meta[s]["chars"]) for s in prepare.SPLITS]
  except (ValueError, KeyError, TypeError, UserError) as e:
    raise _bad(folder, f"has an unreadable meta.json or tokenizer.json ({type(e).__name__})"
               ) from None
  if meta.get("format") != prepare.FORMAT:
    raise _bad(folder, f"has format {meta.get('format')!r}, not {prepare.FORMAT}")
  if dtype.name not in ("uint16", "uint32"):
    raise _bad(folder, f"has dtype {dtype.name}, neither uint16 nor uint32")
  if tok.vocab_size > np.iinfo(dtype).max + 1:
    raise _bad(folder, f"stores a vocabulary of {tok.vocab_size} tokens as {dtype.name}, "
               f"which holds ids below {np.iinfo(dtype).max + 1} only (an overflow)")
  if meta["tokenizer"].get("vocab_size") != tok.vocab_size:
    raise _bad(folder, f"has a tokenizer.json of {tok.vocab_size} tokens where meta.json "
               f"says {meta['tokenizer'].get('vocab_size')}")
  arrays = {}
  for s in prepare.SPLITS:
    path = folder / f"{s}.bin"
    size, want = path.stat().st_size, counts[s] * dtype.itemsize
    if size != want:
      raise _bad(folder, f"has a {s}.bin of {size} bytes where meta.json says {want} "
                 f"({counts[s]} {dtype.name} tokens)")
    arrays[s] = (np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r") if counts[s]
                 else np.zeros(0, dtype))
  return Tokens(tok, meta, arrays["train"], arrays["val"])


# -- What a training config reads ----------------------------------------------------------


def cache_key(sha256: str, kind: str, vocab_size: int, train_fraction: float) -> str:
  size = f"{vocab_size}" if kind == "bpe" else ""
  return f"{sha256[:20]}-{kind}{size}-tf{train_fraction!r}"


RACY_S = 2.0  # a file written this recently can change again with the same times


def source_sha256(path: Path) -> str:
  """`data.file_sha256`, remembered per version of the file, so a large `--path`
  text is not read again at every start.

  The memo is keyed by the file's real path, device, inode, size, and its
  modification and change times (a change time no tool sets back). It is kept
  only for a file unchanged for `RACY_S` seconds, as git's index does: two
  writes within the clock's granularity can leave the same times.
  """
  path = Path(path)
  st = path.stat()
  version = (f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|"
             f"{st.st_ctime_ns}")
  memo = cache_dir() / ".sha256" / hashlib.sha256(version.encode()).hexdigest()[:32]
  try:
    sha = memo.read_text().strip()
    if re.fullmatch(r"[0-9a-f]{64}", sha):
      return sha
  except OSError:
    pass
  sha = data.file_sha256(path)
  if time.time() - max(st.st_mtime, st.st_ctime) >= RACY_S:
    try:
      memo.parent.mkdir(parents=True, exist_ok=True)
      files.write_text(memo, sha + "\n")
    except (OSError, UserError):  # a read-only cache only costs the next start a read
      pass
  return sha


def config_source(config) -> tuple[prepare.Source, str]:
  """The text of `config.data.path` or `.corpus`, and its sha256 (the registry's, if named)."""
  if config.data.path:
    path = Path(config.data.path)
    prepare.check_source(path)
    return prepare.Source(path, str(path)), source_sha256(path)
  name = config.data.corpus
  path = data.resolve_corpus(name)  # checked against the registry's sha256
  return prepare.Source(path, name), data.corpus_sha256(name)


def tokenizer_key(tok) -> str:
  """A short digest of a tokenizer, for the names of folders encoded with it."""
  return hashlib.sha256(json.dumps(tok.to_json(), sort_keys=True).encode()).hexdigest()[:16]


INHERITED = "config.train.init_from's"  # whose tokenizer a transfer run encodes with


def for_config(config, base=None) -> tuple[Path, str]:
  """(token folder, name for logs) that `config` trains on, preparing it into the cache if new.

  With `base` (the tokenizer of the run that `config.train.init_from` names),
  a corpus or path is encoded with that vocabulary, grown by the characters
  it lacks; a token folder is checked against it in `load_corpus`.
  """
  d = config.data
  if d.tokens:
    return Path(d.tokens), str(d.tokens)
  source, sha = config_source(config)
  folder = cache_dir() / cache_key(sha, d.tokenizer, d.vocab_size, d.train_fraction)
  if base is not None:
    folder = folder.with_name(f"{folder.name}-from{tokenizer_key(base)}")
  if not (folder / "meta.json").is_file():
    if folder.is_dir():  # written by hand or by an older layout: not ours to trust
      raise _bad(folder, "is incomplete (no meta.json)")
    try:
      prepare.prepare(source, folder, d.tokenizer, d.vocab_size, d.train_fraction,
                      tokenizer=base, extend=True, whose=INHERITED)
    except UserError:
      if not (folder / "meta.json").is_file():  # else another process got there first
        raise
  return folder, source.name


def remap_chars(folder: Path, meta: dict, old, new, out: Path) -> dict:
  """Copies a character token folder into `out` with its ids in the vocabulary `new`.

  `new` must hold every character of `old` (transfer: a source run's
  vocabulary grown by the folder's new characters); each id becomes the id of
  its character in `new`. Written as `prepare` writes a folder.
  """
  lut = new.encode(old.chars).astype(np.int64)  # old id -> new id
  dtype = prepare.dtype_for(new.vocab_size)

  def write_ids(tmp: Path) -> dict:
    for split in prepare.SPLITS:
      writer = prepare.IdWriter(tmp / f"{split}.bin", dtype)
      try:
        ids = np.memmap(folder / f"{split}.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"),
                        mode="r") if meta[split]["tokens"] else np.zeros(0, np.uint16)
        for start in range(0, ids.size, prepare.CHUNK_BYTES):
          writer.write(lut[ids[start:start + prepare.CHUNK_BYTES]].astype(dtype))
      finally:
        writer.close()
    return {**meta, "dtype": dtype.name, "remapped_from": str(folder),
            "tokenizer": {**meta["tokenizer"], "vocab_size": new.vocab_size}}

  return prepare.write_folder(out, new, False, write_ids)


def _in_vocabulary(folder: Path, prepared: Tokens, base) -> Path:
  """`folder`, or its copy in the cache with ids in `base`'s vocabulary grown by its characters.

  A BPE folder must have been prepared with `base` itself (launch/prepare.py
  --init_from); a character folder is remapped once (`remap_chars`).
  """
  tok = prepared.tokenizer
  fix = ("prepare it with that run's vocabulary: python launch/prepare.py --path=TEXT "
         "--init_from=RUN --out=NEW_FOLDER, and train on NEW_FOLDER")
  if tok.kind != base.kind or (tok.kind == "bpe" and tok != base):
    raise UserError(f"token folder {folder} holds {tok.describe()} but the run in "
                    f"config.train.init_from used {base.describe()}; {fix}")
  grown = base.extended(tok.chars) if tok.kind == "char" else base
  if grown == tok:
    return folder
  meta_key = hashlib.sha256(json.dumps(prepared.meta, sort_keys=True).encode()).hexdigest()
  out = cache_dir() / f"remap-{meta_key[:16]}-to{tokenizer_key(grown)}"
  if not (out / "meta.json").is_file():
    try:
      remap_chars(folder, prepared.meta, tok, grown, out)
    except UserError:
      if not (out / "meta.json").is_file():
        raise
  return out


# The config's data fields that a token folder fixes, and their defaults.
_FOLDER_FIELDS = {"tokenizer": "char", "vocab_size": 0, "train_fraction": 0.9}


def adopt_settings(config, have: dict, owner: str, fix: str) -> None:
  """`owner` (a token folder, or the run a transfer starts from) decides config.data's
  tokenizer fields in `have`: a field left at its default takes `owner`'s value (so
  `config.json` records it); one set to something else must agree with it.
  """
  d = config.data
  differ = {k: v for k, v in have.items() if d[k] != v and d[k] != _FOLDER_FIELDS[k]}
  if differ:
    first = next(iter(differ))
    raise UserError(f"{owner} has {first}={differ[first]!r} but config.data.{first} is "
                    f"{d[first]!r}; drop --config.data.{first}{fix}")
  d.update(have)


def tokenizer_settings(tok) -> dict:
  """The config.data fields a tokenizer fixes."""
  return {"tokenizer": tok.kind, "vocab_size": tok.vocab_size if tok.kind == "bpe" else 0}


def adopt_folder_settings(tokens: Tokens, config, where: str) -> None:
  """A folder named by `config.data.tokens` decides the tokenizer fields (`adopt_settings`)."""
  meta = tokens.meta["tokenizer"]
  have = {"tokenizer": meta["kind"], "vocab_size": meta["vocab_size"] if meta["kind"] == "bpe"
          else 0, "train_fraction": tokens.meta["train_fraction"]}
  adopt_settings(config, have, f"token folder {where}",
                 ", or prepare the folder with this config's settings")


class Corpus(NamedTuple):
  """A run's tokens: the tokenizer, both splits, and tokens per character of each."""
  tokenizer: tokenizer_lib.CharTokenizer | tokenizer_lib.BpeTokenizer
  name: str
  train_ids: np.ndarray  # read-only memmaps of a token folder: uint16 or uint32 ids
  val_ids: np.ndarray
  # Tokens per character of the val (and train) text, for bits per character:
  # 1.0 for characters; under 1 for BPE, whose losses are per token.
  tokens_per_char: float = 1.0
  train_tokens_per_char: float = 1.0
  sha256: str = ""  # of the source text: a run resumes only on the text it started on


def load_corpus(config, base=None) -> Corpus:
  """Checks `config` against the data, then memory-maps its token folder.

  The folder is `config.data.tokens`, or the corpus or path prepared once into
  the cache (`for_config`). With `base`, the ids are in that tokenizer's
  vocabulary, grown by the characters it lacks (a run that starts from
  another's weights). Every user mistake in the config or the data fails here
  or in `loop.make_mesh`, in one line, before anything compiles.
  """
  config_lib.validate(config)
  folder, name = for_config(config, base)
  prepared = open_tokens(folder)
  if config.data.tokens:
    adopt_folder_settings(prepared, config, str(folder))
    if base is not None:
      prepared = open_tokens(_in_vocabulary(folder, prepared, base))
  config_lib.validate_for_data(config, len(prepared.train), len(prepared.val))
  return Corpus(prepared.tokenizer, name, prepared.train, prepared.val,
                tokens_per_char=prepared.tokens_per_char("val"),
                train_tokens_per_char=prepared.tokens_per_char("train"),
                sha256=prepared.meta["source"].get("sha256", ""))
