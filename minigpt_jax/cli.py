"""What every launcher shares: quiet logs, flag parsing, one-line errors.

A user mistake (bad flag, bad config, missing file, bad prompt) ends the
program with exit status 2 and a single `error: ...` line on stderr, never a
traceback. Ctrl-C ends it with status 130 after the loop has saved its work.
"""

import logging
import os
import sys

from absl import flags

from minigpt_jax.errors import UserError


def _quiet_libraries() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax").setLevel(logging.WARNING)


def _one_line(message: str) -> str:
  return " ".join(str(message).split())


def run(main, argv=None) -> None:
  """Parses absl flags, calls `main()`, and turns user errors into one line."""
  _quiet_libraries()
  argv = sys.argv if argv is None else argv
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {_one_line(e)}")
  except UserError as e:  # a config file's get_config() may raise it
    sys.exit(f"error: {_one_line(e)}")
  try:
    main()
  except UserError as e:
    sys.exit(f"error: {_one_line(e)}")
  except KeyboardInterrupt as e:
    print(f"interrupted: {_one_line(e) or 'stopped by user'}", file=sys.stderr)
    sys.exit(130)
