"""Writing a token folder: a text tokenized once into `train.bin`/`val.bin`.

`prepare(source, out, kind, vocab_size, train_fraction)` writes a folder of

- `train.bin`, `val.bin`: the ids as raw little-endian uint16 (a vocabulary of
  up to 65536 tokens) or uint32, nanoGPT's layout;
- `tokenizer.json`: `tokenizer.to_json()`, the form checkpoints save;
- `meta.json`: the source (name, path, bytes, sha256), the tokenizer, the
  dtype, `train_fraction`, and the tokens and characters of each split.

It streams: the text is read in chunks of a few MB (an incremental UTF-8
decoder carries a character cut by a chunk's end), never whole, so memory
stays flat however long the text is. The first pass hashes the file, counts
its characters and collects them (a character vocabulary is the sorted set of
the whole text's characters, as the lecture builds it, so ids are unchanged).
The split is made on the text, as before: the first `int(train_fraction *
characters)` characters are train, the rest val, and each side is encoded on
its own. Characters encode vectorized (UTF-32 code points through a lookup
table); BPE is trained on the train side only, then both sides are encoded by
the library's parallel batch encoder, in pieces cut after a newline between
two non-space characters. The byte-level pre-tokenizer never joins across
such a cut, so the pieces give exactly the ids of encoding each side whole.

The folder is written under a temporary name and renamed when complete: a
killed prepare leaves no folder that reads as prepared, and the next prepare of
the same folder removes what a SIGKILL left (`remove_stale_temps`).

Owns: the token folder format (`FORMAT`, `FILES`), `prepare`, its temp folders
(`write_folder`), `encode_chunks` (a text encoded as `prepare` would, streamed).
May import: numpy, tokenizer, errors.
"""

import codecs
import glob
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from minigpt_jax import tokenizer as tokenizer_lib
from minigpt_jax.errors import UserError

FORMAT = 1
FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")
SPLITS = ("train", "val")
CHUNK_BYTES = 4 << 20  # read size: memory per chunk is a small multiple of it
_BPE_PIECE_CHARS = 1 << 16  # the batch encoder's unit of parallel work
_BPE_MAX_CARRY = 64 << 20  # characters without a safe cut before one is forced
_UNICODE = 0x110000
# After a newline between two non-space characters, byte-level BPE's
# pre-tokenizer starts a new word on both sides, whatever text surrounds them.
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def dtype_for(vocab_size: int) -> np.dtype:
  """The narrowest id dtype of the folder: uint16 halves the files of most vocabularies."""
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# -- Reading the text in chunks ------------------------------------------------------------


class Source(NamedTuple):
  path: Path
  name: str  # for logs and meta.json: a corpus name or the path


def check_source(path: Path) -> None:
  """A missing or empty text fails in one line, before any hashing or training."""
  if not path.is_file():
    raise UserError(f"text file {path} does not exist; check config.data.path or --path")
  if path.stat().st_size == 0:
    raise UserError(f"text file {path} is empty; point config.data.path (or --path) at a text")


def _chunks(path: Path) -> Iterator[tuple[bytes, str, bool]]:
  """(raw bytes, decoded text, whether they are the same ASCII) chunks of a UTF-8 file.

  Bytes that are not UTF-8 are a one-line error.
  """
  decoder = codecs.getincrementaldecoder("utf-8")()
  offset, cr = 0, ""
  with open(path, "rb") as f:
    while True:
      raw = f.read(CHUNK_BYTES)
      try:
        text = decoder.decode(raw, final=not raw)
      except UnicodeDecodeError as e:
        at = offset - len(decoder.getstate()[0]) + e.start
        raise UserError(f"text file {path} is not UTF-8 ({e.reason} near byte {at}); "
                        "convert it to UTF-8") from None
      offset += len(raw)
      # Universal newlines, as Path.read_text reads: \r\n and \r become \n; a \r
      # that ends a chunk waits for the next, which may start with \n.
      same = not cr and raw.isascii() and b"\r" not in raw  # then text is raw, decoded
      text, cr = cr + text, ""
      if raw and text.endswith("\r"):
        text, cr = text[:-1], "\r"
      if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
      if text or raw:
        yield raw, text, same
      if not raw:
        return


