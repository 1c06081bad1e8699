"""The two language models, as pure flax.linen modules with one call signature.

`model.apply({"params": p}, idx_BT, deterministic=..., rngs={"dropout": k})`
returns logits_BTV for both. Layers follow the lecture's final gpt.py so that
its PyTorch weights map one to one: normal(0.02) weights, zero biases,
LayerNorm eps 1e-5, attention scaled by 1/sqrt(head_size).

`GPTDecoder` is GPT for KV-cache decoding: the same parameter tree, fed a few
tokens at a time, with keys/values of earlier tokens kept in a cache.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.extend.random import threefry2x32_p

_INIT = nn.initializers.normal(stddev=0.02)
_LN_EPS = 1e-5  # PyTorch's nn.LayerNorm default


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What a module needs from `config.model`, plus the corpus' vocabulary size."""
  name: str
  vocab_size: int
  block_size: int
  n_embed: int = 64
  n_heads: int = 4
  n_layer: int = 4
  dropout: float = 0.0
  dtype: str = "float32"  # compute dtype; params stay float32

  @classmethod
  def from_config(cls, model_config, vocab_size: int) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size"}
    return cls(vocab_size=vocab_size,
               **{k: v for k, v in model_config.items() if k in fields})


class Dropout(nn.Module):
  """Inverted dropout whose mask depends only on the key and the element's place in the batch.

  Element j of batch row r keeps 16 bits of the threefry hash of
  (first_row + r, j mod ceil(n / 4)), n the row's size: one hash gives four
  masks (16-bit masks already made frost_t4 train 1.25x as fast on CPU as
  flax's 32-bit Dropout; four per hash, 2-3% more). `first_row` is the index of
  x's first row in the whole batch, so a row draws the same mask on whichever
  device computes it. The rate is rounded to a multiple of 2**-16 (0.2
  becomes 0.199997).
  """
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool, first_row=0):
    if deterministic or self.rate == 0.0:
      return x
    threshold = round(self.rate * 2**16)
    rows, n = x.shape[0], math.prod(x.shape[1:])
    hashes = -(-n // 4)
    key = self.make_rng("dropout")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    row_RH = jnp.broadcast_to(
        (jnp.arange(rows, dtype=jnp.uint32) + jnp.asarray(first_row).astype(jnp.uint32))[:, None],
        (rows, hashes))
    column_RH = jnp.broadcast_to(jnp.arange(hashes, dtype=jnp.uint32), (rows, hashes))
    lo_RH, hi_RH = threefry2x32_p.bind(key[0], key[1], row_RH, column_RH)
    bits_RN = jnp.concatenate([lo_RH & 0xFFFF, lo_RH >> 16, hi_RH & 0xFFFF, hi_RH >> 16],
                              axis=-1)[:, :n]
    # Multiplying by a 0-or-scale mask, rather than jnp.where, lets XLA (CPU)
    # fuse the backward pass better: 10% of a frost_t4 step.
    mask_RN = (bits_RN >= threshold).astype(x.dtype) * (1.0 / (1.0 - threshold / 2**16))
    return x * mask_RN.reshape(x.shape)


@jax.custom_vjp
def _matmul(x_MK, w_KN):
  return x_MK @ w_KN


def _matmul_fwd(x_MK, w_KN):
  return x_MK @ w_KN, (x_MK, w_KN)


def _matmul_bwd(residuals, dy_MN):
  x_MK, w_KN = residuals
  dw_NK = lax.dot_general(dy_MN, x_MK, (((0,), (0,)), ((), ())))  # dy^T x
  return dy_MN @ w_KN.T, dw_NK.T


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nn.Module):
  """nn.Dense's parameters and math, with the kernel gradient formed as (dy^T x)^T.

  For nn.Dense's x^T dy, XLA (CPU) first copies dy into a transposed layout;
  from (dy^T x)^T it makes one dot that reads x and dy as they are. Training
  on CPU is 1.1x (frost_t4) to 1.2x (frost_cpu: 248 against 210 steps/s,
  side by side) as fast.
  """
  features: int
  dtype: Any
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _INIT, (x.shape[-1], self.features))
    y = _matmul(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel.astype(self.dtype))
    y = y.reshape(*x.shape[:-1], self.features)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


def _dense(features: int, name: str, dtype, use_bias: bool = True) -> Dense:
  return Dense(features, dtype, use_bias, name=name)


