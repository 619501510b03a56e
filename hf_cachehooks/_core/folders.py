"""`cached_folder`: a folder of files built once per key (a fine-tuned checkpoint, say), as an entry of the contract.

    <folder>/
    ├── <the files build wrote>      plain files only (config.json, model.safetensors, trainer_state.json, ...)
    └── .hf_cachehooks.json          entry "folder", written last: the key and every file's size and hash

The manifest is hidden, so the folder's visible files are exactly what `build` wrote (a model folder loads,
and hashes, as it would without it). A folder without a sealed manifest for the same key is never reused.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .entry import commit, file_record, is_entry_file, open_entry, remove_entry
from .keys import Key

log = logging.getLogger(__name__)

MANIFEST = ".hf_cachehooks.json"
KIND = "folder"


def cached_folder(folder: str | os.PathLike, key: Key, build: Callable[[Path], object]) -> Path:
    """Return `folder`, built by `build` unless a finished build with the same key is there already.

    The folder is reused when its manifest (written after the build, listing every file) is sealed, is for
    `key`, and every file it lists still has its recorded size and content. Otherwise `build(scratch)` fills a
    fresh hidden sibling folder with plain files; the manifest is written into it, and it is renamed to
    `folder`, so a killed build leaves no folder that looks finished. An earlier build under another key, or
    a damaged one, is deleted first: only the files its manifest lists, and only while they hold what it
    recorded (a changed file is kept, and the folder is then refused).

    Args:
        folder: where the built files live.
        key: everything that changes what `build` writes (`make_key`): base model files, data, settings.
        build: writes the files into the folder it is given (plain files, no subfolders).

    Returns:
        `folder`.

    Raises:
        ConfigError: `folder` exists but holds no finished build of ours (a folder of yours, or files changed
            after the build: never deleted), or `build` left a subfolder, link or hidden file (the entry lists
            plain files only).

    Example:
        >>> key = make_key("finetune", {"base": hash_files([gguf]), "data": rows, "steps": 40})  # doctest: +SKIP
        >>> checkpoint = cached_folder(f"outputs/finetune/qa_{key.short}", key, train_and_save)  # doctest: +SKIP
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if open_entry(manifest, kind=KIND, digest=key.digest) is not None:  # a damaged entry is removed by the check
        log.info("Reusing %s: built before with the same key (%s).", folder, key.short)
        return folder
    if is_entry_file(manifest):
        log.info("%s was built with another key: deleting its files and building it again.", folder)
        remove_entry(manifest)  # its listed files, then the folder when that left it empty
    if folder.exists():
        raise ConfigError(
            f"{folder} exists but holds no finished build (no manifest {MANIFEST} for key {key.short}): it is not "
            "ours, or a damaged build's files changed since (kept: maybe yours). Move it away or pick another "
            "folder; it is never deleted."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = folder.with_name(f".{folder.name}.building-{uuid.uuid4().hex[:8]}")
    scratch.mkdir()
    try:
        build(scratch)
        odd = sorted(p.name for p in scratch.iterdir() if p.name.startswith(".") or p.is_symlink() or not p.is_file())
        if odd:
            raise ConfigError(
                f"build left {odd} in {folder}: the entry lists plain, visible files only (no folders, links or "
                "hidden names); write those elsewhere."
            )
        files = {p.name: file_record(p) for p in sorted(scratch.iterdir())}
        if not commit(scratch / MANIFEST, KIND, key, files, fields={"folder": folder.name}):
            raise ConfigError(f"Could not write the manifest of {folder}: is {folder.parent} writable?")
        os.rename(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # ours: a failed build's leftovers (gone after the rename)
    log.info("Built %s (key %s).", folder, key.short)
    return folder
