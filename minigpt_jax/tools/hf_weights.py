"""Our params to Hugging Face tensors and back: GPT-2's names, or modeling_minigpt.py's.

A model that GPT-2's architecture holds exactly (`is_native`: a GPT with
learned positions and a head without a bias, i.e. tied, or untied with
bias=False) becomes GPT-2's state_dict: `transformer.wte`, `wpe`,
`h.{i}.ln_1`, `attn.c_attn` (a Conv1D: weight [in, out], as our kernels, so
nothing is transposed; columns q | k | v, each head-major, as ours),
`attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, `ln_f`, and `lm_head`
([V, C]) when untied. GPT-2 has every bias: those our model lacks
(bias=False, qkv_bias=False) are written as zeros, which is the same model.
Every other model keeps its own tree under modeling_minigpt.py's names:
`block_0/attn/qkv/kernel` is `blocks.0.attn.qkv.weight`, transposed to
torch's Linear [out, in]; LayerNorm's `scale` and Embed's `embedding` are
`weight`.

Numpy only: no torch, no transformers, so it is testable anywhere.

Owns: `is_native`, the two name maps, both directions. May import: model, errors.
"""

from collections.abc import Mapping

import numpy as np

from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig

_PREFIX = "transformer."
# GPT-2 buffers that are the causal mask, not weights (older checkpoints save them).
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")
# Our Linear layers, GPT-2's Conv1D names ({i}: the block), and their bias switches.
_GPT2_LINEAR = {"attn/qkv": "attn.c_attn", "attn/proj": "attn.c_proj",
                "mlp/fc": "mlp.c_fc", "mlp/proj": "mlp.c_proj"}
_GPT2_NORM = {"ln1": "ln_1", "ln2": "ln_2"}


