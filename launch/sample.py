"""Sample text from a trained checkpoint, without the corpus.

  python launch/sample.py --config=configs/frost_t4.py --prompt="THE PASTURE" --num_tokens=500

--config=FILE finds the run `python launch/train.py --config=FILE` made, in
runs/<FILE's stem>; --workdir=FOLDER names any run folder (and wins over --config).

Only the generated text (prompt included) goes to stdout, so it can be piped;
several samples are separated by a line of dashes. Logs go to stderr.

Decoding uses the KV cache; past block_size its window restarts from the last
block_size // 2 characters (see minigpt_jax/sampling.py). --naive reruns the
lecture's cropped window for every character instead: slower, and past
block_size a different text. --stream prints the text as it is generated,
the same text as without it.
"""

import sys

import _preamble  # first: the installed package, or one error line

_preamble.start(__name__)  # before JAX loads: the process may restart

import jax  # noqa: E402
from absl import flags  # noqa: E402

from minigpt_jax import sampling  # noqa: E402
from minigpt_jax.support import cli, restore  # noqa: E402
from minigpt_jax.errors import UserError  # noqa: E402

_WORKDIR, _CONFIG, _STEP, _BEST = cli.define_checkpoint_flags()
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue (empty: a newline).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 500, "Tokens (characters, or BPE tokens) to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature (> 0).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k likeliest (0: all; 1: greedy).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed: the same seed gives the same text.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Independent samples, in one batch.")
_NAIVE = flags.DEFINE_bool("naive", False, "Decode as the lecture does, without a cache: the "
                           "last block_size characters rerun for each new one (slow).")
_STREAM = flags.DEFINE_bool("stream", False, "Print characters as they are generated "
                            "(one sample, KV decode).")


def main():
  workdir = cli.run_folder(_WORKDIR.value)
  if _BEST.value and _STEP.value is not None:
    raise UserError("--step and --best pick different checkpoints; pass only one")
  sampling.validate_request(_NUM_TOKENS.value, _TEMPERATURE.value, _TOP_K.value,
                            _NUM_SAMPLES.value)
  if _STREAM.value and _NAIVE.value:
    raise UserError("--stream works with the KV decode only; drop --naive or --stream")
  if _STREAM.value and _NUM_SAMPLES.value > 1:
    raise UserError("--stream prints one sample; drop --num_samples or --stream")
  model_cfg, params, tokenizer, step = restore.load(
      workdir, step=_STEP.value, best=_BEST.value)[1:]
  prompt_ids, prompt = sampling.encode_prompt(tokenizer, _PROMPT.value, _NUM_SAMPLES.value)
  unit = "characters" if tokenizer.kind == "char" else "tokens"
  print(f"sampling {_NUM_SAMPLES.value} x {_NUM_TOKENS.value} {unit} from step {step} "
        f"of {workdir}", file=sys.stderr)
  key = jax.random.PRNGKey(_SEED.value)
  if _STREAM.value:
    print(prompt, end="", flush=True)
    stream = sampling.make_stream(model_cfg)
    pieces_BN = stream(params, prompt_ids, key, _NUM_TOKENS.value, _TEMPERATURE.value,
                       _TOP_K.value)
    for text in sampling.decode_stream(tokenizer, (piece_BN[0] for piece_BN in pieces_BN)):
      print(text, end="", flush=True)
    print()
    return
  generate = sampling.make_generate(model_cfg, "naive" if _NAIVE.value else "kv")
  out_BN = generate(params, prompt_ids, key, _NUM_TOKENS.value, _TEMPERATURE.value,
                    _TOP_K.value)
  texts = [prompt + tokenizer.decode(row) for row in jax.device_get(out_BN)]
  print("\n---------------\n".join(texts))


if __name__ == "__main__":
  cli.run(main)
