"""Tests for minigpt_jax.sampling against the lecture's plain-Python `generate`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minigpt_jax import sampling
from minigpt_jax.model import ModelConfig, build_model, init_params

V = 13


def _cfg(**kw):
  kw = {"vocab_size": V, "block_size": 8, "n_embed": 16, "n_heads": 2, "n_layer": 1,
        **kw}
  return ModelConfig("gpt", **kw)


@functools.cache
def _setup(cfg):
  model = build_model(cfg)
  params = jax.jit(init_params, static_argnums=0)(model, jax.random.key(0))
  apply_fn = jax.jit(lambda p, idx_BT: model.apply({"params": p}, idx_BT,
                                                   deterministic=True))
  return params, apply_fn


def _prompt(B, P, seed=1):
  return np.asarray(jax.random.randint(jax.random.key(seed), (B, P), 0, V), np.int32)


def _reference(cfg, prompt_BP, key, num_tokens, temperature=1.0, top_k=0):
  """The lecture's loop: crop to the last block_size tokens, sample from the last position.

  Step i draws from jax.random.fold_in(key, i), the key schedule sampling.py uses.
  top_k=1 is plain argmax (greedy) rather than a draw.
  """
  params, apply_fn = _setup(cfg)
  seq_BS = np.asarray(prompt_BP, np.int32)
  for i in range(num_tokens):
    window_BT = seq_BS[:, -cfg.block_size:]
    last_BV = apply_fn(params, jnp.asarray(window_BT))[:, -1, :]
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


def _generate(cfg, prompt_BP, key, num_tokens, temperature=1.0, top_k=0):
  params, _ = _setup(cfg)
  return sampling.make_generate(cfg)(params, prompt_BP, key, num_tokens,
                                     temperature, top_k)


def test_output_shape_dtype_range():
  cfg = _cfg()
  out_BN = _generate(cfg, _prompt(3, 4), jax.random.key(0), 12)
  assert out_BN.shape == (3, 12)
  assert out_BN.dtype == jnp.int32
  assert int(out_BN.min()) >= 0 and int(out_BN.max()) < V


def test_key_determines_tokens():
  """Same key, same text; another key, other text (random init is near uniform)."""
  cfg = _cfg()
  prompt_BP = _prompt(2, 3)
  a_BN = _generate(cfg, prompt_BP, jax.random.key(1), 20)
  b_BN = _generate(cfg, prompt_BP, jax.random.key(1), 20)
  c_BN = _generate(cfg, prompt_BP, jax.random.key(2), 20)
  np.testing.assert_array_equal(a_BN, b_BN)
  assert not np.array_equal(a_BN, c_BN)


@pytest.mark.parametrize("P", [3, 8, 11], ids=["short", "block", "long"])
def test_greedy_matches_cropped_reference(P):
  """top_k=1 is argmax; 20 new tokens > block_size 8, so the crop matters."""
  cfg = _cfg()
  prompt_BP = _prompt(2, P)
  got_BN = _generate(cfg, prompt_BP, jax.random.key(3), 20, top_k=1)
  want_BN = _reference(cfg, prompt_BP, jax.random.key(3), 20, top_k=1)
  np.testing.assert_array_equal(got_BN, want_BN)


def test_greedy_ignores_key_and_temperature():
  cfg = _cfg()
  prompt_BP = _prompt(1, 5)
  a_BN = _generate(cfg, prompt_BP, jax.random.key(4), 12, temperature=1.0, top_k=1)
  b_BN = _generate(cfg, prompt_BP, jax.random.key(5), 12, temperature=0.5, top_k=1)
  np.testing.assert_array_equal(a_BN, b_BN)


@pytest.mark.parametrize("P, temperature, top_k", [
    (3, 1.0, 0),
    (11, 0.7, 0),
    (5, 1.3, 4),
])
def test_sampling_matches_reference(P, temperature, top_k):
  """Step i draws categorical(fold_in(key, i), logits / temperature) on the cropped window."""
  cfg = _cfg()
  prompt_BP = _prompt(2, P, seed=P)
  key = jax.random.key(6)
  got_BN = _generate(cfg, prompt_BP, key, 20, temperature, top_k)
  want_BN = _reference(cfg, prompt_BP, key, 20, temperature, top_k)
  np.testing.assert_array_equal(got_BN, want_BN)
  # Sampling really samples: not the greedy continuation.
  greedy_BN = _reference(cfg, prompt_BP, key, 20, top_k=1)
  assert not np.array_equal(got_BN, greedy_BN)


def test_top_k_restricts_tokens():
  """With top_k=2 every drawn token is one of the two likeliest at its step."""
  cfg = _cfg()
  params, apply_fn = _setup(cfg)
  prompt_BP = _prompt(4, 3)
  out_BN = np.asarray(_generate(cfg, prompt_BP, jax.random.key(7), 10, top_k=2))
  seq_BS = np.concatenate([prompt_BP, out_BN], axis=1)
  for i in range(10):
    filled = 3 + i
    window_BT = seq_BS[:, max(0, filled - cfg.block_size):filled]
    last_BV = np.asarray(apply_fn(params, jnp.asarray(window_BT))[:, -1, :])
    top2_B2 = np.argsort(last_BV, axis=-1)[:, -2:]
    assert all(out_BN[b, i] in top2_B2[b] for b in range(4)), i


def test_prompt_buckets_share_one_compilation():
  """Prompts padded to the same length reuse the compiled loop; a longer one does not."""
  cfg = _cfg(vocab_size=V + 2)  # a config no other test compiled
  params = jax.jit(init_params, static_argnums=0)(build_model(cfg), jax.random.key(0))
  generate = sampling.make_generate(cfg)
  before = sampling._generate._cache_size()
  generate(params, np.zeros((1, 3), np.int32), jax.random.key(0), 6)
  generate(params, np.ones((1, 5), np.int32), jax.random.key(1), 6, temperature=0.5)
  assert sampling._generate._cache_size() - before == 1
  generate(params, np.ones((1, 17), np.int32), jax.random.key(1), 6)  # bucket 32
  assert sampling._generate._cache_size() - before == 2
