"""Rows and names every feature shares: reading records from lists, datasets or JSON files; file-safe model names."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import orjson


def load_rows(data: Any) -> list[dict]:
    """Rows from a list of dicts, a `datasets.Dataset`, or a .json / .jsonl file."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        raw = path.read_bytes()
        if path.suffix == ".jsonl":
            return [orjson.loads(line) for line in raw.splitlines() if line.strip()]
        loaded = orjson.loads(raw)
        return loaded["data"] if isinstance(loaded, dict) and "data" in loaded else loaded
    if hasattr(data, "to_list"):
        return data.to_list()
    return list(data)


def short_name(model_name: str) -> str:
    """A file-name-safe model name: `Qwen/Qwen2.5-3B-Instruct` -> `Qwen2_5-3B-Instruct`."""
    base = model_name.rstrip("/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9_-]", "_", base)
