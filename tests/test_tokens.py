"""Tests for minigpt_jax.tokens, .prepare and .tokenizer: token folders, BPE, the cache, bpc."""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error
from minigpt_jax import config as config_lib, data, loop, sampling, tokenizer, tokens
from minigpt_jax.support import restore
from minigpt_jax.tools import evaluate
from minigpt_jax import prepare as prepare_lib
from minigpt_jax.errors import UserError


def _frost():
  return data.resolve_corpus("frost")


def _source(tmp_path, text: str, name="t.txt"):
  path = tmp_path / name
  path.write_bytes(text.encode("utf-8"))
  return prepare_lib.Source(path, name)


@pytest.fixture
def small_chunks(monkeypatch):
  """Chunks of 1001 bytes and BPE pieces of 300 characters: every boundary gets crossed."""
  monkeypatch.setattr(prepare_lib, "CHUNK_BYTES", 1001)
  monkeypatch.setattr(prepare_lib, "_BPE_PIECE_CHARS", 300)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """The token cache (beside the downloaded corpora) in a temp folder, so it starts empty."""
  assert tokens.cache_dir() == data.download_dir().parent / "tokens"
  monkeypatch.setattr(tokens, "cache_dir", lambda: tmp_path / "tokens")
  return tmp_path / "tokens"


# --- Characters ---------------------------------------------------------------


def test_char_folder_holds_todays_ids_and_vocabulary(tmp_path, small_chunks):
  """Streamed, vectorized and split on the text: exactly the ids of encoding it whole."""
  meta = prepare_lib.prepare(prepare_lib.Source(_frost(), "frost"), tmp_path / "char")
  text = data.read_text(_frost())
  old = data.CharTokenizer.from_text(text)
  train_N, val_N = data.split(old.encode(text))
  prepared = tokens.open_tokens(tmp_path / "char")
  assert prepared.tokenizer == old and prepared.train.dtype == np.uint16
  np.testing.assert_array_equal(prepared.train, train_N)
  np.testing.assert_array_equal(prepared.val, val_N)
  assert meta["train"] == {"tokens": len(train_N), "chars": len(train_N)}
  assert meta["source"]["sha256"] == data.corpus_sha256("frost")
  assert json.loads((tmp_path / "char" / "tokenizer.json").read_text()) == old.to_json()


@pytest.mark.parametrize("text,sizes", [
    ("naïve ü😀 é\r\nline\rx\r\n" * 40 + "€" * 30, (1, 2, 3, 5, 7)),
    ("plain ascii lines\n" * 30 + "".join(map(chr, range(0x400, 0x500))) + "end\n" * 30,
     (64,)),  # over 256 characters: ASCII chunks through the lookup table
])
def test_chunks_carry_utf8_characters_and_newlines_across_their_ends(tmp_path, monkeypatch,
                                                                     text, sizes):
  """A character or a \\r\\n cut by a chunk's end reads as Path.read_text reads it."""
  source = _source(tmp_path, text)
  for size in sizes:
    monkeypatch.setattr(prepare_lib, "CHUNK_BYTES", size)
    prepare_lib.prepare(source, tmp_path / f"c{size}")
    whole = data.read_text(source.path)  # universal newlines
    old = data.CharTokenizer.from_text(whole)
    prepared = tokens.open_tokens(tmp_path / f"c{size}")
    assert prepared.tokenizer == old
    got = np.concatenate([prepared.train, prepared.val])
    np.testing.assert_array_equal(got, old.encode(whole))


# --- BPE ----------------------------------------------------------------------


def test_bpe_folder_encodes_each_split_whole_and_training_is_deterministic(tmp_path,
                                                                          monkeypatch):
  text = data.read_text(_frost())[:20000] + "\n\n  ü😀 naïve\n\nxx\n" * 20
  source = _source(tmp_path, text)
  prepare_lib.prepare(source, tmp_path / "a", "bpe", 300)
  monkeypatch.setattr(prepare_lib, "CHUNK_BYTES", 1001)
  monkeypatch.setattr(prepare_lib, "_BPE_PIECE_CHARS", 300)
  meta = prepare_lib.prepare(source, tmp_path / "b", "bpe", 300)
  for name in prepare_lib.FILES:  # another chunking, another training: the same bytes
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  prepared = tokens.open_tokens(tmp_path / "b")
  tok, n = prepared.tokenizer, int(0.9 * len(text))
  assert tok.kind == "bpe" and tok.vocab_size == 300 and meta["dtype"] == "uint16"
  np.testing.assert_array_equal(prepared.train, tok.encode(text[:n]))  # trained on train only
  np.testing.assert_array_equal(prepared.val, tok.encode(text[n:]))
  assert tok.decode(prepared.val) == text[n:]
  assert meta["val"] == {"tokens": len(prepared.val), "chars": len(text) - n}
  assert tokenizer.from_json(json.loads(json.dumps(tok.to_json()))) == tok
  assert tok.unknown("any UTF-8 at all: ☃") == []


