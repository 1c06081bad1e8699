"""Pure, jit-compiled autoregressive sampling (the lecture's `generate`).

Two decoders behind `make_generate(cfg, method)`, both with fixed shapes so
one compilation serves every prompt of a padded length:

- "naive" runs the whole model on the current window for every new token, in
  a [B, P + N] token buffer. window="crop" (its default) is the lecture's:
  the last block_size tokens, renumbered every step.
- "kv" (the default) prefills the window once, then feeds one token per step
  through GPT's key/value cache (`model.GPT` called with `cache` and `pos`).

Windows past block_size. Positions are window slots (a learned table added at
the input, or rope's turn of q and k), so when the lecture's crop slides the
window by one, every cached key is stale: the crop cannot be cached exactly.
"kv" therefore uses the "chunked" window: it starts as the prompt's last
block_size tokens and grows by one token a step; when a new token would not
fit, it restarts as the last `refill_length` (block_size // 2) tokens,
prefilled again from slot 0. "naive" with window="chunked" runs
the same schedule without a cache. While prompt + new tokens <= block_size the
window is the whole sequence under every policy.

Step i draws with fold_in(key, i), so for the same key "kv" gives exactly the
tokens of "naive" (and of naive "chunked" past block_size), up to float
rounding in the logits, which the tests show does not change a token.

Loading a checkpoint to decode is `support.restore.load`.

Owns: `make_generate`, `make_stream`, prompt encoding and checks. May
import: model, cpu_tricks, errors.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from minigpt_jax import cpu_tricks
from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig, build_model, init_cache

METHODS = ("kv", "naive")
WINDOWS = ("crop", "chunked")


def refill_length(block_size: int) -> int:
  """Tokens a full window restarts from: half, so a refill buys block_size // 2 cached steps."""
  return max(1, block_size // 2)


def _scaled(logits_BV: jax.Array, temperature, top_k: int) -> jax.Array:
  """logits / temperature, with all but the top k set to -inf (top_k=0: none)."""
  logits_BV = logits_BV / temperature
  if top_k:
    kth_B1 = lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample_logits(key: jax.Array, logits_BV: jax.Array, temperature, top_k: int) -> jax.Array:
  """One token per row from logits / temperature, optionally only from the top k."""
  return jax.random.categorical(key, _scaled(logits_BV, temperature, top_k),
                                axis=-1).astype(jnp.int32)


def _gumbel_NBV(key: jax.Array, first_step, num_steps: int, shape_BV) -> jax.Array:
  """The noise `sample_logits(fold_in(key, i), ...)` draws at steps first_step + n.

  categorical(k, l) is argmax(gumbel(k, l.shape) + l); drawing many steps'
  noise in one call saves a (rolled, slow on CPU) threefry loop per token.
  """
  steps_N = first_step + jnp.arange(num_steps)
  return jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i), shape_BV))(steps_N)