def cudnn_causal_attention(q_BTHD, k_BTHD, v_BTHD):
  """cuDNN's fused (flash) attention through `jax.nn.dot_product_attention`, or None.

  None off NVIDIA GPUs, in float32 (cuDNN's kernel is bf16/fp16 only), or
  where cuDNN turns the shapes down at trace time. On CPU, XLA's own
  dot_product_attention ran frost_cpu 10% slower than the explicit softmax,
  so it is not used there.
  """
  if jax.default_backend() != "gpu" or q_BTHD.dtype not in (jnp.bfloat16, jnp.float16):
    return None
  try:
    return jax.nn.dot_product_attention(q_BTHD, k_BTHD, v_BTHD, is_causal=True,
                                        implementation="cudnn")
  except (RuntimeError, NotImplementedError, ValueError):  # no or old cuDNN, or shapes
    return None  # it does not take: the explicit softmax instead


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with one fused q/k/v projection.

  On NVIDIA GPUs in bfloat16, attention without dropout (evaluation, or
  dropout=0) is cuDNN's fused kernel (`cudnn_causal_attention`); otherwise
  the explicit masked softmax, whose weights dropout needs.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTC, deterministic: bool, first_row=0):
    cfg = self.cfg
    B, T, C = x_BTC.shape
    H, D = cfg.n_heads, C // cfg.n_heads
    # Columns are [q | k | v], each head-major: head j of q is q[:, j*D:(j+1)*D].
    qkv_BT3C = _dense(3 * C, "qkv", cfg.dtype, use_bias=False)(x_BTC)
    q_BTHD, k_BTHD, v_BTHD = (a.reshape(B, T, H, D)
                              for a in jnp.split(qkv_BT3C, 3, axis=-1))
    # cuDNN has no dropout on the attention weights: training with dropout
    # takes the explicit softmax.
    attention_dropout = not deterministic and cfg.dropout > 0.0
    y_BTHD = None if attention_dropout else cudnn_causal_attention(q_BTHD, k_BTHD, v_BTHD)
    if y_BTHD is None:
      scores_BHTT = jnp.einsum("bqhd,bkhd->bhqk", q_BTHD, k_BTHD) * D ** -0.5
      causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
      scores_BHTT = jnp.where(causal_TT, scores_BHTT.astype(jnp.float32), -jnp.inf)
      weights_BHTT = jax.nn.softmax(scores_BHTT, axis=-1).astype(cfg.dtype)
      weights_BHTT = Dropout(cfg.dropout)(weights_BHTT, deterministic, first_row)
      y_BTHD = jnp.einsum("bhqk,bkhd->bqhd", weights_BHTT, v_BTHD)
    y_BTC = _dense(C, "proj", cfg.dtype)(y_BTHD.reshape(B, T, C))
    return Dropout(cfg.dropout)(y_BTC, deterministic, first_row)


class MLP(nn.Module):
  """The lecture's FeedForward: 4x expansion, ReLU, projection, dropout."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTC, deterministic: bool, first_row=0):
    C = x_BTC.shape[-1]
    h_BTF = nn.relu(_dense(4 * C, "fc", self.cfg.dtype)(x_BTC))
    y_BTC = _dense(C, "proj", self.cfg.dtype)(h_BTF)
    return Dropout(self.cfg.dropout)(y_BTC, deterministic, first_row)


class Block(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTC, deterministic: bool, first_row=0):
    ln = lambda name: nn.LayerNorm(epsilon=_LN_EPS, dtype=self.cfg.dtype, name=name)
    attn = CausalSelfAttention(self.cfg, name="attn")
    x_BTC = x_BTC + attn(ln("ln1")(x_BTC), deterministic, first_row)
    return x_BTC + MLP(self.cfg, name="mlp")(ln("ln2")(x_BTC), deterministic, first_row)


class GPT(nn.Module):
  """Decoder-only transformer: token + position embeddings, blocks, LayerNorm, head.

  `first_row` is the index of idx_BT's first row in the whole batch, for
  dropout masks that do not depend on how the batch is split over devices.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, idx_BT, deterministic: bool = True, first_row=0):
    cfg = self.cfg
    T = idx_BT.shape[1]
    if T > cfg.block_size:  # Embed would fill the missing positions with NaN
      raise ValueError(f"GPT got a window of {T} tokens but its block_size is "
                       f"{cfg.block_size}; crop the input to the last {cfg.block_size}")
    tok_BTC = nn.Embed(cfg.vocab_size, cfg.n_embed, embedding_init=_INIT,
                       name="tok_embed")(idx_BT)
    pos_TC = nn.Embed(cfg.block_size, cfg.n_embed, embedding_init=_INIT,
                      name="pos_embed")(jnp.arange(T))
    x_BTC = (tok_BTC + pos_TC).astype(cfg.dtype)
    for i in range(cfg.n_layer):
      x_BTC = Block(cfg, name=f"block_{i}")(x_BTC, deterministic, first_row)
    x_BTC = nn.LayerNorm(epsilon=_LN_EPS, dtype=cfg.dtype, name="ln_f")(x_BTC)
    return _dense(cfg.vocab_size, "lm_head", cfg.dtype)(x_BTC).astype(jnp.float32)


