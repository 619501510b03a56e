"""The package tree shows the layers, and imports follow them (read from the source, nothing imported).

    errors, _version           0
    _core/                     1  keys, the entry contract, bytes on disk, locking, time, fingerprints, rows
    _models/                   2  identity, architecture, loading and batches, hooks
    evaluation/ generation/ activations/ training/ conversation/ management   3  one folder per feature
    sweeps/, cli, __main__, the package root                                4  sweeps compose features
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "hf_cachehooks"
FEATURES = {"evaluation", "generation", "activations", "training", "conversation", "management"}


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


def _imports(path: Path):
    """(line, imported module, imported names) for every import of the package's own modules."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (PKG.parent / sub.replace(".", "/")).is_dir()
                yield node.lineno, sub if is_module else target, [] if is_module else [alias.name]
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


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_private_names_stay_in_their_module(path):
    for line, target, names in _imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{_module(path)}:{line} imports private {private} from {target}"


def test_the_tree_shows_the_layers_and_modules_stay_small():
    tops = sorted(p.name for p in PKG.iterdir() if not p.name.startswith("__pycache__"))
    assert {"_core", "_models", "evaluation", "generation", "activations", "training", "conversation"} <= set(tops)
    flat = [p.name for p in PKG.glob("*.py")]
    assert len(flat) <= 8, f"modules left at the top: {flat}"
    too_big = {str(p.relative_to(PKG)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 550}
    assert not too_big, f"split these along a seam: {too_big}"
