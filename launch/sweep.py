"""Sweep config fields: python launch/sweep.py --config=configs/frost_cpu.py --workdir=runs/lr --sweep=train.learning_rate=1e-3,3e-3 --sweep=model.dropout=0,0.1

Trains every combination of the --sweep values (last flag varying fastest),
one after another in this process, each into its own folder under --workdir
named by its values (e.g. learning_rate=0.001,dropout=0.1). --config.FIELD
overrides apply to every run. Rerunning the same command skips the finished
runs and resumes the unfinished one. At the end it prints the runs by best val
loss and writes results.json, results.md and curves.png into --workdir.
"""

import _preamble  # first: the installed package, or one error line

_preamble.start(__name__)  # before JAX loads: the process may restart

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from minigpt_jax.tools import sweep  # noqa: E402
from minigpt_jax.support import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Sweep folder: one run folder per combination, sweep.json, results.")
_SWEEP = flags.DEFINE_multi_string(
    "sweep", None, "SECTION.FIELD=v1,v2,...: values of one config field; repeat for a grid.")
flags.mark_flags_as_required(["config", "workdir", "sweep"])


def main():
  config_flag = flags.FLAGS["config"]
  overrides = config_flags.get_override_values(config_flag)
  sweeps = sweep.parse_sweeps(_SWEEP.value, _CONFIG.value, overrides)
  sweep.run_sweep(_CONFIG.value, _WORKDIR.value, sweeps,
                  config_file=config_flags.get_config_filename(config_flag), overrides=overrides)


if __name__ == "__main__":
  cli.run(main)
