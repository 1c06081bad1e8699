"""Eval-only: the loss and bits per character of a checkpoint, without training.

`evaluate(workdir, step=, best=, eval_iters=, path=)` restores a checkpoint's
config, vocabulary and params (`support.restore.load`: no optimizer state,
the same --step / --best choice and damaged-step fallback as sampling), then
runs `train.estimate_loss`:

- on the run's own corpus (`tokens.load_corpus` of the saved config), its
  train and val splits, with the batches training's evaluation at that step
  drew (they come from the seed and the step): with the run's `eval_iters`
  the numbers are those of the run's eval record at that step;
- or on any text file (`path`), encoded with the checkpoint's tokenizer, as
  one split named "text"; text the tokenizer cannot encode is a UserError.

Bits per character use tokens per character: each split's, or that text's
(its token count over its character count), so the figure compares across
tokenizers. The result is a flat dict whose loss fields are named as in
`metrics.jsonl`'s eval records (`train_loss`, `val_bpc`, ...).

Owns: evaluation of a saved checkpoint. May import: tokens, train, support.restore,
config, data, metrics, errors.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax import config as config_lib, data, tokens
from minigpt_jax.support import restore
from minigpt_jax.errors import UserError
from minigpt_jax.support.metrics import bits_per_char
from minigpt_jax.train import TrainState, jit_estimate_loss


def _splits(loaded: restore.Loaded, config, path) -> tuple[dict, dict, str]:
  """({split: ids}, {split: tokens per character}, the text's name) to evaluate on."""
  if path is None:
    corpus = tokens.load_corpus(config)
    if corpus.tokenizer != loaded.tokenizer:
      raise UserError(f"corpus {corpus.name} no longer has the vocabulary the checkpoint "
                      "was trained with; restore the corpus, or pass --path=FILE")
    return ({"train": corpus.train_ids, "val": corpus.val_ids},
            {"train": corpus.train_tokens_per_char, "val": corpus.tokens_per_char}, corpus.name)
  text = data.read_text(path)
  try:
    ids = loaded.tokenizer.encode(text)
  except UserError as e:
    raise UserError(f"{path} cannot be encoded with the checkpoint's vocabulary: {e}") from None
  block = config.model.block_size
  if len(ids) <= block:
    raise UserError(f"{path} holds {len(ids)} tokens, not more than the model's block_size "
                    f"({block}); pass a longer text")
  return {"text": ids}, {"text": len(ids) / len(text)}, str(path)


def evaluate(workdir: str | Path, step: int | None = None, best: bool = False,
             eval_iters: int | None = None, path: str | Path | None = None,
             warn=None) -> dict:
  """Loss and bits per character of a checkpoint; see the module docstring."""
  if best and step is not None:
    raise UserError("--step and --best pick different checkpoints; pass only one")
  if eval_iters is not None and eval_iters <= 0:
    raise UserError(f"--eval_iters is {eval_iters}; use a positive number of batches")
  loaded = restore.load(workdir, step, best, warn)
  config = config_lib.get_config()  # a field newer than the checkpoint keeps its default
  config.update(loaded.config)
  if "metrics" in config:
    config.metrics.wandb_project = ""  # evaluation logs nowhere: no need for wandb
  splits, tokens_per_char, name = _splits(loaded, config, path)
  eval_iters = eval_iters or config.train.eval_iters
  device = jax.devices()[0]
  # The eval batches come from the run's root key and the step alone.
  state = TrainState(step=jnp.int32(loaded.step), params=loaded.params, opt_state=None,
                     rng=jax.device_put(jax.random.PRNGKey(config.seed), device),
                     model_cfg=loaded.model_cfg, tx=None)
  losses = jit_estimate_loss(
      state, {k: jax.device_put(np.asarray(v, np.int32), device) for k, v in splits.items()},
      batch_size=config.train.batch_size, block_size=config.model.block_size,
      eval_iters=eval_iters)
  result = {"workdir": str(workdir), "step": loaded.step, "text": name,
            "eval_iters": eval_iters, "batch_size": config.train.batch_size,
            "tokens_per_char": round(tokens_per_char.get("val", tokens_per_char.get("text")), 6)}
  for split in sorted(losses):
    loss = float(losses[split])
    result[f"{split}_loss"] = loss
    result[f"{split}_bpc"] = bits_per_char(loss, tokens_per_char[split])
  return result


def summary_line(result: dict) -> str:
  """The human form of a result, for stderr."""
  splits = [k[:-len("_loss")] for k in result if k.endswith("_loss")]
  losses = ", ".join(f"{s} loss {result[s + '_loss']:.4f} ({result[s + '_bpc']:.4f} bits/char)"
                     for s in splits)
  return (f"step {result['step']} of {result['workdir']} on {result['text']} "
          f"({result['eval_iters']} batches of {result['batch_size']} per split): {losses}")