def _codepoints(raw: bytes, text: str, same: bool) -> np.ndarray:
  """The code points of a chunk's text: its bytes themselves where it is ASCII (fast)."""
  if same:
    return np.frombuffer(raw, dtype=np.uint8)
  return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class _Scan(NamedTuple):
  sha256: str
  bytes: int
  chars: int
  codepoints: np.ndarray  # sorted, the text's distinct characters


def _scan(path: Path) -> _Scan:
  """The first pass: sha256, size, character count and character set, chunk by chunk."""
  digest, n_bytes, n_chars = hashlib.sha256(), 0, 0
  seen = np.zeros(_UNICODE, dtype=bool)
  for raw, text, same in _chunks(path):
    digest.update(raw)
    n_bytes += len(raw)
    n_chars += len(text)
    if same:  # ASCII: only bytes not seen yet need a look, and bytes.translate finds them
      new = raw.translate(None, np.flatnonzero(seen[:128]).astype(np.uint8).tobytes())
      seen[np.unique(np.frombuffer(new, dtype=np.uint8))] = True
    else:
      seen[_codepoints(raw, text, same)] = True
  return _Scan(digest.hexdigest(), n_bytes, n_chars, np.flatnonzero(seen).astype(np.uint32))


def _split_texts(path: Path, n_train: int, codepoints: bool = False):
  """(split, piece) in file order, the first `n_train` characters being train.

  A piece is text, or with `codepoints` the array of its code points.
  """
  done = 0
  for raw, text, same in _chunks(path):
    piece = _codepoints(raw, text, same) if codepoints else text
    if done >= n_train:
      yield "val", piece
    elif done + len(text) <= n_train:
      yield "train", piece
    else:
      cut = n_train - done
      yield "train", piece[:cut]
      yield "val", piece[cut:]
    done += len(text)


def _of_split(path: Path, n_train: int, split: str) -> Iterator[str]:
  for side, text in _split_texts(path, n_train):
    if side == split and len(text):
      yield text


def _safe_pieces(texts: Iterator[str]) -> Iterator[list[str]]:
  """Lists of pieces of the concatenated `texts`, each ending at a `_SAFE_CUT`."""
  carry, piece_chars = "", _BPE_PIECE_CHARS
  for text in texts:
    buf, start, pieces = carry + text, 0, []
    while (m := _SAFE_CUT.search(buf, start + piece_chars)) is not None:
      pieces.append(buf[start:m.end()])
      start = m.end()
    carry = buf[start:]
    if len(carry) > _BPE_MAX_CARRY:  # a text without newlines: cut anyway
      pieces.append(carry)
      carry = ""
    if pieces:
      yield pieces
  if carry:
    yield [carry]


def encode_chunks(path: Path, tok,
                  whose: str = "tokenizer's") -> Iterator[tuple[np.ndarray, int]]:
  """(ids, characters) of successive pieces of a UTF-8 file, in flat memory.

  The ids are those `prepare` writes for the same text with the same
  tokenizer: BPE encodes the same safe pieces. A missing, empty or non-UTF-8
  file, or a character outside the vocabulary ("the {whose} vocabulary"), is
  a one-line UserError.
  """
  check_source(path)
  texts = (text for _, text, _ in _chunks(path))
  if tok.kind == "bpe":
    for pieces in _safe_pieces(texts):
      for piece, ids in zip(pieces, tok.encode_batch(pieces)):
        yield np.asarray(ids, np.int32), len(piece)
    return
  for text in texts:
    try:
      ids = tok.encode(text)
    except UserError as e:
      raise UserError(f"{path} cannot be encoded with the {whose} vocabulary: {e}") from None
    yield np.asarray(ids, np.int32), len(text)


