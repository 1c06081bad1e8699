"""Pretraining on tiny Shakespeare for a Frost model: the first half of a transfer recipe.

  python launch/train.py --config=configs/shakespeare_pretrain.py
  python launch/train.py --config=configs/frost_transfer.py

frost_best's model (4 layers, 4 heads, width 128, a 128-character context,
rotary positions, GELU, a tied head) trained on the lecture's 1.1 MB of
Shakespeare, 20 times Frost's text, so that configs/frost_transfer.py starts
from its weights (its config.train.init_from is this run's folder,
runs/shakespeare_pretrain). Muon (0.05) and AdamW (3e-3) as frost_best,
dropout 0.1, cosine over 1500 steps; exact val every 500 steps. Measured:
exact val 1.538 on Shakespeare at step 1500 (docs/recipes.md#frost_transfer).
"""

from minigpt_jax.config import get_config as base_config


def get_config():
  config = base_config()
  config.data.corpus = "shakespeare"
  config.model.update(name="gpt", block_size=128, n_embed=128, n_heads=4, n_layer=4,
                      dropout=0.1, position="rope", activation="gelu", tie_embeddings=True)
  config.train.update(batch_size=32, steps=1500, optimizer="muon", muon_learning_rate=0.05,
                      learning_rate=3e-3, schedule="cosine", warmup_steps=100,
                      min_learning_rate=3e-4, beta2=0.99, weight_decay=0.1,
                      weight_decay_on="matrices", grad_clip=1.0, eval_mode="full",
                      eval_interval=500, eval_at_start=False, log_every=50,
                      steps_per_dispatch=50, sample_tokens=0)
  return config
