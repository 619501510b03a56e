"""Where a model's files are: the ones `from_pretrained` reads for a path or Hub name, found without the network.

A local folder, or the Hub-cache snapshot of the revision asked for; `load_kwargs["subfolder"]`; the GGUF
file wherever it lies; an adapter folder's base model. `identity.files_state` hashes exactly these, so the
remembered identity of a path follows what is actually loaded. What cannot be found offline is None: then
nothing is remembered and the model is loaded on every run.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from ..errors import ConfigError

log = logging.getLogger(__name__)

# Files in a model folder whose content decides what the model computes.
_MODEL_FILE_SUFFIXES = {".safetensors", ".bin", ".gguf", ".json", ".model", ".txt", ".jinja", ".py", ".tiktoken"}
_COMMIT = re.compile(r"[0-9a-f]{40}")  # a Hub commit hash, as huggingface_hub matches it
_ADAPTER_CONFIG = "adapter_config.json"


def split_hub_path(name_or_path: str) -> tuple[str, str | None]:
    """Map `.../models--org--name/snapshots/<sha>[/...]` to ("org/name", sha); other names pass through.

    A Hub repo id is resolved to the commit its `main` ref points at in the local Hub cache.
    """
    parts = Path(name_or_path).parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--") :].replace("--", "/"), parts[i + 2]
    if os.path.isdir(name_or_path):
        return Path(name_or_path).resolve().name, None
    ref = hub_cache_dir() / ("models--" + name_or_path.replace("/", "--")) / "refs" / "main"
    try:
        return name_or_path, ref.read_text().strip()
    except OSError:
        return name_or_path, None


def hub_cache_dir() -> Path:
    """The Hub cache, read from the environment now, as huggingface_hub would resolve it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def model_files(folder: Path | str, subfolder: str | None = None, gguf: bool = True) -> list[str]:
    """The files in a model folder that decide its output, as paths (its GGUF files only when `gguf`).

    With `subfolder` (transformers' `from_pretrained(..., subfolder=...)`), the files of
    `folder/subfolder` count too: the weights and config load from there, the tokenizer from `folder`.
    """
    top = os.fspath(folder)
    folders = [top, os.path.join(top, subfolder)] if subfolder else [top]
    files = []
    for where in folders:
        try:
            with os.scandir(where) as found:  # the file type comes with the listing: no stat per file
                for e in found:
                    suffix = os.path.splitext(e.name)[1]
                    if (
                        not e.name.startswith(".")
                        and suffix in _MODEL_FILE_SUFFIXES
                        and (gguf or suffix != ".gguf")
                        and e.is_file()
                    ):
                        files.append(os.path.join(where, e.name))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return files


