"""What every launcher shares: quiet logs, flag parsing, one-line errors, the compile cache.

A user mistake (bad flag, bad config, missing file, bad prompt) ends the
program with exit status 2 and a single `error: ...` line on stderr, never a
traceback. Ctrl-C ends it with status 130 after the loop has saved its work.

`--compile_cache` (every launcher has it; on by default, off by default in
benchmark.py, which times compilation) turns on JAX's persistent compilation
cache, see minigpt_jax/support/compile_cache.py.

Owns: flag parsing, the `--compile_cache` flag, the default run folder
(runs/<config stem>), and the error and exit-status policy of the launchers.
May import: absl, errors, compile_cache; nothing that loads JAX at import.
"""

import logging
import os
import sys
from pathlib import Path

from absl import flags

from minigpt_jax.support import compile_cache
from minigpt_jax.errors import UserError

USER_ERROR_STATUS = 2

_COMPILE_CACHE = flags.DEFINE_bool(
    "compile_cache", True, "Keep compiled programs on disk for the next run, in "
    f"${compile_cache.DIR_ENV} or else ~/.cache/minigpt_jax/xla (false: compile afresh).")


def _quiet_libraries() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # orbax logs through absl; a failed write (a full disk) also ends as unretrieved
  # asyncio task errors, logged by its threads after checkpoint.save has raised
  # the one error line for it.
  logging.getLogger("absl").setLevel(logging.CRITICAL)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  logging.getLogger("jax").setLevel(logging.WARNING)


def _fail(message) -> None:
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(USER_ERROR_STATUS)


def _unknown_field(argv, key: str) -> str:
  """Names the `--config.a.b=v` argument whose last part is the unknown `key`."""
  for arg in argv[1:]:
    name = arg.split("=", 1)[0]
    if name.startswith("--") and name.rsplit(".", 1)[-1] == key:
      return f"{arg}: no such config field; check its spelling against the config file"
  return f"no config field named {key!r}; check the --config.* overrides"


def _unreadable_config(argv, error: OSError) -> str:
  for arg in argv[1:]:
    name, _, path = arg.partition("=")
    if name == "--config" and not Path(path.split(":", 1)[0]).is_file():
      return f"config file {path} does not exist; pass --config=configs/NAME.py"
  return f"config file could not be read: {str(error).strip().splitlines()[-1]}"


def _check_config_files() -> None:
  """ml_collections defers a bad --config file's error; surface it here, in one line."""
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if not flag.present:  # an optional config flag left out (benchmark.py --suite=gpu)
      continue
    filename = getattr(flag, "config_filename", None)
    if filename is None:
      continue
    path = filename.split(":", 1)[0]
    if not Path(path).is_file():
      raise UserError(f"config file {path} does not exist; pass --{name}=configs/NAME.py")
    try:
      flag.value.keys()
    except UserError:
      raise
    except Exception as e:  # a config file that fails to import or run
      raise UserError(f"config file {path} could not be loaded: {e}") from None


def define_checkpoint_flags(best_help: str = "Use the checkpoint with the lowest val loss."):
  """--workdir, --config, --step and --best: a run and one of its checkpoints, as the
  launchers that read a checkpoint (sample.py, evaluate.py, export_hf.py) take them."""
  return (flags.DEFINE_string("workdir", None, "Run folder written by launch/train.py "
                              "(or pass --config)."),
          flags.DEFINE_string(
              "config", None, "In place of --workdir: the config file train.py ran with, for "
              "its default run folder runs/<the file's stem>. --workdir, when given, wins."),
          flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest)."),
          flags.DEFINE_bool("best", False, best_help))


def run_folder(workdir: str | None, config: str = "config") -> Path:
  """`workdir`, else runs/<stem of the --config file> in the current folder (nanoGPT's
  out_dir), so the bare `--config=configs/NAME.py` command names, and resumes, one folder."""
  if workdir:
    return Path(workdir)
  flag = flags.FLAGS[config]
  filename = getattr(flag, "config_filename", None) or flag.value
  if not filename:
    raise UserError(f"pass --workdir=RUN_FOLDER, or --{config}=configs/NAME.py for the "
                    "folder train.py gave that config, runs/NAME")
  return Path("runs") / Path(filename.split(":", 1)[0]).stem


def run(main, argv=None, compile_cache_default: bool = True) -> None:
  """Parses absl flags, turns the compile cache on or off, calls `main()`, and
  turns user errors into one line."""
  _quiet_libraries()
  argv = sys.argv if argv is None else argv
  flags.FLAGS.set_default("compile_cache", compile_cache_default)
  if any(arg in ("-h", "--help", "--helpshort") for arg in argv[1:]):
    print((sys.modules["__main__"].__doc__ or "").strip() + "\n\nflags:\n" +
          flags.FLAGS.main_module_help() + "\n" + flags.FLAGS.module_help(__name__))
    sys.exit(0)
  try:
    flags.FLAGS(argv)
    _check_config_files()
  except OSError as e:  # --config.FIELD overrides make ml_collections load the file early
    _fail(_unreadable_config(argv, e))
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:  # a config file raised: keep its final line
      message = message.split(":", 2)[0] + ": " + message.strip().splitlines()[-1]
    _fail(message)
  except (AttributeError, KeyError) as e:  # --config.FIELD for a missing FIELD
    _fail(_unknown_field(argv, str(e).strip("\"'")))
  except UserError as e:
    _fail(e)
  if _COMPILE_CACHE.value:
    compile_cache.enable()
  else:
    compile_cache.disable()
  try:
    main()
  except UserError as e:
    _fail(e)
  except KeyboardInterrupt as e:
    print(f"interrupted: {' '.join(str(e).split()) or 'stopped by user'}", file=sys.stderr)
    sys.exit(130)