# -- Writing a folder ----------------------------------------------------------------------


class IdWriter:
  """Appends ids to a .bin file in `dtype`, refusing an id the dtype cannot hold."""

  def __init__(self, path: Path, dtype: np.dtype):
    self.path, self.dtype, self.count = path, dtype, 0
    self._f = open(path, "wb")

  def write(self, ids: np.ndarray) -> None:
    if ids.size == 0:
      return
    if ids.dtype.itemsize > self.dtype.itemsize:  # a wider id may not fit
      top = int(ids.max())
      if top > np.iinfo(self.dtype).max:
        raise UserError(f"token id {top} does not fit the {self.dtype.name} of {self.path}; "
                        "this is a bug in prepare: report it")
    self._f.write(memoryview(np.ascontiguousarray(ids, dtype=self.dtype.newbyteorder("<"))))
    self.count += ids.size

  def close(self) -> None:
    self._f.flush()
    os.fsync(self._f.fileno())
    self._f.close()


def _encode_chars(path: Path, n_train: int, codepoints: np.ndarray, writers: dict) -> None:
  """Each split's characters as ids: `codepoints` is the vocabulary, id i's code point."""
  dtype = writers["train"].dtype
  lut = np.zeros(max(int(codepoints.max()) + 1, 256), dtype=dtype)  # code point -> id
  lut[codepoints] = np.arange(len(codepoints), dtype=dtype)
  # ASCII bytes to ids in one bytes.translate pass, when every id fits a byte.
  table = lut[:256].astype(np.uint8).tobytes() if len(codepoints) <= 256 else None
  for split, codes in _split_texts(path, n_train, codepoints=True):
    if codes.dtype == np.uint8 and table is not None:
      writers[split].write(np.frombuffer(codes.tobytes().translate(table), dtype=np.uint8))
    else:
      writers[split].write(lut[codes])


def _encode_bpe(path: Path, n_train: int, tok: tokenizer_lib.BpeTokenizer,
                writers: dict) -> None:
  for split in SPLITS:
    for pieces in _safe_pieces(_of_split(path, n_train, split)):
      for ids in tok.encode_batch(pieces):
        writers[split].write(ids)


def _train_bpe(path: Path, n_train: int, vocab_size: int, name: str):
  pieces = (p for batch in _safe_pieces(_of_split(path, n_train, "train")) for p in batch)
  return tokenizer_lib.train_bpe(pieces, vocab_size, name)


