"""minigpt_jax/support/hugepages.py: when the launchers restart with glibc's huge-page tunable."""

import pytest

from minigpt_jax.support import hugepages


def test_the_tunable_is_added_to_whatever_is_set():
  assert hugepages.tunables_with_huge_pages("") == "glibc.malloc.hugetlb=1"
  assert (hugepages.tunables_with_huge_pages("glibc.malloc.arena_max=2")
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


@pytest.mark.parametrize("tunables", ["glibc.malloc.hugetlb=1", "glibc.malloc.hugetlb=0",
                                      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"])
def test_a_tunable_already_set_is_left_alone_so_the_restart_happens_once(tunables):
  assert hugepages.tunables_with_huge_pages(tunables) is None


def test_enabled_reads_the_tunable_of_this_process(monkeypatch):
  monkeypatch.setattr(hugepages, "available", lambda: True)
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  assert hugepages.enabled()
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
  assert not hugepages.enabled()
  monkeypatch.delenv("GLIBC_TUNABLES")
  assert not hugepages.enabled()
  monkeypatch.setattr(hugepages, "available", lambda: False)
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  assert not hugepages.enabled()  # set, but this glibc or kernel cannot


def test_restart_is_a_no_op_where_the_tunable_is_set(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
  monkeypatch.setattr(hugepages, "available", lambda: True)  # so only the setting stops it
  monkeypatch.setattr(hugepages.os, "execve", lambda *a: pytest.fail("restarted"))
  hugepages.restart_with_huge_pages()


def test_restart_re_executes_the_same_command_with_the_tunable(monkeypatch):
  calls = []
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.setattr(hugepages, "available", lambda: True)
  monkeypatch.setattr(hugepages.sys, "orig_argv", ["python", "launch/train.py", "--workdir=w"])
  monkeypatch.setattr(hugepages.os, "execve", lambda *args: calls.append(args))
  hugepages.restart_with_huge_pages()
  (executable, argv, env), = calls
  assert argv == [executable, "launch/train.py", "--workdir=w"]
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
