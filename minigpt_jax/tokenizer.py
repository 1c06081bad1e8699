"""Text to ids and back: the lecture's characters, or byte-level BPE (Hugging Face `tokenizers`).

Both kinds share one small interface (`vocab_size`, `encode`, `decode`,
`unknown`, `start_text`, `to_json`), so training, sampling and checkpoints do
not care which they hold. `to_json` is what a checkpoint saves as its `vocab`
item and a token folder as `tokenizer.json`:

- characters: `{"chars": "..."}`, the form every older checkpoint has, so
  those keep restoring (`{"kind": "char", "chars": ...}` reads too);
- BPE: `{"kind": "bpe", "tokenizer": "<the tokenizers library's JSON>"}`.

Byte-level BPE encodes any UTF-8 text (no unknown characters); a character
vocabulary knows only its text's characters, and `unknown` names the others.

Owns: `CharTokenizer`, `BpeTokenizer`, `from_json`, `train_bpe`, `min_bpe_vocab`.
May import: numpy, tokenizers, errors.
"""

import json

import numpy as np

from minigpt_jax.errors import UserError

KINDS = ("char", "bpe")
BPE_SPECIAL_TOKENS = ()  # none: a byte-level vocabulary is the 256 bytes plus merges


def min_bpe_vocab() -> int:
  """The smallest byte-level BPE vocabulary: every byte, plus the special tokens."""
  return 256 + len(BPE_SPECIAL_TOKENS)


class CharTokenizer:
  """Character vocabulary: the sorted set of the text's characters (the lecture's)."""

  kind = "char"

  def __init__(self, chars: str):
    self.chars = chars
    self._stoi = {c: i for i, c in enumerate(chars)}

  @classmethod
  def from_text(cls, text: str) -> "CharTokenizer":
    return cls("".join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  @property
  def start_text(self) -> str:
    """What an empty prompt starts from: a newline, as the lecture does."""
    return "\n" if "\n" in self._stoi else self.chars[0]

  def unknown(self, text: str) -> list[str]:
    """Characters of `text` outside the vocabulary, in order of first use."""
    return list(dict.fromkeys(c for c in text if c not in self._stoi))

  def extended(self, chars) -> "CharTokenizer":
    """This vocabulary plus the characters of `chars` it lacks, sorted, after its own.

    Old ids keep their characters, so a model trained on this vocabulary reads
    the new one (transfer.py grows its embedding by the new ids).
    """
    return CharTokenizer(self.chars + "".join(sorted(set(self.unknown("".join(chars))))))

  def encode(self, text: str) -> np.ndarray:
    missing = self.unknown(text)
    if missing:
      raise UserError(f"text has characters outside the vocabulary: {missing!r}; "
                      "remove them or train on a text that has them")
    return np.fromiter((self._stoi[c] for c in text), dtype=np.int32, count=len(text))

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in ids)

  def describe(self) -> str:
    return f"characters, {self.vocab_size} of them"

  def to_json(self) -> dict:
    return {"chars": self.chars}

  @classmethod
  def from_json(cls, obj: dict) -> "CharTokenizer":
    return cls(obj["chars"])

  def __eq__(self, other) -> bool:
    return isinstance(other, CharTokenizer) and other.chars == self.chars


class BpeTokenizer:
  """Byte-level BPE: any UTF-8 text encodes; a wrapper of a `tokenizers.Tokenizer`."""

  kind = "bpe"
  start_text = "\n"

  def __init__(self, hf_json: str):
    from tokenizers import Tokenizer
    self.hf_json = hf_json
    self.hf = Tokenizer.from_str(hf_json)

  @property
  def vocab_size(self) -> int:
    return self.hf.get_vocab_size()

  def unknown(self, text: str) -> list[str]:
    """Characters of `text` that encode to the unknown token: none for byte-level BPE.

    A tokenizer imported from Hugging Face may have one (WordPiece, or BPE
    without byte fallback); each distinct character is encoded alone.
    """
    unk = json.loads(self.hf_json).get("model", {}).get("unk_token")
    unk_id = None if unk is None else self.hf.token_to_id(unk)
    if unk_id is None:
      return []
    return [c for c in dict.fromkeys(text) if unk_id in self.hf.encode(c).ids]

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.hf.encode(text).ids, dtype=np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids, encoded in parallel by the library (no offsets kept)."""
    return [np.asarray(e.ids, dtype=np.uint32) for e in self.hf.encode_batch_fast(texts)]

  def decode(self, ids) -> str:
    return self.hf.decode([int(i) for i in ids])

  def describe(self) -> str:
    return f"byte-level BPE, {self.vocab_size} tokens"

  def to_json(self) -> dict:
    return {"kind": "bpe", "tokenizer": self.hf_json}

  def __eq__(self, other) -> bool:
    return (isinstance(other, BpeTokenizer)
            and json.loads(other.hf_json) == json.loads(self.hf_json))


def from_json(obj) -> CharTokenizer | BpeTokenizer:
  """The tokenizer a `to_json` dict describes; UserError for anything else."""
  kind = obj.get("kind", "char") if isinstance(obj, dict) else None
  try:
    if kind == "char" and isinstance(obj["chars"], str) and obj["chars"]:
      return CharTokenizer.from_json(obj)
    if kind == "bpe" and isinstance(obj["tokenizer"], str):
      return BpeTokenizer(obj["tokenizer"])
  except Exception:  # the tokenizers library raises its own types for a bad JSON
    pass
  raise UserError("tokenizer JSON is neither {\"chars\": \"...\"} nor {\"kind\": \"bpe\", "
                  "\"tokenizer\": \"...\"}; use one written by launch/train.py or "
                  "launch/prepare.py")


def bpe_trainer_and_tokenizer(vocab_size: int):
  """An untrained byte-level BPE tokenizer and its trainer; no prefix space (pieces join)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                special_tokens=list(BPE_SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  return hf, trainer


def train_bpe(pieces, vocab_size: int, where: str) -> BpeTokenizer:
  """Byte-level BPE of `vocab_size` tokens trained on the texts `pieces` yields.

  Deterministic: the same pieces give the same tokenizer. A text too short for
  `vocab_size` (training runs out of pairs to merge first) is a UserError
  naming the largest size it allows.
  """
  if vocab_size < min_bpe_vocab():
    raise UserError(f"vocab_size {vocab_size} is too small for byte-level BPE, which starts "
                    f"from the 256 bytes; set vocab_size (--vocab_size, config.data.vocab_size) to "
                    f"{min_bpe_vocab()} or more")
  hf, trainer = bpe_trainer_and_tokenizer(vocab_size)
  hf.train_from_iterator(pieces, trainer)
  got = hf.get_vocab_size()
  if got < vocab_size:
    raise UserError(f"the training split of {where} allows at most {got} byte-level BPE "
                    f"tokens (every pair of it merged) but vocab_size is {vocab_size}; set vocab_size "
                    f"(--vocab_size, config.data.vocab_size) to {got} or less, or use a longer text")
  return BpeTokenizer(hf.to_str())
