"""PyTorch state_dicts of the lecture's models and nanoGPT's, mapped onto our params.

No torch here: launch/import_torch.py loads the file and hands over a plain
dict of numpy arrays, so this mapping is testable and importable anywhere.
Three layouts are read, told apart by the token embedding's name:

  lecture  Karpathy's gpt.py: `token_embedding_table`, `position_embedding_table`,
           one Linear per head (`blocks.{i}.sa.heads.{j}.query.weight` [D, C]),
           `sa.proj`, `ffwd.net.{0,2}`, `ln1`, `ln2`, `ln_f`, `lm_head`; with
           config.model.name="bigram", bigram.py's `token_embedding_table` [V, V].
  fused    a one-file GPT with one q/k/v Linear (the layout of the PyTorch
           reference our first benchmarks ran): `tok`, `pos`, `blocks.{i}.att.qkv`
           [3C, C] (rows q | k | v, each head-major), `att.proj`, `mlp.{0,2}`,
           `ln1`, `ln2`, `lnf`, `head`.
  nanogpt  Karpathy's nanoGPT model.py (and our PyTorch twin, torch_twin.py,
           built with nanoGPT's options): `transformer.wte`, `transformer.wpe`,
           `transformer.h.{i}.attn.c_attn` [3C, C] (rows q | k | v, each
           head-major), `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`, `ln_1`, `ln_2`,
           `transformer.ln_f`, and `lm_head`, the same tensor as wte. Its
           `bias` flag (LayerNorm and Linear biases) is our bias = qkv_bias;
           `attn.bias`, where present, is the causal mask, not a weight.

The lecture and fused layouts are the default model (ReLU, biases but none
on q/k/v, learned positions, untied head); nanoGPT's is exact GELU and
learned positions, its head tied to wte: with tie_embeddings (its recipe) a
saved lm_head.weight must equal wte; without, it becomes our own lm_head
(with a zero bias when bias=True). A config asking for another model is a
UserError naming the fields to pass.

torch Linear weights are [out, in] and flax Dense kernels [in, out], so each is
transposed. The lecture's attention scales by 1/sqrt(head_size) as ours does;
the very first version of its gpt.py scaled by 1/sqrt(n_embed), so weights
trained with that copy load but give other logits. The fused and nanogpt
layouts do not record n_heads: a wrong --config.model.n_heads cannot be
detected there (a nanoGPT ckpt.pt's model_args has it).

nanoGPT's ckpt.pt adds model_args, which `nanogpt_model` turns into
config.model fields, and its char datasets a meta.pkl, which `read_meta`
reads without running any code the file names.

Owns: the state_dict -> params mapping, nanoGPT's model_args and meta.pkl.
May import: model, data, errors; no torch.
"""

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from minigpt_jax import data
from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig

# Buffers that hold the causal mask, not weights: read by no one, never reported.
# nanoGPT's is `attn.bias` [1, 1, block, block]; its Linear biases are `attn.c_*.bias`.
_IGNORED = re.compile(r"(^|\.)(tril|mask)$|^transformer\.h\.\d+\.attn\.bias$")
_COMPILED_PREFIX = "_orig_mod."  # what torch.compile adds to a module's names

