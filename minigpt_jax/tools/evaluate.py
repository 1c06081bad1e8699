"""Eval-only: the loss and bits per character of a checkpoint, without training.

`evaluate(workdir, step=, best=, eval_iters=, path=, stride=)` restores a
checkpoint's config, vocabulary and params (`support.restore.load`: no
optimizer state, the same --step / --best choice and damaged-step fallback
as sampling), then scores:

- the run's own corpus (`tokens.load_corpus` of the saved config), its train
  and val splits, in the run's `eval_mode`: "full" scores every val token
  once (`evaluation.FullEvaluation`), "sampled" draws the batches training's
  evaluation drew at that step (they come from the seed and the step). Either
  way the numbers are those of the run's eval record at that step. A
  `stride` asks for "full" with that stride;
- or any text file (`path`), streamed in chunks and encoded with the
  checkpoint's tokenizer, every token scored once ("full", windows moving by
  `stride`, default block_size): `text_loss` and `text_bpc`. Text the
  tokenizer cannot encode is a UserError.

Bits per character use tokens per character: each split's, or that text's,
so the figure compares across tokenizers. The result is a flat dict whose
loss fields are named as in `metrics.jsonl`'s eval records (`train_loss`,
`val_bpc`, ...), with the mode, the stride and the tokens scored.

Owns: evaluation of a saved checkpoint. May import: config, evaluation,
prepare, tokens, train, errors, support.restore, support.metrics.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax import config as config_lib, evaluation, prepare, tokens
from minigpt_jax.errors import UserError
from minigpt_jax.support import restore
from minigpt_jax.support.metrics import bits_per_char
from minigpt_jax.train import TrainState, jit_estimate_loss


def _check_stride(stride, block_size: int | None) -> None:
  """Before loading (block_size None) a stride must be positive; after, at most block_size."""
  if stride is not None and not (stride >= 1 and (block_size is None or stride <= block_size)):
    raise UserError(f"--stride is {stride}; use a stride from 1 to the model's block_size"
                    + (f" ({block_size})" if block_size else ""))


def _score_text(state: TrainState, tokenizer, path: Path, batch_size: int, block_size: int,
                stride: int) -> dict:
  """The text's loss, every token scored once, streamed: the file is never held whole."""
  counted = {"ids": 0, "chars": 0}

  def chunks():
    for ids, chars in prepare.encode_chunks(path, tokenizer, whose="checkpoint's"):
      counted["ids"] += len(ids)
      counted["chars"] += chars
      yield ids

  total, count = evaluation.score(
      state, evaluation.stream_windows(chunks(), block_size, stride), batch_size, block_size)
  if count == 0:
    raise UserError(f"{path} holds {counted['ids']} tokens, not more than the model's "
                    f"block_size ({block_size}); pass a longer text")
  loss, per_char = total / count, counted["ids"] / counted["chars"]
  return {"eval_mode": "full", "eval_stride": stride, "text_tokens_scored": count,
          "tokens_per_char": round(per_char, 6), "text_loss": loss,
          "text_bpc": bits_per_char(loss, per_char)}


