"""Train (or resume) a model: python launch/train.py --config=configs/frost_t4.py

The run folder is runs/frost_t4 (runs/<the config file's stem>, in the current
folder), or --workdir=FOLDER. Rerunning the same command resumes from that
folder's latest checkpoint. Any config field can be overridden, e.g.
--config.train.steps=200.

Several processes (hosts) train one model when each runs this command with
--coordinator_address, --num_processes and --process_id, or with --distributed
where JAX finds them itself (Slurm, TPU VMs); see docs/scale.md.
"""

import sys

import _preamble  # first: the installed package, or one error line

_preamble.start(__name__)  # before JAX loads: the process may restart

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from minigpt_jax import loop, parallel  # noqa: E402
from minigpt_jax.tools import finish  # noqa: E402
from minigpt_jax.support import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, summary.json "
                                "(default: runs/<stem of the --config file>).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process run that JAX detects (Slurm, TPU pods).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index, 0..N-1.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Split the CPU into N devices and train data-parallel over its cores.")
flags.mark_flag_as_required("config")


def main():
  if _CPU_DEVICES.value is not None:
    parallel.set_cpu_devices(_CPU_DEVICES.value)
  if _DISTRIBUTED.value or _COORDINATOR.value:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value)
  config, samples = _CONFIG.value, []
  workdir = cli.run_folder(_WORKDIR.value)

  def end_of_run(end: loop.EndOfRun):
    samples.append(finish.plot_and_sample(end, config.train.sample_tokens))

  summary = loop.train_and_evaluate(config, workdir, on_end=end_of_run)
  if not parallel.is_main_process():
    return
  print(finish.done_line(summary, workdir), file=sys.stderr)
  if samples and samples[0] is not None:
    print(samples[0])


if __name__ == "__main__":
  cli.run(main)
