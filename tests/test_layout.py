"""The import graph shows the design: `sharding/` is a leaf, the package's layers import downwards only, there is
no import cycle, and no project import is deferred into a function (the usual way of hiding a cycle).

Layers, bottom to top: config -> model -> io -> data -> apps -> train (`sharding` beside them, below the
model). The graph is read from the source (ast), not by importing, so it sees every module.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("llama4_jax", "sharding")
# What each part of the package may import (besides itself and `sharding`).
ALLOWED = {
    "llama4_jax.config": set(),
    "llama4_jax.model": {"llama4_jax.config"},
    "llama4_jax.data": {"llama4_jax.config"},
    "llama4_jax.io": {"llama4_jax.config", "llama4_jax.model", "llama4_jax.data"},
    "llama4_jax.apps": {"llama4_jax.config", "llama4_jax.model", "llama4_jax.io", "llama4_jax.data"},
    "llama4_jax.train": {"llama4_jax.config", "llama4_jax.model", "llama4_jax.io", "llama4_jax.data",
                         "llama4_jax.apps"},
}


def _modules() -> dict[str, str]:
  """{module name: file} of every module of the two packages."""
  out = {}
  for pkg in PACKAGES:
    for root, _, files in os.walk(os.path.join(ROOT, pkg)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(root, f), ROOT)[:-3].split(os.sep)
          out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(root, f)
  return out


MODULES = _modules()


def _targets(node: ast.Import | ast.ImportFrom, here: str) -> list[str]:
  """The project modules an import statement imports (`from pkg import mod` counts as `pkg.mod`)."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  else:
    assert not node.level, f"{here}:{node.lineno}: relative import (the project uses absolute ones)"
    base = node.module
    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
  return sorted({n for n in names if n.split(".")[0] in PACKAGES})


def _imports() -> tuple[dict[str, set[str]], list[str]]:
  """(module-level import graph, deferred imports as 'module:line -> target')."""
  graph, deferred = {m: set() for m in MODULES}, []
  for mod, path in MODULES.items():
    tree = ast.parse(open(path).read(), path)
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        for t in _targets(node, mod):
          if id(node) in top:
            graph[mod].add(t)
          else:
            deferred.append(f"{mod}:{node.lineno} -> {t}")
  return graph, deferred


GRAPH, DEFERRED = _imports()


def _part(mod: str) -> str:
  parts = mod.split(".")
  return ".".join(parts[:2]) if parts[0] == "llama4_jax" and len(parts) > 1 else parts[0]


def test_the_walk_sees_the_tree():
  assert {"llama4_jax.model.text", "llama4_jax.io.load", "sharding.dispatch", "llama4_jax.train.loop"} <= set(MODULES)
  assert "llama4_jax.model.moe" in GRAPH["llama4_jax.model.text"]  # `from llama4_jax.model import moe as moe_lib`
  assert "sharding" in GRAPH["llama4_jax.model.moe"]


def test_sharding_imports_nothing_from_the_package():
  edges = [f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts] + [d.replace(":", " ", 1) for d in DEFERRED]
  bad = sorted(e for e in edges if e.startswith("sharding") and " -> llama4_jax" in e)
  assert not bad, bad


def test_no_deferred_project_imports():
  assert not DEFERRED, DEFERRED


def test_no_import_cycle():
  """Depth-first search over the module-level graph (a submodule's implicit import of its parent package's
  `__init__` is not an edge: the package inits re-export, nothing imports them back)."""
  state: dict[str, int] = {}

  def visit(m, stack):
    state[m] = 1
    for t in sorted(GRAPH.get(m, ())):
      if state.get(t) == 1:
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
      if t not in state:
        visit(t, stack + [t])
    state[m] = 2

  for m in sorted(GRAPH):
    if m not in state:
      visit(m, [m])


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_layers_import_downwards(part):
  bad = []
  for m, ts in GRAPH.items():
    if _part(m) != part:
      continue
    for t in ts:
      tp = _part(t)
      if tp not in (part, "sharding") and tp not in ALLOWED[part]:
        bad.append(f"{m} -> {t}")
  assert not bad, bad
