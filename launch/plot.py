"""Plot train and val loss against step for one run or several, overlaid.

  python launch/plot.py --workdir=runs/frost_cpu --workdir=runs/bigram --out=curves.png

A sweep folder (launch/sweep.py's --workdir) stands for all of its runs.

Reads each workdir's metrics.jsonl and config.json only: no JAX, no corpus,
and it works while a run is still training. The suffix of --out picks the
format (.png, .pdf, .svg).
"""

import sys

import _preamble  # noqa: F401  first: the installed package, or one error line

from absl import flags  # noqa: E402

from minigpt_jax.tools import plotting  # noqa: E402
from minigpt_jax.support import cli  # noqa: E402

_WORKDIR = flags.DEFINE_multi_string(
    "workdir", None,
    "Run folder written by launch/train.py, or a sweep's folder (all its runs); repeat it to "
    "overlay runs.")
_OUT = flags.DEFINE_string("out", "curves.png", "Image to write.")
flags.mark_flag_as_required("workdir")


def main():
  workdirs = plotting.expand_sweeps(_WORKDIR.value)
  out = plotting.plot_runs(workdirs, _OUT.value)
  print(f"wrote {out} ({len(workdirs)} run{'s' * (len(workdirs) > 1)})", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
