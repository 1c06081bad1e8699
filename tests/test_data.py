"""Tests for minigpt_jax.data: tokenizer, corpus lookup, text reading, batches."""

import hashlib
import io
import shutil
import urllib.error
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minigpt_jax import data
from minigpt_jax.errors import UserError


@pytest.fixture
def frost():
  """Frost's real file: from $MINIGPT_DATA_DIR, else its pinned download (then cached)."""
  return data.resolve_corpus("frost")


def _entry(name="frost"):
  return data._registry()[name]


# --- CharTokenizer ------------------------------------------------------------


def test_tokenizer_round_trip():
  """decode(encode(text)) must be the text, or samples would print garbage."""
  text = "hello, world!\nThe woods are lovely, dark and deep."
  tok = data.CharTokenizer.from_text(text)
  assert tok.chars == "".join(sorted(set(text)))
  assert tok.vocab_size == len(set(text))
  ids_N = tok.encode(text)
  assert ids_N.dtype == np.int32
  assert ids_N.shape == (len(text),)
  assert ids_N.min() >= 0 and ids_N.max() < tok.vocab_size
  assert tok.decode(ids_N) == text
  # ids follow the sorted order: the smallest character is id 0.
  assert tok.encode(min(text))[0] == 0
  assert tok.encode(max(text))[0] == tok.vocab_size - 1


def test_tokenizer_json_round_trip():
  """A checkpoint stores the vocabulary as JSON; reloading must give the same ids."""
  text = "abcabc xyz\n"
  tok = data.CharTokenizer.from_text(text)
  back = data.CharTokenizer.from_json(tok.to_json())
  assert back.chars == tok.chars
  assert back.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(back.encode(text), tok.encode(text))
  assert back.decode(tok.encode(text)) == text


def test_encode_unknown_characters_lists_them():
  """A prompt with unseen characters must say which ones, not raise KeyError."""
  tok = data.CharTokenizer.from_text("abc")
  with pytest.raises(UserError) as e:
    tok.encode("abXcYX")
  msg = str(e.value)
  assert "'X'" in msg and "'Y'" in msg
  assert "'a'" not in msg
  assert tok.unknown("abXcYX") == ["X", "Y"]


# --- resolve_corpus -------------------------------------------------------------


def test_resolve_corpus_from_env_dir(frost, tmp_path, monkeypatch):
  """$MINIGPT_DATA_DIR wins, and the file is checked against the registry."""
  env_dir = tmp_path / "env"
  env_dir.mkdir()
  shutil.copy(frost, env_dir / "frost.txt")
  monkeypatch.setenv(data.DATA_DIR_ENV, str(env_dir))
  path = data.resolve_corpus("frost", cache_dir=tmp_path / "cache")
  assert path == env_dir / "frost.txt"
  assert hashlib.sha256(path.read_bytes()).hexdigest() == _entry()["sha256"]
  assert not (tmp_path / "cache").exists()


def test_resolve_corpus_wrong_bytes_in_env_dir(tmp_path, monkeypatch):
  """A corrupted or different file under the right name must not be trained on."""
  env_dir = tmp_path / "env"
  env_dir.mkdir()
  (env_dir / "frost.txt").write_text("not the poems\n")
  monkeypatch.setenv(data.DATA_DIR_ENV, str(env_dir))
  with pytest.raises(UserError, match="sha256"):
    data.resolve_corpus("frost", cache_dir=tmp_path / "cache")


def test_resolve_corpus_offline_says_where_to_put_file(tmp_path, monkeypatch):
  """With no network the error names the file and a place for it; nothing partial stays."""
  env_dir, cache = tmp_path / "env", tmp_path / "cache"
  env_dir.mkdir()
  cache.mkdir()
  monkeypatch.setenv(data.DATA_DIR_ENV, str(env_dir))

  def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")

  monkeypatch.setattr(data.urllib.request, "urlopen", offline)
  with pytest.raises(UserError) as e:
    data.resolve_corpus("frost", cache_dir=cache)
  msg = str(e.value)
  assert "frost.txt" in msg
  assert str(cache) in msg
  assert data.DATA_DIR_ENV in msg
  assert "\n" not in msg
  assert list(cache.iterdir()) == []


class _FakeResponse(io.BytesIO):
  """What urlopen returns: a context manager with read()."""


def _fake_urlopen(payload: bytes, calls: list):
  def urlopen(url, timeout=None):
    calls.append(url)
    return _FakeResponse(payload)
  return urlopen


def test_download_wrong_bytes_leaves_nothing(tmp_path, monkeypatch):
  """A download with the wrong checksum is refused and its temp file removed."""
  env_dir, cache = tmp_path / "env", tmp_path / "cache"
  env_dir.mkdir()
  monkeypatch.setenv(data.DATA_DIR_ENV, str(env_dir))
  calls = []
  monkeypatch.setattr(data.urllib.request, "urlopen",
                      _fake_urlopen(b"tampered\n", calls))
  with pytest.raises(UserError, match="sha256"):
    data.resolve_corpus("frost", cache_dir=cache)
  assert calls == [_entry()["url"]]
  assert not cache.exists() or list(cache.iterdir()) == []