def _pick(gumbel_BV: jax.Array, logits_BV: jax.Array, temperature, top_k: int) -> jax.Array:
  """sample_logits with its noise given: the same token for the same noise."""
  return jnp.argmax(gumbel_BV + _scaled(logits_BV, temperature, top_k),
                    axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------- naive decode


@functools.partial(jax.jit, static_argnames=("cfg", "num_tokens", "top_k", "window"))
def _generate_naive(params, prompt_BP, prompt_len, key, temperature, *, cfg: ModelConfig,
                    num_tokens: int, top_k: int, window: str):
  """Tokens after the first `prompt_len` of each row of prompt_BP: int32 [B, num_tokens]."""
  model = build_model(cfg)
  B, P = prompt_BP.shape
  S = P + num_tokens
  T = min(cfg.block_size, S)  # window the model sees each step
  keep = refill_length(cfg.block_size)
  # T spare slots past S: a chunked window never runs off the buffer's end.
  tokens_BS = jnp.zeros((B, S + T), jnp.int32).at[:, :P].set(prompt_BP)

  def step(i, carry):
    tokens_BS, start = carry
    filled = prompt_len + i  # tokens known so far
    if window == "crop":
      start = jnp.maximum(filled - T, 0)
    else:  # chunked: the window restarts as the last `keep` tokens when full
      start = jnp.where(filled - start > T, filled - keep, start)
    window_BT = lax.dynamic_slice_in_dim(tokens_BS, start, T, axis=1)
    logits_BTV = model.apply({"params": params}, window_BT, deterministic=True)
    # Causal attention: padding after `filled` cannot change this position.
    last_BV = lax.dynamic_index_in_dim(logits_BTV, filled - 1 - start, axis=1,
                                       keepdims=False)
    next_B = sample_logits(jax.random.fold_in(key, i), last_BV, temperature, top_k)
    tokens_BS = lax.dynamic_update_slice_in_dim(tokens_BS, next_B[:, None], filled, axis=1)
    return tokens_BS, start

  start = jnp.maximum(prompt_len - T, 0)
  tokens_BS, _ = lax.fori_loop(0, num_tokens, step, (tokens_BS, start))
  return lax.dynamic_slice_in_dim(tokens_BS, prompt_len, num_tokens, axis=1)


# ------------------------------------------------------------ KV-cache decode


class DecodeState(NamedTuple):
  """What one KV decoding step needs; the window holds the cache's tokens."""
  cache: Any  # GPT's per-layer (k_NSD, v_NSD) pairs; () for the bigram
  window_BW: jax.Array  # int32 [B, block_size]: tokens at cache slots 0..W-1
  length: jax.Array  # int32: slots in use
  next_B: jax.Array  # int32 [B]: the newest token, not fed to the model yet
  i: jax.Array  # int32: tokens sampled so far; step i uses fold_in(key, i)


def _decoder(cfg: ModelConfig):
  """`run(params, idx_BT, pos, cache) -> (logits_BTV, cache)` and `new_cache(B)`.

  The bigram's logits depend on the last token only, so its cache is empty
  and the window policy cannot change its tokens.
  """
  model = build_model(cfg)
  if cfg.name == "bigram":
    return (lambda params, idx_BT, pos, cache: (model.apply({"params": params}, idx_BT), cache),
            lambda B: ())
  return (lambda params, idx_BT, pos, cache: model.apply({"params": params}, idx_BT,
                                                         cache=cache, pos=pos),
          lambda B: init_cache(cfg, B))


def _kv_prefill(params, prompt_BP, prompt_len, cfg: ModelConfig) -> DecodeState:
  """Caches all prompt tokens but the last, which step 0 feeds.

  prompt_BP holds at most block_size real tokens (`_prepare` crops); cache
  slots past them get padding, which later steps overwrite before reading.
  """
  run, new_cache = _decoder(cfg)
  B, P = prompt_BP.shape
  _, cache = run(params, prompt_BP, 0, new_cache(B))
  window_BW = jnp.zeros((B, cfg.block_size), jnp.int32).at[:, :P].set(prompt_BP)
  next_B = lax.dynamic_index_in_dim(prompt_BP, prompt_len - 1, axis=1, keepdims=False)
  return DecodeState(cache, window_BW, prompt_len - 1, next_B, jnp.int32(0))


def _kv_refill(params, state: DecodeState, cfg: ModelConfig) -> DecodeState:
  """A full window restarts as its last keep - 1 tokens, re-cached from slot 0;
  feeding the pending token then makes it `keep` long, as naive "chunked" has it."""
  run, _ = _decoder(cfg)
  W, keep = cfg.block_size, refill_length(cfg.block_size)
  tail_BK = state.window_BW[:, W - keep + 1:]
  cache = run(params, tail_BK, 0, state.cache)[1] if keep > 1 else state.cache
  window_BW = lax.dynamic_update_slice_in_dim(state.window_BW, tail_BK, 0, axis=1)
  return state._replace(cache=cache, window_BW=window_BW, length=jnp.int32(keep - 1))


def _kv_feed(params, state: DecodeState, gumbel_BV, temperature, cfg: ModelConfig,
             top_k: int) -> DecodeState:
  """Feeds the pending token into the next free slot and samples the one after it."""
  run, _ = _decoder(cfg)
  logits_B1V, cache = run(params, state.next_B[:, None], state.length, state.cache)
  window_BW = lax.dynamic_update_slice_in_dim(state.window_BW, state.next_B[:, None],
                                              state.length, axis=1)
  next_B = _pick(gumbel_BV, logits_B1V[:, 0], temperature, top_k)
  return DecodeState(cache, window_BW, state.length + 1, next_B, state.i + 1)


def _kv_steps(params, state, key, temperature, count, cfg, top_k, out_BC):
  """`count` tokens, written to out_BC[:, :count]: (state, out_BC).

  The loop runs in segments: refill if the window is full, then feed tokens
  until it is full again. Keeping the refill out of the per-token loop keeps
  that loop free of control flow, which on CPU would copy the cache.
  """
  W, max_steps = cfg.block_size, out_BC.shape[1]
  B, V = out_BC.shape[0], cfg.vocab_size

  def segment(carry):
    state, out_BC, done = carry
    # A 0- or 1-trip loop, not lax.cond: cond copies every cache buffer.
    state = lax.fori_loop(0, (state.length == W).astype(jnp.int32),
                          lambda _, s: _kv_refill(params, s, cfg), state)
    steps = jnp.minimum(W - state.length, count - done)
    gumbel_NBV = _gumbel_NBV(key, state.i, min(W, max_steps), (B, V))

    def feed(n, carry):
      state, out_BC = carry
      state = _kv_feed(params, state, gumbel_NBV[n], temperature, cfg, top_k)
      out_BC = lax.dynamic_update_slice_in_dim(out_BC, state.next_B[:, None], done + n, axis=1)
      return state, out_BC

    state, out_BC = lax.fori_loop(0, steps, feed, (state, out_BC))
    return state, out_BC, done + steps

  state, out_BC, _ = lax.while_loop(lambda carry: carry[2] < count, segment,
                                    (state, out_BC, jnp.int32(0)))
  return state, out_BC


@functools.partial(jax.jit, static_argnames=("cfg", "num_tokens", "top_k"))
def _generate_kv(params, prompt_BP, prompt_len, key, temperature, *, cfg: ModelConfig,
                 num_tokens: int, top_k: int):
  """As `_generate_naive(window="chunked")`, with a KV cache: int32 [B, num_tokens]."""
  params = _kv_params(params, cfg)
  state = _kv_prefill(params, prompt_BP, prompt_len, cfg)
  out_BN = jnp.zeros((prompt_BP.shape[0], num_tokens), jnp.int32)
  return _kv_steps(params, state, key, temperature, num_tokens, cfg, top_k, out_BN)[1]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _kv_start(params, prompt_BP, prompt_len, *, cfg: ModelConfig) -> DecodeState:
  return _kv_prefill(params, prompt_BP, prompt_len, cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "top_k", "chunk"), donate_argnames="state")