# Our module name -> the torch name, per layout; `{i}` is the block index. The
# lecture's q/k/v are one Linear per head: `{name}.{j}.query` and so on.
_NAMES = {
    "lecture": {"tok_embed": "token_embedding_table", "pos_embed": "position_embedding_table",
                "ln1": "blocks.{i}.ln1", "ln2": "blocks.{i}.ln2",
                "attn/qkv": "blocks.{i}.sa.heads",
                "attn/proj": "blocks.{i}.sa.proj", "mlp/fc": "blocks.{i}.ffwd.net.0",
                "mlp/proj": "blocks.{i}.ffwd.net.2", "ln_f": "ln_f", "lm_head": "lm_head"},
    "fused": {"tok_embed": "tok", "pos_embed": "pos",
              "ln1": "blocks.{i}.ln1", "ln2": "blocks.{i}.ln2", "attn/qkv": "blocks.{i}.att.qkv",
              "attn/proj": "blocks.{i}.att.proj", "mlp/fc": "blocks.{i}.mlp.0",
              "mlp/proj": "blocks.{i}.mlp.2", "ln_f": "lnf", "lm_head": "head"},
    "nanogpt": {"tok_embed": "transformer.wte", "pos_embed": "transformer.wpe",
                "ln1": "transformer.h.{i}.ln_1", "ln2": "transformer.h.{i}.ln_2",
                "attn/qkv": "transformer.h.{i}.attn.c_attn",
                "attn/proj": "transformer.h.{i}.attn.c_proj",
                "mlp/fc": "transformer.h.{i}.mlp.c_fc", "mlp/proj": "transformer.h.{i}.mlp.c_proj",
                "ln_f": "transformer.ln_f", "lm_head": "lm_head"},
}
# The model each layout is, in config.model fields (nanoGPT's bias: from its tensors).
_LECTURE_MODEL = {"activation": "relu", "bias": True, "qkv_bias": False,
                  "tie_embeddings": False, "position": "learned"}


def layout(names) -> str:
  """'lecture', 'fused' or 'nanogpt', from the token embedding's name."""
  names = {n.removeprefix(_COMPILED_PREFIX) for n in names}
  if "token_embedding_table.weight" in names:
    return "lecture"
  if "tok.weight" in names:
    return "fused"
  if "transformer.wte.weight" in names:
    return "nanogpt"
  raise UserError(
      "state_dict has neither token_embedding_table.weight (the lecture's gpt.py or "
      "bigram.py), tok.weight (a fused one-file GPT) nor transformer.wte.weight "
      "(nanoGPT, or minigpt_jax/tools/torch_twin.py); save model.state_dict() of one of "
      "those models")


def _check_model(kind: str, cfg: ModelConfig, names) -> None:
  """A UserError naming every config.model field that the layout's model has otherwise."""
  if kind == "nanogpt":
    has_bias = "transformer.ln_f.bias" in {n.removeprefix(_COMPILED_PREFIX) for n in names}
    want = {"activation": "gelu", "bias": has_bias, "qkv_bias": has_bias,
            "position": "learned"}
    kind += f" layout ({'with' if has_bias else 'without'} biases)"
  else:
    want, kind = _LECTURE_MODEL, kind + " layout"
  wrong = {field: value for field, value in want.items() if getattr(cfg, field) != value}
  if wrong:
    raise UserError(
        f"the {kind} has " + " and ".join(f"config.model.{f}={v!r}" for f, v in wrong.items())
        + "; pass " + " ".join(f"--config.model.{f}={v}" for f, v in wrong.items()))


def _sizes(cfg: ModelConfig) -> str:
  if cfg.name == "bigram":
    return f"config.model.name='bigram' and vocab {cfg.vocab_size}"
  return (f"vocab {cfg.vocab_size}, block_size {cfg.block_size}, n_embed {cfg.n_embed}, "
          f"n_heads {cfg.n_heads}, n_layer {cfg.n_layer}")


class _Tensors:
  """Takes tensors out of a state_dict by name, checking each one's shape."""

  def __init__(self, state_dict: Mapping[str, np.ndarray], cfg: ModelConfig):
    self._left = {k.removeprefix(_COMPILED_PREFIX): v for k, v in state_dict.items()}
    self._sizes = _sizes(cfg)

  def take(self, name: str, *shape: int) -> np.ndarray:
    if name not in self._left:
      raise UserError(
          f"state_dict has no tensor {name!r}, which a model with {self._sizes} needs; "
          "pass the --config.model.* values the PyTorch model was built with")
    array = np.asarray(self._left.pop(name), dtype=np.float32)
    if array.shape != shape:
      raise UserError(
          f"state_dict tensor {name!r} has shape {list(array.shape)} but a model with "
          f"{self._sizes} needs {list(shape)}; pass the --config.model.* values and the "
          "vocabulary (--text, --vocab or --meta) the PyTorch model was built with")
    return array

  def has(self, name: str) -> bool:
    return name in self._left

  def dense(self, name: str, n_in: int, n_out: int, bias: bool = True) -> dict:
    kernel = {"kernel": self.take(f"{name}.weight", n_out, n_in).T}
    return {**kernel, "bias": self.take(f"{name}.bias", n_out)} if bias else kernel

  def layer_norm(self, name: str, n: int, bias: bool = True) -> dict:
    scale = {"scale": self.take(f"{name}.weight", n)}
    return {**scale, "bias": self.take(f"{name}.bias", n)} if bias else scale

  def check_all_taken(self) -> None:
    left = [n for n in self._left if not _IGNORED.search(n)]
    if left:
      shown = ", ".join(map(repr, left[:3])) + (", ..." if len(left) > 3 else "")
      raise UserError(
          f"state_dict has {len(left)} tensor{'s' * (len(left) > 1)} that a model with "
          f"{self._sizes} does not use ({shown}); pass the --config.model.* values the "
          "PyTorch model was built with")


