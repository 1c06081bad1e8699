"""Plot train and val loss against step for one run or several, overlaid.

  python launch/plot.py --workdir=runs/frost_cpu --workdir=runs/bigram --out=curves.png

Reads each workdir's metrics.jsonl and config.json only: no JAX, no corpus,
and it works while a run is still training. The suffix of --out picks the
format (.png, .pdf, .svg).
"""

import sys

import _preamble  # noqa: F401  first: the repo on sys.path

from absl import flags  # noqa: E402

from minigpt_jax import cli, plotting  # noqa: E402

_WORKDIR = flags.DEFINE_multi_string(
    "workdir", None, "Run folder written by launch/train.py; repeat it to overlay runs.")
_OUT = flags.DEFINE_string("out", "curves.png", "Image to write.")
flags.mark_flag_as_required("workdir")


def main():
  out = plotting.plot_runs(_WORKDIR.value, _OUT.value)
  print(f"wrote {out} ({len(_WORKDIR.value)} run{'s' * (len(_WORKDIR.value) > 1)})",
        file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
