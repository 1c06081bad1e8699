"""The project's PyTorch twin of our GPT, for side-by-side timing and for the import tests.

`launch/benchmark.py --compare-torch` runs it as `python -m
minigpt_jax.tools.torch_twin` in a subprocess (torch and JAX never share a
process, nor its threads), built from the same config: the same sizes and
options, the same batch shape, AdamW at the config's peak learning rate
(constant; our schedules and Muon are not mirrored, which changes no step's
cost). `launch/torch_twin.py` runs it alone, on a named corpus or a file.

The model is written as nanoGPT's model.py names it (`transformer.wte`,
`transformer.h.{i}.attn.c_attn`, ...), with our options: activation, the
Linear and LayerNorm biases apart from q/k/v's, a tied head, rotary or learned
positions, dropout on the attention weights and after each projection.
`load_params` puts our params into it, so tests compare the two losses and
use its state_dict as a nanoGPT checkpoint. Attention is torch's
`scaled_dot_product_attention`; the lecture's model is the default, and its
modules are created in the order torch_ref-style scripts create theirs, so
seed 1337 gives PyTorch's usual initial weights.

Modes: eager float32; `--bf16`, under `torch.autocast("cpu", bfloat16)` (the
like of our dtype bfloat16); `--compile`, torch.compile. Decoding is the
lecture's naive `generate`: the cropped window re-run for every token.

Owns: the PyTorch model, our params in it, its timing run. May import: torch,
numpy, errors; the core's `data` only to find a named corpus (`--corpus`).
"""

import argparse
import dataclasses
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt_jax.errors import UserError

_ROPE_THETA = 10000.0
_LN_EPS = 1e-5
_SEED = 1337
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU,
                "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


@dataclasses.dataclass(frozen=True)
class TwinConfig:
  """The model fields of our `ModelConfig` that shape the network, and the vocabulary."""
  vocab_size: int
  block_size: int = 32
  n_embed: int = 64
  n_heads: int = 4
  n_layer: int = 4
  dropout: float = 0.0
  activation: str = "relu"
  bias: bool = True
  qkv_bias: bool = False
  tie_embeddings: bool = False
  position: str = "learned"

  @classmethod
  def of(cls, model_cfg) -> "TwinConfig":
    """The twin of a `model.ModelConfig` (read by field name: no JAX import here)."""
    return cls(**{f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(cls)})


# Batch, training and model sizes of the configs the lecture and nanoGPT made famous.
PRESETS = {
    "frost_cpu": dict(batch_size=16, block_size=32, n_embed=64, n_heads=4, n_layer=4,
                      dropout=0.0, learning_rate=1e-3),
    "frost_t4": dict(batch_size=64, block_size=128, n_embed=256, n_heads=4, n_layer=4,
                     dropout=0.2, learning_rate=3e-4),
    # nanoGPT README's CPU recipe for shakespeare_char, without its schedule
    "nanogpt_cpu": dict(batch_size=12, block_size=64, n_embed=128, n_heads=4, n_layer=4,
                        dropout=0.0, learning_rate=1e-3),
    "shakespeare_char": dict(batch_size=64, block_size=256, n_embed=384, n_heads=6, n_layer=6,
                             dropout=0.2, learning_rate=3e-4),
}


class LayerNorm(nn.Module):
  """LayerNorm with an optional bias (nanoGPT's; torch's own has no such switch)."""

  def __init__(self, n: int, bias: bool):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(n))
    self.bias = nn.Parameter(torch.zeros(n)) if bias else None

  def forward(self, x):
    return F.layer_norm(x, self.weight.shape, self.weight, self.bias, _LN_EPS)