def _qkv(t: _Tensors, kind: str, name: str, cfg: ModelConfig) -> dict:
  """Our fused q/k/v Dense: kernel [C, 3C], columns q | k | v, each head-major."""
  C, H = cfg.n_embed, cfg.n_heads
  if kind != "lecture":
    return t.dense(name, C, 3 * C, cfg.qkv_bias)
  D = C // H  # one bias-free Linear per head and part
  return {"kernel": np.concatenate([t.take(f"{name}.{j}.{part}.weight", D, C).T
                                    for part in ("query", "key", "value") for j in range(H)],
                                   axis=1)}


def _head(t: _Tensors, kind: str, name: str, cfg: ModelConfig, table_VC: np.ndarray) -> dict:
  """lm_head's params; none when tied, after checking a saved head is the embedding."""
  V, C = cfg.vocab_size, cfg.n_embed
  if kind != "nanogpt":
    return {"lm_head": t.dense(name, C, V)}
  if not cfg.tie_embeddings:  # nanoGPT's head has no bias: ours starts at zero
    kernel_CV = t.take(f"{name}.weight", V, C).T
    bias_V = {"bias": np.zeros(V, np.float32)} if cfg.bias else {}
    return {"lm_head": {"kernel": kernel_CV, **bias_V}}
  if t.has(f"{name}.weight") and not np.array_equal(t.take(f"{name}.weight", V, C), table_VC):
    raise UserError(f"state_dict's {name}.weight differs from transformer.wte.weight, so its "
                    "head is not tied; pass --config.model.tie_embeddings=False")
  return {}


