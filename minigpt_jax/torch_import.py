"""PyTorch state_dicts of the lecture's models, mapped onto our params.

No torch here: launch/import_torch.py loads the file and hands over a plain
dict of numpy arrays, so this mapping is testable and importable anywhere.
Two layouts are read, told apart by the token embedding's name:

  lecture  Karpathy's gpt.py: `token_embedding_table`, `position_embedding_table`,
           one Linear per head (`blocks.{i}.sa.heads.{j}.query.weight` [D, C]),
           `sa.proj`, `ffwd.net.{0,2}`, `ln1`, `ln2`, `ln_f`, `lm_head`; with
           config.model.name="bigram", bigram.py's `token_embedding_table` [V, V].
  fused    ../shared/bench/torch_ref.py: `tok`, `pos`, `blocks.{i}.att.qkv`
           [3C, C] (rows q | k | v, each head-major), `att.proj`, `mlp.{0,2}`,
           `ln1`, `ln2`, `lnf`, `head`.

torch Linear weights are [out, in] and flax Dense kernels [in, out], so each is
transposed. The lecture's attention scales by 1/sqrt(head_size) as ours does;
the very first version of its gpt.py scaled by 1/sqrt(n_embed), so weights
trained with that copy load but give other logits. The fused layout does not
record n_heads: a wrong --config.model.n_heads cannot be detected there.

Owns: the state_dict -> params mapping. May import: model, errors; no torch.
"""

import re
from collections.abc import Mapping

import numpy as np

from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig

# Buffers that hold the causal mask, not weights: read by no one, never reported.
_IGNORED = re.compile(r"(^|\.)(tril|mask)$")
_COMPILED_PREFIX = "_orig_mod."  # what torch.compile adds to a module's names

# Our module name -> the torch name, per layout; `{i}` is the block index.
_NAMES = {
    "lecture": {"tok_embed": "token_embedding_table", "pos_embed": "position_embedding_table",
                "ln1": "blocks.{i}.ln1", "ln2": "blocks.{i}.ln2",
                "attn/proj": "blocks.{i}.sa.proj", "mlp/fc": "blocks.{i}.ffwd.net.0",
                "mlp/proj": "blocks.{i}.ffwd.net.2", "ln_f": "ln_f", "lm_head": "lm_head"},
    "fused": {"tok_embed": "tok", "pos_embed": "pos",
              "ln1": "blocks.{i}.ln1", "ln2": "blocks.{i}.ln2",
              "attn/proj": "blocks.{i}.att.proj", "mlp/fc": "blocks.{i}.mlp.0",
              "mlp/proj": "blocks.{i}.mlp.2", "ln_f": "lnf", "lm_head": "head"},
}


def layout(names) -> str:
  """'lecture' or 'fused', from the token embedding's name."""
  names = {n.removeprefix(_COMPILED_PREFIX) for n in names}
  if "token_embedding_table.weight" in names:
    return "lecture"
  if "tok.weight" in names:
    return "fused"
  raise UserError(
      "state_dict has neither token_embedding_table.weight (the lecture's gpt.py or "
      "bigram.py) nor tok.weight (../shared/bench/torch_ref.py); save "
      "model.state_dict() of one of those models")


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
          "--text or --vocab the PyTorch model was built with")
    return array

  def dense(self, name: str, n_in: int, n_out: int) -> dict:
    return {"kernel": self.take(f"{name}.weight", n_out, n_in).T,
            "bias": self.take(f"{name}.bias", n_out)}

  def layer_norm(self, name: str, n: int) -> dict:
    return {"scale": self.take(f"{name}.weight", n), "bias": self.take(f"{name}.bias", n)}

  def check_all_taken(self) -> None:
    left = [n for n in self._left if not _IGNORED.search(n)]
    if left:
      shown = ", ".join(map(repr, left[:3])) + (", ..." if len(left) > 3 else "")
      raise UserError(
          f"state_dict has {len(left)} tensor{'s' * (len(left) > 1)} that a model with "
          f"{self._sizes} does not use ({shown}); pass the --config.model.* values the "
          "PyTorch model was built with")


def _qkv_kernel(t: _Tensors, kind: str, block: str, C: int, H: int) -> np.ndarray:
  """Our fused kernel [C, 3C]: columns q | k | v, each head-major."""
  if kind == "fused":
    return t.take(f"{block}.att.qkv.weight", 3 * C, C).T
  D = C // H
  return np.concatenate([t.take(f"{block}.sa.heads.{j}.{part}.weight", D, C).T
                         for part in ("query", "key", "value") for j in range(H)], axis=1)


def convert(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
  """Our params (float32 numpy, the tree of `model.init_params`) from a state_dict.

  Raises UserError naming the first missing, misshapen or unused tensor.
  """
  kind = layout(state_dict)
  t = _Tensors(state_dict, cfg)
  V, T, C, H = cfg.vocab_size, cfg.block_size, cfg.n_embed, cfg.n_heads
  if cfg.name == "bigram":
    if kind != "lecture":
      raise UserError("config.model.name is 'bigram' but the state_dict is a GPT's "
                      "(torch_ref.py layout); use a GPT config such as configs/frost_cpu.py")
    params = {"table": {"embedding": t.take("token_embedding_table.weight", V, V)}}
    t.check_all_taken()
    return params
  names = _NAMES[kind]
  params = {"tok_embed": {"embedding": t.take(names["tok_embed"] + ".weight", V, C)},
            "pos_embed": {"embedding": t.take(names["pos_embed"] + ".weight", T, C)}}
  for i in range(cfg.n_layer):
    torch_name = {ours: theirs.format(i=i) for ours, theirs in names.items()}
    params[f"block_{i}"] = {
        "ln1": t.layer_norm(torch_name["ln1"], C),
        "attn": {"qkv": {"kernel": _qkv_kernel(t, kind, f"blocks.{i}", C, H)},
                 "proj": t.dense(torch_name["attn/proj"], C, C)},
        "ln2": t.layer_norm(torch_name["ln2"], C),
        "mlp": {"fc": t.dense(torch_name["mlp/fc"], C, 4 * C),
                "proj": t.dense(torch_name["mlp/proj"], 4 * C, C)},
    }
  params["ln_f"] = t.layer_norm(names["ln_f"], C)
  params["lm_head"] = t.dense(names["lm_head"], C, V)
  t.check_all_taken()
  return params
