"""The two language models, bigram and GPT, as pure flax.linen modules.

`model.apply({"params": p}, idx_BT, deterministic=..., rngs={"dropout": k})`
returns logits_BTV for both. By default the layers are the lecture's final
gpt.py, so its PyTorch weights map one to one: normal(0.02) weights, zero
biases, LayerNorm eps 1e-5, attention scaled by 1/sqrt(head_size), ReLU,
learned positions, an untied head with a bias, a q/k/v projection without one.

Options (`config.model`; nanoGPT's train.py is activation="gelu", bias =
qkv_bias = False, tie_embeddings=True):
- activation="gelu": the exact erf GELU, torch's nn.GELU() (nanoGPT's);
  "gelu_tanh": its tanh approximation, GPT-2's `gelu_new` (its weights need it).
- bias=False drops the LayerNorm and Linear biases but q/k/v's: qkv_bias is
  that projection's own switch, so the lecture's default (biases, none on
  q/k/v) keeps its parameter tree; nanoGPT's one `bias` flag is both.
- tie_embeddings: logits = x @ tok_embed^T, no lm_head params and so no head
  bias (nanoGPT's lm_head has none either).
- position="rope": no pos_embed; q and k turn by their window position
  (`rope`: rotate-half pairs (i, i + D/2), theta 10000).

Precision (`dtype`), as under torch.autocast: params, the residual stream,
LayerNorm, softmax, the logits and the loss are float32, and every product
casts its inputs to cfg.dtype and accumulates in float32
(preferred_element_type), the form XLA runs on AMX units and tensor cores.
Why float32 there: bfloat16 keeps 8 bits of mantissa, so a residual sum
would drop each block's small update, and LayerNorm's variance, softmax's
exp-sum and the loss's log-sum-exp are long reductions that lose the digits
their results depend on; they cost little next to the products.
Linear layers add their bias in float32 and round once to cfg.dtype, the head
excepted, so q/k/v, attention weights, MLP activations and the KV cache are
cfg.dtype; where dropout follows (the attention weights, each branch's output)
it falls on the float32 value before that rounding (`_dropout`). Backward products cast the float32 cotangent to
cfg.dtype, so dx and dW are cfg.dtype products too (`products`), with the
CPU tricks on or off. In float32 all this is the plain float32 model.

One GPT trains and decodes: given `cache` (from `init_cache`) and `pos`, the
same modules take a few new tokens at window positions [pos, pos + T), keep
their keys and values in the cache, and return (logits, cache).

Owns: ModelConfig, the modules, the loss, init. May import: `cpu_tricks`
(behind `ModelConfig.cpu_tricks`), `precision` (dtype "auto"), `products`, `settings`, JAX,
Flax, optax.
"""

import contextlib
import contextvars
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.extend.random import threefry2x32_p

from minigpt_jax import cpu_tricks, precision, products, settings
from minigpt_jax.settings import boolean, one_of, positive_int, rule, setting

