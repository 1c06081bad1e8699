"""Tests for minigpt_jax.sampling against the lecture's plain-Python `generate`.

The KV decode must give exactly the naive decode's tokens: the lecture's crop
while prompt + new tokens fit in block_size, and the "chunked" window past it.
"""

import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_one_line_error
from minigpt_jax import sampling, train
from minigpt_jax.support import checkpoint
from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig, build_model, init_params

V = 13
B = 2  # one batch size and a few token counts throughout: compilations are shared
N = 40  # new tokens past block_size 8: five blocks
ROOT = Path(__file__).resolve().parents[1]


def _cfg(name="gpt", **kw):
  kw = {"vocab_size": V, "block_size": 8, "n_embed": 16, "n_heads": 2, "n_layer": 2,
        **kw}
  return ModelConfig(name, **kw)


@functools.cache
def _setup(cfg):
  """Params scaled x5: a fresh init predicts almost uniformly, whatever the context,
  so crop and chunked windows would give the same tokens and prove nothing."""
  model = build_model(cfg)
  params = jax.jit(init_params, static_argnums=0)(model, jax.random.key(0))
  params = jax.tree_util.tree_map(lambda p: 5 * p, params)
  apply_fn = jax.jit(lambda p, idx_BT: model.apply({"params": p}, idx_BT,
                                                   deterministic=True))
  return params, apply_fn


def _prompt(P, seed=1, batch=B):
  return np.asarray(jax.random.randint(jax.random.key(seed), (batch, P), 0, V), np.int32)


