"""Exact evaluation (minigpt_jax/evaluation.py): every val token scored once, one number."""

import json

import numpy as np
import optax
import pytest

from conftest import tiny
from minigpt_jax import config as config_lib, data, evaluation, loop, prepare, tokens, train
from minigpt_jax.errors import UserError
from minigpt_jax.tools import evaluate


@pytest.mark.parametrize("n, block, stride", [(10, 4, 4), (10, 4, 3), (10, 4, 1), (5, 4, 4),
                                              (200, 16, 7), (129, 16, 16)])
def test_sliding_windows_score_every_target_once(n, block, stride):
  starts_W, first_W = data.sliding_windows(n, block, stride)
  scored = [s + t + 1 for s, f in zip(starts_W, first_W) for t in range(f, block)]
  assert sorted(scored) == list(range(1, n))  # each next-token target once
  assert starts_W[-1] + block == n - 1  # the last window ends at the last id
  # After the first window, a scored target sees at least block - stride tokens before it.
  assert all(f >= block - stride for f in first_W[1:-1])


def test_streamed_windows_are_the_sliding_windows_whatever_the_chunks():
  rng = np.random.default_rng(0)
  for _ in range(100):
    n = int(rng.integers(5, 300))
    block = int(rng.integers(1, min(n - 1, 40) + 1))
    stride = int(rng.integers(1, block + 1))
    ids = rng.integers(0, 50, n).astype(np.int32)
    cuts = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(0, 6)), replace=False))
    pieces = list(evaluation.stream_windows(np.split(ids, cuts), block, stride))
    starts_W, first_W = data.sliding_windows(n, block, stride)
    np.testing.assert_array_equal(np.concatenate([w for w, _ in pieces]),
                                  data.gather_windows(ids, starts_W, block))
    np.testing.assert_array_equal(np.concatenate([f for _, f in pieces]), first_W)


def _state(config, vocab_size):
  return train.create_train_state(config, vocab_size)


def test_full_loss_is_the_mean_loss_of_every_val_token(tiny_config):
  """The loss of each target once, as a model called on each window alone gives it;
  5 windows in batches of 4: the padding of the last batch is not counted."""
  tiny_config.model.block_size = 8
  rng = np.random.default_rng(1)
  splits = {"train": rng.integers(0, 20, 300).astype(np.int32),
            "val": rng.integers(0, 20, 38).astype(np.int32)}
  state = _state(tiny_config, 20)
  full = evaluation.FullEvaluation(splits, None, batch_size=4, block_size=8, stride=6)
  starts_W, first_W = data.sliding_windows(38, 8, 6)
  assert len(starts_W) == 6 and full.tokens_scored("val") == 37
  losses = []
  for start, first in zip(starts_W, first_W):
    window = splits["val"][start:start + 9][None]
    logits = state.apply(state.params, window[:, :-1])
    token_losses = optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:])[0]
    losses.extend(np.asarray(token_losses[first:], np.float64))
  got = full.evaluate(state)
  assert len(losses) == 37
  np.testing.assert_allclose(got["val"], np.mean(losses), rtol=1e-6)
  assert got == full.evaluate(state)  # fixed windows: the same number every time
  assert full.tokens_scored("train") == 6 * 8  # as many train windows as val has


def test_host_and_device_batches_record_the_same_full_loss_and_evaluate_repeats_it(
    tiny_config, tmp_path):
  tiny_config.train.update(steps=20, eval_interval=10, eval_mode="full", eval_stride=8)
  records = {}
  for on_device in (True, False):
    tiny_config.data.on_device = on_device
    workdir = tmp_path / f"on_device_{on_device}"
    loop.train_and_evaluate(tiny_config, workdir, show_progress=False)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records[on_device] = {r["step"]: r for r in map(json.loads, lines) if r["kind"] == "eval"}
  for step in (0, 10, 20):
    assert records[True][step]["val_loss"] == pytest.approx(records[False][step]["val_loss"],
                                                            rel=1e-6)
  result = evaluate.evaluate(tmp_path / "on_device_False", step=10)
  assert result["val_loss"] == pytest.approx(records[False][10]["val_loss"], rel=1e-6)
  assert result["train_loss"] == pytest.approx(records[False][10]["train_loss"], rel=1e-6)
  assert (result["eval_mode"], result["eval_stride"]) == ("full", 8)
  assert result["val_tokens_scored"] == len(tokens.load_corpus(tiny_config).val_ids) - 1
  sampled = [evaluate.evaluate(tmp_path / "on_device_False", step=10, mode="sampled", seed=s)
             for s in (1, 2)]  # the lecture's estimate of the same checkpoint, two seeds
  assert [r["eval_mode"] for r in sampled] == ["sampled", "sampled"]
  assert sampled[0]["val_loss"] != sampled[1]["val_loss"]
  assert abs(sampled[0]["val_loss"] - result["val_loss"]) < 0.1


def test_a_text_is_scored_streamed_in_chunks_as_one_split(tiny_config, tmp_path, monkeypatch):
  """evaluate --path: the same number as the whole text's ids, whatever the chunk size."""
  tiny_config.train.update(steps=10, eval_interval=10, eval_at_start=False)
  workdir = tmp_path / "run"
  loop.train_and_evaluate(tiny_config, workdir, show_progress=False)
  text = data.read_text(data.resolve_corpus("frost"))[:5000]
  path = tmp_path / "poems.txt"
  path.write_text(text)
  whole = evaluate.evaluate(workdir, path=path, stride=5)
  monkeypatch.setattr(prepare, "CHUNK_BYTES", 777)
  chunked = evaluate.evaluate(workdir, path=path, stride=5)
  assert chunked["text_loss"] == pytest.approx(whole["text_loss"], rel=1e-9)
  assert (chunked["eval_mode"], chunked["eval_stride"]) == ("full", 5)
  assert chunked["text_tokens_scored"] == len(text) - 1 and chunked["tokens_per_char"] == 1.0
  block = evaluate.evaluate(workdir, path=path)  # stride block_size: less context per token
  assert block["eval_stride"] == 16 and block["text_loss"] != whole["text_loss"]


def test_bad_strides_and_short_splits_are_one_line_errors(tiny_config, tmp_path):
  for stride in (0, 17):
    tiny_config.train.eval_stride = stride
    with pytest.raises(UserError, match=rf"config.train.eval_stride is {stride}; use a stride "
                                        r"from 1 to config.model.block_size \(16\)"):
      config_lib.validate(tiny_config)
  tiny_config.train.eval_stride = None
  with pytest.raises(UserError, match=r"block_size \(16\) is not shorter than the val split "
                                      r"\(12 tokens\)"):
    config_lib.validate_for_data(tiny_config, 1000, 12)
  with pytest.raises(UserError, match=r"--stride is 0; use a stride from 1"):
    evaluate.evaluate(tmp_path, stride=0)
