"""What may become of a store's folder before an extraction: open, resume, replace, or refuse.

A finished store of the same inputs is opened; a killed run of the same inputs is resumed from the chunks its
sidecars confirm; a store (or killed run) made from other inputs is replaced only with `force`, and then only
the files its manifest or sidecars record are removed. A folder that is not ours (no CACHEDIR.TAG, no manifest
of ours) is refused, so a user's files are never replaced (`claim_folder`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

from .._core import entry, remote
from .._core.cache_config import CacheConfig
from .._core.freshness import describe_age
from .._core.keys import Key, diff_inputs
from .._core.store import is_tagged
from ..errors import ConfigError
from .shards import sidecar, sidecars
from .store import CHUNKS, KIND, MANIFEST, store_problem

log = logging.getLogger(__name__)


def clear_the_way(folder: Path, key: Key, force: bool, cache: CacheConfig, rank: int) -> entry.Entry | None:
    """The finished store for `key` in `folder`, or None after rank 0 removed whatever was in the way.

    A killed run of the same inputs is resumed, unless `cache` says to recompute.

    Raises:
        ConfigError: `folder` holds a cache made from other inputs and `force` is off.
    """
    remote.refresh(folder / MANIFEST)  # a store on object storage: its finished copy, if any (else no-op)
    claim_folder(folder, force)
    found, problem = entry.inspect(folder / MANIFEST, "stamp")  # never deletes: we decide below
    other = found is not None and found.kind != KIND
    problem = problem or (None if found is None or other else store_problem(found))
    changes: list[str] | None = None
    if problem:
        log.warning("Corrupt activation cache in %s (%s); removing it and extracting again.", folder, problem)
    elif found is not None and found.key["digest"] == key.digest and not other:
        now = cache.clock()
        if not cache.reads:
            log.info(
                "Activation cache %s: %s; extracting again.",
                folder,
                "force_recompute is set" if cache.force_recompute else "the cache is disabled",
            )
        elif not cache.expired(found.created_at, now):
            return found
        else:
            log.info(
                "Activation cache %s is %s old (max %s days): expired, extracting again.",
                folder,
                describe_age(now - found.created_at),
                cache.max_age_days,
            )
    elif found is not None:
        changes = [f"it holds a {found.kind} entry"] if other else diff_inputs(found.key["inputs"], key.inputs)
    else:
        side = next(sidecars(folder), None)  # a killed run (any chunk it finished): resume it if the same inputs
        if side is None or (side["key"]["digest"] == key.digest and cache.reads):
            return None
        if side["key"]["digest"] != key.digest:
            changes = diff_inputs(side["key"]["inputs"], key.inputs)
    if changes is not None:
        if not force:
            raise ConfigError(
                f"{folder} holds activations made from other inputs ({'; '.join(changes[:5])}). "
                "Give another folder=, or force=True to replace it."
            )
        log.warning("Replacing the activation cache in %s (%s).", folder, "; ".join(changes[:3]))
    if rank == 0:
        remove_store(folder)
    return None


_STORE_NAMES = re.compile(r"(manifest|metadata|layer_info|state|dataset_info)\.json|data-\d{5}\.arrow|\.chunks")


def claim_folder(folder: Path, force: bool) -> None:
    """Refuse to write a store into a folder that is not ours, so no file of the user's is ever replaced.

    Ours: missing, empty, marked with our CACHEDIR.TAG, or holding a manifest of ours. A `manifest.json`
    that is not one of ours is never removed nor overwritten, even with `force`. Another non-empty folder
    needs `force`, which writes the store beside its files, and is refused even then when a file there
    has a name the store writes. Inside a folder marked as ours, the store's file names are the store's.

    Raises:
        ConfigError: `folder` is not ours (names what is there and the fix).
    """
    manifest = folder / MANIFEST
    if (manifest.exists() or manifest.is_symlink()) and not entry.is_entry_file(manifest):
        raise ConfigError(
            f"{manifest} is not an activation cache of hf_cachehooks (a file of yours, or a cache written by "
            "an earlier version); it is never removed or overwritten, even with force=True. Move it away, or "
            "choose another folder=."
        )
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise ConfigError(f"{folder} is a file, not a folder; give folder= a folder for the store.") from None
    if not names or is_tagged(folder) or entry.is_entry_file(manifest):
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if not force:
        raise ConfigError(
            f"{folder} is not empty and holds no activation cache of hf_cachehooks (no CACHEDIR.TAG of ours; "
            f"it has {shown}). Choose a new or empty folder=, or pass force=True to write "
            "the store beside these files, which are never touched."
        )
    clash = [name for name in names if _STORE_NAMES.fullmatch(name)]
    if clash:
        raise ConfigError(
            f"{folder} holds {', '.join(clash[:5])}, which the activation store would overwrite; hf_cachehooks "
            "never overwrites a file it did not write, even with force=True. Move them away, or choose another "
            "folder=."
        )
    log.warning("Writing an activation store into %s beside files that are not ours (force); they stay.", folder)


def remove_store(folder: Path) -> int:
    """Delete the store in `folder`: the files its manifest lists, a killed run's shards and `.chunks/`; no others.

    A file goes only while it holds what was recorded for it (see `entry.remove_entry`): a killed run's
    shard is checked against its sidecar.
    """
    chunks = folder / CHUNKS
    shards = (
        {}
        if chunks.is_symlink() or not chunks.is_dir()
        else {
            f"{p.stem}.arrow": {"bytes": side["bytes"], "xxh3": side["content_hash"], "stamp": side.get("stamp")}
            for p in sorted(chunks.iterdir())
            if re.fullmatch(r"data-\d{5}\.json", p.name) and (side := sidecar(folder, int(p.stem[5:]))) is not None
        }
    )
    if entry.is_entry_file(folder / MANIFEST):
        freed = entry.remove_entry(folder / MANIFEST, also=shards)
    else:  # a killed run: no manifest, only the shards its sidecars record
        freed = 0
        for name, rec in shards.items():
            if entry.check_file(folder, name, rec, "stamp") is None:
                with contextlib.suppress(OSError):
                    freed += (folder / name).stat().st_size
                    (folder / name).unlink()
    if chunks.is_dir() and not chunks.is_symlink():
        shutil.rmtree(chunks, ignore_errors=True)
    return freed
