"""hf_cachehooks: compute once, reuse everywhere, for HuggingFace evaluation and training loops.

The package root is the API. Heavy libraries (torch, transformers, datasets, evaluate) are imported
only when a model has to run, so a cache hit stays fast: the names below that need them load lazily
(type checkers see them through the `TYPE_CHECKING` imports), and a missing extra raises
`MissingDependencyError` naming `pip install 'hf_cachehooks[<extra>]'`. Every exception is in `errors`.
"""

import typing as _typing
from importlib import import_module as _import_module
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._core.cache_config import CacheConfig
from ._core.extras import requires_extras as _requires_extras
from ._core.fingerprint import hash_files
from ._core.folders import cached_folder
from ._core.keys import Key, make_key
from ._core.rows import load_rows
from ._core.store import cache_root
from ._version import __version__ as __version__
from .errors import (
    CacheError,
    ConfigError,
    CorruptEntryError,
    HFCacheHooksError,
    KVCacheMismatchError,
    MissingDependencyError,
    ProbeMismatchError,
    ServerError,
    WaitTimeoutError,
)
from .evaluation.config import EvalConfig
from .evaluation.predictions import PredictionCache
from .evaluation.runs import EvalResult, evaluate_model

# name -> module, imported on first use
_LAZY = {
    "ActivationStore": "activations.store",
    "CachedEvalCallback": "evaluation.trainer_callback",
    "CachedHFLM": "harness.model",
    "GenerationCache": "generation.cache",
    "Generations": "generation.cache",
    "KSweepResult": "sweeps.k_sweep",
    "ModelBackend": "sweeps.k_sweep",
    "OpenAIBackend": "generation.remote",
    "Sampling": "generation.backends",
    "SpeedupCallback": "training.callbacks",
    "SpeedupConfig": "training.config",
    "SteeringVector": "activations.vectors",
    "TokenCache": "conversation.cache",
    "TokenCacheConfig": "conversation.files",
    "TokenRecord": "conversation.files",
    "TransformersBackend": "generation.backends",
    "cache_activations": "activations.writer",
    "cache_activations_from_path": "activations.paths",
    "cache_evaluation": "evaluation.trainer_loop",
    "k_sweep": "sweeps.k_sweep",
    "load_model": "_models.loading",
    "load_tokenizer": "_models.loading",
}
_LAZY_MODULES = {"speedups": "training.speedups"}  # plan(), load_model(): the Trainer helper, as a namespace

if _TYPE_CHECKING:  # type checkers see the real classes; at run time __getattr__ imports them on first use
    from ._models.loading import load_model, load_tokenizer
    from .activations.paths import cache_activations_from_path
    from .activations.store import ActivationStore
    from .activations.vectors import SteeringVector
    from .activations.writer import cache_activations
    from .conversation.cache import TokenCache
    from .conversation.files import TokenCacheConfig, TokenRecord
    from .evaluation.trainer_callback import CachedEvalCallback
    from .evaluation.trainer_loop import cache_evaluation
    from .generation.backends import Sampling, TransformersBackend
    from .generation.cache import GenerationCache, Generations
    from .generation.remote import OpenAIBackend
    from .harness.model import CachedHFLM
    from .sweeps.k_sweep import KSweepResult, ModelBackend, k_sweep
    from .training import speedups
    from .training.callbacks import SpeedupCallback
    from .training.config import SpeedupConfig

__all__ = [
    "ActivationStore",
    "CacheConfig",
    "CacheError",
    "CachedEvalCallback",
    "CachedHFLM",
    "ConfigError",
    "CorruptEntryError",
    "EvalConfig",
    "EvalResult",
    "GenerationCache",
    "Generations",
    "HFCacheHooksError",
    "KSweepResult",
    "KVCacheMismatchError",
    "Key",
    "MissingDependencyError",
    "ModelBackend",
    "OpenAIBackend",
    "PredictionCache",
    "ProbeMismatchError",
    "Sampling",
    "ServerError",
    "SpeedupCallback",
    "SpeedupConfig",
    "SteeringVector",
    "TokenCache",
    "TokenCacheConfig",
    "TokenRecord",
    "TransformersBackend",
    "WaitTimeoutError",
    "cache_activations",
    "cache_activations_from_path",
    "cache_evaluation",
    "cache_root",
    "cached_folder",
    "evaluate_model",
    "hash_files",
    "k_sweep",
    "load_model",
    "load_rows",
    "load_tokenizer",
    "make_key",
    "speedups",
]


# Hidden from type checkers, so a misspelt name is their error, never `Any` (mypy knows only this spelling here).
if not _typing.TYPE_CHECKING:

    def __getattr__(name: str) -> _Any:
        if name not in _LAZY and name not in _LAZY_MODULES:
            raise AttributeError(f"module 'hf_cachehooks' has no attribute {name!r}")
        with _requires_extras(f"hf_cachehooks.{name}"):  # a missing extra: MissingDependencyError naming it
            if name in _LAZY_MODULES:
                value = _import_module(f".{_LAZY_MODULES[name]}", __name__)
            else:
                value = _public(getattr(_import_module(f".{_LAZY[name]}", __name__), name))
        globals()[name] = value
        return value


def _public(value: _Any) -> _Any:
    """Name `value` as the package root's (tracebacks and reprs show `hf_cachehooks.X`, not a private path)."""
    value.__module__ = __name__
    return value


for _name in __all__:  # the names imported above; the lazy ones are named as they load
    if _name in globals() and _name not in _LAZY_MODULES:
        _public(globals()[_name])
del _name


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))
