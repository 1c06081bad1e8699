"""Train (or resume) a model: python launch/train.py --config=configs/frost_t4.py --workdir=runs/frost_t4

Rerunning the same command on the same workdir resumes from its latest
checkpoint. Any config field can be overridden, e.g. --config.train.steps=200.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from minigpt_jax import cli, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, summary.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(f"done: step {summary['step']}, train loss {summary['train_loss']:.4f}, "
        f"val loss {summary['val_loss']:.4f} (best {summary['best_val_loss']:.4f} at step "
        f"{summary['best_step']}), {summary['steps_per_s']} steps/s, "
        f"{summary['wall_s']} s; summary in {_WORKDIR.value}/summary.json", file=sys.stderr)
  if "sample" in summary:
    print(summary["sample"])


if __name__ == "__main__":
  cli.run(main)