def test_download_right_bytes_is_cached(frost, tmp_path, monkeypatch):
  """A good download lands in the cache, and the next lookup does not download again."""
  env_dir, cache = tmp_path / "env", tmp_path / "cache"
  env_dir.mkdir()
  monkeypatch.setenv(data.DATA_DIR_ENV, str(env_dir))
  calls = []
  payload = frost.read_bytes()
  monkeypatch.setattr(data.urllib.request, "urlopen", _fake_urlopen(payload, calls))
  path = data.resolve_corpus("frost", cache_dir=cache)
  assert path == cache / "frost.txt"
  assert path.read_bytes() == payload
  assert [p.name for p in cache.iterdir()] == ["frost.txt"]  # no .part left
  assert data.resolve_corpus("frost", cache_dir=cache) == path
  assert len(calls) == 1


def test_downloads_go_to_the_user_cache_not_the_package(frost, tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "empty"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.setattr(data.urllib.request, "urlopen", _fake_urlopen(frost.read_bytes(), []))
  assert data.resolve_corpus("frost") == tmp_path / "xdg" / "minigpt_jax" / "corpora" / "frost.txt"
  assert data.REGISTRY.parent == Path(data.__file__).parent  # the registry is package data


def test_unknown_corpus(tmp_path):
  with pytest.raises(UserError, match="unknown corpus 'nope'") as e:
    data.resolve_corpus("nope", cache_dir=tmp_path)
  assert "frost" in str(e.value) and "shakespeare" in str(e.value)
  assert data.corpus_names() == ["frost", "shakespeare"]


# --- read_text ------------------------------------------------------------------


def test_read_text_ok(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("héllo\n", encoding="utf-8")
  assert data.read_text(path) == "héllo\n"


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"abc\xff\xfedef", "not UTF-8"),
])
def test_read_text_errors(tmp_path, content, words):
  """Each usual mistake gives one line naming the file and the problem."""
  path = tmp_path / "t.txt"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(UserError) as e:
    data.read_text(path)
  msg = str(e.value)
  assert words in msg
  assert str(path) in msg
  assert "\n" not in msg


# --- split and get_batch --------------------------------------------------------


@pytest.mark.parametrize("n", [10, 11, 99, 1000, 1234])
def test_split_is_90_10(n):
  ids_N = np.arange(n, dtype=np.int32)
  train, val = data.split(ids_N)
  assert len(train) == int(0.9 * n)
  assert len(val) == n - int(0.9 * n)
  np.testing.assert_array_equal(np.concatenate([train, val]), ids_N)


def test_get_batch_windows():
  """x is a real window of the data and y is the same window one step later."""
  N, B, T = 50, 64, 8
  data_N = jnp.arange(N, dtype=jnp.int32)
  x_BT, y_BT = data.get_batch(jax.random.key(0), data_N, B, T)
  assert x_BT.shape == (B, T) and y_BT.shape == (B, T)
  assert x_BT.dtype == jnp.int32 and y_BT.dtype == jnp.int32
  x_BT, y_BT = np.asarray(x_BT), np.asarray(y_BT)
  np.testing.assert_array_equal(x_BT[:, 1:], y_BT[:, :-1])
  data_np = np.arange(N)
  for x_T, y_T in zip(x_BT, y_BT):
    s = x_T[0]
    assert 0 <= s and s + T + 1 <= N  # the target window stays inside the data
    np.testing.assert_array_equal(x_T, data_np[s:s + T])
    np.testing.assert_array_equal(y_T, data_np[s + 1:s + T + 1])
  # Any valid start can come up: with 64 draws from 42 starts, not all the same.
  assert len(set(x_BT[:, 0])) > 1


def test_get_batch_reaches_last_window():
  """The lecture's randint(len - block) reaches the final window and never beyond."""
  N, T = 12, 8
  data_N = jnp.arange(N, dtype=jnp.int32)
  x_BT, y_BT = data.get_batch(jax.random.key(1), data_N, 256, T)
  starts = set(np.asarray(x_BT[:, 0]).tolist())
  assert starts == set(range(N - T))
  assert int(y_BT.max()) == N - 1


def test_get_batch_key_determines_batch():
  data_N = jnp.arange(1000, dtype=jnp.int32)
  a = data.get_batch(jax.random.key(7), data_N, 4, 16)
  b = data.get_batch(jax.random.key(7), data_N, 4, 16)
  c = data.get_batch(jax.random.key(8), data_N, 4, 16)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_get_batch_under_jit():
  """The train step calls it inside jit with static sizes; results must match eager."""
  data_N = jnp.arange(300, dtype=jnp.int32) % 17
  jitted = jax.jit(data.get_batch, static_argnames=("batch_size", "block_size"))
  key = jax.random.key(3)
  x_BT, y_BT = jitted(key, data_N, batch_size=5, block_size=9)
  ex_BT, ey_BT = data.get_batch(key, data_N, 5, 9)
  assert x_BT.shape == (5, 9) and y_BT.shape == (5, 9)
  np.testing.assert_array_equal(x_BT, ex_BT)
  np.testing.assert_array_equal(y_BT, ey_BT)
