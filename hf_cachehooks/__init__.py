"""hf_cachehooks: compute once, reuse everywhere, for HuggingFace evaluation and training loops.

The package root is the API. Heavy libraries (torch, transformers, datasets, evaluate) are imported
only when a model has to run, so a cache hit stays fast: the names below that need them load lazily.
"""

from importlib import import_module as _import_module
from typing import Any as _Any

from ._version import __version__ as __version__
from .config import EvalConfig
from .errors import ConfigError, CorruptEntryError, HFCacheHooksError, MissingDependencyError
from .evaluation import EvalResult, evaluate_model
from .keys import Key, make_key
from .predictions import PredictionCache
from .store import cache_root

# name -> module, imported on first use
_LAZY = {
    "ActivationStore": "activations",
    "GenerationCache": "generation",
    "OpenAIBackend": "backends",
    "ProbeMismatchError": "vectors",
    "SpeedupCallback": "callbacks",
    "SpeedupConfig": "training_config",
    "SteeringVector": "vectors",
    "TokenCache": "token_cache",
    "TokenCacheConfig": "token_files",
    "TokenRecord": "token_files",
    "TransformersBackend": "backends",
    "cache_activations": "activation_writer",
}

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
    "make_key",
]


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        value = getattr(_import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_cachehooks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
