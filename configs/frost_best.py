"""The best val loss on the seed's corpus (Frost's poems) in under 10 minutes of CPU training.

  python launch/train.py --config=configs/frost_best.py --workdir=runs/frost_best

frost_cpu's model (4 layers, 4 heads, width 128 here) with a 128-character
context, batch 32, and a research recipe: rotary positions, GELU, a head tied
to the embedding, dropout 0.3; Muon (0.05) for the blocks' matrices and AdamW
(3e-3) for the rest, 100 warmup steps, cosine to a tenth over 1150 steps,
beta2 0.99, weight decay 0.1 on matrices, clipping at 1.0 (dropout and Muon's
rate from a sweep.py grid). Evaluation is exact (eval_mode "full": every val
token once, in windows of 128 that do not overlap, so the figure compares with
the sampled estimates of frost_cpu and frost_t4, whose windows also give each
token 0 to 127 characters before it) and cheap on this small val text, so it
runs every 50 steps; early stopping
after 12 without a new best keeps the run from the over-fitting that frost_cpu
and frost_t4 end in, and the best checkpoint is the exact best.
Measured (exact val): best 1.642 at step 950, last 1.647, in 300 s from launch
on a 2-core AMD EPYC, against frost_cpu's best 1.82 (docs/recipes.md, with the
sweep behind it).
"""

from minigpt_jax.config import get_config as base_config


def get_config():
  config = base_config()
  config.data.corpus = "frost"
  config.model.update(name="gpt", block_size=128, n_embed=128, n_heads=4, n_layer=4,
                      dropout=0.3, position="rope", activation="gelu", tie_embeddings=True)
  config.train.update(batch_size=32, steps=1150, optimizer="muon", muon_learning_rate=0.05,
                      learning_rate=3e-3, schedule="cosine", warmup_steps=100,
                      min_learning_rate=3e-4, beta2=0.99, weight_decay=0.1,
                      weight_decay_on="matrices", grad_clip=1.0, eval_mode="full",
                      eval_interval=50, early_stop_evals=12, log_every=50,
                      steps_per_dispatch=50)
  return config
