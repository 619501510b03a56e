import inspect
import subprocess
import sys

import hf_cachehooks


def test_all_is_sorted_and_complete():
    assert hf_cachehooks.__all__ == sorted(hf_cachehooks.__all__)
    names = (n for n in dir(hf_cachehooks) if not n.startswith("_"))
    public = {n for n in names if not inspect.ismodule(getattr(hf_cachehooks, n))}
    assert public | set(hf_cachehooks._LAZY_MODULES) == set(hf_cachehooks.__all__)  # plus namespaces like speedups


def test_import_is_light():
    """A cache hit must not pay for torch, transformers, datasets or evaluate."""
    code = ("import sys, hf_cachehooks, hf_cachehooks.cli, hf_cachehooks.management;"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'evaluate', 'joblib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_errors_subclass_the_builtins_they_resemble():
    assert issubclass(hf_cachehooks.ConfigError, ValueError)
    assert issubclass(hf_cachehooks.MissingDependencyError, ImportError)
    assert issubclass(hf_cachehooks.CorruptEntryError, hf_cachehooks.HFCacheHooksError)