def prepare(source: Source, out: Path, kind: str = "char", vocab_size: int = 0,
            train_fraction: float = 0.9, replace_existing: bool = False,
            tokenizer=None, extend: bool = False, whose: str = "the model's") -> dict:
  """Tokenizes `source` into the folder `out` (see the module docstring); returns its meta.

  `out` must not exist yet (or be empty). If another process completes the
  same folder first (`replace_existing=False` and a complete `out` appears),
  this one's copy is dropped and that folder is kept. A given `tokenizer` (an
  imported model's, or a run's that another starts from) is used, not built
  from the text: `kind` and `vocab_size` are its own. A character it lacks is
  a UserError naming `whose` tokenizer, unless `extend` lets a character
  vocabulary grow by them (`CharTokenizer.extended`: old ids keep their meaning).
  """
  if tokenizer is not None:
    kind = tokenizer.kind
    vocab_size = tokenizer.vocab_size if kind == "bpe" else 0
  if kind not in tokenizer_lib.KINDS:
    raise UserError(f"tokenizer {kind!r} is unknown; use one of "
                    f"{', '.join(tokenizer_lib.KINDS)}")
  if tokenizer is None and kind == "bpe" and vocab_size < tokenizer_lib.min_bpe_vocab():
    raise UserError(f"vocab_size {vocab_size} is too small for byte-level BPE, which starts "
                    "from the 256 bytes; set vocab_size (--vocab_size, "
                    f"config.data.vocab_size) to {tokenizer_lib.min_bpe_vocab()} or more")
  out = Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"{out} already exists and is not empty; remove it or pick another --out")
  check_source(source.path)
  scan = _scan(source.path)
  n_train = int(train_fraction * scan.chars)
  if tokenizer is not None:
    tok = tokenizer
    chars = "".join(map(chr, scan.codepoints.tolist()))
    if kind == "char" and extend:
      tok = tokenizer.extended(chars)
    missing = tok.unknown(chars)
    if missing:
      more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
      raise UserError(f"{source.path} has characters that {whose} tokenizer cannot encode: "
                      f"{''.join(missing[:10])!r}{more}; remove them or use another text")
  elif kind == "char":
    tok = tokenizer_lib.CharTokenizer("".join(map(chr, scan.codepoints.tolist())))
  else:
    tok = _train_bpe(source.path, n_train, vocab_size, source.name)
  dtype = dtype_for(tok.vocab_size)

  def write_ids(tmp: Path) -> dict:
    writers = {s: IdWriter(tmp / f"{s}.bin", dtype) for s in SPLITS}
    try:
      if kind == "char":
        vocab = np.fromiter(map(ord, tok.chars), np.uint32, len(tok.chars))
        _encode_chars(source.path, n_train, vocab, writers)
      else:
        _encode_bpe(source.path, n_train, tok, writers)
    finally:
      for w in writers.values():
        w.close()
    chars = {"train": n_train, "val": scan.chars - n_train}
    return {
        "format": FORMAT,
        "source": {"name": source.name, "path": str(source.path), "bytes": scan.bytes,
                   "sha256": scan.sha256},
        "tokenizer": {"kind": kind, "vocab_size": tok.vocab_size,
                      "requested_vocab_size": vocab_size},
        "dtype": dtype.name,
        "train_fraction": train_fraction,
        **{s: {"tokens": writers[s].count, "chars": chars[s]} for s in SPLITS},
    }

  return write_folder(out, tok, replace_existing, write_ids)


def write_folder(out: Path, tok, replace_existing: bool, write_ids) -> dict:
  """Writes `out` under a temporary name: `write_ids(tmp)` writes the .bin files, returns meta."""
  out.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_temps(out)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    meta = write_ids(tmp)
    (tmp / "tokenizer.json").write_text(json.dumps(tok.to_json(), ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _commit(tmp, out, replace_existing)
  except OSError as e:
    raise UserError(f"could not write the token folder {out}: {e.strerror or e}; free disk "
                    "space or make the folder writable, then rerun") from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return meta


STALE_AFTER_S = 3600  # a live prepare writes its temp folder far more often than this


def remove_stale_temps(out: Path) -> list[Path]:
  """Removes the temp folders of prepares of `out` that were killed (SIGKILL, power loss).

  A temp folder is stale when the process named in it is gone from this host and
  nothing in it changed for `STALE_AFTER_S` (so another host's live prepare, on a
  shared disk, keeps its own). Returns the folders removed.
  """
  now, removed = time.time(), []
  for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
    pid = tmp.name.rsplit("-", 1)[1]
    if not pid.isdigit() or _pid_alive(int(pid)):
      continue
    try:
      changed = max([tmp.stat().st_mtime] + [f.stat().st_mtime for f in tmp.iterdir()])
    except OSError:  # removed meanwhile
      continue
    if now - changed >= STALE_AFTER_S:
      shutil.rmtree(tmp, ignore_errors=True)
      removed.append(tmp)
  return removed


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _commit(tmp: Path, out: Path, replace_existing: bool) -> None:
  """Renames the finished folder into place; a complete one that raced us in stays."""
  if out.is_dir() and not any(out.iterdir()):
    out.rmdir()
  try:
    os.rename(tmp, out)
  except OSError:
    if replace_existing or not (out / "meta.json").is_file():
      raise