def rope(x_BHTD, positions_T):
  """Our `model.rope`: rotate-half pairs (i, i + D/2), theta 10000, in float32."""
  D = x_BHTD.shape[-1]
  inv_freq_F = _ROPE_THETA ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
  angle_TF = positions_T.float()[:, None] * inv_freq_F[None, :]
  cos_TF, sin_TF = torch.cos(angle_TF), torch.sin(angle_TF)
  x1, x2 = x_BHTD.float().chunk(2, dim=-1)
  return torch.cat([x1 * cos_TF - x2 * sin_TF, x2 * cos_TF + x1 * sin_TF],
                   dim=-1).to(x_BHTD.dtype)


class CausalSelfAttention(nn.Module):

  def __init__(self, c: TwinConfig):
    super().__init__()
    self.c_attn = nn.Linear(c.n_embed, 3 * c.n_embed, bias=c.qkv_bias)
    self.c_proj = nn.Linear(c.n_embed, c.n_embed, bias=c.bias)
    self.resid_dropout = nn.Dropout(c.dropout)
    self.n_heads, self.dropout, self.rope = c.n_heads, c.dropout, c.position == "rope"

  def forward(self, x_BTC):
    B, T, C = x_BTC.shape
    q, k, v = (a.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
               for a in self.c_attn(x_BTC).split(C, dim=2))
    if self.rope:
      positions_T = torch.arange(T)
      q, k = rope(q, positions_T), rope(k, positions_T)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                       dropout_p=self.dropout if self.training else 0.0)
    return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):

  def __init__(self, c: TwinConfig):
    super().__init__()
    self.c_fc = nn.Linear(c.n_embed, 4 * c.n_embed, bias=c.bias)
    self.act = _ACTIVATIONS[c.activation]()
    self.c_proj = nn.Linear(4 * c.n_embed, c.n_embed, bias=c.bias)
    self.dropout = nn.Dropout(c.dropout)

  def forward(self, x):
    return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):

  def __init__(self, c: TwinConfig):
    super().__init__()
    self.ln_1, self.attn = LayerNorm(c.n_embed, c.bias), CausalSelfAttention(c)
    self.ln_2, self.mlp = LayerNorm(c.n_embed, c.bias), MLP(c)

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
  """Our GPT in PyTorch: `model(idx_BT, targets_BT)` is (logits_BTV, mean loss or None)."""

  def __init__(self, c: TwinConfig):
    super().__init__()
    self.config = c
    modules = dict(wte=nn.Embedding(c.vocab_size, c.n_embed))
    if c.position == "learned":
      modules["wpe"] = nn.Embedding(c.block_size, c.n_embed)
    modules["h"] = nn.ModuleList([Block(c) for _ in range(c.n_layer)])
    modules["ln_f"] = LayerNorm(c.n_embed, c.bias)
    self.transformer = nn.ModuleDict(modules)
    self.lm_head = nn.Linear(c.n_embed, c.vocab_size, bias=c.bias and not c.tie_embeddings)
    if c.tie_embeddings:  # nanoGPT's tie: one tensor, saved under both names
      self.transformer.wte.weight = self.lm_head.weight

  def forward(self, idx_BT, targets_BT=None):
    x = self.transformer.wte(idx_BT)
    if "wpe" in self.transformer:
      x = x + self.transformer.wpe(torch.arange(idx_BT.shape[1]))
    for block in self.transformer.h:
      x = block(x)
    logits = self.lm_head(self.transformer.ln_f(x))
    if targets_BT is None:
      return logits, None
    return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(),
                                   targets_BT.reshape(-1))

  @torch.no_grad()
  def generate(self, idx_BT, num_tokens: int, generator=None):
    """The lecture's sampler: re-run the last block_size tokens for every new one."""
    for _ in range(num_tokens):
      logits, _ = self(idx_BT[:, -self.config.block_size:])
      probs = F.softmax(logits[:, -1, :].float(), dim=-1)
      idx_BT = torch.cat((idx_BT, torch.multinomial(probs, 1, generator=generator)), dim=1)
    return idx_BT


# -- Our params in the twin.

