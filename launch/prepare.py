"""Tokenize a text once into a token folder that training memory-maps:

  python launch/prepare.py --corpus=frost --tokenizer=char --out=tokens/frost_char
  python launch/prepare.py --path=my_text.txt --tokenizer=bpe --vocab_size=512 --out=tokens/mine
  python launch/train.py --config=configs/frost_cpu.py --config.data.tokens=tokens/frost_char ...
  python launch/prepare.py --corpus=frost --init_from=runs/shakespeare_pretrain --out=tokens/frost_sp

The folder holds train.bin and val.bin (uint16 ids, or uint32 past 65536
tokens), tokenizer.json and meta.json (source sha256, tokenizer, token and
character counts). The text is streamed in chunks, never held whole; the
first --train_fraction of its characters are train, the rest val, and BPE
(byte-level, Hugging Face tokenizers) is trained on the train side only.
Training without config.data.tokens prepares its corpus the same way, into a
cache (see minigpt_jax/tokens.py).
"""

import sys
import time
from pathlib import Path

import _preamble  # noqa: F401  first: the installed package, or one error line

from absl import flags  # noqa: E402

from minigpt_jax import config as config_lib, data, prepare, tokenizer, tokens  # noqa: E402
from minigpt_jax.support import cli, transfer  # noqa: E402
from minigpt_jax.errors import UserError  # noqa: E402

_CORPUS = flags.DEFINE_string("corpus", None, "A corpus name of minigpt_jax/corpora.json.")
_PATH = flags.DEFINE_string("path", None, "Or any UTF-8 text file.")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "char", list(tokenizer.KINDS),
                               "char: the text's sorted characters; bpe: byte-level BPE.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 0, "bpe: tokens in the vocabulary (256 or "
                                   "more); char: leave at 0.")
_TRAIN_FRACTION = flags.DEFINE_float(
    "train_fraction", config_lib.get_config().data.train_fraction,
    "Share of the characters that are train (as config.data.train_fraction).")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "A run's workdir: encode with its vocabulary (grown by the characters "
    "it lacks; BPE as it is), for a run with config.train.init_from set to it.")
_OUT = flags.DEFINE_string("out", None, "New folder to write.")
flags.mark_flag_as_required("out")


def main():
  if bool(_CORPUS.value) == bool(_PATH.value):
    raise UserError("pass exactly one of --corpus=NAME (one of "
                    f"{', '.join(data.corpus_names())}) and --path=FILE")
  config = config_lib.get_config()
  config.data.update(corpus=_CORPUS.value or "", path=_PATH.value or "",
                     tokenizer=_TOKENIZER.value, vocab_size=_VOCAB_SIZE.value,
                     train_fraction=_TRAIN_FRACTION.value)
  try:
    config_lib.validate(config)
  except UserError as e:  # name the flags of this launcher, not the config fields
    message = str(e)
    for field in ("tokenizer", "vocab_size", "train_fraction", "corpus", "path"):
      message = message.replace(f"--config.data.{field}", f"--{field}")
      message = message.replace(f"config.data.{field}", f"--{field}")
    raise UserError(message) from None
  source, _ = tokens.config_source(config)
  base = transfer.saved_tokenizer(_INIT_FROM.value) if _INIT_FROM.value else None
  start = time.perf_counter()
  meta = prepare.prepare(source, Path(_OUT.value), _TOKENIZER.value, _VOCAB_SIZE.value,
                         _TRAIN_FRACTION.value, tokenizer=base, extend=True,
                         whose=f"{_INIT_FROM.value}'s")
  seconds = time.perf_counter() - start
  mb = meta["source"]["bytes"] / 1e6
  print(f"prepared {source.name} ({mb:.1f} MB, {meta['train']['chars'] + meta['val']['chars']:,}"
        f" characters) into {_OUT.value}: {meta['tokenizer']['kind']}, vocab "
        f"{meta['tokenizer']['vocab_size']}, {meta['train']['tokens']:,} train / "
        f"{meta['val']['tokens']:,} val {meta['dtype']} tokens, {seconds:.1f} s "
        f"({mb / max(seconds, 1e-9):.1f} MB/s)", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