class BigramLM(nn.Module):
  """The lecture's bigram model: row `i` of a V x V table is the logits after token i."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, idx_BT, deterministic: bool = True, first_row=0):
    del deterministic, first_row  # no dropout; kept for the shared call signature
    table = nn.Embed(self.cfg.vocab_size, self.cfg.vocab_size,
                     embedding_init=_INIT, name="table")
    return table(idx_BT).astype(jnp.float32)


# KV-cache decoding. The modules below read GPT's parameter tree unchanged
# (same names, same layers), so any checkpoint decodes; they never train.
# A cache holds keys and values for one window of at most block_size tokens:
# one (k_NSD, v_NSD) pair per layer, N = batch * heads (row b * H + h),
# S = block_size, slot s = window position s. Each pair is its own buffer so a
# step can update it in place; the merged N axis matters too: XLA (CPU) copies
# a loop-carried buffer with a size-1 axis, e.g. B = 1 in [B, H, S, D].


class _DecodeDense(nn.Module):
  """nn.Dense's parameters and math; the kernel may come as column slices.

  With `slice_kernels` each product is many independent ones, which XLA (CPU)
  spreads over all cores; a single matrix-vector product runs on one core.
  """
  features: int
  dtype: Any
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    if self.is_initializing():
      kernel = self.param("kernel", _INIT, (x.shape[-1], self.features))
    else:  # as given: whole [in, out] or a tuple of [in, out_i] slices
      kernel = self.get_variable("params", "kernel")
    x_MK = x.reshape(-1, x.shape[-1]).astype(self.dtype)  # 2-D: no per-slice reshapes
    slices = kernel if isinstance(kernel, tuple) else (kernel,)
    y = jnp.concatenate([x_MK @ k.astype(self.dtype) for k in slices], axis=-1)
    y = y.reshape(*x.shape[:-1], self.features)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


def slice_kernels(params, pieces: int | None = None):
  """GPT params with each block's kernels cut into `pieces` column slices, for GPTDecoder.

  Slicing copies the weights once; do it outside the decode loop. On a
  2-core CPU, 16 pieces made frost_t4's batch-1 decode 10-20% faster (a bare
  chain of its products 1.5x); 4 or 8 did not help, as XLA hands work to
  another thread only when many operations are ready at once. On a GPU each
  slice is one more kernel launch per token, so the default (None) cuts into
  16 on CPU and leaves the kernels whole elsewhere.
  """
  if pieces is None:
    pieces = 16 if jax.default_backend() == "cpu" else 1
  if pieces == 1:
    return params

  def cut(path, x):
    if path[0].key.startswith("block_") and path[-1].key == "kernel":
      return tuple(jnp.array_split(x, pieces, axis=1))
    return x

  return jax.tree_util.tree_map_with_path(cut, params)


class CachedSelfAttention(nn.Module):
  """CausalSelfAttention on T new tokens at window positions [pos, pos + T).

  Their keys/values are written into the cache first; query t then attends to
  slots <= pos + t, so stale slots past the window's end are never seen.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTC, kv, pos):
    cfg = self.cfg
    B, T, C = x_BTC.shape
    k_NSD, v_NSD = kv
    S = k_NSD.shape[1]
    H, D = cfg.n_heads, C // cfg.n_heads
    qkv_BT3C = _DecodeDense(3 * C, cfg.dtype, use_bias=False, name="qkv")(x_BTC)
    # [B, T, H, D] -> [B * H, T, D]: each head a row of the cache.
    q_NTD, k_new_NTD, v_new_NTD = (a.reshape(B, T, H, D).transpose(0, 2, 1, 3)
                                   .reshape(B * H, T, D)
                                   for a in jnp.split(qkv_BT3C, 3, axis=-1))
    k_NSD = lax.dynamic_update_slice_in_dim(k_NSD, k_new_NTD.astype(k_NSD.dtype), pos, 1)
    v_NSD = lax.dynamic_update_slice_in_dim(v_NSD, v_new_NTD.astype(v_NSD.dtype), pos, 1)
    scores_NTS = jnp.einsum("nqd,nkd->nqk", q_NTD, k_NSD) * D ** -0.5
    visible_TS = jnp.arange(S)[None, :] <= pos + jnp.arange(T)[:, None]
    scores_NTS = jnp.where(visible_TS, scores_NTS.astype(jnp.float32), -jnp.inf)
    weights_NTS = jax.nn.softmax(scores_NTS, axis=-1).astype(cfg.dtype)
    y_NTD = jnp.einsum("nqk,nkd->nqd", weights_NTS, v_NSD)
    y_BTC = _DecodeDense(C, cfg.dtype, name="proj")(
        y_NTD.reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, C))
    return y_BTC, (k_NSD, v_NSD)


