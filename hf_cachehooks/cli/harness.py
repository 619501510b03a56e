"""The `lm-eval` command: lm-evaluation-harness's own CLI, with the model `hf-cachehooks` registered.

lm-eval finds models only in its registry, filled by imports (it reads no plugin entry points, and
`--include_path` adds tasks, not models), so `lm_eval --model hf-cachehooks` alone does not know the name.
`hf-cachehooks lm-eval ARGS...` imports `harness.model` (which registers it) and runs lm-eval's CLI with
ARGS unchanged: every lm-eval flag, subcommand (`run`, `ls`, `validate`) and exit code is lm-eval's.
"""

from __future__ import annotations

import os
import sys

from .._core.extras import missing_dependency

LM_EVAL = "lm-eval"


def split_lm_eval(argv: list[str]) -> tuple[str | None, list[str]] | None:
    """(cache dir or None, lm-eval's arguments) when `argv` runs the `lm-eval` command, else None.

    The one option of ours allowed before the command is `--cache-dir DIR` (or `--cache-dir=DIR`).

    Example:
        >>> split_lm_eval(["--cache-dir", "c", "lm-eval", "--model", "hf-cachehooks"])
        ('c', ['--model', 'hf-cachehooks'])
    """
    cache_dir = None
    rest = list(argv)
    if rest[:1] == ["--cache-dir"] and len(rest) >= 2:
        cache_dir, rest = rest[1], rest[2:]
    elif rest[:1] and rest[0].startswith("--cache-dir="):
        cache_dir, rest = rest[0].split("=", 1)[1], rest[1:]
    if rest[:1] != [LM_EVAL]:
        return None
    return cache_dir, rest[1:]


def run_lm_eval(args: list[str], cache_dir: str | None = None) -> int:
    """Run lm-eval's CLI on `args` with `hf-cachehooks` registered; its exit code.

    `cache_dir` sets $HF_CACHEHOOKS_HOME for the run (a `cache_dir=` in `--model_args` wins over it).
    """
    try:
        from lm_eval.__main__ import cli_evaluate

        from ..harness import model  # noqa: F401  registers `hf-cachehooks` with lm-eval
    except ModuleNotFoundError as exc:
        raise (missing_dependency(exc, "hf-cachehooks lm-eval") or exc) from exc
    if cache_dir:
        os.environ["HF_CACHEHOOKS_HOME"] = cache_dir
    saved = sys.argv
    sys.argv = [LM_EVAL, *args]  # lm-eval's CLI reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0