_INIT = cpu_tricks.INIT
_LN_EPS = 1e-5  # PyTorch's nn.LayerNorm default
_ROPE_THETA = 10000.0
# Exact erf GELU is torch's nn.GELU() default, so nanoGPT's weights give its
# logits; GPT-2 trained with the tanh form (transformers' "gelu_new").
_ACTIVATIONS = {"relu": nn.relu, "gelu": lambda x: nn.gelu(x, approximate=False),
                "gelu_tanh": lambda x: nn.gelu(x, approximate=True)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """`config.model`'s fields, declared once, plus the corpus' vocabulary size.

  config.get_config's defaults, config.validate's one-field checks and
  config.check_fits' fields (`fits`) all follow from these lines.
  """
  name: str = setting("gpt", '"bigram" | "gpt"', check=one_of("bigram", "gpt"), fits=True)
  block_size: int = setting(32, "context length in tokens", check=positive_int, fits=True)
  n_embed: int = setting(64, "width; must divide by n_heads", check=positive_int, fits=True)
  n_heads: int = setting(4, "attention heads per block", check=positive_int, fits=True)
  n_layer: int = setting(4, "transformer blocks", check=positive_int, fits=True)
  dropout: float = setting(0.0, "rate on attention weights, projections, MLP out",
                           check=rule(lambda v: 0.0 <= v < 1.0, "use a rate in [0, 1)"))
  dtype: str = setting("float32", 'compute dtype of products: "auto" (precision.py: bfloat16 '
                       'where the hardware multiplies it natively) | "float32" | "bfloat16" | '
                       '"float16" (loss-scaled); params, softmax and the loss stay float32',
                       config="auto", read=precision.resolve, check=one_of(*precision.DTYPES))
  cpu_tricks: bool = setting(False, 'cpu_tricks.py\'s XLA:CPU speed-ups: "auto" (on for the CPU '
                             'backend) | "on" | "off" (plain Flax: forward-mode AD works)',
                             config="auto", read=cpu_tricks.enabled,
                             check=one_of(*cpu_tricks.SETTINGS))
  activation: str = setting("relu", '"relu" | "gelu" (exact erf, as nanoGPT\'s nn.GELU) | '
                            '"gelu_tanh" (tanh approximation, GPT-2\'s gelu_new)',
                            check=one_of("relu", "gelu", "gelu_tanh"), fits=True)
  bias: bool = setting(True, "Linear and LayerNorm biases, but the q/k/v projection's",
                       check=boolean, fits=True)
  qkv_bias: bool = setting(False, "the q/k/v projection's bias (nanoGPT: equal to bias)",
                           check=boolean, fits=True)
  tie_embeddings: bool = setting(False, "the head is tok_embed's transpose, without a bias",
                                 check=boolean, fits=True)
  position: str = setting("learned", '"learned" table | "rope" (q and k rotated, in attention)',
                          check=one_of("learned", "rope"), fits=True)
  vocab_size: int = dataclasses.field(kw_only=True)  # the corpus', not a config field

  @classmethod
  def from_config(cls, model_config, vocab_size: int) -> "ModelConfig":
    """From `config.model` (a field it lacks has its default); cpu_tricks read as a bool."""
    return cls(vocab_size=vocab_size, **settings.read(cls, model_config))


_FIRST_ROW = contextvars.ContextVar("first_row", default=0)


@contextlib.contextmanager
def rows_from(first_row):
  """Model calls inside take rows first_row, first_row + 1, ... of a larger batch.

  The train step wraps each device's (and each micro-batch's) share of the
  batch in it once, so `Dropout` draws the masks those rows have in the whole
  batch: the masks, and so the losses, do not depend on how the batch is
  split. Read while tracing, like a named axis; `first_row` may be traced.
  """
  token = _FIRST_ROW.set(first_row)
  try:
    yield
  finally:
    _FIRST_ROW.reset(token)


class Dropout(nn.Module):
  """Inverted dropout whose mask depends only on the key and the element's place in the batch.

  Element j of batch row r keeps 16 bits of the threefry hash of
  (first_row + r, j mod ceil(n / 4)), n the row's size: one hash gives four
  masks. `first_row` (`rows_from`, 0 by default) is the index of x's first
  row in the whole batch, so a row draws the same mask on whichever device
  computes it (the 1-vs-N-device tests rely on it). The rate is rounded to a
  multiple of 2**-16 (0.2 becomes 0.199997). The hash is the threefry
  primitive itself, not jax.random: the public per-row form (fold_in and
  bits, vmapped) trains slower (docs/speed.md).
  """
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    threshold = round(self.rate * 2**16)
    rows, n = x.shape[0], math.prod(x.shape[1:])
    hashes = -(-n // 4)
    key = self.make_rng("dropout")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    first_row = jnp.asarray(_FIRST_ROW.get()).astype(jnp.uint32)
    row_RH = jnp.broadcast_to((jnp.arange(rows, dtype=jnp.uint32) + first_row)[:, None],
                              (rows, hashes))
    column_RH = jnp.broadcast_to(jnp.arange(hashes, dtype=jnp.uint32), (rows, hashes))
    lo_RH, hi_RH = threefry2x32_p.bind(key[0], key[1], row_RH, column_RH)
    bits_RN = jnp.concatenate([lo_RH & 0xFFFF, lo_RH >> 16, hi_RH & 0xFFFF, hi_RH >> 16],
                              axis=-1)[:, :n]
    # A 0-or-scale mask multiply, not jnp.where: XLA:CPU fuses its backward
    # pass better (docs/speed.md).
    mask_RN = (bits_RN >= threshold).astype(x.dtype) * (1.0 / (1.0 - threshold / 2**16))
    return x * mask_RN.reshape(x.shape)


def rope(x_BTHD, positions_T):
  """Rotary position embedding of q or k at window positions `positions_T`.

  The rotate-half convention (GPT-NeoX, Hugging Face LLaMA): feature i pairs
  with i + D/2 and turns by positions * theta^(-2i/D). Computed in float32,
  returned in x's dtype. q.k then depends on the positions' difference only.
  """
  D = x_BTHD.shape[-1]
  inv_freq_F = _ROPE_THETA ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)  # F = D / 2
  angle_TF = jnp.asarray(positions_T, jnp.float32)[:, None] * inv_freq_F[None, :]
  cos_T1F, sin_T1F = jnp.cos(angle_TF)[:, None, :], jnp.sin(angle_TF)[:, None, :]
  x1_BTHF, x2_BTHF = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1_BTHF * cos_T1F - x2_BTHF * sin_T1F,
                          x2_BTHF * cos_T1F + x1_BTHF * sin_T1F], axis=-1).astype(x_BTHD.dtype)


