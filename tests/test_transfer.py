"""Transfer (config.train.init_from): a run started from another run's weights on a new text."""

import json

import jax
import numpy as np
import pytest

from conftest import tiny
from configs import frost_cpu
from minigpt_jax import data, loop, prepare, tokens, train
from minigpt_jax import tokenizer as tokenizer_lib
from minigpt_jax.errors import UserError
from minigpt_jax.support import checkpoint, restore, transfer

NEW = "ê—"  # Frost's characters that the source's text below lacks


def _config(path, **train):
  config = tiny(frost_cpu.get_config())
  config.data.path = str(path)
  config.train.update({"steps": 20, **train})
  return config


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
  """A source text without NEW, a target with them, and one of the source's characters only."""
  folder = tmp_path_factory.mktemp("texts")
  frost = data.read_text(data.resolve_corpus("frost"))
  plain = frost.translate({ord(c): None for c in NEW})
  paths = {"source": folder / "source.txt", "target": folder / "target.txt",
           "same_chars": folder / "same_chars.txt"}
  paths["source"].write_text(plain[:30000], encoding="utf-8")
  paths["target"].write_text(frost[30000:] + NEW, encoding="utf-8")
  paths["same_chars"].write_text(plain[30000:] + "".join(sorted(set(plain[:30000]))),
                                 encoding="utf-8")
  return paths


@pytest.fixture(scope="module")
def source(texts, tmp_path_factory):
  """A tiny run of 20 steps on the source text: the run others start from."""
  workdir = tmp_path_factory.mktemp("source")
  loop.train_and_evaluate(_config(texts["source"]), workdir, show_progress=False)
  return workdir


def _started(config, workdir):
  """A transfer run's step-0 state and corpus, as loop._start makes them."""
  base, src = transfer.vocabulary_base(config, workdir, print)
  corpus = tokens.load_corpus(config, base)
  fresh = train.create_train_state(config, corpus.tokenizer.vocab_size)
  state, record = transfer.start_from(fresh, src, corpus.tokenizer)
  return fresh, state, corpus, record


