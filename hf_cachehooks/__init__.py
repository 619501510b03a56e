"""hf_cachehooks: compute once, reuse everywhere, for HuggingFace evaluation and training loops.

The package root is the API. Heavy libraries (torch, transformers, datasets, evaluate) are imported
only when a model has to run, so a cache hit stays fast.
"""

__version__ = "0.1.0"

from .config import EvalConfig
from .errors import ConfigError, CorruptEntryError, HFCacheHooksError, MissingDependencyError
from .evaluation import EvalResult, evaluate_model
from .keys import Key, make_key
from .predictions import PredictionCache
from .store import cache_root

__all__ = [
    "ConfigError",
    "CorruptEntryError",
    "EvalConfig",
    "EvalResult",
    "HFCacheHooksError",
    "Key",
    "MissingDependencyError",
    "PredictionCache",
    "cache_root",
    "evaluate_model",
    "make_key",
]