def cudnn_causal_attention(q_BTHD, k_BTHD, v_BTHD):
  """cuDNN's fused (flash) attention through `jax.nn.dot_product_attention`, or None.

  None off NVIDIA GPUs, in float32 (cuDNN's kernel is bf16/fp16 only), or
  where cuDNN turns the shapes down at trace time. On CPU, XLA's own
  dot_product_attention is slower than the explicit softmax (docs/speed.md),
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

  Training and evaluation (`kv` None): the T tokens attend to each other. On
  NVIDIA GPUs in bfloat16 or float16, attention without dropout is cuDNN's
  fused kernel (`cudnn_causal_attention`); otherwise the explicit masked
  softmax, whose weights dropout needs. Decoding (`kv` = this layer's (k_NSD, v_NSD) cache,
  N = batch * heads, S = block_size): the T new tokens at window positions
  [pos, pos + T) are written into the cache first, then query t attends to
  slots <= pos + t, so stale slots past the window's end are never seen.
  With rope, q and k are rotated by their window positions pos + t before k
  enters the cache: a cached key keeps its slot's rotation, and a refill
  re-caches from slot 0. Returns (y_BTC, the updated kv or None).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTC, deterministic: bool, kv=None, pos=0):
    cfg = self.cfg
    B, T, C = x_BTC.shape
    H, D = cfg.n_heads, C // cfg.n_heads
    # Columns are [q | k | v], each head-major: head j of q is q[:, j*D:(j+1)*D].
    qkv_BT3C = _dense(3 * C, "qkv", cfg, use_bias=cfg.qkv_bias)(x_BTC)
    q_BTHD, k_BTHD, v_BTHD = (a.reshape(B, T, H, D)
                              for a in jnp.split(qkv_BT3C, 3, axis=-1))
    if cfg.position == "rope":
      positions_T = pos + jnp.arange(T)
      q_BTHD, k_BTHD = rope(q_BTHD, positions_T), rope(k_BTHD, positions_T)
    if kv is None:
      # cuDNN has no dropout on the attention weights: training with dropout
      # takes the explicit softmax.
      attention_dropout = not deterministic and cfg.dropout > 0.0
      y_BTHD = None if attention_dropout else cudnn_causal_attention(q_BTHD, k_BTHD, v_BTHD)
      if y_BTHD is None:
        scores_BHTT = _einsum("bqhd,bkhd->bhqk", q_BTHD, k_BTHD, cfg) * D ** -0.5
        causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
        scores_BHTT = jnp.where(causal_TT, scores_BHTT, -jnp.inf)
        weights_BHTT = _dropout(jax.nn.softmax(scores_BHTT, axis=-1), cfg, deterministic)
        y_BTHD = _einsum("bhqk,bkhd->bqhd", weights_BHTT, v_BTHD, cfg)
      y_BTC = y_BTHD.reshape(B, T, C)
    else:
      y_BTC, kv = _cached_attention(q_BTHD, k_BTHD, v_BTHD, kv, pos, cfg)
    y_BTC = _dense(C, "proj", cfg, out_dtype=jnp.float32)(y_BTC)
    return _dropout(y_BTC, cfg, deterministic), kv


def _cached_attention(q_BTHD, k_BTHD, v_BTHD, kv, pos, cfg):
  """Attention of T new tokens over a cache they are written into first: (y_BTC, kv).

  Each head is a row of the cache ([B, T, H, D] -> [B * H, T, D]), kept in
  cfg.dtype; y comes in float32, as the full window's.
  """
  B, T, H, D = q_BTHD.shape
  k_NSD, v_NSD = kv
  S = k_NSD.shape[1]
  q_NTD, k_new_NTD, v_new_NTD = (a.transpose(0, 2, 1, 3).reshape(B * H, T, D)
                                 for a in (q_BTHD, k_BTHD, v_BTHD))
  k_NSD = lax.dynamic_update_slice_in_dim(k_NSD, k_new_NTD.astype(k_NSD.dtype), pos, 1)
  v_NSD = lax.dynamic_update_slice_in_dim(v_NSD, v_new_NTD.astype(v_NSD.dtype), pos, 1)
  scores_NTS = _einsum("nqd,nkd->nqk", q_NTD, k_NSD, cfg) * D ** -0.5
  visible_TS = jnp.arange(S)[None, :] <= pos + jnp.arange(T)[:, None]
  scores_NTS = jnp.where(visible_TS, scores_NTS, -jnp.inf)
  weights_NTS = jax.nn.softmax(scores_NTS, axis=-1).astype(cfg.dtype)
  y_NTD = _einsum("nqk,nkd->nqd", weights_NTS, v_NSD, cfg)
  return y_NTD.reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, H * D), (k_NSD, v_NSD)


class MLP(nn.Module):
  """The lecture's FeedForward: 4x expansion, ReLU (or a GELU), projection, dropout."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTC, deterministic: bool):
    C = x_BTC.shape[-1]
    h_BTF = _dense(4 * C, "fc", self.cfg)(x_BTC)
    h_BTF = _ACTIVATIONS[self.cfg.activation](h_BTF)
    y_BTC = _dense(C, "proj", self.cfg, out_dtype=jnp.float32)(h_BTF)
    return _dropout(y_BTC, self.cfg, deterministic)


