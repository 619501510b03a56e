"""Exceptions raised by hf_cachehooks.

    HFCacheHooksError
    ├── ConfigError (ValueError)        a bad setting; the message names the value and the fix
    ├── CorruptEntryError (ValueError)  a cache file failed its checksum (callers turn it into a miss)
    └── MissingDependencyError (ImportError)  an optional extra is not installed

A cache miss is never an exception.
"""


class HFCacheHooksError(Exception):
    """Root of every exception this package raises on purpose."""


class ConfigError(HFCacheHooksError, ValueError):
    """A configuration value is invalid."""


class CorruptEntryError(HFCacheHooksError, ValueError):
    """A cache entry is truncated, edited or fails its checksum."""


class MissingDependencyError(HFCacheHooksError, ImportError):
    """An optional dependency is missing."""
