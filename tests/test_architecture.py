"""The library's shape: sub-packages in layers (each imports only from the layers below it), no
import cycles (also through imports inside functions), no project imports inside functions but
the bootstrap's, no module branching on an objective's name outside the one that builds
objectives, modules of a readable size."""

import ast
import os

from bdiff_jax import objectives
from bdiff_jax.config import configuration
from tests import helpers

PACKAGE = os.path.join(helpers.REPO, "bdiff_jax")
# The only modules allowed to compare against objective names: the registry and the config's
# list of allowed values.
_NAME_OWNERS = {"bdiff_jax/objectives/__init__.py", "bdiff_jax/config/configuration.py"}
_OBJECTIVE_NAMES = {"diffusion", "autoregressive"}
_MAX_LINES = 450
# The sub-packages of bdiff_jax (and its one top-level module, errors), lowest first: a module
# imports only from its own package and from packages of lower layers.
_LAYERS = (
    ("errors",),                          # user-facing errors, imported by everything
    ("runtime", "models", "optim"),       # process, devices, workdir; networks; update rules
    ("data", "diffusion"),                # WikiText-2 and tokenizers; masked diffusion
    ("objectives", "config", "evaluation"),
    ("train",),
    ("glue",),                            # the GLUE benchmark (fine-tunes with train's pieces)
    ("modes",),                           # what main.py --mode runs
    ("benchmarks",),                      # measurements that run modes
)
# The one function allowed to import project modules in its body: it orders the process's setup
# before JAX starts (bdiff_jax/runtime/bootstrap.py).
_LATE_IMPORT_OWNERS = {("bdiff_jax/runtime/bootstrap.py", "bootstrap")}


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


def _package(name: str) -> str:
  """bdiff_jax.runtime.workdir -> runtime; bdiff_jax.errors -> errors."""
  return name.split(".")[1]


def test_packages_import_only_lower_layers():
  layer = {p: i for i, names in enumerate(_LAYERS) for p in names}
  trees = {name: ast.parse(open(path, encoding="utf-8").read()) for name, _, path in _modules()}
  unknown = sorted({_package(n) for n in trees if "." in n} - set(layer))
  assert not unknown, f"sub-packages missing from _LAYERS: {unknown}"
  upward = []
  for n, tree in trees.items():
    if "." not in n:
      continue
    for m in _imports(n, tree):
      if m in trees and "." in m and _package(m) != _package(n):
        if layer[_package(m)] >= layer[_package(n)]:
          upward.append(f"{n} imports {m}")
  assert not upward, f"imports of the same or a higher layer (see _LAYERS): {sorted(upward)}"


def _function_level_project_imports(rel, tree):
  """`file:line (in function)` of each project import inside a function."""
  out = []

  def visit(node, function):
    for child in ast.iter_child_nodes(node):
      inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
      if isinstance(child, ast.Lambda):
        inner = inner or "<lambda>"
      if function and (rel, function) not in _LATE_IMPORT_OWNERS:
        if isinstance(child, ast.Import):
          names = [a.name for a in child.names]
        elif isinstance(child, ast.ImportFrom):
          names = ["bdiff_jax"] if child.level else [child.module or ""]
        else:
          names = []
        if any(n == "bdiff_jax" or n.startswith("bdiff_jax.") for n in names):
          out.append(f"{rel}:{child.lineno} (in {function})")
      visit(child, inner)

  visit(tree, None)
  return out


def test_project_imports_only_at_module_top():
  """Imports inside functions hide a module's dependencies; they once ordered the process's setup
  before JAX starts, which is now `bootstrap()`'s alone: everything else imports at the top of
  its module (main.py reaches the modes through importlib, by name)."""
  paths = [(rel, path) for _, rel, path in _modules()]
  configs = os.path.join(helpers.REPO, "configs")
  for rel in ["main.py"] + sorted(os.path.join("configs", f) for f in os.listdir(configs)
                                  if f.endswith(".py")):
    paths.append((rel, os.path.join(helpers.REPO, rel)))
  late = []
  for rel, path in paths:
    late += _function_level_project_imports(rel, ast.parse(open(path, encoding="utf-8").read()))
  assert not late, f"project imports inside functions (outside bootstrap()): {late}"


def test_the_late_import_check_sees_them():
  tree = ast.parse("import os\n\ndef f():\n  from bdiff_jax.runtime import workdir\n"
                   "  return lambda: 1\n\nclass C:\n  def g(self):\n"
                   "    import bdiff_jax.errors\n")
  assert _function_level_project_imports("x.py", tree) == ["x.py:4 (in f)", "x.py:9 (in g)"]
  assert not _function_level_project_imports("bdiff_jax/runtime/bootstrap.py", ast.parse(
      "def bootstrap():\n  from bdiff_jax.runtime import distributed\n"))


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
  assert not offenders, f"objective names compared outside objectives/__init__.py: {offenders}"


def test_modules_are_short():
  long = []
  for _, rel, path in _modules():
    text = open(path, encoding="utf-8").read()
    if text.count("\n") > _MAX_LINES:
      long.append(f"{rel} ({text.count(chr(10))} lines)")
  assert not long, f"modules over {_MAX_LINES} lines (split them by idea): {long}"


def test_config_objectives_match_registry():
  assert tuple(configuration.OBJECTIVES) == tuple(objectives.NAMES)


# The sub-packages below the one config -> objects step (train/builder.py, and the modes that
# read their own sections): they take plain values, never a ConfigDict.
_PLAIN_VALUE_PACKAGES = ("glue", "diffusion", "optim", "models")


def _config_dict_uses(rel, tree):
  """`file:line` of each import of ml_collections and each call of a ConfigDict in `tree`."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      bad = any(a.name.split(".")[0] == "ml_collections" for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      bad = (node.module or "").split(".")[0] == "ml_collections"
    elif isinstance(node, ast.Call):
      f = node.func
      bad = (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")) in (
          "ConfigDict", "FrozenConfigDict")
    else:
      bad = False
    if bad:
      out.append(f"{rel}:{node.lineno}")
  return out


def test_packages_below_the_builder_take_plain_values():
  """glue/, diffusion/, optim/ and models/ never import ml_collections nor make a ConfigDict: the
  config becomes their plain values once, above them (train/builder.py, modes/glue.py)."""
  found = []
  for name, rel, path in _modules():
    if "." in name and _package(name) in _PLAIN_VALUE_PACKAGES:
      found += _config_dict_uses(rel, ast.parse(open(path, encoding="utf-8").read()))
  assert not found, f"ml_collections / ConfigDict below the builder: {found}"


def test_the_plain_value_check_sees_them():
  tree = ast.parse("import ml_collections\nfrom ml_collections import config_dict\n"
                   "import os\nx = ml_collections.ConfigDict({})\ny = ConfigDict()\n"
                   "z = dict(a=1)\n")
  assert _config_dict_uses("x.py", tree) == ["x.py:1", "x.py:2", "x.py:4", "x.py:5"]
