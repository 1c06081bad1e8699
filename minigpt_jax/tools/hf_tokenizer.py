"""Our tokenizers as a Hugging Face folder's tokenizer.json, and back.

A character vocabulary becomes a `tokenizers` WordLevel model whose ids are
ours (character i of the vocabulary is id i), after a pre-tokenizer that
isolates every character and a decoder that joins them with nothing between:
so `AutoTokenizer` gives our ids and our text. A BPE tokenizer is already a
`tokenizers` JSON and goes as it is. `tokenizer_config.json` names the
generic fast class, so no custom tokenizer code is needed.

Reading a folder back: a WordLevel model of single characters with ids
0..V-1 is a `CharTokenizer` again; a BPE model (GPT-2's byte-level BPE, ours)
is a `BpeTokenizer`; a folder with only GPT-2's vocab.json and merges.txt is
rebuilt as GPT-2's byte-level BPE.

Owns: `to_hf`, `from_folder`. May import: tokenizer, errors, tokenizers.
"""

import json
from pathlib import Path

from minigpt_jax import tokenizer as tokenizer_lib
from minigpt_jax.errors import UserError

_EVERY_CHAR = r"[\s\S]"  # one match per character, newlines included


def _char_hf(chars: str):
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  hf = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
  hf.pre_tokenizer = pre_tokenizers.Split(Regex(_EVERY_CHAR), behavior="isolated")
  hf.decoder = decoders.Fuse()
  return hf


def to_hf(tok, block_size: int) -> tuple[str, dict]:
  """(tokenizer.json text, tokenizer_config.json dict) of our tokenizer.

  A character vocabulary that the `tokenizers` model cannot hold with our ids
  (a character it cannot store or isolate, such as a lone surrogate) is a
  UserError naming the characters.
  """
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
            "clean_up_tokenization_spaces": False}
  if tok.kind == "bpe":
    eos = "<|endoftext|>" if tok.hf.token_to_id("<|endoftext|>") is not None else None
    return tok.hf_json, {**config, **({"eos_token": eos, "bos_token": eos} if eos else {})}
  bad = [c for c in tok.chars if 0xD800 <= ord(c) <= 0xDFFF]
  try:
    hf = None if bad else _char_hf(tok.chars)
    ids = hf.encode(tok.chars).ids if hf else []
    bad = bad or [c for i, c in enumerate(tok.chars)
                  if i >= len(ids) or ids[i] != i or hf.decode([i]) != c]
  except Exception:  # the library's own error types
    bad = bad or list(tok.chars)
  if bad:
    raise UserError(f"the character vocabulary has {len(bad)} character(s) a Hugging Face "
                    f"tokenizer cannot hold with our ids ({''.join(map(ascii, bad[:5]))}); "
                    "train on a text without them (or with --config.data.tokenizer=bpe)")
  return hf.to_str(), config


def eos_id(tok) -> int | None:
  """The id of GPT-2's <|endoftext|>, where the tokenizer has it."""
  return tok.hf.token_to_id("<|endoftext|>") if tok.kind == "bpe" else None


def _gpt2_files(folder: Path) -> str:
  """GPT-2's byte-level BPE from its vocab.json and merges.txt, as tokenizer.json text."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  hf = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.post_processor = processors.ByteLevel(trim_offsets=False)
  return hf.to_str()


def from_folder(folder: Path):
  """Our tokenizer of a Hugging Face folder (tokenizer.json, or vocab.json + merges.txt)."""
  path = folder / "tokenizer.json"
  if path.is_file():
    text = path.read_text(encoding="utf-8")
  elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
    text = _gpt2_files(folder)
  else:
    raise UserError(f"{folder} has no tokenizer.json (nor GPT-2's vocab.json and merges.txt); "
                    "save the tokenizer there too (tokenizer.save_pretrained)")
  try:
    model = json.loads(text)["model"]
  except (ValueError, KeyError, TypeError):
    raise UserError(f"{path} is not a tokenizers JSON; save it again with "
                    "tokenizer.save_pretrained") from None
  if model.get("type") == "WordLevel":
    vocab = model.get("vocab", {})
    chars = sorted(vocab, key=vocab.get)
    if (all(isinstance(c, str) and len(c) == 1 for c in chars)
        and sorted(vocab.values()) == list(range(len(chars)))):
      return tokenizer_lib.CharTokenizer("".join(chars))
  if model.get("type") == "BPE":
    return tokenizer_lib.BpeTokenizer(text)
  raise UserError(f"{path} is a {model.get('type')} tokenizer; only byte-level BPE (GPT-2's) "
                  "and the character vocabularies launch/export_hf.py writes import")