class CachedMLP(nn.Module):
  """MLP without dropout, its kernels possibly sliced."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTC):
    C = x_BTC.shape[-1]
    h_BTF = nn.relu(_DecodeDense(4 * C, self.cfg.dtype, name="fc")(x_BTC))
    return _DecodeDense(C, self.cfg.dtype, name="proj")(h_BTF)


class CachedBlock(nn.Module):
  """Block with CachedSelfAttention and CachedMLP."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTC, kv, pos):
    ln = lambda name: nn.LayerNorm(epsilon=_LN_EPS, dtype=self.cfg.dtype, name=name)
    y_BTC, kv = CachedSelfAttention(self.cfg, name="attn")(ln("ln1")(x_BTC), kv, pos)
    x_BTC = x_BTC + y_BTC
    return x_BTC + CachedMLP(self.cfg, name="mlp")(ln("ln2")(x_BTC)), kv


class GPTDecoder(nn.Module):
  """GPT for decoding: `apply({"params": gpt_params}, idx_BT, pos, cache)`.

  idx_BT are window positions [pos, pos + T); returns (logits_BTV, cache).
  Prefill is T = prompt length at pos 0; each later step is T = 1. The
  logits equal GPT's on the whole window up to float rounding, with params
  as GPT has them or through `slice_kernels`.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, idx_BT, pos, cache):
    cfg = self.cfg
    T = idx_BT.shape[1]
    if T > cfg.block_size:  # Embed would fill the missing positions with NaN
      raise ValueError(f"GPT got a window of {T} tokens but its block_size is "
                       f"{cfg.block_size}; crop the input to the last {cfg.block_size}")
    tok_BTC = nn.Embed(cfg.vocab_size, cfg.n_embed, embedding_init=_INIT,
                       name="tok_embed")(idx_BT)
    pos_embed = nn.Embed(cfg.block_size, cfg.n_embed, embedding_init=_INIT, name="pos_embed")
    x_BTC = (tok_BTC + pos_embed(pos + jnp.arange(T))).astype(cfg.dtype)
    new_cache = []
    for i in range(cfg.n_layer):
      x_BTC, kv = CachedBlock(cfg, name=f"block_{i}")(x_BTC, cache[i], pos)
      new_cache.append(kv)
    x_BTC = nn.LayerNorm(epsilon=_LN_EPS, dtype=cfg.dtype, name="ln_f")(x_BTC)
    logits_BTV = _dense(cfg.vocab_size, "lm_head", cfg.dtype)(x_BTC).astype(jnp.float32)
    return logits_BTV, tuple(new_cache)


def init_cache(cfg: ModelConfig, batch_size: int):
  """An empty GPTDecoder cache: n_layer pairs (k_NSD, v_NSD) of zeros."""
  shape = (batch_size * cfg.n_heads, cfg.block_size, cfg.n_embed // cfg.n_heads)
  return tuple((jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
               for _ in range(cfg.n_layer))


def build_model(cfg: ModelConfig) -> nn.Module:
  return {"bigram": BigramLM, "gpt": GPT}[cfg.name](cfg)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy, PyTorch's F.cross_entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()


def init_params(model: nn.Module, key: jax.Array):
  cfg = model.cfg
  return model.init(key, jnp.zeros((1, cfg.block_size), jnp.int32))["params"]


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