def _kv_continue(params, state, key, temperature, count, *, cfg: ModelConfig, top_k: int,
                 chunk: int):
  """`count` <= chunk more tokens: (state, int32 [B, chunk] whose first `count` are real)."""
  out_BC = jnp.zeros((state.next_B.shape[0], chunk), jnp.int32)
  return _kv_steps(params, state, key, temperature, count, cfg, top_k, out_BC)


def _kv_params(params, cfg: ModelConfig):
  """The params as the KV decoder takes them: with the CPU tricks, each block's kernels
  cut into column slices (`cpu_tricks.slice_kernels`), once, before the token loop."""
  return cpu_tricks.slice_kernels(params, cfg.cpu_tricks)


_jit_kv_params = jax.jit(_kv_params, static_argnames="cfg")  # once per stream


# ------------------------------------------------------------------ interface


def _padded_length(n: int) -> int:
  """Prompt lengths are padded to a power of two (at least 16) to share compilations."""
  return max(16, 1 << (n - 1).bit_length())


def _prepare(cfg: ModelConfig, prompt_ids, method: str):
  """(padded int32 [B, P'], true length). KV needs only the last block_size tokens."""
  prompt_BP = np.asarray(prompt_ids, np.int32)
  if prompt_BP.ndim != 2 or prompt_BP.shape[1] == 0:
    raise UserError(f"prompt_ids has shape {prompt_BP.shape}; pass int tokens [batch, length >= 1]")
  if method == "kv":
    prompt_BP = prompt_BP[:, -cfg.block_size:]
  B, P = prompt_BP.shape
  padded = _padded_length(P)
  if method == "kv":
    padded = max(P, min(padded, cfg.block_size))
  padded_BP = np.zeros((B, padded), np.int32)
  padded_BP[:, :P] = prompt_BP
  return jnp.asarray(padded_BP), jnp.int32(P)


