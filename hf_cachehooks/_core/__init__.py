"""The private core: keys, the entry contract and its bytes on disk, locking, time, fingerprints and rows.

Imports nothing above it (only `errors` and `_version`); every cache is built on it."""
