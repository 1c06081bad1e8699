"""One training run per workdir: an OS lock (flock) on `<workdir>/train.lock`.

The kernel drops the lock when its process ends, however it ends (kill -9
included), so no stale lock is ever left behind. The file itself stays, and
holds the PID and host of the last holder, which names it in the error a
second run gets. Readers (sample.py, plot.py, evaluation) never take it.
Only the process that writes metrics (process 0) holds it; docs/reliability.md
says what a filesystem shared by several hosts does.
Standard library only, but `lock_run` (a run's lock, agreed by every
process): no JAX at import, so it is cheap to import and test.
Owns: `WorkdirLock`, `lock_run`. May import: errors, support.files (and
parallel, inside `lock_run`).
"""

import errno
import fcntl
import os
import socket
from pathlib import Path

from minigpt_jax.errors import UserError
from minigpt_jax.support.files import write_error

LOCK_NAME = "train.lock"


class WorkdirLock:
  """Holds the lock from `acquire()` until `release()` or the process' end."""

  def __init__(self, workdir: str | Path):
    self.path = Path(workdir) / LOCK_NAME
    self._fd = None
    self.unsupported = None  # the OSError of a filesystem without locks, if any

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises UserError naming the holder; writes nothing else."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncated before the lock
    except OSError as e:  # a read-only folder or filesystem
      raise write_error(self.path, e) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
      os.close(fd)
      raise UserError(
          f"{self.path.parent} is in use by another training run ({holder}); wait for it to "
          "end or stop it, or pass another --workdir") from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        os.close(fd)
        raise
      self.unsupported = e  # e.g. some network filesystems: run unlocked, and say so
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor drops the flock
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def lock_run(workdir: Path, is_main: bool, log) -> WorkdirLock:
  """Process 0 locks the workdir; every process stops if it cannot.

  The one function here that needs JAX (to agree across processes), so it
  imports `parallel` itself and the lock stays cheap to import.
  """
  from minigpt_jax import parallel
  lock = WorkdirLock(workdir)
  error = None
  if is_main:
    try:
      lock.acquire()
    except UserError as e:
      error = e
    if lock.unsupported is not None:
      log(f"warning: {lock.path} cannot be locked on this filesystem "
          f"({lock.unsupported.strerror}); make sure no other run trains in {workdir}")
  if parallel.any_process(error is not None):
    raise error or UserError(f"process 0 could not lock {workdir}; see its error line")
  return lock