class Block(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)); (x, kv)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTC, deterministic: bool, kv=None, pos=0):
    ln = lambda name: _layer_norm(name, self.cfg)
    attn = CausalSelfAttention(self.cfg, name="attn")
    y_BTC, kv = attn(ln("ln1")(x_BTC), deterministic, kv, pos)
    x_BTC = x_BTC + y_BTC
    return x_BTC + MLP(self.cfg, name="mlp")(ln("ln2")(x_BTC), deterministic), kv


class GPT(nn.Module):
  """Decoder-only transformer: token (+ position) embeddings, blocks, LayerNorm, head.

  Dropout masks follow each row's place in the whole batch (`rows_from`).
  With a `cache` (`init_cache`), idx_BT sits at window positions
  [pos, pos + T) and the call returns (logits_BTV, cache): prefill is T =
  prompt length at pos 0, each later step T = 1, and the logits equal those
  of the whole window up to float rounding.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, idx_BT, deterministic: bool = True, cache=None, pos=0):
    cfg = self.cfg
    T = idx_BT.shape[1]
    if T > cfg.block_size:  # Embed would fill the missing positions with NaN
      raise ValueError(f"GPT got a window of {T} tokens but its block_size is "
                       f"{cfg.block_size}; crop the input to the last {cfg.block_size}")
    tok_embed = nn.Embed(cfg.vocab_size, cfg.n_embed, embedding_init=_INIT, name="tok_embed")
    x_BTC = tok_embed(idx_BT)
    if cfg.position == "learned":  # rope turns q and k in attention instead
      positions_TC = nn.Embed(cfg.block_size, cfg.n_embed, embedding_init=_INIT,
                              name="pos_embed")(pos + jnp.arange(T))
      x_BTC = cpu_tricks.add_positions(x_BTC, positions_TC, cfg.cpu_tricks)
    new_cache = []
    for i in range(cfg.n_layer):
      kv = None if cache is None else cache[i]
      x_BTC, kv = Block(cfg, name=f"block_{i}")(x_BTC, deterministic, kv, pos)
      new_cache.append(kv)
    x_BTC = _layer_norm("ln_f", cfg)(x_BTC)
    if cfg.tie_embeddings:  # nanoGPT's tied head: no params of its own, no bias
      logits_BTV = _einsum("btc,vc->btv", x_BTC, tok_embed.embedding, cfg)
    else:
      logits_BTV = _dense(cfg.vocab_size, "lm_head", cfg, out_dtype=jnp.float32)(x_BTC)
    return logits_BTV if cache is None else (logits_BTV, tuple(new_cache))


class BigramLM(nn.Module):
  """The lecture's bigram model: row `i` of a V x V table is the logits after token i."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, idx_BT, deterministic: bool = True):
    del deterministic  # no dropout; kept for the shared call signature
    table = nn.Embed(self.cfg.vocab_size, self.cfg.vocab_size,
                     embedding_init=_INIT, name="table")
    return table(idx_BT).astype(jnp.float32)


