"""The library's shape: no import cycles (also through imports inside functions), no module
branching on an objective's name outside the one that builds objectives, modules of a readable
size."""

import ast
import os

from tests import helpers

PACKAGE = os.path.join(helpers.REPO, "bdiff_jax")
# The only modules allowed to compare against objective names: the registry and the config's
# list of allowed values.
_NAME_OWNERS = {"bdiff_jax/objectives/__init__.py", "bdiff_jax/config/configuration.py"}
_OBJECTIVE_NAMES = {"diffusion", "autoregressive"}
_MAX_LINES = 400
_LONG_MARK = "Longer than 400 lines because"


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, helpers.REPO)
        name = rel[:-3].replace(os.sep, ".")
        if name.endswith(".__init__"):
          name = name[:-len(".__init__")]
        yield name, rel, path


def _imports(name, tree):
  """bdiff_jax modules imported anywhere in the module (top level or inside functions)."""
  out = set()
  package = name if name.count(".") == 0 else name.rsplit(".", 1)[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("bdiff_jax")}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([base] if base else []))
      if base.startswith("bdiff_jax"):
        out.add(base)
        out |= {f"{base}.{a.name}" for a in node.names}
  return out


def test_no_import_cycles():
  trees = {name: ast.parse(open(path, encoding="utf-8").read()) for name, _, path in _modules()}
  graph = {n: {m for m in _imports(n, t) if m in trees and m != n} for n, t in trees.items()}
  # A package's __init__ importing its own submodules is not a cycle of concepts.
  for n in graph:
    graph[n] = {m for m in graph[n] if not (m.startswith(n + ".") or n.startswith(m + "."))}
  state, stack = {}, []

  def visit(n):
    state[n] = "open"
    stack.append(n)
    for m in sorted(graph[n]):
      if state.get(m) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
      if m not in state:
        visit(m)
    stack.pop()
    state[n] = "done"

  for n in sorted(graph):
    if n not in state:
      visit(n)


def test_no_branching_on_objective_names():
  offenders = []
  for _, rel, path in _modules():
    if rel in _NAME_OWNERS:
      continue
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, ast.Compare):
        consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
        if any(c.value in _OBJECTIVE_NAMES for c in consts):
          offenders.append(f"{rel}:{node.lineno}")
  assert not offenders, f"compare against objective names outside objectives/__init__.py: {offenders}"


def test_modules_are_short_or_say_why():
  long = []
  for _, rel, path in _modules():
    text = open(path, encoding="utf-8").read()
    if text.count("\n") > _MAX_LINES and _LONG_MARK not in text[:3000]:
      long.append(f"{rel} ({text.count(chr(10))} lines)")
  assert not long, f"modules over {_MAX_LINES} lines without a reason at the top: {long}"


def test_config_objectives_match_registry():
  from bdiff_jax import objectives as objective  # pylint: disable=g-import-not-at-top
  from bdiff_jax.config import configuration  # pylint: disable=g-import-not-at-top
  assert tuple(configuration.OBJECTIVES) == tuple(objective.NAMES)
