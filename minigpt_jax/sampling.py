"""Pure, jit-compiled autoregressive sampling (the lecture's `generate`).

The loop has fixed shapes: tokens live in a [B, P + N] buffer, and each step
runs the model on the last `block_size` tokens (the lecture's crop), so one
compilation serves every prompt of a given padded length.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig, build_model


def sample_logits(key: jax.Array, logits_BV: jax.Array, temperature, top_k: int) -> jax.Array:
  """One token per row from logits / temperature, optionally only from the top k."""
  logits_BV = logits_BV / temperature
  if top_k:
    kth_B1 = lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "num_tokens", "top_k"))
def _generate(params, prompt_BP, prompt_len, key, temperature, *, cfg: ModelConfig,
              num_tokens: int, top_k: int):
  """Tokens after the first `prompt_len` of each row of prompt_BP: int32 [B, num_tokens]."""
  model = build_model(cfg)
  B, P = prompt_BP.shape
  S = P + num_tokens
  T = min(cfg.block_size, S)  # window the model sees each step
  tokens_BS = jnp.zeros((B, S), jnp.int32).at[:, :P].set(prompt_BP)

  def step(i, tokens_BS):
    filled = prompt_len + i  # tokens known so far
    start = jnp.clip(filled - T, 0, S - T)
    window_BT = lax.dynamic_slice_in_dim(tokens_BS, start, T, axis=1)
    logits_BTV = model.apply({"params": params}, window_BT, deterministic=True)
    # Causal attention: padding after `filled` cannot change this position.
    last_BV = lax.dynamic_index_in_dim(logits_BTV, filled - 1 - start, axis=1,
                                       keepdims=False)
    next_B = sample_logits(jax.random.fold_in(key, i), last_BV, temperature, top_k)
    return lax.dynamic_update_slice_in_dim(tokens_BS, next_B[:, None], filled, axis=1)

  tokens_BS = lax.fori_loop(0, num_tokens, step, tokens_BS)
  return lax.dynamic_slice_in_dim(tokens_BS, prompt_len, num_tokens, axis=1)


def _padded_length(n: int) -> int:
  """Prompt lengths are padded to a power of two (at least 16) to share compilations."""
  return max(16, 1 << (n - 1).bit_length())


def make_generate(cfg: ModelConfig):
  """`generate(params, prompt_ids, key, num_tokens, temperature=1.0, top_k=0)`.

  prompt_ids: int [B, P] with P >= 1. Returns int32 [B, num_tokens], the new
  tokens only. top_k=0 samples from the whole vocabulary; top_k=1 is greedy.
  """

  def generate(params, prompt_ids, key, num_tokens: int, temperature: float = 1.0,
               top_k: int = 0):
    prompt_BP = jnp.asarray(prompt_ids, jnp.int32)
    B, P = prompt_BP.shape
    padded_BP = jnp.zeros((B, _padded_length(P)), jnp.int32).at[:, :P].set(prompt_BP)
    return _generate(params, padded_BP, jnp.int32(P), key, jnp.float32(temperature),
                     cfg=cfg, num_tokens=int(num_tokens),
                     top_k=min(int(top_k), cfg.vocab_size))

  return generate


def validate_request(num_tokens: int, temperature: float, top_k: int,
                     num_samples: int = 1) -> None:
  """One-line errors for sampling settings that cannot work."""
  for name, value, ok, fix in (
      ("num_tokens", num_tokens, num_tokens > 0, "a positive count"),
      ("temperature", temperature, temperature > 0, "a positive value (1.0 samples as trained)"),
      ("top_k", top_k, top_k >= 0, "0 (every token) or a positive k"),
      ("num_samples", num_samples, num_samples > 0, "a positive count")):
    if not ok:
      raise UserError(f"--{name} is {value!r}; use {fix}")


def encode_prompt(tokenizer, prompt: str, num_samples: int = 1):
  """int32 [num_samples, P]; an empty prompt starts from a newline, as the lecture does."""
  if not prompt:
    prompt = "\n" if "\n" in tokenizer.chars else tokenizer.chars[0]
  missing = tokenizer.unknown(prompt)
  if missing:
    raise UserError(f"prompt has characters outside the model's vocabulary: "
                    f"{''.join(missing)!r}; remove or replace them")
  ids_P = tokenizer.encode(prompt)
  return jnp.tile(jnp.asarray(ids_P)[None, :], (num_samples, 1)), prompt
