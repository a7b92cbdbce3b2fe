"""The library's layers, enforced: every import in pyrobnn/, inference/ and models/ (function-level and
``TYPE_CHECKING`` imports included) points down the layer order below, and the module graph has no cycle.

:data:`LAYERS` is the one statement of the order; the README's design section draws it. A module may
import modules of its own layer or of a lower one. Inside the library a module imports the module that
defines a name, not the lazy ``pyrobnn`` facade (which re-exports from several layers) or the
``pyrobnn.inference`` facade.
"""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
#: import name -> folder of the repository (setup.cfg's package_dir)
PACKAGE_DIRS = {"pyrobnn": "pyrobnn", "pyrobnn.inference": "inference", "pyrobnn.models": "models"}

#: The layer order, lowest first: ``(layer, module patterns)``. A module belongs to the layer of its
#: most specific matching pattern (an exact name beats ``pkg.*``).
LAYERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("foundation", ("pyrobnn.registry", "pyrobnn.validation", "pyrobnn.fastpath", "pyrobnn.site_dist", "pyrobnn.lrt",
                    "pyrobnn.inputs", "pyrobnn.state_io", "pyrobnn.data")),
    ("blocks", ("pyrobnn.priors", "pyrobnn.priors.*", "pyrobnn.guides", "pyrobnn.guides.*", "pyrobnn.layers",
                "pyrobnn.likelihoods", "pyrobnn.metrics")),
    ("network", ("pyrobnn.randomize", "pyrobnn.bnn", "pyrobnn.io")),
    ("posterior", ("pyrobnn", "pyrobnn.posterior", "pyrobnn.diagnostics", "pyrobnn.arviz_compat", "pyrobnn.plots",
                   "pyrobnn.sparsity", "pyrobnn.relevance")),
    ("models", ("pyrobnn.models", "pyrobnn.models.*")),
    ("inference", ("pyrobnn.inference", "pyrobnn.inference.*", "pyrobnn.priors.deep_weight.pipeline")),
    ("cli", ("pyrobnn.cli", "pyrobnn.cli.*")),
)


# -- the graph ---------------------------------------------------------------------------------------------
def find_modules(root: Path, package_dirs: Mapping[str, str]) -> Dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file under the packages' folders."""
    modules: Dict[str, Path] = {}
    for package, folder in package_dirs.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _lazy_targets(tree: ast.Module) -> List[str]:
    """Relative module names a package's PEP 562 table ``_LAZY = {name: (".module", attr)}`` imports on
    first use: those imports are real although no ``import`` statement names them."""
    out = []
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            for value in node.value.values:
                if isinstance(value, ast.Tuple) and value.elts and isinstance(value.elts[0], ast.Constant):
                    out.append(value.elts[0].value)
    return out


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The innermost known module that ``name`` (a module, or a name inside one) lives in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    """Absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if not level:
        return target or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (level - 1)]
    if len(parts) == 0:
        raise ValueError(f"{module}: relative import beyond the top-level package")
    return ".".join(parts + ([target] if target else []))


def _with_packages(target: str, importer: str, modules: Mapping[str, Path]) -> Set[str]:
    """``target`` and the packages around it that importing it executes: ``import a.b.c`` runs
    ``a/b/__init__.py`` first, unless the importer sits inside ``a.b`` (then that package is already
    being executed)."""
    out = set()
    name = target
    while name and not (importer == name or importer.startswith(name + ".")):
        if name in modules:
            out.add(name)
        name = name.rpartition(".")[0]
    return out


def imports_of(module: str, path: Path, modules: Mapping[str, Path]) -> Set[str]:
    """The library modules ``module`` imports, wherever the import statement sits (function bodies and
    ``if TYPE_CHECKING:`` blocks included). ``from P import n`` imports ``P.n`` when that is a module and
    ``P`` otherwise; importing a module from outside its package also imports the package (its
    ``__init__`` runs first); outside modules (torch, pyro, ...) are left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None:
                found.update(_with_packages(resolved, module, modules))
    if is_package:
        for relative in _lazy_targets(tree):
            resolved = _resolve(_absolute(module, True, len(relative) - len(relative.lstrip(".")),
                                          relative.lstrip(".") or None), modules)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def import_graph(root: Path = REPO, package_dirs: Mapping[str, str] = PACKAGE_DIRS) -> Dict[str, Set[str]]:
    modules = find_modules(root, package_dirs)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


