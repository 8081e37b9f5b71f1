"""The house: kdjax's packages are layers, and imports run one way, down.

The import graph is read from the source with `ast` (function-level imports included, since an import inside a
function is how a circle hides), so nothing is imported to draw it. LAYERS is the declared order, bottom first: a
module may import its own package and the layers below it, never one above; the root modules (the command lines
and the public API) may import anything.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "kdjax"

# Bottom to top. serving is below distill and evaluation, so it can import neither.
LAYERS = ("infra", "gsm8k", "models", "serving", "teacher", "distill", "evaluation", "plan", "experiment")
ROOT_MODULES = {"kdjax", "kdjax.main", "kdjax.convert"}


def _modules(package: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
  modules = {}
  for path in sorted(package.rglob("*.py")):
    parts = path.relative_to(package.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    modules[name] = path
  return modules


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
  """kdjax modules that `name` imports anywhere in its file (module level or inside functions)."""
  found = set()
  is_package = path.name == "__init__.py"
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "kdjax"}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = name.split(".")[:len(name.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
      if base.split(".")[0] != "kdjax":
        continue
      for alias in node.names:  # `from kdjax.x import y`: y is a module of kdjax.x or a name inside it
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
  return {m for m in found if m != name}


def _layer(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
  modules = _modules(package)
  return {name: _imports(name, path, modules) for name, path in modules.items()}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
  return import_graph()


def test_every_module_lives_in_a_declared_layer_or_is_a_root_module(graph):
  strays = sorted(m for m in graph if m not in ROOT_MODULES and _layer(m) not in LAYERS)
  assert not strays, f"modules outside the declared layers {LAYERS}: {strays}"
  assert len([m for m in graph if m in ROOT_MODULES]) <= 4


def test_imports_run_down_the_layers(graph):
  upward = []
  for module, imported in graph.items():
    if module in ROOT_MODULES:
      continue
    for target in imported:
      if target in ROOT_MODULES or LAYERS.index(_layer(target)) > LAYERS.index(_layer(module)):
        upward.append(f"{module} -> {target}")
  assert not upward, "imports against the layers " + ", ".join(LAYERS) + ": " + "; ".join(sorted(upward))


def test_no_import_circle(graph):
  """Depth-first search over every module's imports, function-level ones included."""
  state, stack, circles = {}, [], []

  def visit(module):
    state[module] = "open"
    stack.append(module)
    for target in sorted(graph.get(module, ())):
      if target not in graph:
        continue
      if state.get(target) == "open":
        circles.append(stack[stack.index(target):] + [target])
      elif target not in state:
        visit(target)
    stack.pop()
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module)
  assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_serving_imports_neither_distill_nor_evaluation(graph):
  crossing = sorted(f"{m} -> {t}" for m, ts in graph.items() if _layer(m) == "serving"
                    for t in ts if _layer(t) in ("distill", "evaluation"))
  assert not crossing, crossing


def test_only_the_experiment_reads_the_config_dict():
  """Library modules take typed settings: ml_collections is imported by kdjax.experiment and the command line alone."""
  readers = []
  for path in PACKAGE.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if any(n.split(".")[0] == "ml_collections" for n in names):
        readers.append(str(path.relative_to(PACKAGE.parent)))
  assert sorted(set(readers)) == sorted({r for r in readers if "/experiment/" in r or r.endswith("main.py")}), readers


def test_the_check_finds_a_circle_and_an_upward_import(tmp_path):
  """The graph builder itself: function-level imports count, relative imports resolve."""
  (tmp_path / "kdjax" / "infra").mkdir(parents=True)
  (tmp_path / "kdjax" / "models").mkdir()
  for folder in ("kdjax", "kdjax/infra", "kdjax/models"):
    (tmp_path / folder / "__init__.py").write_text("")
  (tmp_path / "kdjax" / "infra" / "a.py").write_text("def f():\n  from kdjax.models import b\n")
  (tmp_path / "kdjax" / "models" / "b.py").write_text("from ..infra import a\n")
  graph = import_graph(tmp_path / "kdjax")
  assert graph["kdjax.infra.a"] == {"kdjax.models.b"} and graph["kdjax.models.b"] == {"kdjax.infra.a"}
  with pytest.raises(AssertionError, match="kdjax.infra.a -> kdjax.models.b"):
    test_imports_run_down_the_layers(graph)
  with pytest.raises(AssertionError, match="import circles"):
    test_no_import_circle(graph)