def _reference(cfg, prompt_BP, key, num_tokens, temperature=1.0, top_k=0, window="crop"):
  """The lecture's loop: run the window, sample from its last position.

  window="crop": the last block_size tokens. window="chunked": the window
  grows to block_size tokens, then restarts as the last block_size // 2.
  Step i draws from jax.random.fold_in(key, i), the key schedule sampling.py
  uses. top_k=1 is plain argmax (greedy) rather than a draw.
  """
  params, apply_fn = _setup(cfg)
  seq_BS = np.asarray(prompt_BP, np.int32)
  start = max(0, seq_BS.shape[1] - cfg.block_size)
  for i in range(num_tokens):
    if window == "crop":
      start = max(0, seq_BS.shape[1] - cfg.block_size)
    elif seq_BS.shape[1] - start > cfg.block_size:
      start = seq_BS.shape[1] - max(1, cfg.block_size // 2)
    last_BV = apply_fn(params, jnp.asarray(seq_BS[:, start:]))[:, -1, :]
    if top_k == 1:
      next_B = np.asarray(jnp.argmax(last_BV, axis=-1))
    else:
      last_BV = last_BV / temperature
      if top_k:
        kth_B1 = np.sort(np.asarray(last_BV), axis=-1)[:, -top_k][:, None]
        last_BV = jnp.where(last_BV < kth_B1, -jnp.inf, last_BV)
      next_B = np.asarray(jax.random.categorical(jax.random.fold_in(key, i), last_BV,
                                                 axis=-1))
    seq_BS = np.concatenate([seq_BS, next_B[:, None].astype(np.int32)], axis=1)
  return seq_BS[:, prompt_BP.shape[1]:]


def _generate(cfg, prompt_BP, key, num_tokens, temperature=1.0, top_k=0, method="kv",
              window=None):
  params, _ = _setup(cfg)
  return np.asarray(sampling.make_generate(cfg, method, window)(
      params, prompt_BP, key, num_tokens, temperature, top_k))


@pytest.mark.parametrize("method", ["kv", "naive"])
def test_output_shape_dtype_range(method):
  cfg = _cfg()
  out_BN = sampling.make_generate(cfg, method)(_setup(cfg)[0], _prompt(4),
                                               jax.random.key(0), N)
  assert out_BN.shape == (B, N)
  assert out_BN.dtype == jnp.int32
  assert int(out_BN.min()) >= 0 and int(out_BN.max()) < V


def test_key_determines_tokens():
  """Same key, same text; another key, other text."""
  cfg = _cfg()
  prompt_BP = _prompt(3)
  a_BN = _generate(cfg, prompt_BP, jax.random.key(1), N)
  b_BN = _generate(cfg, prompt_BP, jax.random.key(1), N)
  c_BN = _generate(cfg, prompt_BP, jax.random.key(2), N)
  np.testing.assert_array_equal(a_BN, b_BN)
  assert not np.array_equal(a_BN, c_BN)


@pytest.mark.parametrize("P", [3, 8, 11], ids=["short", "block", "long"])
def test_naive_greedy_matches_cropped_reference(P):
  """top_k=1 is argmax; 40 new tokens > block_size 8, so the crop matters."""
  cfg = _cfg()
  prompt_BP = _prompt(P)
  got_BN = _generate(cfg, prompt_BP, jax.random.key(3), N, top_k=1, method="naive")
  want_BN = _reference(cfg, prompt_BP, jax.random.key(3), N, top_k=1)
  np.testing.assert_array_equal(got_BN, want_BN)


def test_greedy_ignores_key_and_temperature():
  cfg = _cfg()
  prompt_BP = _prompt(5)
  a_BN = _generate(cfg, prompt_BP, jax.random.key(4), N, temperature=1.0, top_k=1)
  b_BN = _generate(cfg, prompt_BP, jax.random.key(5), N, temperature=0.5, top_k=1)
  np.testing.assert_array_equal(a_BN, b_BN)


@pytest.mark.parametrize("P, temperature, top_k", [
    (3, 1.0, 0),
    (11, 0.7, 0),
    (5, 1.3, 4),
])
def test_naive_sampling_matches_reference(P, temperature, top_k):
  """Step i draws categorical(fold_in(key, i), logits / temperature) on the cropped window."""
  cfg = _cfg()
  prompt_BP = _prompt(P, seed=P)
  key = jax.random.key(6)
  got_BN = _generate(cfg, prompt_BP, key, N, temperature, top_k, method="naive")
  want_BN = _reference(cfg, prompt_BP, key, N, temperature, top_k)
  np.testing.assert_array_equal(got_BN, want_BN)
  # Sampling really samples: not the greedy continuation.
  greedy_BN = _generate(cfg, prompt_BP, key, N, top_k=1, method="naive")
  assert not np.array_equal(got_BN, greedy_BN)


@pytest.mark.parametrize("P, num_tokens, temperature, top_k", [
    (3, 5, 1.0, 1),  # prompt + new tokens == block_size
    (3, 5, 0.7, 0),
    (3, 5, 1.3, 4),
    (1, 5, 1.0, 0),  # shorter than a block
    (8, 1, 1.0, 0),  # a full-block prompt, one token
])
def test_kv_matches_naive_within_block_size(P, num_tokens, temperature, top_k):
  """While everything fits in block_size no window policy applies: same tokens."""
  cfg = _cfg()
  prompt_BP = _prompt(P, seed=P + top_k)
  key = jax.random.key(7)
  kv_BN = _generate(cfg, prompt_BP, key, num_tokens, temperature, top_k)
  np.testing.assert_array_equal(kv_BN, _generate(cfg, prompt_BP, key, num_tokens,
                                                 temperature, top_k, method="naive"))
  np.testing.assert_array_equal(
      kv_BN, _reference(cfg, prompt_BP, key, num_tokens, temperature, top_k))


@pytest.mark.parametrize("P, temperature, top_k", [
    (1, 1.0, 1),
    (11, 1.0, 1),  # a prompt longer than block_size
    (1, 1.0, 0),
    (8, 0.7, 0),
    (5, 1.3, 4),
])
def test_kv_matches_naive_chunked_past_block_size(P, temperature, top_k):
  """40 new tokens = 5 blocks: several refills, each the naive "chunked" window."""
  cfg = _cfg()
  prompt_BP = _prompt(P, seed=P)
  key = jax.random.key(8)
  kv_BN = _generate(cfg, prompt_BP, key, N, temperature, top_k)
  chunked_BN = _generate(cfg, prompt_BP, key, N, temperature, top_k, method="naive",
                         window="chunked")
  np.testing.assert_array_equal(kv_BN, chunked_BN)
  np.testing.assert_array_equal(
      kv_BN, _reference(cfg, prompt_BP, key, N, temperature, top_k, window="chunked"))
  # The window policy shows: the lecture's crop gives other tokens.
  crop_BN = _generate(cfg, prompt_BP, key, N, temperature, top_k, method="naive")
  assert not np.array_equal(kv_BN, crop_BN)


@pytest.mark.parametrize("block_size", [1, 3])
def test_kv_matches_naive_chunked_for_tiny_blocks(block_size):
  """Edge cases: a refill keeps one token (block_size // 2 is 0, 1)."""
  cfg = _cfg(block_size=block_size)
  prompt_BP = _prompt(2)
  key = jax.random.key(9)
  np.testing.assert_array_equal(
      _generate(cfg, prompt_BP, key, 12),
      _generate(cfg, prompt_BP, key, 12, method="naive", window="chunked"))


def test_bigram_kv_is_the_naive_decode():
  """The bigram sees only the last token: no cache, and every window gives the same text."""
  cfg = _cfg("bigram")
  prompt_BP = _prompt(5)
  key = jax.random.key(10)
  kv_BN = _generate(cfg, prompt_BP, key, N)
  np.testing.assert_array_equal(kv_BN, _generate(cfg, prompt_BP, key, N, method="naive"))
  np.testing.assert_array_equal(kv_BN, _reference(cfg, prompt_BP, key, N))


def test_top_k_restricts_tokens():
  """With top_k=4 every drawn token is one of the four likeliest at its step."""
  cfg = _cfg()
  params, apply_fn = _setup(cfg)
  prompt_BP = _prompt(3, seed=11)
  out_BN = _generate(cfg, prompt_BP, jax.random.key(11), 5, top_k=4)  # within a block
  seq_BS = np.concatenate([prompt_BP, out_BN], axis=1)
  for i in range(5):
    last_BV = np.asarray(apply_fn(params, jnp.asarray(seq_BS[:, :3 + i]))[:, -1, :])
    top4_B4 = np.argsort(last_BV, axis=-1)[:, -4:]
    assert all(out_BN[b, i] in top4_B4[b] for b in range(B)), i


def test_naive_prompt_buckets_share_one_compilation():
  """Prompts padded to the same length reuse the compiled loop; a longer one does not."""
  cfg = _cfg(vocab_size=V + 2)  # a config no other test compiled
  params = jax.jit(init_params, static_argnums=0)(build_model(cfg), jax.random.key(0))
  generate = sampling.make_generate(cfg, "naive")
  before = sampling._generate_naive._cache_size()
  generate(params, np.zeros((1, 3), np.int32), jax.random.key(0), 6)
  generate(params, np.ones((1, 5), np.int32), jax.random.key(1), 6, temperature=0.5)
  assert sampling._generate_naive._cache_size() - before == 1
  generate(params, np.ones((1, 17), np.int32), jax.random.key(1), 6)  # bucket 32
  assert sampling._generate_naive._cache_size() - before == 2


def test_kv_prompts_up_to_a_block_share_one_compilation():
  """KV keeps only a prompt's last block_size tokens, so with block_size 16 every
  prompt pads to 16: one compilation for any prompt, key and temperature."""
  cfg = _cfg(vocab_size=V + 3, block_size=16)  # a config no other test compiled
  params = jax.jit(init_params, static_argnums=0)(build_model(cfg), jax.random.key(0))
  generate = sampling.make_generate(cfg)
  before = sampling._generate_kv._cache_size()
  for P, seed, temperature in ((9, 0, 1.0), (9, 1, 0.5), (3, 2, 1.0), (16, 3, 0.8),
                               (40, 4, 1.0)):
    generate(params, _prompt(P, seed), jax.random.key(seed), 24, temperature)
  assert sampling._generate_kv._cache_size() - before == 1


@pytest.mark.parametrize("P, num_tokens", [(3, N), (8, 1)])
def test_stream_pieces_join_into_the_generated_tokens(P, num_tokens):
  """Pieces of up to 16 tokens (the last one shorter) from one compilation."""
  cfg = _cfg()
  prompt_BP = _prompt(P)
  key = jax.random.key(12)
  stream = sampling.make_stream(cfg, chunk=16)
  pieces = list(stream(_setup(cfg)[0], prompt_BP, key, num_tokens, 0.8))
  assert [p.shape[1] for p in pieces] == [min(16, num_tokens - d)
                                          for d in range(0, num_tokens, 16)]
  np.testing.assert_array_equal(np.concatenate(pieces, axis=1),
                                _generate(cfg, prompt_BP, key, num_tokens, temperature=0.8))
  before = sampling._kv_continue._cache_size()
  list(stream(_setup(cfg)[0], _prompt(6), key, 20, 1.0))
  assert sampling._kv_continue._cache_size() == before


def test_bad_method_or_window_is_a_user_error():
  cfg = _cfg()
  with pytest.raises(UserError, match="method 'beam'"):
    sampling.make_generate(cfg, "beam")
  with pytest.raises(UserError, match="window 'slide'"):
    sampling.make_generate(cfg, "naive", "slide")
  with pytest.raises(UserError, match="cannot crop"):
    sampling.make_generate(cfg, "kv", "crop")


def _sample_cli(*args, check=True):
  result = subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_sample_cli_stream_prints_the_same_text(tiny_config, tmp_path):
  """An untrained checkpoint is enough: --stream prints what the batch path prints."""
  vocab = {"chars": "\n !,.?abcdefghijklmnopqrstuvwxyz"}
  state = train.create_train_state(tiny_config, len(vocab["chars"]))
  checkpoint.save(checkpoint.manager(tmp_path), state, tiny_config.to_dict(), vocab,
                  {"val_loss": 3.0})
  args = [f"--workdir={tmp_path}", "--prompt=the ", "--num_tokens=70", "--seed=5"]
  streamed = _sample_cli(*args, "--stream").stdout
  assert streamed == _sample_cli(*args).stdout
  assert streamed.startswith("the ") and len(streamed) == 4 + 70 + 1
  error = _sample_cli(*args, "--stream", "--num_samples=2", check=False)
  assert_one_line_error(error, "error: --stream")
  # Prompt + 12 characters fill block_size 16: --naive, the lecture's crop, agrees.
  args[2] = "--num_tokens=12"
  assert _sample_cli(*args, "--naive").stdout == _sample_cli(*args).stdout
