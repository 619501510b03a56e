"""hf_cachehooks: compute once, reuse everywhere, for HuggingFace evaluation and training loops.

The package root is the API. Heavy libraries (torch, transformers, datasets, evaluate) are imported
only when a model has to run, so a cache hit stays fast: the names below that need them load lazily.
"""

from importlib import import_module as _import_module
from typing import Any as _Any

from ._core.keys import Key, make_key
from ._core.rows import load_rows
from ._core.store import cache_root
from ._version import __version__ as __version__
from .errors import ConfigError, CorruptEntryError, HFCacheHooksError, MissingDependencyError
from .evaluation.config import EvalConfig
from .evaluation.predictions import PredictionCache
from .evaluation.runs import EvalResult, evaluate_model

# name -> module, imported on first use
_LAZY = {
    "ActivationStore": "activations.store",
    "GenerationCache": "generation.cache",
    "OpenAIBackend": "generation.backends",
    "ProbeMismatchError": "activations.vectors",
    "SpeedupCallback": "training.callbacks",
    "SpeedupConfig": "training.config",
    "SteeringVector": "activations.vectors",
    "TokenCache": "conversation.cache",
    "TokenCacheConfig": "conversation.files",
    "TokenRecord": "conversation.files",
    "TransformersBackend": "generation.backends",
    "cache_activations": "activations.writer",
}
_LAZY_MODULES = {"speedups": "training.speedups"}  # plan(), load_model(): the Trainer helper, as a namespace

__all__ = [
    "ActivationStore",
    "ConfigError",
    "CorruptEntryError",
    "EvalConfig",
    "EvalResult",
    "GenerationCache",
    "HFCacheHooksError",
    "Key",
    "MissingDependencyError",
    "OpenAIBackend",
    "PredictionCache",
    "ProbeMismatchError",
    "SpeedupCallback",
    "SpeedupConfig",
    "SteeringVector",
    "TokenCache",
    "TokenCacheConfig",
    "TokenRecord",
    "TransformersBackend",
    "cache_activations",
    "cache_root",
    "evaluate_model",
    "load_rows",
    "make_key",
    "speedups",
]


def __getattr__(name: str) -> _Any:
    if name in _LAZY_MODULES:
        value = _import_module(f".{_LAZY_MODULES[name]}", __name__)
        globals()[name] = value
        return value
    if name in _LAZY:
        value = getattr(_import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_cachehooks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))
