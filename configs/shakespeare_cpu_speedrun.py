"""The lowest val loss on tiny Shakespeare in the wall time of nanoGPT's CPU recipe.

  python launch/train.py --config=configs/shakespeare_cpu_speedrun.py --workdir=runs/speedrun

The budget is what nanoGPT's CPU recipe takes in PyTorch on the same machine,
from launch to the end, compilation included, as the project's PyTorch twin
runs it: `python launch/torch_twin.py --corpus=shakespeare --preset=nanogpt_cpu
--steps=2000 --eval_iters=200` (nanoGPT's CPU model: 4 layers, 4 heads, width
128, block 64, batch 12, lr 1e-3 constant, 2000 steps). The model keeps that size and context, with rotary
positions, GELU and a head tied to the embedding. The recipe: batch 32 for
500 steps; Muon (0.05) for the blocks' matrices and AdamW (1e-2) for the rest,
50 warmup steps, then cosine to a twentieth; beta2 0.99, weight decay 0.1 on
matrices, clipping at 1.0; one evaluation, at the end, exact (eval_mode
"full": every val token once in windows of 64; train on as many fixed windows).
Measured: exact val 1.670 at step 500, against PyTorch's 1.806 (its
estimate), in 0.90 of its wall time on a 2-core CPU (docs/recipes.md, with the
sweeps behind it).
"""

from minigpt_jax.config import get_config as base_config


def get_config():
  config = base_config()
  config.data.corpus = "shakespeare"
  config.model.update(name="gpt", block_size=64, n_embed=128, n_heads=4, n_layer=4,
                      dropout=0.0, position="rope", activation="gelu", tie_embeddings=True)
  config.train.update(batch_size=32, steps=500, optimizer="muon", muon_learning_rate=0.05,
                      learning_rate=1e-2, schedule="cosine", warmup_steps=50,
                      min_learning_rate=5e-4, beta2=0.99, weight_decay=0.1,
                      weight_decay_on="matrices", grad_clip=1.0, eval_mode="full", eval_interval=500,
                      eval_at_start=False, log_every=50, steps_per_dispatch=50)
  return config
