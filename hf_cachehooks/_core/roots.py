"""A cache root as management reads it: a local folder, or a root on object storage with its local copy.

`root_at` is the one place that tells the two apart. Both give the same answers in the same shapes: each
entry's head (`heads.Head`, for ls, du, prune and clear), each entry opened through the contract (for
verify), the candidates for dead writers' leftovers, and the lease objects dead writers left on a bucket.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from . import remote, remote_sync
from .entry import Entry, inspect, is_entry_file
from .heads import Head, read_summary
from .store import TEMP_SUFFIX, cache_folders


def _spare(name: str) -> bool:
    """True for a writer's temp file or a removal's trash file (a leftover once its writer is dead)."""
    return name.startswith(".") and (name.endswith(TEMP_SUFFIX) or ".trash-" in name)


def _locks(folder: Path) -> list[Path]:
    """The lock files in `folder`'s `.locks` (plain files only); one cheap failed scan where there is none."""
    try:
        with os.scandir(os.path.join(folder, ".locks")) as found:
            return [Path(e.path) for e in found if ".lock" in e.name and e.is_file(follow_symlinks=False)]
    except OSError:
        return []


class LocalRoot:
    """A cache root in a local (or shared) folder: entries are the manifests in folders marked as ours."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def is_cache(self) -> bool:
        """True when the root is, or holds, a folder marked as this library's cache."""
        return any(True for _ in cache_folders(self.path))

    def manifests(self) -> Iterator[Path]:
        """Every file that starts like a manifest of the contract, in the marked folders."""
        for folder, files in cache_folders(self.path):
            for name in files:
                path = folder / name
                if name.endswith(".json") and not path.is_symlink() and is_entry_file(path):
                    yield path

    def heads(self, spare: list[Path] | None = None) -> Iterator[Head]:
        """The head of every readable entry: one read of each manifest's first bytes (`verify` hashes the rest).

        `spare` collects, in the same walk, the files that may be dead writers' leftovers.
        """
        for folder, files in cache_folders(self.path):
            for name in files:
                if name.endswith(".json"):
                    head = read_summary(folder / name)
                    if head is not None:
                        yield head
                elif spare is not None and _spare(name):
                    spare.append(folder / name)
            if spare is not None:
                spare += _locks(folder)

    def scan(self, check: str) -> Iterator[tuple[Path, Entry | None, str | None]]:
        """(manifest, entry or None, problem or None) of every entry, opened through the contract with `check`."""
        for path in self.manifests():
            yield (path, *inspect(path, check=check))

    def dead_leases(self, now: float, grace: float) -> list[tuple[str, int]]:
        """Lease objects (URL, bytes) that dead writers left on object storage: none for a local root."""
        return []


class RemoteRoot(LocalRoot):
    """The local copy of a root on object storage: entries are the bucket's manifests, read without downloading
    data; leftovers are the local copy's own files and the bucket's dead lease objects."""

    def is_cache(self) -> bool:
        return remote_sync.is_cache(self.path)

    def heads(self, spare: list[Path] | None = None) -> Iterator[Head]:
        yield from remote_sync.heads(self.path)
        if spare is not None:  # the local copy's own leftovers
            for folder, files in cache_folders(self.path):
                spare += [folder / n for n in files if _spare(n)] + _locks(folder)

    def scan(self, check: str) -> Iterator[tuple[Path, Entry | None, str | None]]:
        """Every object streamed through the check (with "hash", through xxh3), nothing kept."""
        return ((s.path, s.entry, s.problem) for s in remote_sync.scan(self.path, check=check))

    def dead_leases(self, now: float, grace: float) -> list[tuple[str, int]]:
        return remote_sync.dead_leases(self.path, now, grace)


def root_at(path: Path) -> LocalRoot:
    """The root at `path`: a `RemoteRoot` for the local copy of a URL root (s3://...), else a `LocalRoot`."""
    return RemoteRoot(path) if remote.url_of(path) is not None else LocalRoot(path)
