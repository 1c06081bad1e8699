"""The seed's CPU run at the lecture's CPU size, on Robert Frost's poems.

  python launch/train.py --config=configs/frost_cpu.py --workdir=runs/frost_cpu

The same model in PyTorch, the project's twin, reaches val loss 1.913 on frost
and 1.804 on shakespeare (`python launch/torch_twin.py --corpus=frost
--preset=frost_cpu --steps=5000 --eval_iters=200`, or --corpus=shakespeare;
measured with its predecessor, whose losses the twin repeats exactly).
Evaluation is the lecture's estimate (eval_mode "sampled"), as the twin's is,
so the two compare.
"""

from minigpt_jax.config import get_config as base_config


def get_config():
  config = base_config()
  config.data.corpus = "frost"
  # float32, not "auto": PyTorch's 1.913 and 1.804 are float32 runs (the twin's)
  config.model.update(name="gpt", block_size=32, n_embed=64, n_heads=4, n_layer=4,
                      dropout=0.0, dtype="float32")
  # 50 steps (one log interval) per compiled call: the same losses, faster at
  # this size, where a step takes milliseconds (docs/speed.md).
  config.train.update(batch_size=16, steps=5000, learning_rate=1e-3,
                      eval_interval=500, eval_iters=200, steps_per_dispatch=50)
  return config
