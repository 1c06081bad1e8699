"""The package's shape, as docs/layout.md describes it: small modules, small classes,
attributes declared in __init__, and imports that only point down (core <- support <- tools)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minigpt_jax"
MODULES = sorted(PACKAGE.rglob("*.py"))
# A module's layer: the core at the package's root, then support/, then tools/. The
# loop drives the core and writes through support/, so it sits with support.
LAYER = {"core": 0, "support": 1, "tools": 2}
# Leaf helpers that import nothing of ours but errors: every layer may use them.
LEAVES = {"minigpt_jax.errors", "minigpt_jax.support.files"}


def _name(path: Path) -> str:
  return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _layer(module: str) -> int:
  parts = module.split(".")
  if len(parts) > 2 and parts[1] in LAYER:
    return LAYER[parts[1]]
  return LAYER["support"] if module == "minigpt_jax.loop" else LAYER["core"]


def _imports(tree: ast.Module) -> set[str]:
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minigpt_jax"):
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        found.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists()
                  else node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("minigpt_jax."))
  return found - {"minigpt_jax"}


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_modules_and_classes_are_small_and_declare_their_attributes(path):
  text = path.read_text()
  assert len(text.splitlines()) <= 400, f"{_name(path)} is over 400 lines"
  for node in ast.walk(ast.parse(text)):
    if not isinstance(node, ast.ClassDef):
      continue
    assert node.end_lineno - node.lineno + 1 <= 120, f"class {node.name} is over 120 lines"
    methods = {m.name: m for m in node.body if isinstance(m, ast.FunctionDef)}
    declared = {t.attr for t in ast.walk(methods["__init__"])
                if isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store)
                } if "__init__" in methods else set()
    for name, method in methods.items():
      for target in ast.walk(method):
        if (isinstance(target, ast.Attribute) and isinstance(target.ctx, ast.Store)
            and isinstance(target.value, ast.Name) and target.value.id == "self"):
          assert target.attr in declared, f"{node.name}.{target.attr} first set in {name}"


def test_imports_point_down_and_have_no_cycles():
  graph = {_name(p): _imports(ast.parse(p.read_text())) for p in MODULES}
  for module, imported in graph.items():
    for other in imported:
      assert other in LEAVES or _layer(other) <= _layer(module), (
          f"{module} imports {other}, a layer above it")
  done, active = set(), []

  def visit(module):
    if module in active:
      raise AssertionError("import cycle: " + " -> ".join(active[active.index(module):] + [module]))
    if module in done:
      return
    active.append(module)
    for other in graph.get(module, ()):
      visit(other)
    active.pop()
    done.add(module)

  for module in graph:
    visit(module)