@pytest.mark.parametrize("size,words", [(255, ["256 or more"]), (200000, ["at most", "or less"])])
def test_a_bpe_vocab_size_the_text_cannot_have_is_one_error(tmp_path, size, words):
  source = _source(tmp_path, "the cat sat on the mat\n" * 50)
  with pytest.raises(UserError) as e:
    prepare_lib.prepare(source, tmp_path / "out", "bpe", size)
  for word in words:
    assert word in str(e.value)
  assert not (tmp_path / "out").exists()


def test_stream_decode_holds_a_character_cut_between_pieces():
  bpe = tokenizer.train_bpe(iter(["abc\n"]), 256, "t")  # bytes only: ü is two tokens
  ids = bpe.encode("aü😀b")
  pieces = [ids[i:i + 1] for i in range(len(ids))]
  out = list(sampling.decode_stream(bpe, pieces))
  assert "".join(out) == "aü😀b" and "\ufffd" not in "".join(out)


# --- Training reads token folders ---------------------------------------------


def _old_load_corpus(config, base=None):
  """tokens.load_corpus as it was before token folders: the text, encoded whole in Python."""
  config_lib.validate(config)
  text, name = data.load_text(config)
  tok = data.CharTokenizer.from_text(text)
  train_N, val_N = data.split(tok.encode(text), config.data.train_fraction)
  return tokens.Corpus(tok, name, train_N, val_N)


def _evals(workdir):
  records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  return [(r["step"], r["train_loss"], r["val_loss"]) for r in records if r["kind"] == "eval"]


def test_a_char_run_gives_todays_losses_through_token_files(tiny_config, tmp_path, cache,
                                                            monkeypatch):
  tiny_config.train.update(steps=20, eval_interval=10)
  new = loop.train_and_evaluate(tiny_config, tmp_path / "new", show_progress=False)
  corpus = tokens.load_corpus(tiny_config)
  assert isinstance(corpus.train_ids, np.memmap) and corpus.train_ids.dtype == np.uint16
  monkeypatch.setattr(tokens, "load_corpus", _old_load_corpus)
  old = loop.train_and_evaluate(tiny_config, tmp_path / "old", show_progress=False)
  assert _evals(tmp_path / "new") == _evals(tmp_path / "old")
  assert new["val_bpc"] == old["val_bpc"] and len(list(cache.iterdir())) == 1


def test_the_cache_is_keyed_by_source_and_settings_and_reused(tiny_config, cache, monkeypatch):
  calls, prepare = [], prepare_lib.prepare
  monkeypatch.setattr(prepare_lib, "prepare", lambda *a, **k: calls.append(a) or prepare(*a, **k))
  first, _ = tokens.for_config(tiny_config)
  assert first.parent == cache and data.corpus_sha256("frost")[:20] in first.name
  assert tokens.for_config(tiny_config)[0] == first and len(calls) == 1
  tiny_config.data.update(tokenizer="bpe", vocab_size=300)
  bpe, _ = tokens.for_config(tiny_config)
  tiny_config.data.train_fraction = 0.8
  assert len({first, bpe, tokens.for_config(tiny_config)[0]}) == 3


