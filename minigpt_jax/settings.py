"""A config field declared once, as a dataclass field: default, one-line meaning, check.

`model.ModelConfig` declares `config.model` this way and
`optimizer.OptimizerConfig` the optimizer's part of `config.train`, as
nanoGPT's GPTConfig does. `config.get_config` takes its defaults from them,
`config.validate` runs their checks and `config.check_fits` reads their
marks, so adding a field means adding one line.

Owns: `setting`, the one-field checks, reading a config section into a
declaration. May import: the standard library only.
"""

import dataclasses
from typing import Any, Callable

Check = Callable[[Any], "str | None"]
_SAME = object()


def setting(default, meaning: str, *, check: Check | None = None, fits: bool = False,
            layout: Callable | None = None, config: Any = _SAME,
            read: Callable | None = None):
  """A dataclass field that is also a config field.

  `check(value)` gives the fix for a bad value, or None. `fits`: the field fixes
  parameter shapes or the computation, so a checkpoint resumes only with its
  value. `layout(train)`: what the field fixes in the optimizer state's arrays.
  `config`: the config's default where it differs from the dataclass's, and
  `read` turns a config value into the dataclass's (cpu_tricks' "auto" to a bool).
  """
  return dataclasses.field(default=default, metadata={
      "meaning": meaning, "check": check, "fits": fits, "layout": layout,
      "config": default if config is _SAME else config, "read": read})


def declared(cls, mark: str | None = None) -> tuple[dataclasses.Field, ...]:
  """The `setting` fields of a declaration, in order; with `mark`, those it marks."""
  return tuple(f for f in dataclasses.fields(cls)
               if "meaning" in f.metadata and (mark is None or f.metadata[mark]))


def defaults(cls) -> dict:
  """The config's defaults: what get_config holds and a saved config lacking a field reads."""
  return {f.name: f.metadata["config"] for f in declared(cls)}


def read(cls, section) -> dict:
  """The declaration's fields from a config section (ConfigDict or saved JSON dict).

  A field the section lacks (a saved config of an older version) has its default.
  """
  values = {}
  for f in declared(cls):
    value = section.get(f.name, f.metadata["config"])
    values[f.name] = f.metadata["read"](value) if f.metadata["read"] else value
  return values


def rule(ok: Callable[[Any], bool], fix: str) -> Check:
  """A check: `fix` (what to set instead) unless ok(value)."""
  return lambda value: None if ok(value) else fix


def one_of(*choices: str) -> Check:
  return rule(lambda value: value in choices, f"use one of {', '.join(choices)}")


positive_int = rule(lambda v: isinstance(v, int) and v > 0, "set it to a positive integer")
boolean = rule(lambda v: isinstance(v, bool), "use True or False")
