"""Exactly the seed notebook's GPU run on Robert Frost's poems (about 9 minutes
on a Colab T4 in PyTorch).

  python launch/train.py --config=configs/frost_t4.py --workdir=runs/frost_t4

3.2M parameters; dropout 0.2; eval every 500 steps over 200 batches per split: the
seed's estimate (eval_mode "sampled"), so the numbers compare with the notebook's.
The dtype is "auto": float32 on a T4, as the notebook's; bfloat16 on an A100 or newer,
where it reached float32's best val loss (docs/speed.md, "On a GPU").
"""

from minigpt_jax.config import get_config as base_config


def get_config():
  config = base_config()
  config.data.corpus = "frost"
  config.model.update(name="gpt", block_size=128, n_embed=256, n_heads=4, n_layer=4,
                      dropout=0.2)
  # 10 steps per compiled call: the same losses, faster on CPU (docs/speed.md).
  config.train.update(batch_size=64, steps=5000, learning_rate=3e-4,
                      eval_interval=500, eval_iters=200, steps_per_dispatch=10)
  return config
