"""What a training launcher does when a run ends: the loss plot, the sample, the done line.

launch/train.py and tools/sweep.py pass `plot_and_sample` to
`loop.train_and_evaluate` as its `on_end` hook (process 0 only), and print
`done_line` last.

Owns: `done_line`, `plot_and_sample`, `sample_text`. May import: loop,
sampling, train, support.files, tools.plotting.
"""

import dataclasses

import jax
import numpy as np

from minigpt_jax import loop, sampling
from minigpt_jax.support import files
from minigpt_jax.tools import plotting
from minigpt_jax.train import TrainState, sample_key


def done_line(summary: dict, workdir) -> str:
  """The launcher's last log line; losses an interrupt left unmeasured read `n/a`."""
  loss = lambda x: "n/a" if x is None else f"{x:.4f}"
  best = ("" if summary["best_step"] is None else
          f" (best {loss(summary['best_val_loss'])} at step {summary['best_step']})")
  rate = "" if summary["steps_per_s"] is None else f", {summary['steps_per_s']} steps/s"
  early = " (stopped early)" if summary.get("early_stopped") else ""
  return (f"done{early}: step {summary['step']}, train loss {loss(summary['train_loss'])}, "
          f"val loss {loss(summary['val_loss'])}{best}{rate}, {summary['wall_s']} s; "
          f"summary in {workdir}/summary.json")


def plot_and_sample(end: loop.EndOfRun, sample_tokens: int) -> str | None:
  """A finished run's chores: loss.png, and a sample of `sample_tokens` (0: none) for TensorBoard.

  Returns the sample, for a launcher to print.
  """
  try:
    plotting.save_loss_plot(end.workdir)
  except OSError as e:
    raise files.write_error(end.workdir / "loss.png", e) from None
  if not sample_tokens:
    return None
  text = sample_text(end.state, end.tokenizer, sample_tokens, end.summary.get("decode_dtype"))
  end.writer.write_text("sample", end.summary["step"], text)
  return text


def sample_text(state: TrainState, tokenizer, num_tokens: int, dtype: str | None = None) -> str:
  """The end-of-training sample, on this process' first device alone, from its own stream,
  in `dtype` (the run's decoding dtype; None: its training dtype)."""
  params = jax.device_get(state.params)  # replicated: every process has them whole
  generate = sampling.make_generate(dataclasses.replace(state.model_cfg,
                                                        dtype=dtype or state.model_cfg.dtype))
  prompt_ids, _ = sampling.encode_prompt(tokenizer, "")
  out = generate(params, prompt_ids, sample_key(state), num_tokens)
  return tokenizer.decode(np.asarray(out[0]))
