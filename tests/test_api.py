import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hf_cachehooks
from hf_cachehooks import errors
from hf_cachehooks._core.extras import EXTRAS, missing_dependency, requires_extras

CFG = hf_cachehooks.EvalConfig(max_new_tokens=4, batch_size=2, metrics=("exact_match",))


def test_all_is_sorted_and_complete():
    assert hf_cachehooks.__all__ == sorted(hf_cachehooks.__all__)
    names = (n for n in dir(hf_cachehooks) if not n.startswith("_"))
    public = {n for n in names if not inspect.ismodule(getattr(hf_cachehooks, n))}
    assert public | set(hf_cachehooks._LAZY_MODULES) == set(hf_cachehooks.__all__)  # plus namespaces like speedups


def test_import_is_light():
    """A cache hit must not pay for torch, transformers, datasets or evaluate."""
    code = (
        "import sys, hf_cachehooks, hf_cachehooks.cli, hf_cachehooks.management;"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'evaluate', 'joblib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_errors_subclass_the_builtins_they_resemble():
    assert issubclass(hf_cachehooks.ConfigError, ValueError)
    assert issubclass(hf_cachehooks.MissingDependencyError, ImportError)
    assert issubclass(hf_cachehooks.CorruptEntryError, hf_cachehooks.HFCacheHooksError)


def test_every_exception_lives_in_the_tree_the_errors_docstring_draws():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BaseException)]
    assert len(classes) >= 7
    for cls in classes:
        assert issubclass(cls, hf_cachehooks.HFCacheHooksError), cls
        assert getattr(hf_cachehooks, cls.__name__) is cls, f"{cls.__name__} is not exported from the root"
        assert re.search(rf"\b{cls.__name__}\b", errors.__doc__), f"{cls.__name__} is missing from the drawn tree"
        if cls is not hf_cachehooks.HFCacheHooksError:  # each also subclasses the built-in it resembles
            assert [
                b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException, object)
            ], cls


def test_no_module_defines_an_exception_outside_the_tree():
    """A public exception class anywhere else must derive from one in errors.py (ServerError once did not)."""
    ours = {name for name, c in vars(errors).items() if isinstance(c, type)}
    pkg = Path(hf_cachehooks.__file__).parent
    outside = []
    for path in pkg.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if any(b.endswith(("Error", "Exception")) for b in bases) and not bases & ours:
                    outside.append(f"{path.relative_to(pkg)}:{node.name}")
    assert not outside


def test_a_moved_name_has_one_import_path():
    """The package is at 0.1: a name that moved lives in its new module only. No module but the root
    re-exports (`from x import Y as Y`) or serves names through a module `__getattr__`."""
    from hf_cachehooks.generation import backends

    assert not hasattr(backends, "ServerError") and not hasattr(backends, "OpenAIBackend")
    assert hf_cachehooks.ServerError is errors.ServerError
    assert hf_cachehooks.ProbeMismatchError is errors.ProbeMismatchError
    pkg = Path(hf_cachehooks.__file__).parent
    shims = []
    for path in sorted(pkg.rglob("*.py")):
        if path == pkg / "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        shims += [
            f"{path.relative_to(pkg)}:{node.lineno} re-exports {a.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for a in node.names
            if a.asname == a.name
        ]
        shims += [
            f"{path.relative_to(pkg)}:{node.lineno} has a module __getattr__"
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
        ]
    assert not shims


def test_catching_an_error_never_imports_torch():
    code = (
        "import sys, hf_cachehooks\n"
        "try:\n    raise hf_cachehooks.ProbeMismatchError('x')\n"
        "except (hf_cachehooks.ProbeMismatchError, hf_cachehooks.ServerError, hf_cachehooks.WaitTimeoutError,"
        " hf_cachehooks.KVCacheMismatchError):\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


ROOT = Path(__file__).resolve().parents[1]


def _package_imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, names) of every `import hf_cachehooks...` / `from hf_cachehooks... import ...` in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "hf_cachehooks"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hf_cachehooks":
            found.append((node.module or "", [a.name for a in node.names]))
    return found


