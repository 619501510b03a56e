"""Which optional extra provides each third-party module, and the error that says how to install it.

A missing extra is always the project's own `MissingDependencyError`, naming the command that fixes it:
`Evaluating 'gpt2' needs torch: pip install 'hf_cachehooks[models]'`, never a bare `ModuleNotFoundError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import MissingDependencyError

# top-level module -> the extra in pyproject.toml [project.optional-dependencies] that installs it
EXTRAS: dict[str, str] = {
    "torch": "models",
    "transformers": "models",
    "accelerate": "models",
    "peft": "models",
    "gguf": "models",
    "yaml": "models",  # pyyaml arrives with transformers; only the chat server's --config reads YAML
    "datasets": "eval",
    "evaluate": "eval",
    "pyarrow": "activations",
    "safetensors": "activations",
    "numpy": "activations",
    "matplotlib": "plots",
    "fastapi": "server",
    "uvicorn": "server",
    "httpx": "server",
    "lz4": "compression",
    "zstandard": "compression",
    "lm_eval": "lm-eval",
}


def missing_dependency(exc: ImportError, what: str) -> MissingDependencyError | None:
    """The `MissingDependencyError` for a failed import of an optional dependency, or None for any other.

    Args:
        exc: the error an import raised (its `name` is the module that was not found).
        what: what needed it, as the message's subject, e.g. "hf_cachehooks.ActivationStore".

    Returns:
        `MissingDependencyError("<what> needs <module>: pip install 'hf_cachehooks[<extra>]'")`, or None
        when `exc` is not a missing module one of the extras provides (re-raise it as it is).

    Example:
        >>> try:
        ...     import pyarrow
        ... except ImportError as exc:
        ...     raise (missing_dependency(exc, "The activation store") or exc) from exc
    """
    if isinstance(exc, MissingDependencyError) or not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    module = exc.name.split(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return None
    return MissingDependencyError(f"{what} needs {module}: pip install 'hf_cachehooks[{extra}]'")


@contextmanager
def requires_extras(what: str) -> Iterator[None]:
    """Turn a missing optional module inside the block into `MissingDependencyError` (see `missing_dependency`)."""
    try:
        yield
    except ModuleNotFoundError as exc:
        error = missing_dependency(exc, what)
        if error is None:
            raise
        raise error from exc