def test_step_0_holds_the_source_params_bit_for_bit_and_scores_as_it_does(texts, source,
                                                                          tmp_path):
  config = _config(texts["same_chars"], init_from=str(source))
  fresh, state, corpus, record = _started(config, tmp_path)
  loaded = restore.load(source)
  assert corpus.tokenizer == loaded.tokenizer and record["new_chars"] == ""
  for got, want in zip(jax.tree_util.tree_leaves(state.params),
                       jax.tree_util.tree_leaves(loaded.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  windows = jax.numpy.asarray(np.asarray(corpus.val_ids[:8 * 17], np.int32).reshape(8, 17))
  ours = train.eval_step(state, state.params, windows)
  theirs = train.eval_step(state, loaded.params, windows)
  assert float(ours) == float(theirs)
  assert int(state.step) == 0 and record["step"] == 20


def test_the_vocabulary_grows_by_exactly_the_new_characters_and_old_ids_keep_their_rows(
    texts, source, tmp_path):
  config = _config(texts["target"], init_from=str(source))
  fresh, state, corpus, record = _started(config, tmp_path)
  old = restore.load(source)
  n = old.tokenizer.vocab_size
  assert corpus.tokenizer.chars == old.tokenizer.chars + "".join(sorted(NEW))
  assert record["new_chars"] == "".join(sorted(NEW)) and record["vocab_size"] == n
  text = texts["target"].read_text(encoding="utf-8")
  ids = np.concatenate([corpus.train_ids, corpus.val_ids])
  assert corpus.tokenizer.decode(ids) == text  # the text, in the grown vocabulary
  got, want, init = (jax.device_get(p) for p in (state.params, old.params, fresh.params))
  for path, leaf in jax.tree_util.tree_flatten_with_path(got)[0]:
    source_leaf = np.asarray(_at(want, path))
    kept = tuple(slice(0, s) for s in source_leaf.shape)
    np.testing.assert_array_equal(leaf[kept], source_leaf)  # old ids keep their rows
    grown = np.ones(leaf.shape, bool)
    grown[kept] = False
    np.testing.assert_array_equal(leaf[grown], np.asarray(_at(init, path))[grown])
  embed = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(got)[0]
           if leaf.shape[0] == n + len(NEW)]
  assert embed, "the token embedding grew"


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_a_fine_tune_records_its_source_and_a_rerun_resumes_its_own_checkpoint(
    texts, source, tmp_path):
  """Killed half way and rerun (the source gone meanwhile), it ends as an unbroken one."""
  config = _config(texts["target"], init_from=str(source), steps=40)
  lines = []
  unbroken = loop.train_and_evaluate(config, tmp_path / "unbroken", log=lines.append,
                                     show_progress=False)
  assert f"starting from {source} step 20" in lines[0] and repr("".join(sorted(NEW))) in lines[0]
  assert unbroken["init_from"]["workdir"] == str(source.resolve())
  assert unbroken["init_from"]["step"] == 20 and unbroken["vocab_size"] == 67 + len(NEW)
  meta = checkpoint.restore_json(checkpoint.manager(tmp_path / "unbroken"), 40)[2]
  assert meta["init_from"] == unbroken["init_from"]
  from minigpt_jax.tools import hf_export
  assert str(source.resolve()) in hf_export._started_from(meta)[0]  # the model card's line
  config.train.steps = 20
  loop.train_and_evaluate(config, tmp_path / "resumed", show_progress=False)
  moved = source.with_name(source.name + "-away")
  source.rename(moved)
  try:
    config.train.steps = 40
    lines.clear()
    resumed = loop.train_and_evaluate(config, tmp_path / "resumed", log=lines.append,
                                      show_progress=False)
  finally:
    moved.rename(source)
  assert lines[0].startswith("resuming from step 20 of a run started from")
  for field in ("val_loss", "train_loss", "best_val_loss", "init_from"):
    assert resumed[field] == unbroken[field], field
  template = train.create_train_state(config, unbroken["vocab_size"])
  states = [checkpoint.restore_state(checkpoint.manager(tmp_path / name), 40, template)
            for name in ("unbroken", "resumed")]
  for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(states[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _one_line(excinfo, *needles):
  message = str(excinfo.value)
  assert "\n" not in message, message
  for needle in needles:
    assert needle in message, message


def test_a_model_field_that_differs_from_the_source_is_one_line(texts, source, tmp_path):
  config = _config(texts["target"], init_from=str(source))
  config.model.n_embed = 48
  with pytest.raises(UserError) as e:
    transfer.vocabulary_base(config, tmp_path, print)
  _one_line(e, "config.model.n_embed=32", "init_from", "48")
  config = _config(texts["target"], init_from=str(source), init_from_step="7")
  with pytest.raises(UserError) as e:
    transfer.vocabulary_base(config, tmp_path, print)
  _one_line(e, "init_from_step is 7", "20")
  config = _config(texts["target"], init_from=str(tmp_path / "nothing"))
  with pytest.raises(UserError) as e:
    transfer.vocabulary_base(config, tmp_path, print)
  _one_line(e, "holds no checkpoint")


def test_a_plain_resume_onto_another_text_is_one_line_naming_both(texts, source):
  config = _config(texts["same_chars"], steps=40)  # the same characters, another text
  with pytest.raises(UserError) as e:
    loop.train_and_evaluate(config, source, show_progress=False)
  _one_line(e, "source.txt", "same_chars.txt", "sha256", f"--config.train.init_from={source}")


def test_a_character_token_folder_is_remapped_into_the_source_vocabulary(texts, source,
                                                                          tmp_path):
  folder = tmp_path / "tokens"
  prepare.prepare(prepare.Source(texts["target"], "target"), folder)
  config = _config(texts["target"], init_from=str(source))
  config.data.tokens = str(folder)
  base = restore.load(source).tokenizer
  corpus = tokens.load_corpus(config, base)
  assert corpus.tokenizer.chars == base.chars + "".join(sorted(NEW))
  text = texts["target"].read_text(encoding="utf-8")
  assert corpus.tokenizer.decode(np.concatenate([corpus.train_ids, corpus.val_ids])) == text
  bpe = tmp_path / "bpe"
  prepare.prepare(prepare.Source(texts["target"], "target"), bpe, "bpe", 300)
  config.data.update(tokens=str(bpe), tokenizer="char", vocab_size=0)
  with pytest.raises(UserError) as e:
    tokens.load_corpus(config, base)
  _one_line(e, "byte-level BPE", "characters, 67", "--init_from=RUN")


def test_a_tokenizer_that_cannot_encode_a_character_names_it(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  hf = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  tok = tokenizer_lib.BpeTokenizer(hf.to_str())
  text = tmp_path / "t.txt"
  text.write_text("abcab\u00e9", encoding="utf-8")
  assert tok.unknown("abcab\u00e9") == ["c", "\u00e9"]
  with pytest.raises(UserError) as e:
    prepare.prepare(prepare.Source(text, "t"), tmp_path / "out", tokenizer=tok, extend=True,
                    whose=tokens.INHERITED)
  _one_line(e, "init_from's tokenizer cannot encode", "'cé'")
  assert tokenizer_lib.CharTokenizer("ab").extended("bxa\u00e9").chars == "abx\u00e9"
  assert json.loads(json.dumps(tokenizer_lib.CharTokenizer("ab").to_json())) == {"chars": "ab"}


def test_init_from_is_checked_and_a_run_keeps_the_one_it_started_from(tmp_path):
  from minigpt_jax import config as config_lib
  config = config_lib.get_config()
  config.train.init_from_step = "last"
  with pytest.raises(UserError) as e:
    config_lib.validate(config)
  _one_line(e, "config.train.init_from_step", '"latest"')
  saved = config_lib.get_config().to_dict()
  saved["train"]["init_from"] = "runs/shakespeare_pretrain"
  vocab = {"chars": "ab"}
  with pytest.raises(UserError) as e:
    config_lib.check_fits(saved, vocab, config_lib.get_config(), vocab, "runs/frost_transfer")
  _one_line(e, "init_from='runs/shakespeare_pretrain'", "new --workdir")
  config = config_lib.get_config()
  config.train.init_from = str(tmp_path)
  with pytest.raises(UserError) as e:
    transfer.vocabulary_base(config, tmp_path, print)
  _one_line(e, "the run's own --workdir")


def test_an_imported_workdir_is_a_source_from_its_step_0(texts, tmp_path):
  """import_torch.py and import_hf.py write step 0 without a val loss: "best" takes it."""
  from minigpt_jax.tools import imported
  config = _config(texts["source"])
  tok = tokenizer_lib.CharTokenizer.from_text(texts["source"].read_text(encoding="utf-8"))
  params = jax.device_get(train.create_train_state(config, tok.vocab_size).params)
  imported.save_step0(config, tok, params, tmp_path / "imported", "model.pt")
  fresh, state, corpus, record = _started(
      _config(texts["target"], init_from=str(tmp_path / "imported")), tmp_path / "tuned")
  assert (record["step"], record["val_loss"], record["corpus"]) == (
      0, None, "imported from model.pt")
  assert "step 0 (latest: no step there has a val loss, val loss n/a" in transfer.describe(
      record, corpus.tokenizer.vocab_size)
