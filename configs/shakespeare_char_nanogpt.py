"""nanoGPT's `config/train_shakespeare_char.py`, exactly, on tiny Shakespeare (10.7M parameters).

  python launch/train.py --config=configs/shakespeare_char_nanogpt.py --workdir=runs/shakespeare_char_nanogpt

Model: 6 layers, 6 heads, width 384, block 256, dropout 0.2, GELU, tied
embeddings, no biases. Optimizer: AdamW with beta2 0.99, weight decay 0.1 on
matrices only, gradient clipping at 1.0, learning rate 1e-3 warmed up over 100
steps, then cosine down to 1e-4 at step 5000; batch 64. Evaluation every 250
steps is exact (eval_mode "full": every val token once, in windows of 256),
where nanoGPT's is an estimate over 200 random batches.

nanoGPT's README reports best val 1.4697 after 5000 steps (about 3 minutes on
an A100). Like `shakespeare_char`, it is a GPU config: far too slow on 2 CPU
cores. Measured here: not yet, as no GPU has been lent to measure it on
(docs/recipes.md gets the figures then).
"""

from minigpt_jax.config import get_config as base_config


def get_config():
  config = base_config()
  config.data.corpus = "shakespeare"
  config.model.update(name="gpt", block_size=256, n_embed=384, n_heads=6, n_layer=6,
                      dropout=0.2, activation="gelu", bias=False, tie_embeddings=True)
  config.train.update(batch_size=64, steps=5000, learning_rate=1e-3, schedule="cosine",
                      warmup_steps=100, min_learning_rate=1e-4, beta2=0.99,
                      weight_decay=0.1, weight_decay_on="matrices", grad_clip=1.0,
                      eval_mode="full", eval_interval=250, log_every=10,
                      steps_per_dispatch=5)
  return config
