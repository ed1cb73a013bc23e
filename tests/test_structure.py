"""The package's structure, read from its source with `ast`: no import circle (function-local
imports included), no private name imported across modules, dependencies pointing one way."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "shapeflow"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported shapeflow module, imported name or None, line) for every import in `module`,
    at any depth (function-local imports too). `from pkg import sub` counts as importing pkg.sub."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("shapeflow")]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            if not target.startswith("shapeflow"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _, _ in _imports(module):
            # importing a.b.c runs a and a.b first
            parts = target.split(".")
            for k in range(1, len(parts) + 1):
                name = ".".join(parts[:k])
                if name in MODULES and name != module:
                    graph[module].add(name)
    return graph


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def test_no_import_circle():
    """A circle between modules (not counting a package importing its own submodules, and a
    submodule importing its package's siblings through the package) fails, with the circle shown."""
    graph = _graph()
    # a package's __init__ re-exports its submodules; the edge submodule -> own package is how
    # Python runs them, not a design dependency
    edges = {m: {t for t in targets if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
             for m, targets in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_no_private_name_imported_across_modules():
    """`from shapeflow.x import _name` (or `module._name` on an imported shapeflow module) outside
    the module that defines it fails. Private modules (`_fused`, `_amg`) may be imported by name
    inside their own package."""
    problems = []
    for module, path in MODULES.items():
        imported_modules = {}
        for target, name, line in _imports(module):
            if name is not None and name.startswith("_") and name != "__version__":
                problems.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name} from {target}")
            if name is None:
                short = target.rsplit(".", 1)[-1]
                # shapeflow.pkg._x belongs to pkg; the top-level shapeflow._x are shared helpers
                private_module = short.startswith("_") and target.count(".") > 1
                if private_module and not module.startswith(_package_of(target) + "."):
                    problems.append(f"{path.relative_to(ROOT.parent)}:{line} imports the private module {target}")
                imported_modules[short] = target
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                problems.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not problems, "\n".join(problems)


#: layers, lowest first: a module may import its own layer and those below, never one above
LAYERS = [
    {"shapeflow.errors", "shapeflow._files", "shapeflow._optional", "shapeflow._registry", "shapeflow.progress",
     "shapeflow._options", "shapeflow._numba", "shapeflow._threads"},
    {"shapeflow.shapes"},
    {"shapeflow.grids"},
    # sampling asks kernels.neighbors for neighbour distances (isolated points)
    {"shapeflow.regularizers", "shapeflow.kernels", "shapeflow.interpolation", "shapeflow.sampling"},
    {"shapeflow.solvers", "shapeflow.deform", "shapeflow.losses"},
    {"shapeflow.metrics", "shapeflow.io", "shapeflow.viz", "shapeflow.apply", "shapeflow.synthetic"},
    {"shapeflow.result"},
    {"shapeflow.pipelines", "shapeflow.learn", "shapeflow.superres"},
    {"shapeflow.register"},
    # cohorts: many register() calls on Dask (issue 15); above register, which they call
    {"shapeflow.pipelines.batch", "shapeflow.pipelines.atlas"},
    {"shapeflow"},
]


def _layer(module: str) -> int:
    best = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (index, prefix)
    if best is None:
        pytest.fail(f"{module} is in no layer of tests/test_structure.py: place it")
    return best[0]


def test_dependencies_point_one_way():
    """cli -> register -> pipelines -> {deform, losses, regularizers, solvers} -> shapes; io, metrics
    and viz beside; nothing imports `register` or a pipeline back (function-local imports too),
    and the solver core knows nothing of models or losses."""
    graph = _graph()
    problems = []
    for module, targets in graph.items():
        for target in targets:
            if module.startswith(target + ".") and MODULES[target].name == "__init__.py":
                continue   # a submodule running its package's __init__
            if _layer(target) > _layer(module):
                problems.append(f"{module} imports {target}, a higher layer")
    for module, targets in graph.items():
        if module.startswith("shapeflow.solvers"):
            problems += [f"{module} imports {t}" for t in targets
                         if t.startswith(("shapeflow.deform", "shapeflow.losses"))]
    assert not problems, "\n".join(sorted(problems))


def test_the_checks_catch_what_they_look_for(tmp_path, monkeypatch):
    """The checks fail on a planted circle and a planted private import (they cannot pass vacuously)."""
    global MODULES
    fake = tmp_path / "shapeflow"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("def f():\n    from .b import g\n")
    (fake / "b.py").write_text("from shapeflow.a import f\nfrom shapeflow.a import _hidden\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake, raising=False)
    saved = MODULES
    MODULES = {_module_name_in(fake, p): p for p in sorted(fake.rglob("*.py"))}
    try:
        with pytest.raises(pytest.fail.Exception, match="import circle: shapeflow.a -> shapeflow.b -> shapeflow.a"):
            test_no_import_circle()
        with pytest.raises(AssertionError, match="imports _hidden from shapeflow.a"):
            test_no_private_name_imported_across_modules()
    finally:
        MODULES = saved


def _module_name_in(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_subpackage_is_listed_for_installation():
    """A non-editable install only ships the packages pyproject.toml lists."""
    import tomllib

    listed = set(tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT.parent).parts) for p in ROOT.rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
