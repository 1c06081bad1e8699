"""Text in, integer batches out: corpus lookup, tokenizer, split, batches.

Batches are drawn from an explicit PRNG key, so a step's batch depends only
on (seed, step): a resumed run sees the batches an unbroken run would have
seen. `draw_windows` draws them on device from a corpus every device holds;
`window_starts` and `gather_windows` draw the same windows on the host, from
numpy arrays or memmaps of any size (see `batches.py`).

Owns: the corpus registry and downloads, `split`, `draw_windows` (and the
lecture's `get_batch`), `window_starts`, the windows of an exact evaluation
(`sliding_windows`, `spaced_windows`),
`gather_windows` (`CharTokenizer` moved to tokenizer.py and is re-exported here).
May import: JAX, numpy, tokenizer, errors.
"""

import functools
import hashlib
import json
import mmap
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax.errors import UserError
from minigpt_jax.tokenizer import CharTokenizer  # noqa: F401  (it lived here; still importable)

REGISTRY = Path(__file__).resolve().parent / "corpora.json"  # package data
DATA_DIR_ENV = "MINIGPT_DATA_DIR"


def user_cache_dir() -> Path:
  """The project's folder in the user's cache: `$XDG_CACHE_HOME/minigpt_jax`, by
  default `~/.cache/minigpt_jax`, so an installed package (site-packages) and a
  checkout stay read-only."""
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base).expanduser() / "minigpt_jax"


def download_dir() -> Path:
  """Where downloaded corpora are kept: `user_cache_dir()/corpora`, never the package."""
  return user_cache_dir() / "corpora"


@functools.cache
def _registry() -> dict:
  return json.loads(REGISTRY.read_text())


def corpus_names() -> list[str]:
  return sorted(_registry())


def file_sha256(path: Path) -> str:
  """A file's sha256, read in 4 MB chunks (token sources may be far larger than memory)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def _checked(path: Path, name: str, entry: dict) -> Path:
  digest = file_sha256(path)
  if digest != entry["sha256"]:
    raise UserError(
        f"corpus {name!r} at {path} has sha256 {digest[:12]}..., expected "
        f"{entry['sha256'][:12]}...; replace it with the file from {entry['url']}")
  return path


def _download(url: str, dest: Path, name: str, entry: dict) -> Path:
  """Downloads to a temp file beside `dest`, checks it, then renames atomically."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out:
      with urllib.request.urlopen(url, timeout=30) as response:
        out.write(response.read())
    digest = file_sha256(Path(tmp))
    if digest != entry["sha256"]:
      raise UserError(
          f"corpus {name!r} downloaded from {url} has sha256 {digest[:12]}..., "
          f"expected {entry['sha256'][:12]}...; put the right file at {dest} "
          f"or in ${DATA_DIR_ENV}")
    os.replace(tmp, dest)
    return dest
  except (urllib.error.URLError, OSError) as e:
    raise UserError(
        f"could not download corpus {name!r} from {url} ({e}); put "
        f"{entry['file']} in {dest.parent} or in a folder named by "
        f"${DATA_DIR_ENV}") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def corpus_sha256(name: str) -> str:
  """The sha256 the registry pins for a named corpus."""
  return _registry()[name]["sha256"]


def resolve_corpus(name: str, cache_dir: Path | None = None) -> Path:
  """Path of a named corpus: $MINIGPT_DATA_DIR, then the cache (`download_dir()`), then download."""
  registry = _registry()
  if name not in registry:
    raise UserError(f"unknown corpus {name!r}; use one of {', '.join(sorted(registry))}"
                    " or set config.data.path to a text file")
  entry = registry[name]
  env_dir = os.environ.get(DATA_DIR_ENV)
  if env_dir and (Path(env_dir) / entry["file"]).is_file():
    return _checked(Path(env_dir) / entry["file"], name, entry)
  cached = Path(cache_dir if cache_dir is not None else download_dir()) / entry["file"]
  if cached.is_file():
    return _checked(cached, name, entry)
  return _download(entry["url"], cached, name, entry)


def read_text(path: str | Path) -> str:
  """Reads a UTF-8 text file, with one-line errors for the usual mistakes."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"text file {path} does not exist; check config.data.path")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"text file {path} is not UTF-8 ({e.reason} at byte {e.start}); "
                    "convert it to UTF-8") from None
  if not text:
    raise UserError(f"text file {path} is empty; point config.data.path at a text")
  return text


def load_text(config) -> tuple[str, str]:
  """The training text of a config and a short name for logs."""
  if config.data.path:
    return read_text(config.data.path), str(config.data.path)
  return read_text(resolve_corpus(config.data.corpus)), config.data.corpus


def split(ids: np.ndarray, train_fraction: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
  """First 90% for training, the rest for validation, as in the lecture."""
  n = int(train_fraction * len(ids))
  return ids[:n], ids[n:]


def draw_windows(key: jax.Array, data_N: jax.Array, batch_size: int,
                 block_size: int) -> jax.Array:
  """`batch_size` random windows [B, block_size + 1] of `data_N`: inputs and their targets.

  Traceable: call it inside jit with static `batch_size` and `block_size`.
  Its int32 starts reach 2**31 tokens; larger corpora are drawn on the host.
  """
  span = data_N.shape[0] - block_size
  if span > INT32_SPAN:
    raise ValueError(f"{data_N.shape[0]} tokens are past int32 starts; draw on the host")
  starts_B = jax.random.randint(key, (batch_size,), 0, span)
  offsets_T = jnp.arange(block_size + 1)
  return data_N[starts_B[:, None] + offsets_T[None, :]]


def get_batch(key: jax.Array, data_N: jax.Array, batch_size: int,
              block_size: int) -> tuple[jax.Array, jax.Array]:
  """The lecture's get_batch: `draw_windows` as inputs x_BT and targets y_BT shifted by one."""
  windows_BT1 = draw_windows(key, data_N, batch_size, block_size)
  return windows_BT1[:, :-1], windows_BT1[:, 1:]


