"""minigpt_jax's models in PyTorch, for `transformers` (trust_remote_code=True).

launch/export_hf.py copies this file, unchanged, into every exported folder
that GPT-2's architecture cannot hold (the lecture's head with a bias, rotary
positions, the bigram table); config.json's `auto_map` names its two
classes. It imports torch and transformers only, never minigpt_jax, so the
folder runs where our package is not installed.

The math is minigpt_jax/model.py's in float32: pre-LayerNorm blocks (eps
1e-5), one fused q/k/v Linear (columns q | k | v, each head-major),
attention scaled by 1/sqrt(head size), a 4x MLP (ReLU, exact GELU or its
tanh form), learned positions or rotary ones (rotate-half pairs (i, i + D/2),
theta 10000), an untied head (with a bias when `bias`) or the token
embedding's transpose. There is no KV cache: `generate` reruns the last
`block_size` tokens for each new one, as `launch/sample.py --naive` does,
so greedy decoding gives its text.

Owns: `MiniGPTConfig`, `MiniGPTForCausalLM`. May import: torch, transformers.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class MiniGPTConfig(PretrainedConfig):
  """minigpt_jax's `ModelConfig` fields, under their own names (`kind` is its `name`)."""

  model_type = "minigpt"

  def __init__(self, vocab_size=65, kind="gpt", block_size=32, n_embed=64, n_heads=4,
               n_layer=4, dropout=0.0, activation="relu", bias=True, qkv_bias=False,
               tie_embeddings=False, position="learned", **kwargs):
    self.vocab_size, self.kind, self.block_size = vocab_size, kind, block_size
    self.n_embed, self.n_heads, self.n_layer = n_embed, n_heads, n_layer
    self.dropout, self.activation, self.bias, self.qkv_bias = dropout, activation, bias, qkv_bias
    self.tie_embeddings, self.position = tie_embeddings, position
    kwargs.setdefault("use_cache", False)  # no KV cache: each step reruns the window
    kwargs["tie_word_embeddings"] = False  # a tied head reads tok_embed itself
    super().__init__(**kwargs)


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu,
                "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _rope(x, theta=10000.0):
  """Rotary embedding of x [B, H, T, D] at positions 0..T-1 (rotate-half pairs)."""
  D, T = x.shape[-1], x.shape[-2]
  inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float32, device=x.device) / D)
  angle = torch.arange(T, dtype=torch.float32, device=x.device)[:, None] * inv_freq[None, :]
  cos, sin = angle.cos(), angle.sin()
  x1, x2 = x.float().chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):

  def __init__(self, cfg):
    super().__init__()
    self.cfg = cfg
    self.qkv = nn.Linear(cfg.n_embed, 3 * cfg.n_embed, bias=cfg.qkv_bias)
    self.proj = nn.Linear(cfg.n_embed, cfg.n_embed, bias=cfg.bias)
    self.drop = nn.Dropout(cfg.dropout)

  def forward(self, x):
    B, T, C = x.shape
    H = self.cfg.n_heads
    q, k, v = (a.view(B, T, H, C // H).transpose(1, 2) for a in self.qkv(x).split(C, dim=2))
    if self.cfg.position == "rope":
      q, k = _rope(q), _rope(k)
    scores = (q @ k.transpose(-2, -1)) * (C // H) ** -0.5
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    weights = self.drop(F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1))
    y = (weights @ v).transpose(1, 2).reshape(B, T, C)
    return self.drop(self.proj(y))


class MLP(nn.Module):

  def __init__(self, cfg):
    super().__init__()
    self.fc = nn.Linear(cfg.n_embed, 4 * cfg.n_embed, bias=cfg.bias)
    self.proj = nn.Linear(4 * cfg.n_embed, cfg.n_embed, bias=cfg.bias)
    self.act = _ACTIVATIONS[cfg.activation]
    self.drop = nn.Dropout(cfg.dropout)

  def forward(self, x):
    return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):

  def __init__(self, cfg):
    super().__init__()
    self.ln1 = nn.LayerNorm(cfg.n_embed, eps=1e-5, bias=cfg.bias)
    self.attn = Attention(cfg)
    self.ln2 = nn.LayerNorm(cfg.n_embed, eps=1e-5, bias=cfg.bias)
    self.mlp = MLP(cfg)

  def forward(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class MiniGPTForCausalLM(PreTrainedModel, GenerationMixin):
  """The GPT (or, with kind="bigram", the V x V table); logits in float32."""

  config_class = MiniGPTConfig
  base_model_prefix = "minigpt"
  main_input_name = "input_ids"

  @classmethod
  def _supports_default_dynamic_cache(cls) -> bool:
    return False  # no KV cache: generate reruns the window (prepare_inputs_for_generation)

  def __init__(self, config):
    super().__init__(config)
    cfg = config
    if cfg.kind == "bigram":
      self.table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)
    else:
      self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.n_embed)
      if cfg.position == "learned":
        self.pos_embed = nn.Embedding(cfg.block_size, cfg.n_embed)
      self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
      self.ln_f = nn.LayerNorm(cfg.n_embed, eps=1e-5, bias=cfg.bias)
      if not cfg.tie_embeddings:
        self.lm_head = nn.Linear(cfg.n_embed, cfg.vocab_size, bias=cfg.bias)
    self.post_init()

  def _init_weights(self, module):
    """Normal(0.02) weights and zero biases, as minigpt_jax initializes them."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
      nn.init.zeros_(module.bias)

  def get_input_embeddings(self):
    return self.table if self.config.kind == "bigram" else self.tok_embed

  def logits(self, input_ids):
    cfg = self.config
    if cfg.kind == "bigram":
      return self.table(input_ids).float()
    T = input_ids.shape[1]
    if T > cfg.block_size:
      raise ValueError(f"got {T} tokens but block_size is {cfg.block_size}; crop the input")
    x = self.tok_embed(input_ids)
    if cfg.position == "learned":
      x = x + self.pos_embed(torch.arange(T, device=input_ids.device))
    for block in self.blocks:
      x = block(x)
    x = self.ln_f(x)
    return x @ self.tok_embed.weight.T if cfg.tie_embeddings else self.lm_head(x)

  def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
    """Logits [B, T, V] of the window (attention_mask is not used: no padding);
    with labels, the mean next-token cross-entropy as `loss`."""
    logits = self.logits(input_ids)
    loss = None
    if labels is not None:
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             labels[:, 1:].reshape(-1))
    return CausalLMOutput(loss=loss, logits=logits)

  def prepare_inputs_for_generation(self, input_ids, **kwargs):
    """The last block_size tokens, rerun whole at each step (the lecture's decode)."""
    if self.config.kind != "bigram":
      input_ids = input_ids[:, -self.config.block_size:]
    return {"input_ids": input_ids}
