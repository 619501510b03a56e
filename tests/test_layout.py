"""The package tree shows the layers, and imports follow them (read from the source, nothing imported).

    errors, _version           0
    _core/                     1  keys, the entry contract, bytes on disk, locking, time, fingerprints, rows
    _models/                   2  identity, architecture, loading and batches, hooks
    evaluation/ generation/ activations/ training/ conversation/ harness/ management   3  one folder per feature
    sweeps/, cli, __main__, the package root                                4  sweeps compose features

No imports form a circle (imports inside functions count), and private names stay in their module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "hf_cachehooks"
FEATURES = {"evaluation", "generation", "activations", "training", "conversation", "management", "harness"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> tuple[int, str]:
    """(layer, group) of a dotted module name under hf_cachehooks."""
    parts = module.split(".")[1:]
    top = parts[0] if parts else ""
    if top in ("errors", "_version"):
        return 0, top
    if top == "_core":
        return 1, top
    if top == "_models":
        return 2, top
    if top in FEATURES:
        return 3, top
    return 4, top or "root"


def _is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` (or an alias ending in it, or `typing.TYPE_CHECKING`): never run."""
    name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
    return name.endswith("TYPE_CHECKING")


def _walk(tree: ast.AST, run_time_only: bool):
    """Every node of `tree`, leaving out the bodies of `if TYPE_CHECKING:` when `run_time_only`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if run_time_only and isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _is_module(dotted: str) -> bool:
    """True when `dotted` (under hf_cachehooks) names a module or a package, not a name inside one."""
    where = PKG.parent / dotted.replace(".", "/")
    return where.with_suffix(".py").exists() or where.is_dir()


def _imports(path: Path, run_time_only: bool = False):
    """(line, imported module, imported names) for every import of the package's own modules.

    Top-level and function-level imports alike; `run_time_only` leaves out those under `if TYPE_CHECKING:`.
    """
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in _walk(ast.parse(path.read_text()), run_time_only):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if _is_module(sub) else target, [] if _is_module(sub) else [alias.name]
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.startswith("hf_cachehooks"):
                    yield node.lineno, name, []


SOURCES = sorted(p for p in PKG.rglob("*.py") if "metric_scripts" not in p.parts)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_never_point_up_or_sideways(path):
    here = _module(path)
    layer, group = _layer(here)
    for line, target, _ in _imports(path):
        their_layer, their_group = _layer(target)
        assert their_layer <= layer, f"{here}:{line} imports {target}, a higher layer"
        if layer == 3 and their_layer == 3:
            assert their_group == group, f"{here}:{line} imports {target}: features do not import each other"
        outside_cli = here.split(".")[1:2] != ["cli"] and not here.endswith("__main__")
        assert not (outside_cli and target.split(".")[1:2] == ["cli"]), f"{here}:{line} imports the CLI"


def _module_names(path: Path) -> dict[str, str]:
    """{local name: module} for each of the package's modules that `path` binds to a name.

    `from . import keys`, `from .._core import keys as k`, `import hf_cachehooks._core.keys as keys`.
    """
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    bound = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if target.startswith("hf_cachehooks") and _is_module(f"{target}.{alias.name}"):
                    bound[alias.asname or alias.name] = f"{target}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name.startswith("hf_cachehooks"):
                    bound[alias.asname] = alias.name
    return bound


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_private_names_stay_in_their_module(path):
    for line, target, names in _imports(path):
        private = [n for n in names if _private(n)]
        assert not private, f"{_module(path)}:{line} imports private {private} from {target}"
    modules = _module_names(path)  # ... nor are read through the module: `from . import keys` then `keys._x`
    read = [
        f"{_module(path)}:{node.lineno} reads private {node.value.id}.{node.attr}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in modules
        and _private(node.attr)
        and not _is_module(f"{modules[node.value.id]}.{node.attr}")
    ]
    assert not read, "; ".join(read)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph` (module -> modules it imports): Tarjan's strongly connected components
    of more than one module, or of one that imports itself, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _circle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest circle through `component[0]` inside `component`, as a path that ends where it starts."""
    start, inside = component[0], set(component)
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop(0)
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return [*paths[node], start]
            if nxt in inside and nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                todo.append(nxt)
    raise AssertionError(f"{component} is not a circle")


def test_the_cycle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": {"b"}}
    assert _cycles(graph) == [["a", "b", "c"], ["e"]]
    assert _circle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"] and _circle(graph, ["e"]) == ["e", "e"]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    """No circle among the package's modules, counting imports inside functions (they run too), not those
    under `if TYPE_CHECKING:`. A deferred import that only dodges a circle at import time still ties the
    modules together; break it along a seam instead (`_core/entry.py`'s `Mirror` hooks, say)."""
    graph = {_module(p): {t for _, t, _ in _imports(p, run_time_only=True) if t != _module(p)} for p in SOURCES}
    short = [[m.removeprefix("hf_cachehooks.") for m in c] for c in _cycles(graph)]
    circles = [" -> ".join(m.removeprefix("hf_cachehooks.") for m in _circle(graph, c)) for c in _cycles(graph)]
    assert not circles, "import cycles: " + "; ".join(
        f"{circle} (one circle among: {', '.join(c)})" for circle, c in zip(circles, short, strict=True)
    )


def test_the_tree_shows_the_layers_and_modules_stay_small():
    tops = sorted(p.name for p in PKG.iterdir() if not p.name.startswith("__pycache__"))
    assert {"_core", "_models", "evaluation", "generation", "activations", "training", "conversation"} <= set(tops)
    flat = [p.name for p in PKG.glob("*.py")]
    assert len(flat) <= 8, f"modules left at the top: {flat}"
    too_big = {str(p.relative_to(PKG)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 550}
    assert not too_big, f"split these along a seam: {too_big}"