def state_dict_of(params, c: TwinConfig) -> dict:
  """Our params (a nested dict of arrays, `model.init_params`'s tree) as the twin's
  state_dict of float32 numpy arrays; tied, lm_head.weight is transformer.wte.weight."""
  as_np = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
  sd = {}

  def dense(name, p):
    sd[f"{name}.weight"] = as_np(p["kernel"]).T
    if "bias" in p:
      sd[f"{name}.bias"] = as_np(p["bias"])

  def layer_norm(name, p):
    sd[f"{name}.weight"] = as_np(p["scale"])
    if "bias" in p:
      sd[f"{name}.bias"] = as_np(p["bias"])

  sd["transformer.wte.weight"] = as_np(params["tok_embed"]["embedding"])
  if c.position == "learned":
    sd["transformer.wpe.weight"] = as_np(params["pos_embed"]["embedding"])
  for i in range(c.n_layer):
    ours, theirs = params[f"block_{i}"], f"transformer.h.{i}"
    layer_norm(f"{theirs}.ln_1", ours["ln1"])
    dense(f"{theirs}.attn.c_attn", ours["attn"]["qkv"])
    dense(f"{theirs}.attn.c_proj", ours["attn"]["proj"])
    layer_norm(f"{theirs}.ln_2", ours["ln2"])
    dense(f"{theirs}.mlp.c_fc", ours["mlp"]["fc"])
    dense(f"{theirs}.mlp.c_proj", ours["mlp"]["proj"])
  layer_norm("transformer.ln_f", params["ln_f"])
  if c.tie_embeddings:
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
  else:
    dense("lm_head", params["lm_head"])
  return sd


def load_params(params, c: TwinConfig) -> GPT:
  """A twin in eval mode holding our params exactly (float32)."""
  model = GPT(c)
  model.load_state_dict({k: torch.tensor(v) for k, v in state_dict_of(params, c).items()})
  return model.eval()


# -- The timing run: the lecture's batches, AdamW, steady-state speed, naive decode.

class _Parser(argparse.ArgumentParser):
  """argparse with our launchers' one `error: ...` line (exit 2) in place of the usage."""

  def error(self, message):
    raise UserError(f"{message}; see --help")


def _args(argv):
  ap = _Parser(
      prog="torch_twin", description="Time the PyTorch twin of our GPT on a text: one JSON line.")
  where = ap.add_mutually_exclusive_group(required=True)
  where.add_argument("--text", help="any UTF-8 text file (its sorted characters: the vocabulary)")
  where.add_argument("--corpus", help="a named corpus (frost, shakespeare), found or "
                     "downloaded as training does")
  ap.add_argument("--preset", choices=sorted(PRESETS), default="frost_cpu",
                  help="sizes, batch, dropout and learning rate; the flags below override")
  for name, kind in (("batch_size", int), ("block_size", int), ("n_embed", int),
                     ("n_heads", int), ("n_layer", int), ("dropout", float),
                     ("learning_rate", float)):
    ap.add_argument(f"--{name}", type=kind)
  ap.add_argument("--activation", choices=sorted(_ACTIVATIONS), default="relu")
  ap.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True)
  ap.add_argument("--qkv_bias", action=argparse.BooleanOptionalAction, default=False)
  ap.add_argument("--tie_embeddings", action=argparse.BooleanOptionalAction, default=False)
  ap.add_argument("--position", choices=("learned", "rope"), default="learned")
  ap.add_argument("--steps", type=int, default=50, help="timed training steps")
  ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
  ap.add_argument("--sample_tokens", type=int, default=200, help="tokens of the timed decode")
  ap.add_argument("--eval_iters", type=int, default=0,
                  help="if > 0, report train and val loss over this many batches each")
  ap.add_argument("--bf16", action="store_true",
                  help='train under torch.autocast("cpu", bfloat16), as our dtype bfloat16')
  ap.add_argument("--compile", action="store_true", help="torch.compile the model")
  ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  ap.add_argument("--seed", type=int, default=_SEED, help="torch.manual_seed: init and batches")
  args = ap.parse_args(argv)
  for name, value in (("steps", args.steps), ("warmup", args.warmup),
                      ("sample_tokens", args.sample_tokens)):
    if value < (0 if name == "warmup" else 1):
      raise UserError(f"--{name} is {value}; use a "
                      f"{'non-negative' if name == 'warmup' else 'positive'} integer")
  return args


