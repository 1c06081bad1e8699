"""The lowest val loss on tiny Shakespeare in the wall time of nanoGPT's CPU recipe.

  python launch/train.py --config=configs/shakespeare_cpu_speedrun.py --workdir=runs/speedrun

The budget is what `../shared/bench/torch_ref.py --preset nanogpt_cpu --steps
2000` (nanoGPT's CPU model: 4 layers, 4 heads, width 128, block 64, batch 12,
lr 1e-3 constant, 2000 steps) takes on the same machine, from launch to the
end, compilation included. The model is the same; the recipe differs: a batch
of 32, 1200 steps at a 3x higher peak rate warmed up over 100 steps and
cosine-decayed to a tenth, beta2 0.99, weight decay 0.1 on matrices, gradient
clipping at 1.0, and one evaluation, at the end (200 batches per split, as
torch_ref). Measured figures: README "Recipes".
"""

from minigpt_jax.config import get_config as base_config


def get_config():
  config = base_config()
  config.data.corpus = "shakespeare"
  config.model.update(name="gpt", block_size=64, n_embed=128, n_heads=4, n_layer=4,
                      dropout=0.0)
  config.train.update(batch_size=32, steps=550, optimizer="muon", muon_learning_rate=0.05,
                      learning_rate=5e-3, schedule="cosine", warmup_steps=100,
                      min_learning_rate=5e-4, beta2=0.99, weight_decay=0.1,
                      weight_decay_on="matrices", grad_clip=1.0, eval_interval=550,
                      eval_at_start=False, eval_iters=75, log_every=50, steps_per_dispatch=50)
  return config
