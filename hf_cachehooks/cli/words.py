"""The command line's words for library messages: the library names its Python arguments, the CLI its flags.

Every printed error goes through `in_cli_words` (`main`); the activation commands, whose library messages
name their own arguments (`folder=`, `force=True`, ...), also go through `as_flags` (`says_flags`).
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
from collections.abc import Callable

from ..errors import HFCacheHooksError

# Python argument -> flag, for every command (the cache settings every command shares)
CACHE_WORDS = (
    ("cache=CacheConfig(root=...)", "--cache-dir DIR"),
    ("the root argument", "--cache-dir"),
    ("cache=CacheConfig(max_age=...)", "--max-age"),
)
# a model-loading argument with its value, e.g. gguf_file="m.gguf" -> --gguf-file m.gguf (every command)
_GGUF_FILE = re.compile(r'\bgguf_file="([^"]*)"')

# Python argument -> flag, for the activation commands only ("folder=" is another thing elsewhere)
ACTIVATION_FLAGS = {
    "force=True": "--force",
    "folder=": "--output",
    "text_field=": "--text-field",
    "label_field=": "--label-field",
    "layers=": "--layers",
    "positive=": "--positive",
}
_ARGUMENT = re.compile(r"\b(" + "|".join(map(re.escape, ACTIVATION_FLAGS)) + r")(\S?)")


def in_cli_words(message: str) -> str:
    """A library message with the cache and model arguments it names replaced by this command line's flags."""
    for argument, flag in CACHE_WORDS:
        message = message.replace(argument, flag)
    return _GGUF_FILE.sub(lambda match: "--gguf-file " + shlex.quote(match[1]), message)


def as_flags(message: str) -> str:
    """`message` in the activation commands' words: "force=True" -> "--force", "folder='a'" -> "--output 'a'",
    "cache_activations" -> "cache-activations"."""

    def flag(match: re.Match) -> str:
        after = match[2]  # a value follows the flag after a space; punctuation stays where it is
        return ACTIVATION_FLAGS[match[1]] + (" " if after and after not in ",.;:)" else "") + after

    return _ARGUMENT.sub(flag, re.sub(r"\bcache_activations\b", "cache-activations", message))


def says_flags(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`command` with its errors' fixes in the words of the command line (see `as_flags`)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except HFCacheHooksError as exc:
            message = as_flags(str(exc))
            if message == str(exc):
                raise
            raise type(exc)(message) from exc

    return run