def test_a_path_texts_sha256_is_read_once_per_version_of_the_file(tmp_path, cache,
                                                                 monkeypatch):
  reads, file_sha256 = [], data.file_sha256
  monkeypatch.setattr(data, "file_sha256", lambda p: reads.append(p) or file_sha256(p))
  path = tmp_path / "t.txt"
  path.write_text("one text\n")
  sha = tokens.source_sha256(path)
  assert tokens.source_sha256(path) == sha and len(reads) == 2  # just written: not kept
  monkeypatch.setattr(tokens, "RACY_S", 0.0)  # as if it had been written a while ago
  assert tokens.source_sha256(path) == sha and len(reads) == 3
  assert tokens.source_sha256(path) == sha and len(reads) == 3  # remembered
  time.sleep(0.05)  # past the file clock's granularity (RACY_S is off here)
  path.write_text("two text\n")  # the same size, a new version
  assert tokens.source_sha256(path) == file_sha256(path) != sha and len(reads) == 4


def test_bpe_training_counts_bits_per_character_of_each_split(tiny_config, tmp_path):
  prepare_lib.prepare(prepare_lib.Source(_frost(), "frost"), tmp_path / "bpe", "bpe", 300)
  tiny_config.data.tokens = str(tmp_path / "bpe")  # the folder names its tokenizer
  tiny_config.train.update(steps=10, eval_interval=10, sample_tokens=0)
  corpus = tokens.load_corpus(tiny_config)
  assert (tiny_config.data.tokenizer, tiny_config.data.vocab_size) == ("bpe", 300)
  meta = json.loads((tmp_path / "bpe" / "meta.json").read_text())
  assert corpus.tokenizer.vocab_size == 300
  assert corpus.tokens_per_char == meta["val"]["tokens"] / meta["val"]["chars"] < 1
  assert corpus.train_tokens_per_char == meta["train"]["tokens"] / meta["train"]["chars"]
  summary = loop.train_and_evaluate(tiny_config, tmp_path / "run", show_progress=False)
  assert summary["vocab_size"] == 300
  assert summary["val_bpc"] == round(summary["val_loss"] * corpus.tokens_per_char / math.log(2),
                                     4)
  assert summary["train_bpc"] == round(
      summary["train_loss"] * corpus.train_tokens_per_char / math.log(2), 4)
  # Evaluation of the checkpoint gives the run's own numbers, bits per character included.
  record = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text()
                           .splitlines()) if r["kind"] == "eval"][-1]
  result = evaluate.evaluate(tmp_path / "run")
  assert {k: result[k] for k in ("train_bpc", "val_bpc")} == {
      k: record[k] for k in ("train_bpc", "val_bpc")}
  # The checkpoint carries the tokenizer: sampling decodes with it, any prompt encodes.
  model_cfg, params, tok, _ = restore.load(tmp_path / "run")[1:]
  assert tok == corpus.tokenizer and model_cfg.vocab_size == 300
  ids, prompt = sampling.encode_prompt(tok, "☃ unseen")
  assert tok.decode(np.asarray(ids[0])) == prompt
  # A resume with another tokenizer (here: characters) is one error.
  tiny_config.data.update(tokens="", tokenizer="char", vocab_size=0)
  with pytest.raises(UserError, match="different vocabulary.*byte-level BPE, 300 tokens"):
    loop.train_and_evaluate(tiny_config, tmp_path / "run", show_progress=False)


# --- Bad input ----------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
  prepare_lib.prepare(_source(tmp_path, "abcd efg\n" * 100), tmp_path / "tok")
  return tmp_path / "tok"


@pytest.mark.parametrize("damage,words", [
    (lambda f: (f / "val.bin").unlink(), ["has no val.bin", "launch/prepare.py"]),
    (lambda f: (f / "meta.json").unlink(), ["has no meta.json"]),
    (lambda f: (f / "meta.json").write_text("{"), ["unreadable meta.json"]),
    (lambda f: (f / "tokenizer.json").write_text('{"kind": "word"}'), ["unreadable"]),
    (lambda f: (f / "train.bin").write_bytes(b"\0" * 3), ["train.bin of 3 bytes"]),
])
def test_a_damaged_token_folder_is_one_error(folder, damage, words):
  damage(folder)
  with pytest.raises(UserError) as e:
    tokens.open_tokens(folder)
  for word in words:
    assert word in str(e.value)
  assert "\n" not in str(e.value)