# A cache holds keys and values for one window of at most block_size tokens:
# one (k_NSD, v_NSD) pair per layer, N = batch * heads (row b * H + h),
# S = block_size, slot s = window position s. Each pair is its own buffer so a
# step can update it in place; the merged N axis matters too: XLA:CPU copies
# a loop-carried buffer with a size-1 axis, e.g. B = 1 in [B, H, S, D].
def init_cache(cfg: ModelConfig, batch_size: int):
  """An empty GPT cache: n_layer pairs (k_NSD, v_NSD) of zeros."""
  shape = (batch_size * cfg.n_heads, cfg.block_size, cfg.n_embed // cfg.n_heads)
  return tuple((jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
               for _ in range(cfg.n_layer))


def _einsum(spec: str, a, b, cfg: ModelConfig) -> jax.Array:
  """An einsum of operands cast to cfg.dtype, accumulated and returned in float32, its
  backward products in cfg.dtype too (`products.einsum`)."""
  return products.einsum(spec, a, b, cfg.dtype, cfg.cpu_tricks)


def _dense(features: int, name: str, cfg: ModelConfig, use_bias: bool | None = None,
           out_dtype=None):
  """A Linear layer, with a bias iff `use_bias` (None: cfg.bias): float32 product and bias,
  rounded once to `out_dtype` (None: cfg.dtype), as autocast's linear returns bf16."""
  use_bias = cfg.bias if use_bias is None else use_bias
  layer = cpu_tricks.dense(features, name, cfg.dtype, use_bias, cfg.cpu_tricks)
  return lambda x: layer(x).astype(out_dtype or cfg.dtype)


def _dropout(x_f32, cfg: ModelConfig, deterministic: bool) -> jax.Array:
  """Dropout of a float32 result, then its one rounding to cfg.dtype (autocast's bf16 output).

  Dropping before the cast keeps the mask multiply, forward and backward, in
  float32 and fused with the cast; in bfloat16 on a CPU that saved the mask
  multiplies' own passes (docs/speed.md). The masks are the same.
  """
  return Dropout(cfg.dropout)(x_f32, deterministic).astype(cfg.dtype)


def _layer_norm(name: str, cfg: ModelConfig) -> nn.Module:
  """float32 in and out, whatever cfg.dtype (autocast's layer_norm); the next product casts."""
  return nn.LayerNorm(epsilon=_LN_EPS, dtype=jnp.float32, use_bias=cfg.bias, name=name)


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