# -- the checks --------------------------------------------------------------------------------------------
def find_cycles(graph: Mapping[str, Iterable[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (or a module importing itself), each
    sorted; Tarjan's algorithm, iterative."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    cycles.append(sorted(component))
    return cycles


def layer_of(module: str, layers: Sequence[Tuple[str, Sequence[str]]] = LAYERS) -> Tuple[int, str] | None:
    """``(position, layer name)`` of the most specific pattern matching ``module``; None if none does."""
    best = None
    for position, (name, patterns) in enumerate(layers):
        for pattern in patterns:
            if fnmatch.fnmatchcase(module, pattern):
                specificity = (pattern == module, len(pattern))
                if best is None or specificity > best[0]:
                    best = (specificity, position, name)
    return None if best is None else (best[1], best[2])


def layer_violations(graph: Mapping[str, Iterable[str]],
                     layers: Sequence[Tuple[str, Sequence[str]]] = LAYERS) -> List[str]:
    """One line per module outside every layer and per import pointing up the order."""
    problems = []
    for module in sorted(graph):
        here = layer_of(module, layers)
        if here is None:
            problems.append(f"{module} is in no layer: add it to LAYERS in tests/test_import_layers.py")
            continue
        for target in sorted(graph[module]):
            there = layer_of(target, layers)
            if there is not None and there[0] > here[0]:
                problems.append(f"{module} ({here[1]}) imports {target} ({there[1]}), a higher layer")
    return problems


# -- the library -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_sees_function_level_and_type_checking_imports(graph):
    # the known edges of three kinds: module level, inside a function, and the lazy facade's table
    assert "pyrobnn.registry" in graph["pyrobnn.bnn"]
    assert "pyrobnn.bnn" in graph["pyrobnn"]  # through _LAZY
    assert len(graph) > 40


def test_the_library_has_no_import_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_every_import_points_down_the_layer_order(graph):
    problems = layer_violations(graph)
    assert not problems, "\n".join(problems)


def test_every_layer_pattern_matches_a_module(graph):
    """A stale entry (a module moved or removed) would let the table drift from the code."""
    stale = [p for _, patterns in LAYERS for p in patterns if not any(fnmatch.fnmatchcase(m, p) for m in graph)]
    assert not stale, f"LAYERS names no module for: {stale}"


def test_every_package_folder_is_installed():
    """setup.cfg lists packages one by one; a subpackage missing there is missing from a wheel."""
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    folders = {name for name, path in find_modules(REPO, PACKAGE_DIRS).items() if path.name == "__init__.py"}
    assert folders <= listed, f"packages missing from setup.cfg [options] packages: {sorted(folders - listed)}"
    mapped = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
    for name in folders:
        assert (REPO / mapped[name] / "__init__.py").is_file(), name


def test_the_readme_draws_the_layers_in_order():
    text = (REPO / "README.md").read_text()
    design = text.split("\n## Design", 1)[1].split("\n## ", 1)[0]
    diagram = design.split("```", 2)[1]
    rows = [line.split()[0] for line in diagram.splitlines() if line[:1].isalpha()]  # indented lines continue a row
    assert rows == [name for name, _ in reversed(LAYERS)], rows


# -- the checker itself fails where it must ----------------------------------------------------------------
_TOY_LAYERS = (("low", ("toy.low", "toy.util")), ("high", ("toy", "toy.high")))


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_an_upward_import_is_found():
    graph = {"toy": {"toy.high"}, "toy.high": {"toy.low"}, "toy.low": {"toy.high"}, "toy.util": set()}
    problems = layer_violations(graph, _TOY_LAYERS)
    assert problems == ["toy.low (low) imports toy.high (high), a higher layer"]
    assert layer_violations({"toy.stray": set()}, _TOY_LAYERS) == [
        "toy.stray is in no layer: add it to LAYERS in tests/test_import_layers.py"]


def _write(root: Path, files: Mapping[str, str]):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_package_on_disk_with_hidden_imports_fails(tmp_path):
    """Imports hidden in a function body and under TYPE_CHECKING, written relative and absolute, and a
    lazy ``_LAZY`` table are all seen: the injected cycle and the upward import are reported."""
    _write(tmp_path, {
        "toy/__init__.py": '_LAZY = {"High": (".high", "High")}\n',
        "toy/util.py": "import os\n",
        "toy/low.py": ("from typing import TYPE_CHECKING\nfrom . import util\n"
                       "if TYPE_CHECKING:\n    from .high import High\n"),
        "toy/high.py": "def f():\n    from toy.low import thing\n    import toy.util\n",
    })
    graph = import_graph(tmp_path, {"toy": "toy"})
    assert graph == {"toy": {"toy.high"}, "toy.util": set(), "toy.low": {"toy.util", "toy.high"},
                     "toy.high": {"toy.low", "toy.util"}}
    assert find_cycles(graph) == [["toy.high", "toy.low"]]
    assert layer_violations(graph, _TOY_LAYERS) == ["toy.low (low) imports toy.high (high), a higher layer"]
    # remove the hidden import: both checks pass
    _write(tmp_path, {"toy/low.py": "from . import util\n"})
    graph = import_graph(tmp_path, {"toy": "toy"})
    assert find_cycles(graph) == [] and layer_violations(graph, _TOY_LAYERS) == []


def test_importing_a_module_runs_its_package(tmp_path):
    """``from toy.sub.b import x`` outside ``toy.sub`` executes ``toy/sub/__init__.py`` (which imports
    ``toy.sub.a``): the cycle toy.low -> toy.sub -> toy.sub.a -> toy.low is real and found. Inside the
    package a sibling import does not count the package itself (it is already running)."""
    _write(tmp_path, {
        "toy/__init__.py": "",
        "toy/low.py": "def f():\n    from toy.sub.b import x\n",
        "toy/sub/__init__.py": "from . import a, b\n",
        "toy/sub/a.py": "from .b import x\nfrom toy import low\n",
        "toy/sub/b.py": "x = 1\n",
    })
    graph = import_graph(tmp_path, {"toy": "toy"})
    assert graph["toy.low"] == {"toy.sub", "toy.sub.b"}
    assert graph["toy.sub.a"] == {"toy.sub.b", "toy.low"}
    assert find_cycles(graph) == [["toy.low", "toy.sub", "toy.sub.a"]]


def test_most_specific_pattern_decides_the_layer():
    layers = (("low", ("p.*",)), ("high", ("p.app",)))
    assert layer_of("p.app", layers) == (1, "high")
    assert layer_of("p.core", layers) == (0, "low")
    assert layer_of("q", layers) is None