def _score_corpus(state: TrainState, loaded: restore.Loaded, config, eval_iters,
                  stride) -> dict:
  """The run's splits, in its own eval mode (or "full" with a given stride)."""
  # A run started from another's weights encoded its text in that run's
  # vocabulary, grown: the checkpoint's vocabulary encodes it the same.
  corpus = tokens.load_corpus(config, loaded.tokenizer if config.train.init_from else None)
  if corpus.tokenizer != loaded.tokenizer:
    raise UserError(f"corpus {corpus.name} no longer has the vocabulary the checkpoint "
                    "was trained with; restore the corpus, or pass --path=FILE")
  t, block = config.train, config.model.block_size
  splits = {"train": corpus.train_ids, "val": corpus.val_ids}
  per_char = {"train": corpus.train_tokens_per_char, "val": corpus.tokens_per_char}
  result = {"text": corpus.name, "tokens_per_char": round(corpus.tokens_per_char, 6)}
  if stride is not None or t.eval_mode == "full":
    full = evaluation.FullEvaluation(splits, None, t.batch_size, block,
                                     stride or t.eval_stride, t.eval_train_windows)
    losses = full.evaluate(state)
    result.update(eval_mode="full", eval_stride=full.stride,
                  train_tokens_scored=full.tokens_scored("train"),
                  val_tokens_scored=full.tokens_scored("val"))
  else:
    device = jax.devices()[0]
    eval_iters = eval_iters or t.eval_iters
    losses = jit_estimate_loss(
        state, {k: jax.device_put(np.asarray(v, np.int32), device) for k, v in splits.items()},
        batch_size=t.batch_size, block_size=block, eval_iters=eval_iters)
    result.update(eval_mode="sampled", eval_iters=eval_iters)
  for split in sorted(losses):
    loss = float(losses[split])
    result[f"{split}_loss"] = loss
    result[f"{split}_bpc"] = bits_per_char(loss, per_char[split])
  return result


def evaluate(workdir: str | Path, step: int | None = None, best: bool = False,
             eval_iters: int | None = None, path: str | Path | None = None,
             stride: int | None = None, mode: str | None = None, seed: int | None = None,
             batch_size: int | None = None, warn=None) -> dict:
  """Loss and bits per character of a checkpoint; see the module docstring.

  `mode` ("sampled" or "full") overrides the run's eval_mode, `seed` the seed
  the sampled batches are drawn from (another estimate), `batch_size` the
  windows per batch (the run's by default; any size gives the same full loss).
  """
  if best and step is not None:
    raise UserError("--step and --best pick different checkpoints; pass only one")
  if eval_iters is not None and eval_iters <= 0:
    raise UserError(f"--eval_iters is {eval_iters}; use a positive number of batches")
  _check_stride(stride, None)
  if mode is not None and mode not in config_lib.EVAL_MODES:
    raise UserError(f"--mode is {mode!r}; use one of {', '.join(config_lib.EVAL_MODES)}")
  if batch_size is not None and batch_size <= 0:
    raise UserError(f"--batch_size is {batch_size}; use a positive number of windows")
  loaded = restore.load(workdir, step, best, warn)
  config = config_lib.get_config()  # a field newer than the checkpoint keeps its default
  config.update(loaded.config)
  if "metrics" in config:
    config.metrics.wandb_project = ""  # evaluation logs nowhere: no need for wandb
  config.train.eval_mode = mode or config.train.eval_mode
  config.seed = config.seed if seed is None else seed
  config.train.batch_size = batch_size or config.train.batch_size
  block = config.model.block_size
  _check_stride(stride, block)
  # The sampled batches come from the run's root key and the step alone.
  state = TrainState(step=jnp.int32(loaded.step), params=loaded.params, opt_state=None,
                     rng=jax.device_put(jax.random.PRNGKey(config.seed), jax.devices()[0]),
                     model_cfg=loaded.model_cfg, tx=None)
  result = {"workdir": str(workdir), "step": loaded.step,
            "batch_size": config.train.batch_size}
  if path is not None:
    result["text"] = str(path)
    result.update(_score_text(state, loaded.tokenizer, Path(path), config.train.batch_size,
                              block, stride or block))
  else:
    result.update(_score_corpus(state, loaded, config, eval_iters, stride))
  return result


def summary_line(result: dict) -> str:
  """The human form of a result, for stderr."""
  splits = [k[:-len("_loss")] for k in result if k.endswith("_loss")]
  losses = ", ".join(f"{s} loss {result[s + '_loss']:.4f} ({result[s + '_bpc']:.4f} bits/char)"
                     for s in splits)
  if result["eval_mode"] == "full":
    how = (f"every token once, windows moving by {result['eval_stride']}"
           + ("; train on fixed windows" if "train_loss" in result else ""))
  else:
    how = f"{result['eval_iters']} batches of {result['batch_size']} per split"
  return f"step {result['step']} of {result['workdir']} on {result['text']} ({how}): {losses}"
