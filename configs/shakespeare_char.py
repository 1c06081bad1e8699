"""The lecture's final gpt.py on tiny Shakespeare (10.8M parameters).

  python launch/train.py --config=configs/shakespeare_char.py --workdir=runs/shakespeare_char

The lecture reports val loss 1.48 after 5000 steps on a GPU (about 15 minutes
on an A100); on a 2-core CPU it is far too slow to run in full. Evaluation is the
lecture's estimate (eval_mode "sampled"), as that 1.48 is. The dtype is
"auto": bfloat16 on an A100 or newer, in which this config reached the
lecture's 1.48 (docs/speed.md, "On a GPU").
"""

from minigpt_jax.config import get_config as base_config


def get_config():
  config = base_config()
  config.data.corpus = "shakespeare"
  config.model.update(name="gpt", block_size=256, n_embed=384, n_heads=6, n_layer=6,
                      dropout=0.2)
  # 5 steps per compiled call: the same losses, faster on CPU (docs/speed.md).
  config.train.update(batch_size=64, steps=5000, learning_rate=3e-4,
                      eval_interval=500, eval_iters=200, steps_per_dispatch=5)
  return config
