"""Exceptions raised by hf_cachehooks, all in one tree (importing this module imports nothing heavy).

    HFCacheHooksError
    ├── CacheError (OSError)                 a store that is the result (activations) cannot be written there
    ├── ConfigError (ValueError)             a bad setting; the message names the value and the fix
    ├── CorruptEntryError (ValueError)       a cache file failed its checksum (callers turn it into a miss)
    ├── ProbeMismatchError (ValueError)      a probe or vector used on another model, hidden size or layer
    ├── MissingDependencyError (ImportError) an optional extra is not installed; the message names it
    ├── ServerError (ConnectionError)        every completion server failed; the message names each one
    ├── WaitTimeoutError (TimeoutError)      other processes did not finish their share of the work in time
    └── KVCacheMismatchError (RuntimeError)  past_key_values do not hold the tokens the caller said they do

Each class also subclasses the built-in it resembles, so `except ValueError:` and friends keep working.
A cache miss is never an exception.
"""


class HFCacheHooksError(Exception):
    """Root of every exception this package raises on purpose."""


class CacheError(HFCacheHooksError, OSError):
    """A store that is the result itself (an activation store) cannot be written; the message names the folder."""


class ConfigError(HFCacheHooksError, ValueError):
    """A configuration value is invalid."""


class CorruptEntryError(HFCacheHooksError, ValueError):
    """A cache entry is truncated, edited or fails its checksum."""


class ProbeMismatchError(HFCacheHooksError, ValueError):
    """A probe or steering vector was trained on a different model, hidden size or layer than its use."""


class MissingDependencyError(HFCacheHooksError, ImportError):
    """An optional dependency is missing: `pip install 'hf_cachehooks[<extra>]'` fixes it."""


class ServerError(HFCacheHooksError, ConnectionError):
    """Every completion server failed; the message names each one and its last error.

    `completions` holds what succeeded before that (`None` elsewhere), so a caller can still save it.
    """

    def __init__(self, message: str, completions: list | None = None) -> None:
        super().__init__(message)
        self.completions: list = completions or []


class WaitTimeoutError(HFCacheHooksError, TimeoutError):
    """Other processes sharing the work did not finish their part within the timeout."""


class KVCacheMismatchError(HFCacheHooksError, RuntimeError):
    """The `past_key_values` passed in do not hold exactly the tokens the caller said are cached."""
