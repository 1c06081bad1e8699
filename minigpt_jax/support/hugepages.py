"""Transparent huge pages for XLA's CPU buffers: the launchers restart themselves once.

XLA:CPU allocates a compiled call's buffers on every call, and glibc's
malloc returns large blocks to the kernel when they are freed, so each call
faults its memory in again, 4 KiB at a time. With glibc's
`glibc.malloc.hugetlb=1` tunable, malloc asks for transparent huge pages
(2 MiB) instead, and training on CPU is faster (docs/speed.md). glibc reads
tunables only when a process starts, hence the restart. It does not change
any result: only where memory comes from.

No JAX import here: the launchers call this before importing anything heavy.

Owns: the launchers' restart with glibc's huge-page tunable. Figures:
docs/speed.md. May import: the standard library only.
"""

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_has_tunable() -> bool:
  """Linux with glibc 2.35 or later, the first with glibc.malloc.hugetlb."""
  if not sys.platform.startswith("linux"):
    return False
  libc, version = platform.libc_ver()
  try:
    return libc == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
  except ValueError:
    return False


def _kernel_allows_huge_pages() -> bool:
  try:
    return "[never]" not in _THP_MODE.read_text()
  except OSError:
    return False


def available() -> bool:
  """Whether glibc and the kernel here can give malloc transparent huge pages."""
  return _glibc_has_tunable() and _kernel_allows_huge_pages()


def _settings(tunables: str) -> dict:
  """GLIBC_TUNABLES ("name=value:name=value") as a dict."""
  return dict(item.partition("=")[::2] for item in tunables.split(":") if item)


def enabled() -> bool:
  """Whether this process runs with huge pages on (the tunable set, not to 0)."""
  value = _settings(os.environ.get("GLIBC_TUNABLES", "")).get(TUNABLE, "0")
  return available() and value != "0"


def tunables_with_huge_pages(tunables: str) -> str | None:
  """GLIBC_TUNABLES with `glibc.malloc.hugetlb=1` added, or None to leave it as it is.

  None where the tunable is set already, either way: GLIBC_TUNABLES=
  glibc.malloc.hugetlb=0 opts out.
  """
  if TUNABLE in _settings(tunables):
    return None
  return ":".join(filter(None, (tunables, f"{TUNABLE}=1")))


def restart_with_huge_pages() -> None:
  """Re-executes this Python command with huge pages on; returns where it need not.

  Call it first in a launcher's `__main__`, never from a library or a test:
  the process is replaced. A no-op off Linux, on glibc before 2.35, where
  the kernel has transparent huge pages off, or when GLIBC_TUNABLES names
  the tunable already (so the restarted process goes on).
  """
  tunables = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES", ""))
  if tunables is None or not available():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
            dict(os.environ, GLIBC_TUNABLES=tunables))
