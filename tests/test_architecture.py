"""The folder tree is the architecture: dependencies point one way (README, "Layout").

Read from the source (``ast``), so it costs nothing and needs no imports:

* every module imports only from its own sub-package or from a lower layer;
* the package's own imports form no cycle, module by module;
* nothing inside the package imports the public facade ``edgeinfinite_jax/__init__``;
* imports inside functions are only of heavy optional packages, each with a comment.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "edgeinfinite_jax")
PKG = "edgeinfinite_jax"

# Lower layers first; a module may import its own sub-package and any earlier layer.
# ``model.config`` sits below the rest of ``model`` (everything imports it); ``configs``
# may import config dataclasses only.
LAYERS = (
    ("quant",),
    ("model.config",),
    ("configs", "model"),
    ("checkpoints",),
    ("data",),
    ("engine", "train"),
    ("eval", "deploy"),
    ("jobs",),
    ("cli", "bench"),
)
ONLY = {"configs": ("configs", "model.config")}
# Imported inside functions on purpose: optional or slow to import, each needed by one path.
# (onnx_ir: jax2onnx's graph IR, installed with it.)
LAZY_OK = ("torch", "transformers", "datasets", "onnx", "onnxruntime", "ai_edge_litert",
           "litert_converter", "jax2onnx", "onnx_ir")


def _modules():
  for dirpath, _, files in os.walk(ROOT):
    for f in sorted(files):
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        yield (rel[:-len(".__init__")] if rel.endswith(".__init__") else rel), path


MODULES = dict(_modules())


def _group(module: str) -> str:
  """'edgeinfinite_jax.model.config' -> 'model.config'; '.model.rope' -> 'model'."""
  rest = module[len(PKG) + 1:]
  return "model.config" if rest == "model.config" else rest.split(".")[0]


def _rank(group: str) -> int:
  for i, layer in enumerate(LAYERS):
    if group in layer:
      return i
  raise AssertionError(f"sub-package {group!r} is in no layer of LAYERS")


def _imports(path):
  """[(imported module, line, inside a function, source line)] of one file."""
  tree = ast.parse(open(path).read())
  lines = open(path).read().splitlines()
  out = []

  def visit(node, in_fn):
    for child in ast.iter_child_nodes(node):
      fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        out.extend((a.name, child.lineno, in_fn) for a in child.names)
      elif isinstance(child, ast.ImportFrom) and child.level == 0:
        for a in child.names:
          full = f"{child.module}.{a.name}"
          out.append((full if full in MODULES else child.module, child.lineno, in_fn))
      visit(child, fn)

  visit(tree, False)
  return [(m, n, f, lines[n - 1] + " " + lines[n - 2]) for m, n, f in out]


def _internal(name):
  while name not in MODULES and "." in name:
    name = name.rpartition(".")[0]
  return name if name in MODULES else None


def test_every_subpackage_has_a_layer():
  for module in MODULES:
    if module != PKG:
      _rank(_group(module))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != PKG))
def test_imports_point_down(module):
  me = _group(module)
  bad = []
  for name, line, _, _ in _imports(MODULES[module]):
    target = _internal(name) if name.startswith(PKG) else None
    if target is None:
      continue
    if target == PKG:
      bad.append(f"line {line}: imports the public facade {PKG}/__init__")
      continue
    other = _group(target)
    allowed = ONLY.get(me)
    if allowed is not None and other not in allowed:
      bad.append(f"line {line}: {me} may import only {allowed}, not {target}")
    elif other != me and not (me == "model" and other == "model.config") \
        and _rank(other) >= _rank(me):
      bad.append(f"line {line}: {me} (layer {_rank(me)}) imports {target} "
                 f"(layer {_rank(other)})")
  assert not bad, f"{module}:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_imports_inside_functions_but_optional_heavy_ones(module):
  bad = [f"line {line}: {name}" for name, line, in_fn, src in _imports(MODULES[module])
         if in_fn and not (name.split(".")[0] in LAZY_OK and "#" in src)]
  assert not bad, (f"{module}: imports inside functions (allowed only for {LAZY_OK}, "
                   "with a comment saying why):\n" + "\n".join(bad))


def test_no_import_cycles():
  graph = {m: {t for n, _, f, _ in _imports(p) if not f and n.startswith(PKG)
               for t in [_internal(n)] if t and t != m}
           for m, p in MODULES.items()}
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in sorted(graph[m]):
      if state.get(t) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
      if t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