def _not_from_the_root(module: str, names: list[str]) -> list[str]:
    """What in one import is not the package root's public API (`__all__`, or the `speedups` namespace)."""
    if module in ("hf_cachehooks", "hf_cachehooks.speedups"):
        return [] if module != "hf_cachehooks" else sorted(set(names) - set(hf_cachehooks.__all__))
    return [module]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:python|py)[ \t]*\n(.*?)^```", text, re.S | re.M)


def test_the_readme_names_import_from_the_root():
    """Every import of the package in a python block of README.md or docs/*.md is from the root (`from
    hf_cachehooks import X`, X in `__all__`), so the docs teach only names that stay put."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    seen, wrong = 0, []
    for page in pages:
        for block in _python_blocks(page.read_text(encoding="utf-8")):
            for module, names in _package_imports(ast.parse(block)):
                seen += 1
                wrong += [f"{page.name}: {bad}" for bad in _not_from_the_root(module, names)]
    assert seen >= 10, "found too few imports: has the code-block syntax of the docs changed?"
    assert wrong == []


def test_the_readme_import_check_catches_a_deep_import():
    block = _python_blocks(
        "```python\nfrom hf_cachehooks.generation.cache import Generations\n"
        "from hf_cachehooks import EvalConfig, Nope\nimport hf_cachehooks._core.keys\n```\n"
    )[0]
    found = [bad for m, n in _package_imports(ast.parse(block)) for bad in _not_from_the_root(m, n)]
    assert found == ["hf_cachehooks.generation.cache", "Nope", "hf_cachehooks._core.keys"]


# An example may reach past the root only for what the root does not export; each such module, and why.
EXAMPLES_BEYOND_THE_ROOT = {
    "main.py": {"hf_cachehooks.management": "is_cache, plan_clear and disk_usage: the public management module's API"},
    "probe_eval_awareness.py": {
        "hf_cachehooks.activations.probing": "analyze_probe and generate_vectors (not exported)",
        "hf_cachehooks.activations.spec": "load_records reads the example's labelled rows (not exported)",
    },
}


def test_the_examples_import_from_the_root():
    """Examples are what users copy: they import from the root, except the modules listed above (a listed
    module the example no longer needs fails too, so the list stays true)."""
    used = {}
    for example in sorted((ROOT / "examples").glob("*.py")):
        tree = ast.parse(example.read_text(encoding="utf-8"))
        beyond = {bad for m, n in _package_imports(tree) for bad in _not_from_the_root(m, n)}
        if beyond:
            used[example.name] = beyond
    assert used == {name: set(modules) for name, modules in EXAMPLES_BEYOND_THE_ROOT.items()}


