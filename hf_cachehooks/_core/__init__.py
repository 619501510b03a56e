"""The private core: keys, the entry contract and its bytes on disk, locking, time, fingerprints and rows.

Imports nothing above it (only `errors` and `_version`); every cache is built on it."""

from . import remote  # noqa: F401  installs the entry contract's hooks for roots on object storage (`entry.Mirror`)