def sliding_windows(num_tokens: int, block_size: int, stride: int):
  """Windows that score every next-token target of `num_tokens` ids exactly once.

  Returns (starts [W] int64, first [W] int32): window w holds ids
  starts[w] .. starts[w] + block_size and scores its positions from first[w]
  on. Starts move by `stride`, and a last window ends at the last id. The
  first window scores all its positions; each later one only the targets no
  earlier window scored, so with a stride under block_size every scored
  target sees at least block_size - stride tokens of context. The counts add
  up to num_tokens - 1, each target once.
  """
  last = num_tokens - 1 - block_size  # the last start whose window fits
  starts = np.arange(0, last + 1, stride, dtype=np.int64)
  if starts[-1] != last:
    starts = np.append(starts, last)
  first = np.zeros(len(starts), np.int32)
  first[1:] = starts[:-1] + block_size - starts[1:]  # targets up to there were scored
  return starts, first


def spaced_windows(num_tokens: int, block_size: int, count: int):
  """`count` evenly spaced windows of `num_tokens` ids, each scoring all its positions.

  Returns (starts [count] int64, first [count] int32 of zeros), as
  `sliding_windows` does; the same windows at every call.
  """
  last = num_tokens - 1 - block_size
  starts = np.round(np.linspace(0, last, count)).astype(np.int64)
  return starts, np.zeros(count, np.int32)


# The largest range of starts that draw_windows' int32 randint draws from.
INT32_SPAN = int(np.iinfo(np.int32).max)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _randint_starts(keys_K, batch_size: int, span: int) -> jax.Array:
  return jax.vmap(lambda key: jax.random.randint(key, (batch_size,), 0, span))(keys_K)


@functools.partial(jax.jit, static_argnums=1)
def _wide_bits(keys_K, batch_size: int) -> jax.Array:
  return jax.vmap(lambda key: jax.random.bits(key, (2, batch_size), jnp.uint32))(keys_K)


def window_starts(keys_K: jax.Array, num_tokens: int, batch_size: int,
                  block_size: int) -> np.ndarray:
  """Starts [K, B] (int64, on the host) of the windows of `num_tokens`, one row per key.

  Up to 2**31 starts: draw_windows' own randint, so the host and the device draw
  the same windows from the same keys. Past that (int32 overflows, and jit has
  no 64-bit integers without x64): two uint32 draws made one uint64, modulo
  the range; the bias is below span / 2**64, nothing for any real corpus.
  """
  span = num_tokens - block_size
  if span <= INT32_SPAN:
    return np.asarray(_randint_starts(keys_K, batch_size, span)).astype(np.int64)
  bits_K2B = np.asarray(_wide_bits(keys_K, batch_size))
  wide_KB = (bits_K2B[:, 0].astype(np.uint64) << np.uint64(32)) | bits_K2B[:, 1]
  return (wide_KB % np.uint64(span)).astype(np.int64)


def gather_windows(ids_N: np.ndarray, starts: np.ndarray, block_size: int) -> np.ndarray:
  """`ids_N[s : s + block_size + 1]` for every start, as int32 (shape starts.shape + [T+1]).

  From a whole token file's np.memmap the windows are read with pread, not
  through the mapping: a page fault maps the kernel's whole cached folio into
  the process (RSS grew past 2 GB in 50 steps on a 2 GB file), a pread copies
  only the window. So host memory does not grow with the file.
  """
  if isinstance(getattr(ids_N, "base", None), mmap.mmap) and ids_N.filename:
    return _pread_windows(ids_N, starts, block_size)
  offsets = np.arange(block_size + 1, dtype=np.int64)
  return np.asarray(ids_N[starts[..., None] + offsets], dtype=np.int32)


def _pread_windows(ids_N: np.memmap, starts: np.ndarray, block_size: int) -> np.ndarray:
  width = (block_size + 1) * ids_N.itemsize
  flat = np.empty(starts.size * width, np.uint8)
  fd = os.open(ids_N.filename, os.O_RDONLY)
  try:
    for i, start in enumerate(starts.reshape(-1).tolist()):
      os.preadv(fd, [memoryview(flat[i * width:(i + 1) * width])],
                ids_N.offset + start * ids_N.itemsize)
  finally:
    os.close(fd)
  windows = flat.view(ids_N.dtype).reshape(*starts.shape, block_size + 1)
  return windows.astype(np.int32)