def resolve_local_folder(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> Path | None:
    """The local folder `from_pretrained(name_or_path, revision=revision)` reads, found without the network.

    A local folder is itself (transformers ignores `revision` for it). A Hub name is the snapshot of
    `revision` in the Hub cache (`cache_dir`, else $HF_HUB_CACHE): a 40-hex commit as it is, a branch or
    tag through `refs/<revision>`, None meaning `main`, as huggingface_hub resolves it offline. None when
    there is no such snapshot.
    """
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    repo = (Path(cache_dir).expanduser() if cache_dir else hub_cache_dir()) / (
        "models--" + name_or_path.replace("/", "--")
    )
    commit = revision if revision is not None and _COMMIT.fullmatch(revision) else _read_ref(repo, revision or "main")
    if commit is None:
        return None
    snap = repo / "snapshots" / commit
    return snap if snap.is_dir() else None


def _read_ref(repo: Path, revision: str) -> str | None:
    """The commit `refs/<revision>` names (`refs/pr/1` included); None for a missing ref or a name that is not one."""
    if os.path.isabs(revision) or any(part in ("", ".", "..") for part in revision.split("/")):
        return None
    try:
        commit = (repo / "refs" / revision).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def resolve_files(name_or_path: str, load_options: Mapping[str, Any]) -> dict[str, tuple[str | None, list[str]]] | None:
    """The files `from_pretrained` loads for `name_or_path` with these options, as {group: (base, paths)}
    (each path named relative to its group's base); None when they cannot all be found without the network.

    Found as transformers finds them: the folder `resolve_local_folder` gives for `load_kwargs["revision"]`
    (and `cache_dir`), with `load_kwargs["subfolder"]`; `gguf_file` joined to that folder (an absolute path
    stays as it is, and a path that exists from the working directory is the one the weights load from);
    for an adapter folder without a config.json of its own, the base model its `adapter_config.json` names,
    at the same revision and subfolder.

    Raises:
        ConfigError: `gguf_file` is not there in a local model folder, or is missing for a folder that holds
            only GGUF weights (`check_gguf_given`).
    """
    load_kwargs = load_options.get("load_kwargs") or {}
    if not isinstance(load_kwargs, Mapping):
        load_kwargs = {}
    revision, cache_dir, subfolder = (
        str(load_kwargs[name]) if load_kwargs.get(name) else None for name in ("revision", "cache_dir", "subfolder")
    )
    gguf_file = load_options.get("gguf_file")
    check_gguf_given(name_or_path, gguf_file, subfolder)
    folder = resolve_local_folder(name_or_path, revision, cache_dir)
    if folder is None:
        return None
    groups: dict[str, tuple[str | None, list[str]]] = {
        "model": (os.fspath(folder), model_files(folder, subfolder, gguf=not gguf_file))
    }
    if gguf_file:
        found = _gguf_files(name_or_path, folder, str(gguf_file), subfolder or "")
        if found is None:
            return None
        groups["gguf"] = (None, found)
    adapter = os.path.join(folder, subfolder or "", _ADAPTER_CONFIG)
    # transformers loads the base, then the adapter over it, unless the path is a full model of its own
    if os.path.isfile(adapter) and not os.path.exists(os.path.join(name_or_path, "config.json")):
        try:
            base = orjson.loads(Path(adapter).read_bytes()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            return None
        base_folder = resolve_local_folder(base, revision, cache_dir) if isinstance(base, str) and base else None
        if base_folder is None:
            log.info(
                "The base model %r of adapter %s is not on this machine: its identity is not remembered, so "
                "it is loaded on every run.",
                base,
                name_or_path,
            )
            return None
        groups["base"] = (os.fspath(base_folder), model_files(base_folder, subfolder))
    return groups


def check_gguf_given(name_or_path: str, gguf_file: Any, subfolder: str | None = None) -> None:
    """Refuse a local folder that holds GGUF weights but no config.json when no `gguf_file` names one.

    transformers would fail with a bare ValueError ("Unrecognized model ... config.json"); this says which
    GGUF files are there and how to pass one.

    Raises:
        ConfigError: the folder holds only GGUF weights and `gguf_file` is not given.
    """
    if gguf_file or not os.path.isdir(name_or_path):
        return
    folders = [name_or_path, os.path.join(name_or_path, subfolder)] if subfolder else [name_or_path]
    if any(os.path.isfile(os.path.join(where, name)) for where in folders for name in ("config.json", _ADAPTER_CONFIG)):
        return
    ggufs = sorted(os.path.basename(path) for path in model_files(name_or_path, subfolder) if path.endswith(".gguf"))
    if ggufs:
        raise ConfigError(
            f"The model folder {name_or_path!r} holds no config.json, only GGUF weights: {', '.join(ggufs)}. "
            f'Name the one to load with gguf_file="{ggufs[0]}".'
        )


def _gguf_files(name_or_path: str, folder: Path, gguf_file: str, subfolder: str) -> list[str] | None:
    """The GGUF file(s) transformers reads for `gguf_file`: the weights from `gguf_file` itself when that is a
    file (an absolute path, or one relative to the working directory), else from the folder; the config from
    `folder/subfolder/gguf_file`, the tokenizer from `folder/gguf_file` (an absolute `gguf_file` is itself)."""
    in_folder = os.path.join(folder, subfolder, gguf_file)
    weights = os.path.abspath(gguf_file) if os.path.isfile(gguf_file) else in_folder
    found = [
        path for path in dict.fromkeys((weights, in_folder, os.path.join(folder, gguf_file))) if os.path.isfile(path)
    ]
    if weights in found:
        return found
    if os.path.isdir(name_or_path):
        raise ConfigError(
            f"gguf_file={gguf_file!r} is not a file: looked for {weights}. Give the GGUF file's path inside the "
            f"model folder {os.fspath(folder)!r} (e.g. 'model.gguf' or 'q4/model.gguf') or an absolute path."
        )
    return None  # a Hub snapshot without it yet: transformers downloads it, so nothing is remembered