def _check(method: str, window: str | None) -> str:
  if method not in METHODS:
    raise UserError(f"sampling method {method!r} is unknown; use one of {', '.join(METHODS)}")
  window = window or {"kv": "chunked", "naive": "crop"}[method]
  if window not in WINDOWS:
    raise UserError(f"window {window!r} is unknown; use one of {', '.join(WINDOWS)}")
  if method == "kv" and window != "chunked":
    raise UserError("the KV cache cannot crop (positions would shift); use window='chunked' "
                    "or method='naive'")
  return window


def make_generate(cfg: ModelConfig, method: str = "kv", window: str | None = None):
  """`generate(params, prompt_ids, key, num_tokens, temperature=1.0, top_k=0)`.

  prompt_ids: int [B, P] with P >= 1. Returns int32 [B, num_tokens], the new
  tokens only. top_k=0 samples from the whole vocabulary; top_k=1 is greedy.
  method "kv" (window "chunked") or "naive" (window "crop" by default, or
  "chunked" to reproduce "kv" past block_size); see the module docstring.
  """
  window = _check(method, window)

  def generate(params, prompt_ids, key, num_tokens: int, temperature: float = 1.0,
               top_k: int = 0):
    prompt_BP, prompt_len = _prepare(cfg, prompt_ids, method)
    kwargs = dict(cfg=cfg, num_tokens=int(num_tokens), top_k=min(int(top_k), cfg.vocab_size))
    if method == "naive":
      kwargs["window"] = window
    if method == "naive":
      return _generate_naive(params, prompt_BP, prompt_len, key, jnp.float32(temperature),
                             **kwargs)
    return _generate_kv(params, prompt_BP, prompt_len, key, jnp.float32(temperature),
                        **kwargs)

  return generate


def make_stream(cfg: ModelConfig, chunk: int = 32):
  """`stream(...)`, generate's arguments, yields int32 numpy [B, n] pieces as made.

  The KV decode in compiled pieces of up to `chunk` tokens, carrying the
  state between them; the pieces join into "kv" generate's tokens for the
  same arguments.
  """

  def stream(params, prompt_ids, key, num_tokens: int, temperature: float = 1.0,
             top_k: int = 0):
    prompt_BP, prompt_len = _prepare(cfg, prompt_ids, "kv")
    temperature = jnp.float32(temperature)
    top_k = min(int(top_k), cfg.vocab_size)
    params = _jit_kv_params(params, cfg=cfg)
    state = _kv_start(params, prompt_BP, prompt_len, cfg=cfg)
    for done in range(0, num_tokens, chunk):
      count = min(chunk, num_tokens - done)
      state, out_BC = _kv_continue(params, state, key, temperature, jnp.int32(count),
                                   cfg=cfg, top_k=top_k, chunk=chunk)
      yield np.asarray(out_BC)[:, :count]

  return stream


def decode_stream(tokenizer, pieces_N):
  """The text of a stream's id pieces, as it grows: each yield is the new text.

  A byte-level BPE piece can end inside a character's UTF-8 bytes; that
  character waits for the next piece rather than printing as a replacement.
  """
  ids, shown = [], 0
  for piece_N in pieces_N:
    ids.extend(int(i) for i in piece_N)
    text = tokenizer.decode(ids)
    end = len(text.rstrip("\ufffd")) if tokenizer.kind == "bpe" else len(text)
    if end > shown:
      yield text[shown:end]
      shown = end
  text = tokenizer.decode(ids)
  if len(text) > shown:
    yield text[shown:]


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
    prompt = tokenizer.start_text
  missing = tokenizer.unknown(prompt)
  if missing:
    raise UserError(f"prompt has characters outside the model's vocabulary: "
                    f"{''.join(missing)!r}; remove or replace them")
  ids_P = tokenizer.encode(prompt)
  return jnp.tile(jnp.asarray(ids_P)[None, :], (num_samples, 1)), prompt
