"""Loss and bits per character of a checkpoint, without training or its optimizer state.

  python launch/evaluate.py --config=configs/frost_t4.py --best

--config=FILE finds the run `python launch/train.py --config=FILE` made, in
runs/<FILE's stem>; --workdir=FOLDER names any run folder (and wins over --config).

Evaluates on the run's own corpus, in the run's eval mode, so the numbers
equal that step's eval record: "full" scores every val token once, "sampled"
draws the batches the run's evaluation drew at that step. --path=FILE scores
every token of any text the checkpoint's vocabulary covers, streamed in
chunks, in windows moving by --stride tokens (default: block_size; a smaller
stride gives each token more context).

  python launch/evaluate.py --config=configs/frost_best.py --path=poems.txt --stride=64

One JSON object goes to stdout for scripts (`train_loss`, `val_loss`,
`train_bpc`, `val_bpc`, or `text_loss` and `text_bpc` with --path; `step`,
`eval_mode`, `eval_stride` and the tokens scored, or `eval_iters`, ...); a
line for people goes to stderr.
"""

import json
import sys

import _preamble  # first: the installed package, or one error line

_preamble.start(__name__)  # before JAX loads: the process may restart

from absl import flags  # noqa: E402

from minigpt_jax.tools import evaluate  # noqa: E402
from minigpt_jax.support import cli  # noqa: E402

_WORKDIR, _CONFIG, _STEP, _BEST = cli.define_checkpoint_flags()
_EVAL_ITERS = flags.DEFINE_integer("eval_iters", None,
                                   "Batches per split (default: the run's eval_iters).")
_PATH = flags.DEFINE_string("path", None, "Score every token of this UTF-8 text file instead "
                            "of the run's corpus (one split, `text`), streamed.")
_MODE = flags.DEFINE_enum("mode", None, ["sampled", "full"], "How to score the run's "
                          "splits (default: the run's eval_mode).")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the sampled batches (default: the run's; "
                             "another seed gives another estimate).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Windows per batch (default: the run's).")
_STRIDE = flags.DEFINE_integer("stride", None, "Tokens between windows of a full evaluation, "
                               "1 to block_size (default: block_size, or the run's eval_stride).")


def main():
  workdir = cli.run_folder(_WORKDIR.value)
  result = evaluate.evaluate(workdir, step=_STEP.value, best=_BEST.value,
                             eval_iters=_EVAL_ITERS.value, path=_PATH.value,
                             stride=_STRIDE.value, mode=_MODE.value, seed=_SEED.value,
                             batch_size=_BATCH_SIZE.value)
  print(evaluate.summary_line(result), file=sys.stderr)
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
