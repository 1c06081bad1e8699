"""Frost's poems from a Shakespeare-pretrained model: the second half of a transfer recipe.

  python launch/train.py --config=configs/shakespeare_pretrain.py
  python launch/train.py --config=configs/frost_transfer.py

Starts from the best checkpoint of the first command's run
(config.train.init_from: runs/shakespeare_pretrain, docs/training.md#transfer):
frost_best's model, whose vocabulary of Shakespeare's 65 characters grows by
the 8 that only Frost uses. Then 400 steps on Frost with a fresh optimizer
and schedule at a tenth of the pretraining's rates (Muon 0.005, AdamW 3e-4,
from a sweep.py grid), dropout 0.3, scored exactly on frost_best's val split
every 25 steps. Measured: best exact val 1.550 at step 400, against
frost_best's 1.641 in the same session (docs/recipes.md#frost_transfer).
"""

from minigpt_jax.config import get_config as base_config


def get_config():
  config = base_config()
  config.data.corpus = "frost"
  config.model.update(name="gpt", block_size=128, n_embed=128, n_heads=4, n_layer=4,
                      dropout=0.3, position="rope", activation="gelu", tie_embeddings=True)
  config.train.update(init_from="runs/shakespeare_pretrain", init_from_step="best",
                      batch_size=32, steps=400, optimizer="muon", muon_learning_rate=0.005,
                      learning_rate=3e-4, schedule="cosine", warmup_steps=20,
                      min_learning_rate=1e-4, beta2=0.99, weight_decay=0.1,
                      weight_decay_on="matrices", grad_clip=1.0, eval_mode="full",
                      eval_interval=25, early_stop_evals=6, log_every=25,
                      steps_per_dispatch=25)
  return config