def test_a_uint16_overflow_is_one_error_and_the_writer_refuses_one(folder, tmp_path):
  big = tokenizer.CharTokenizer("".join(map(chr, range(0x10000, 0x10000 + 65537))))
  (folder / "tokenizer.json").write_text(json.dumps(big.to_json()))
  meta = json.loads((folder / "meta.json").read_text())
  meta["tokenizer"]["vocab_size"] = big.vocab_size
  (folder / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(UserError, match="as uint16.*overflow"):
    tokens.open_tokens(folder)
  writer = prepare_lib.IdWriter(tmp_path / "x.bin", np.dtype(np.uint16))
  with pytest.raises(UserError, match="token id 65536 does not fit the uint16"):
    writer.write(np.array([1, 65536], np.uint32))
  writer.close()
  assert prepare_lib.dtype_for(65536) == np.uint16 and prepare_lib.dtype_for(65537) == np.uint32


def test_a_prepare_that_fails_midway_leaves_no_folder(tmp_path, monkeypatch):
  source = _source(tmp_path, "abc\n" * 100)

  def killed(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(prepare_lib, "_encode_chars", killed)
  with pytest.raises(KeyboardInterrupt):
    prepare_lib.prepare(source, tmp_path / "out")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_the_next_prepare_removes_what_a_killed_one_left(tmp_path):
  """A SIGKILL skips the cleanup; the next prepare of that folder removes its temp folder."""
  source, out = _source(tmp_path, "abc\n" * 100), tmp_path / "out"
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  killed, live, unnamed = (tmp_path / f".out.tmp-{pid}" for pid in (dead, os.getppid(), "x"))
  for folder in (killed, live):
    folder.mkdir()
    (folder / "train.bin").write_bytes(b"\0" * 8)
    old = os.stat(folder).st_mtime - 2 * prepare_lib.STALE_AFTER_S
    for path in (folder / "train.bin", folder):
      os.utime(path, (old, old))
  unnamed.mkdir()
  prepare_lib.prepare(source, out)
  assert not killed.exists()  # its process is gone and it is old
  assert live.exists() and unnamed.exists()  # a live process's, and one not named by a pid
  assert (out / "meta.json").is_file()
  # Gone from this host but written to a moment ago (another host's, on a shared disk): kept.
  killed.mkdir()
  assert prepare_lib.remove_stale_temps(out) == []


def test_a_token_folder_must_match_the_config(tiny_config, folder):
  tiny_config.data.tokens = str(folder)
  tiny_config.data.update(tokenizer="bpe", vocab_size=300)
  with pytest.raises(UserError, match="has tokenizer='char' but config.data.tokenizer is "
                     "'bpe'; drop --config.data.tokenizer"):
    tokens.load_corpus(tiny_config)
  with pytest.raises(UserError, match="does not exist"):
    tiny_config.data.update(tokens=str(folder / "nope"), tokenizer="char", vocab_size=0)
    tokens.load_corpus(tiny_config)


@pytest.mark.parametrize("fields,words", [
    ({"tokenizer": "word"}, ["config.data.tokenizer", "'word'", "char, bpe"]),
    ({"tokenizer": "bpe", "vocab_size": 100}, ["config.data.vocab_size", "256 or more"]),
    ({"vocab_size": 300}, ["config.data.vocab_size", "tokenizer=bpe"]),
])
def test_bad_tokenizer_fields_are_one_error(tiny_config, fields, words):
  tiny_config.data.update(**fields)
  with pytest.raises(UserError) as e:
    config_lib.validate(tiny_config)
  for word in words:
    assert word in str(e.value)


def test_old_char_vocabularies_still_read():
  old = {"chars": "\nabc"}
  assert tokenizer.from_json(old) == tokenizer.from_json({"kind": "char", "chars": "\nabc"})
  assert tokenizer.from_json(old).to_json() == old
  with pytest.raises(UserError, match="neither"):
    tokenizer.from_json({"kind": "bpe", "tokenizer": "not json"})


def test_prepare_cli_writes_a_folder_and_refuses_to_overwrite_it(tmp_path):
  cmd = [sys.executable, str(ROOT / "launch" / "prepare.py"), "--corpus=frost",
         "--tokenizer=bpe", "--vocab_size=300", f"--out={tmp_path / 'f'}"]
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  assert "prepared frost" in result.stderr and "vocab 300" in result.stderr
  assert tokens.open_tokens(tmp_path / "f").tokenizer.vocab_size == 300
  assert_one_line_error(subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT),
                        "already exists")