def _read(args) -> str:
  if args.corpus:
    from minigpt_jax import data  # finds or downloads it; only here, so no JAX otherwise
    path = data.resolve_corpus(args.corpus)
  else:
    path = args.text
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read --text {path}: {e}; pass a UTF-8 text file") from None
  if not text:
    raise UserError(f"--text {path} is empty; pass a text to train on")
  return text


def run(args) -> dict:
  """Train `args.steps` timed steps after `args.warmup`, then decode: the JSON fields."""
  sizes = {k: v if getattr(args, k) is None else getattr(args, k)
           for k, v in PRESETS[args.preset].items()}
  text = _read(args)
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  chars = sorted(set(text))
  stoi = {ch: i for i, ch in enumerate(chars)}
  ids = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
  n = int(0.9 * len(ids))
  splits = {"train": ids[:n], "val": ids[n:]}
  B, T = sizes["batch_size"], sizes["block_size"]
  if min(len(s) for s in splits.values()) <= T:
    raise UserError(f"the text's val split has {len(splits['val'])} characters, not more "
                    f"than block_size {T}; pass a longer text")

  def batch(split="train"):
    src = splits[split]
    starts = torch.randint(len(src) - T, (B,))
    return (torch.stack([src[i:i + T] for i in starts]),
            torch.stack([src[i + 1:i + T + 1] for i in starts]))

  cfg = TwinConfig(vocab_size=len(chars), activation=args.activation, bias=args.bias,
                   qkv_bias=args.qkv_bias, tie_embeddings=args.tie_embeddings,
                   position=args.position,
                   **{k: v for k, v in sizes.items() if k not in ("batch_size", "learning_rate")})
  model = GPT(cfg)
  optimizer = torch.optim.AdamW(model.parameters(), lr=sizes["learning_rate"])
  step_model = torch.compile(model) if args.compile else model

  def step():
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
      _, loss = step_model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()

  start = time.perf_counter()
  for _ in range(args.warmup):
    step()
  warmup_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  final_loss = float(loss)
  seconds = time.perf_counter() - start
  model.eval()
  losses = {}
  if args.eval_iters:
    with torch.no_grad():
      for split in splits:
        total = sum(float(model(*batch(split))[1]) for _ in range(args.eval_iters))
        losses[f"{split}_loss"] = round(total / args.eval_iters, 4)
  start = time.perf_counter()
  model.generate(torch.zeros((1, 1), dtype=torch.long), args.sample_tokens)
  sample_s = time.perf_counter() - start
  impl = "torch" + ("-compile" if args.compile else "-eager") + ("-bf16" if args.bf16 else "")
  return dict(impl=impl, preset=args.preset, params=sum(p.numel() for p in model.parameters()),
              threads=torch.get_num_threads(), warmup_s=round(warmup_s, 2),
              steps_per_s=round(args.steps / seconds, 3),
              tokens_per_s=round(args.steps * B * T / seconds),
              naive_sample_tok_per_s=round(args.sample_tokens / sample_s, 1),
              final_loss=round(final_loss, 4) if math.isfinite(final_loss) else None,
              steps=args.steps + args.warmup, **losses)


def main(argv=None) -> None:
  """Prints run's JSON line; a UserError is one `error: ...` line and exit status 2."""
  try:
    print(json.dumps(run(_args(sys.argv[1:] if argv is None else argv))), flush=True)
  except UserError as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