def test_every_lazy_name_is_visible_to_type_checkers():
    """Each lazy name (and namespace) is imported under `if TYPE_CHECKING:`, so it is not `Any` to mypy."""
    tree = ast.parse(Path(hf_cachehooks.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))
    seen = {a.asname or a.name for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert seen == set(hf_cachehooks._LAZY) | set(hf_cachehooks._LAZY_MODULES)


# A missing extra is the project's own error, naming the install command ------------------------------------


def test_each_extras_entry_names_an_extra_that_installs_it():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    distributions = {"yaml": "pyyaml"}
    transitive = {"yaml"}  # pyyaml arrives with transformers (the models extra); no extra lists it
    for module, extra in EXTRAS.items():
        names = {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower() for req in extras[extra]}
        assert module in transitive or distributions.get(module, module) in names, (module, extra)


def test_missing_dependency_names_the_module_and_the_extra():
    error = missing_dependency(ModuleNotFoundError("No module named 'lz4'", name="lz4.frame"), "The lz4 codec")
    assert isinstance(error, hf_cachehooks.MissingDependencyError) and isinstance(error, ImportError)
    assert str(error) == "The lz4 codec needs lz4: pip install 'hf_cachehooks[compression]'"
    assert missing_dependency(ModuleNotFoundError("No module named 'x'", name="not_ours"), "X") is None
    assert missing_dependency(ImportError("cannot import name 'y'"), "X") is None  # not a missing module


def test_requires_extras_converts_only_the_modules_an_extra_provides(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ModuleNotFoundError
    with pytest.raises(
        hf_cachehooks.MissingDependencyError,
        match=r"^Reading needs pyarrow: pip install "
        r"'hf_cachehooks\[activations\]'$",
    ) as info:
        with requires_extras("Reading"):
            import pyarrow  # noqa: F401
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    monkeypatch.setitem(sys.modules, "not_an_extra", None)
    with pytest.raises(ModuleNotFoundError) as other, requires_extras("Reading"):
        import not_an_extra  # noqa: F401
    assert not isinstance(other.value, hf_cachehooks.MissingDependencyError)


def test_a_lazy_name_without_its_extra_says_which_extra_to_install():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import hf_cachehooks\n"
        "try:\n    hf_cachehooks.SteeringVector\n"
        "except hf_cachehooks.MissingDependencyError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "hf_cachehooks.SteeringVector needs torch: pip install 'hf_cachehooks[models]'"


def test_evaluating_a_model_path_without_the_models_extra_names_it(tmp_path, monkeypatch, qa_rows):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(
        hf_cachehooks.MissingDependencyError,
        match=r"needs transformers: pip install "
        r"'hf_cachehooks\[models\]'",
    ):
        hf_cachehooks.evaluate_model(str(folder), qa_rows, CFG)


# EvalResult ---------------------------------------------------------------------------------------------------


def test_miss_reason_says_why_the_run_entry_was_not_served(tiny, qa_rows):
    model, tok = tiny
    first = hf_cachehooks.evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert (first.cache_status, first.miss_reason) == ("miss", "no earlier entry in this cache")
    hit = hf_cachehooks.evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert (hit.cache_status, hit.miss_reason) == ("hit", None)
    changed = hf_cachehooks.evaluate_model(model, qa_rows, CFG.with_(max_new_tokens=5), tokenizer=tok)
    assert changed.cache_status == "miss" and changed.miss_reason is not None
    assert "differs in" in changed.miss_reason and "generation.max_new_tokens 4→5" in changed.miss_reason
    forced = hf_cachehooks.evaluate_model(model, qa_rows, CFG.with_(force_recompute=True), tokenizer=tok)
    assert (forced.cache_status, forced.miss_reason) == ("recomputed", "force_recompute is set")
    off = hf_cachehooks.evaluate_model(model, qa_rows, CFG.with_(use_prediction_cache=False), tokenizer=tok)
    assert (off.cache_status, off.miss_reason) == ("disabled", None)
    assert not hasattr(first, "extra")


def test_a_run_entry_made_while_waiting_for_the_lease_is_served_as_a_hit(tiny, qa_rows, monkeypatch):
    """Another process computes the same run first; this one, after waiting for the lease, answers from
    that process's run entry: a hit, predicting nothing itself."""
    from hf_cachehooks.evaluation import runs

    model, tok = tiny
    real = runs.single_flight
    other: list = []

    def another_process_first(lock, lookup, compute, **options):
        monkeypatch.setattr(runs, "single_flight", real)
        other.append(hf_cachehooks.evaluate_model(model, qa_rows, CFG, tokenizer=tok))
        return real(lock, lookup, compute, **options)

    monkeypatch.setattr(runs, "single_flight", another_process_first)
    mine = hf_cachehooks.evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert other[0].cache_status == "miss" and other[0].path is not None
    assert (mine.cache_status, mine.miss_reason) == ("hit", None)
    assert (mine.predictions, mine.metrics, mine.path) == (other[0].predictions, other[0].metrics, other[0].path)


def test_every_public_name_is_named_as_the_package_roots():
    """Tracebacks, reprs and API docs show `hf_cachehooks.X`, never a private module path."""
    for name in hf_cachehooks.__all__:
        value = getattr(hf_cachehooks, name)
        if name != "speedups":  # a namespace module, named as itself
            assert value.__module__ == "hf_cachehooks", name
    assert repr(hf_cachehooks.CacheConfig).startswith("<class 'hf_cachehooks.CacheConfig'")