def is_native(cfg: ModelConfig) -> bool:
  """True when GPT-2's architecture holds the model exactly (no custom code needed)."""
  return (cfg.name == "gpt" and cfg.position == "learned"
          and (cfg.tie_embeddings or not cfg.bias))


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def to_gpt2(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """GPT-2's state_dict of a native model; absent biases as zeros, a tied head left out."""
  if not is_native(cfg):
    raise ValueError("not a GPT-2 model; use to_minigpt")
  C = cfg.n_embed
  zeros = lambda n: np.zeros(n, np.float32)
  out = {"transformer.wte.weight": _f32(params["tok_embed"]["embedding"]),
         "transformer.wpe.weight": _f32(params["pos_embed"]["embedding"])}
  for i in range(cfg.n_layer):
    block, h = params[f"block_{i}"], f"transformer.h.{i}."
    for ours, theirs in _GPT2_NORM.items():
      out[h + theirs + ".weight"] = _f32(block[ours]["scale"])
      out[h + theirs + ".bias"] = _f32(block[ours].get("bias", zeros(C)))
    for ours, theirs in _GPT2_LINEAR.items():
      part, name = ours.split("/")
      layer = block[part][name]
      out[h + theirs + ".weight"] = _f32(layer["kernel"])
      out[h + theirs + ".bias"] = _f32(layer.get("bias", zeros(layer["kernel"].shape[1])))
  out["transformer.ln_f.weight"] = _f32(params["ln_f"]["scale"])
  out["transformer.ln_f.bias"] = _f32(params["ln_f"].get("bias", zeros(C)))
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = _f32(np.asarray(params["lm_head"]["kernel"]).T)
  return out


def from_gpt2(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, where: str) -> dict:
  """Our params (the tree of a bias=qkv_bias=True GPT) from GPT-2's state_dict.

  The `transformer.` prefix is optional (GPT2Model saves without it); the
  mask buffers are skipped. A tied model's lm_head.weight, if saved, must be wte.
  """
  left = {k.removeprefix(_PREFIX): v for k, v in tensors.items()
          if not k.endswith(_GPT2_BUFFERS)}

  def take(name, *shape):
    if name not in left:
      raise UserError(f"{where} has no tensor {name!r}, which GPT-2 of its config.json has; "
                      "export the model again with save_pretrained")
    array = _f32(left.pop(name))
    if array.shape != shape:
      raise UserError(f"{where}'s tensor {name!r} has shape {list(array.shape)} where its "
                      f"config.json says {list(shape)}; export the model again")
    return array

  V, T, C = cfg.vocab_size, cfg.block_size, cfg.n_embed
  params = {"tok_embed": {"embedding": take("wte.weight", V, C)},
            "pos_embed": {"embedding": take("wpe.weight", T, C)}}
  widths = {"attn/qkv": (C, 3 * C), "attn/proj": (C, C), "mlp/fc": (C, 4 * C),
            "mlp/proj": (4 * C, C)}
  for i in range(cfg.n_layer):
    block = params[f"block_{i}"] = {"attn": {}, "mlp": {}}
    for ours, theirs in _GPT2_NORM.items():
      block[ours] = {"scale": take(f"h.{i}.{theirs}.weight", C),
                     "bias": take(f"h.{i}.{theirs}.bias", C)}
    for ours, theirs in _GPT2_LINEAR.items():
      part, name = ours.split("/")
      n_in, n_out = widths[ours]
      block[part][name] = {"kernel": take(f"h.{i}.{theirs}.weight", n_in, n_out),
                           "bias": take(f"h.{i}.{theirs}.bias", n_out)}
  params["ln_f"] = {"scale": take("ln_f.weight", C), "bias": take("ln_f.bias", C)}
  head = left.pop("lm_head.weight", None)
  if cfg.tie_embeddings:
    if head is not None and not np.array_equal(_f32(head), params["tok_embed"]["embedding"]):
      raise UserError(f"{where}'s lm_head.weight differs from wte.weight but its config.json "
                      "ties them; set tie_word_embeddings to false in config.json")
  else:
    if head is None:
      raise UserError(f"{where} has no lm_head.weight but its config.json unties the head; "
                      "export the model again with save_pretrained")
    left["lm_head.weight"] = head
    params["lm_head"] = {"kernel": take("lm_head.weight", V, C).T.copy(),
                         "bias": np.zeros(V, np.float32)}  # GPT-2's head has none
  _all_taken(left, where)
  return params


def _all_taken(left: Mapping, where: str) -> None:
  if left:
    shown = ", ".join(map(repr, list(left)[:3])) + (", ..." if len(left) > 3 else "")
    raise UserError(f"{where} has {len(left)} tensor(s) its config.json does not account "
                    f"for ({shown}); pass a folder written by save_pretrained or "
                    "launch/export_hf.py")


# -- modeling_minigpt.py's names: our tree, flattened with dots.

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _torch_path(path: tuple[str, ...]) -> str:
  *modules, leaf = path
  modules = [f"blocks.{m.removeprefix('block_')}" if m.startswith("block_") else m
             for m in modules]
  return ".".join(modules + [_LEAF[leaf]])


def _flat(tree: Mapping, prefix=()) -> dict[tuple, np.ndarray]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def to_minigpt(params: Mapping) -> dict[str, np.ndarray]:
  """modeling_minigpt.py's state_dict: our tree, Linear kernels transposed to [out, in]."""
  return {_torch_path(path): _f32(value.T if path[-1] == "kernel" else value)
          for path, value in _flat(params).items()}


def from_minigpt(tensors: Mapping[str, np.ndarray], shapes: Mapping, where: str) -> dict:
  """Our params from modeling_minigpt.py's state_dict, given the tree of shapes
  `shapes` (init_params' eval_shape for the folder's config)."""
  left = dict(tensors)
  params: dict = {}
  for path, leaf in _flat(shapes).items():
    name = _torch_path(path)
    if name not in left:
      raise UserError(f"{where} has no tensor {name!r}, which its config.json's model needs; "
                      "export the model again with launch/export_hf.py")
    array = _f32(left.pop(name))
    array = array.T if path[-1] == "kernel" else array
    if array.shape != tuple(leaf.shape):
      raise UserError(f"{where}'s tensor {name!r} does not fit its config.json's model; "
                      "export the model again with launch/export_hf.py")
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(array)
  _all_taken(left, where)
  return params
