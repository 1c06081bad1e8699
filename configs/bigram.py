"""The lecture's bigram.py: a V x V table of next-character logits.

  python launch/train.py --config=configs/bigram.py --workdir=runs/bigram \
      --config.data.corpus=shakespeare

The lecture reaches a val loss of about 2.5 on tiny Shakespeare. Evaluation is
the lecture's estimate (eval_mode "sampled": random batches), as its numbers are.
"""

from minigpt_jax.config import get_config as base_config


def get_config():
  config = base_config()
  config.data.corpus = "frost"
  config.model.update(name="bigram", block_size=8)
  config.train.update(batch_size=32, steps=3000, learning_rate=1e-2,
                      eval_interval=300, eval_iters=200)
  return config
