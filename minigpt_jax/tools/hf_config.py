"""config.json and generation_config.json of an exported folder, and config.json read back.

A native model is GPT-2's config (`model_type: "gpt2"`): n_positions is our
block_size, n_embd, n_head, n_layer, our activation by transformers' name
(relu "relu", gelu "gelu" (exact erf), gelu_tanh "gelu_new"), LayerNorm eps
1e-5 and attention scaled by 1/sqrt(head size) as ours, resid_pdrop and
attn_pdrop our dropout, embd_pdrop 0 (we have no embedding dropout), and
tie_word_embeddings our tie_embeddings. Any other model is `model_type:
"minigpt"` with our ModelConfig fields (`kind` for `name`) and an `auto_map`
naming modeling_minigpt.py's classes.

Owns: `hf_config`, `generation_config`, `model_fields` (config.json -> our
config.model fields). May import: model, errors.
"""

from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig

MODELING_FILE = "modeling_minigpt.py"
ACTIVATION_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
_ACTIVATION_FROM_HF = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                       "gelu_pytorch_tanh": "gelu_tanh"}
_MINIGPT_FIELDS = ("block_size", "n_embed", "n_heads", "n_layer", "dropout", "activation",
                   "bias", "qkv_bias", "tie_embeddings", "position")


def hf_config(cfg: ModelConfig, native: bool, eos: int | None) -> dict:
  """config.json of the exported model."""
  common = {"vocab_size": cfg.vocab_size, "bos_token_id": eos, "eos_token_id": eos,
            "dtype": "float32"}
  if native:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embed, "n_head": cfg.n_heads,
            "n_layer": cfg.n_layer, "n_inner": None,
            "activation_function": ACTIVATION_TO_HF[cfg.activation],
            "resid_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "embd_pdrop": 0.0,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "scale_attn_weights": True, "tie_word_embeddings": cfg.tie_embeddings,
            "use_cache": True}
  module = MODELING_FILE.removesuffix(".py")
  return {"architectures": ["MiniGPTForCausalLM"], "model_type": "minigpt", **common,
          "auto_map": {"AutoConfig": f"{module}.MiniGPTConfig",
                       "AutoModelForCausalLM": f"{module}.MiniGPTForCausalLM"},
          "kind": cfg.name, **{f: getattr(cfg, f) for f in _MINIGPT_FIELDS},
          "tie_word_embeddings": False, "use_cache": False}


def generation_config(cfg: ModelConfig, native: bool, eos: int | None) -> dict:
  """Sampling as launch/sample.py's defaults (temperature 1, all tokens); a GPT-2
  model's learned positions end at block_size, so its length stops there."""
  out = {"do_sample": True, "temperature": 1.0, "top_k": 0, "bos_token_id": eos,
         "eos_token_id": eos}
  return {**out, "max_length": cfg.block_size} if native else {**out, "use_cache": False}


def _get(config: dict, key: str, kind, where: str):
  value = config.get(key)
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise UserError(f"{where}'s config.json has {key}={value!r}; pass a folder that "
                    "save_pretrained or launch/export_hf.py wrote")
  return value


def model_fields(config: dict, where: str) -> tuple[dict, int]:
  """(our config.model fields, vocab size) of a gpt2 or minigpt config.json."""
  kind = config.get("model_type")
  if kind == "minigpt":
    fields = {f: config[f] for f in _MINIGPT_FIELDS if f in config}
    return {"name": config.get("kind", "gpt"), **fields}, _get(config, "vocab_size", int, where)
  if kind != "gpt2":
    raise UserError(f"{where} is a {kind!r} model; only GPT-2's architecture (model_type "
                    "gpt2: gpt2, distilgpt2, ...) and folders of launch/export_hf.py import")
  n_embd = _get(config, "n_embd", int, where)
  activation = _ACTIVATION_FROM_HF.get(config.get("activation_function", "gelu_new"))
  wrong = [f"{k}={config.get(k)!r}" for k, ok in (
      ("activation_function", activation is not None),
      ("n_inner", config.get("n_inner") in (None, 4 * n_embd)),
      ("layer_norm_epsilon", config.get("layer_norm_epsilon", 1e-5) == 1e-5),
      ("scale_attn_weights", config.get("scale_attn_weights", True) is True),
      ("scale_attn_by_inverse_layer_idx",
       not config.get("scale_attn_by_inverse_layer_idx", False)),
      ("add_cross_attention", not config.get("add_cross_attention", False))) if not ok]
  if wrong:
    raise UserError(f"{where}'s config.json has {', '.join(wrong)}, which our GPT does not "
                    "have; only GPT-2's own settings import (activation relu, gelu or "
                    "gelu_new, n_inner 4 x n_embd, LayerNorm eps 1e-5)")
  fields = {"name": "gpt", "block_size": _get(config, "n_positions", int, where),
            "n_embed": n_embd, "n_heads": _get(config, "n_head", int, where),
            "n_layer": _get(config, "n_layer", int, where),
            "dropout": float(config.get("resid_pdrop", 0.1)), "activation": activation,
            "bias": True, "qkv_bias": True,  # GPT-2 has every bias
            "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
            "position": "learned"}
  return fields, _get(config, "vocab_size", int, where)