def convert(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
  """Our params (float32 numpy, the tree of `model.init_params`) from a state_dict.

  Raises UserError naming the first missing, misshapen or unused tensor.
  """
  kind = layout(state_dict)
  t = _Tensors(state_dict, cfg)
  V, T, C = cfg.vocab_size, cfg.block_size, cfg.n_embed
  if cfg.name == "bigram":
    if kind != "lecture":
      raise UserError(f"config.model.name is 'bigram' but the state_dict is a GPT's "
                      f"({kind} layout); use a GPT config such as configs/frost_cpu.py")
    params = {"table": {"embedding": t.take("token_embedding_table.weight", V, V)}}
    t.check_all_taken()
    return params
  _check_model(kind, cfg, state_dict)
  names, bias = _NAMES[kind], cfg.bias
  params = {"tok_embed": {"embedding": t.take(names["tok_embed"] + ".weight", V, C)},
            "pos_embed": {"embedding": t.take(names["pos_embed"] + ".weight", T, C)}}
  for i in range(cfg.n_layer):
    torch_name = {ours: theirs.format(i=i) for ours, theirs in names.items()}
    params[f"block_{i}"] = {
        "ln1": t.layer_norm(torch_name["ln1"], C, bias),
        "attn": {"qkv": _qkv(t, kind, torch_name["attn/qkv"], cfg),
                 "proj": t.dense(torch_name["attn/proj"], C, C, bias)},
        "ln2": t.layer_norm(torch_name["ln2"], C, bias),
        "mlp": {"fc": t.dense(torch_name["mlp/fc"], C, 4 * C, bias),
                "proj": t.dense(torch_name["mlp/proj"], 4 * C, C, bias)},
    }
  params["ln_f"] = t.layer_norm(names["ln_f"], C, bias)
  params.update(_head(t, kind, names["lm_head"], cfg, params["tok_embed"]["embedding"]))
  t.check_all_taken()
  return params


# -- nanoGPT's ckpt.pt model_args and meta.pkl.

# model_args -> config.model, and what nanoGPT's model.py fixes.
_MODEL_ARGS = {"n_layer": "n_layer", "n_head": "n_heads", "n_embd": "n_embed",
               "block_size": "block_size", "bias": "bias", "dropout": "dropout"}
_NANOGPT_MODEL = {"name": "gpt", "activation": "gelu", "tie_embeddings": True,
                  "position": "learned"}


def nanogpt_model(model_args: Mapping, vocab_size: int, where: str) -> dict:
  """config.model fields of a ckpt.pt's model_args; its vocab must be the tokenizer's."""
  for key in _MODEL_ARGS:
    value = model_args.get(key)
    kind = bool if key == "bias" else (int, float) if key == "dropout" else int
    if not isinstance(value, kind) or (key != "bias" and isinstance(value, bool)):
      raise UserError(f"{where}'s model_args has {key}={value!r}; nanoGPT's train.py saves "
                      "n_layer, n_head, n_embd, block_size, bias, vocab_size and dropout")
  if model_args.get("vocab_size") != vocab_size:
    raise UserError(
        f"{where}'s model_args has vocab_size={model_args.get('vocab_size')!r} but the "
        f"vocabulary has {vocab_size} characters; only character-level nanoGPT models import "
        "(not GPT-2's BPE, 50257 padded to 50304): pass the meta.pkl (--meta) or text the "
        "model was trained on")
  fields = {ours: model_args[theirs] for theirs, ours in _MODEL_ARGS.items()}
  fields["dropout"] = float(fields["dropout"])
  return {**fields, "qkv_bias": fields["bias"], **_NANOGPT_MODEL}  # one flag covers c_attn too


class _Refused(pickle.UnpicklingError):
  pass


class _NoGlobals(pickle.Unpickler):
  """Builds pickle's own types only: any class or function a file names is refused,
  so loading runs no code of the file's choosing."""

  def find_class(self, module, name):
    raise _Refused(f"it names the Python global {module}.{name}")


def _plain(x) -> bool:
  return isinstance(x, (str, int))


def read_meta(path: Path) -> data.CharTokenizer:
  """nanoGPT's meta.pkl ({'vocab_size', 'itos', 'stoi'}) as a tokenizer with its ids."""
  if not path.is_file():
    raise UserError(f"--meta file {path} does not exist; pass the meta.pkl that nanoGPT's "
                    "data/shakespeare_char/prepare.py wrote")
  try:
    with path.open("rb") as f:
      meta = _NoGlobals(f).load()
  except _Refused as e:
    raise UserError(f"--meta file {path} is refused: {e}; only a meta.pkl of plain dicts, "
                    "strings and ints is read") from None
  except Exception:  # a truncated or foreign file: pickle raises many kinds
    raise UserError(f"--meta file {path} is not a pickle; pass nanoGPT's meta.pkl") from None
  ok = isinstance(meta, dict) and all(
      isinstance(k, str) and (_plain(v) or isinstance(v, dict)
                              and all(_plain(a) and _plain(b) for a, b in v.items()))
      for k, v in meta.items())
  itos = meta.get("itos") if ok else None
  n = len(itos) if isinstance(itos, dict) else 0
  chars = [itos.get(i) for i in range(n)]
  if not (n and all(isinstance(c, str) and len(c) == 1 for c in chars)
          and len(set(chars)) == n and meta.get("vocab_size", n) == n
          and all(meta.get("stoi", {}).get(c, i) == i for i, c in enumerate(chars))):
    raise UserError(f"--meta file {path} is not a character meta.pkl ({{'vocab_size': V, "
                    "'itos': {0: char, ...}, 'stoi': {char: 0, ...}}); pass the one nanoGPT's "
                    "data/shakespeare_char/prepare.py wrote")
  return data.CharTokenizer("".join(chars))  # id i is itos[i], sorted or not
