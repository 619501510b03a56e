"""How a model folder or Hub name becomes a model and its tokenizer: the one loader every caller uses.

`load_model` picks the head (causal LM, sequence classifier, or the bare base model), the weights'
dtype, an optional GGUF file, and the attention implementation. A sequence of implementations is a
ladder tried in order (flash_attention_2 -> sdpa -> eager): transformers has no fallback of its own
from flash_attention_2, it raises, so each rung that fails is logged with its reason and the next is
tried. torch and transformers are imported only when a model is really loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from .._core.extras import requires_extras
from ..errors import ConfigError
from .sources import check_gguf_given

log = logging.getLogger(__name__)

ATTENTION_LADDER = ("flash_attention_2", "sdpa", "eager")
HEADS = {"causal": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification", "base": "AutoModel"}
# from_pretrained options that say where the files are and may be trusted: the tokenizer gets them too.
_SHARED_WITH_TOKENIZER = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code")


class LoadSettings(Protocol):
    """How to load a model by path or name (`EvalConfig` is one)."""

    @property
    def task(self) -> str: ...
    @property
    def model_dtype(self) -> str | None: ...
    @property
    def gguf_file(self) -> str | None: ...
    @property
    def load_kwargs(self) -> Mapping[str, Any]: ...


def load_options(config: LoadSettings, dtype: str) -> dict:
    """How a path is turned into a model, with `dtype` the one resolved for this load (never None): part of the
    files-state memo key, not of the cache key. The one spelling for `evaluate_model` and the saved-checkpoint
    bridge (`saved.path_load_options`), so the two files states meet."""
    return {
        "task": config.task,
        "dtype": dtype,
        "gguf_file": config.gguf_file,
        "load_kwargs": dict(config.load_kwargs),
    }


def attention_ladder(first: str) -> tuple[str, ...]:
    """`first` and the rungs below it, e.g. "sdpa" -> ("sdpa", "eager"); an unknown name is tried alone."""
    return ATTENTION_LADDER[ATTENTION_LADDER.index(first) :] if first in ATTENTION_LADDER else (first,)


def _torch_dtype(dtype: Any) -> Any:
    if dtype is None or not isinstance(dtype, str) or dtype == "auto":
        return dtype
    with requires_extras("Loading a model"):
        import torch

    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"dtype {dtype!r} is not a torch dtype. Use float32, float16, bfloat16 or auto.")
    return value


def load_weights(
    name_or_path: str,
    *,
    head: str = "causal",
    dtype: Any = "float32",
    gguf_file: str | None = None,
    attn_implementation: str | Sequence[str] | None = None,
    on_fallback: Callable[[str, str], None] | None = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """The model alone (no tokenizer), in eval mode: `load_model` without the tokenizer.

    Args:
        on_fallback: called with (implementation, reason) for each attention implementation that failed
            before one loaded.
    """
    if head not in HEADS:
        raise ConfigError(f"head={head!r} is not one of {', '.join(HEADS)}.")
    check_gguf_given(name_or_path, gguf_file, from_pretrained_kwargs.get("subfolder"))
    with requires_extras(f"Loading {name_or_path}"):
        import transformers

    auto = getattr(transformers, HEADS[head])
    options = dict(from_pretrained_kwargs)
    if dtype is not None:
        options["dtype"] = _torch_dtype(dtype)
    if gguf_file:
        options["gguf_file"] = gguf_file
    if attn_implementation is None:
        rungs: list[str | None] = [None]  # transformers' own default
    elif isinstance(attn_implementation, str):
        rungs = [attn_implementation]
    else:
        rungs = list(attn_implementation)
        if not rungs:
            raise ConfigError("attn_implementation is an empty sequence; give at least one, e.g. ('sdpa', 'eager').")
    log.info("Loading %s ...", name_or_path)
    for i, rung in enumerate(rungs):
        attention = {} if rung is None else {"attn_implementation": rung}
        try:
            model = auto.from_pretrained(name_or_path, **attention, **options)
            break
        except (ImportError, ValueError) as exc:  # what transformers raises for an unavailable kernel
            if i == len(rungs) - 1:
                raise  # the last rung's error is the user's to see, unchanged
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            log.warning("attn_implementation=%s failed (%s); trying %s.", rung, reason, rungs[i + 1])
            if on_fallback is not None:
                on_fallback(str(rung), reason)
    if rungs[0] is not None and rung != rungs[0]:
        log.warning("Using attn_implementation=%s instead of %s.", rung, rungs[0])
    return model.eval()


def load_tokenizer(name_or_path: str, *, gguf_file: str | None = None, **from_pretrained_kwargs: Any) -> Any:
    """The tokenizer stored with a model (in its GGUF file when `gguf_file` is given)."""
    check_gguf_given(name_or_path, gguf_file, from_pretrained_kwargs.get("subfolder"))
    with requires_extras(f"Loading the tokenizer of {name_or_path}"):
        from transformers import AutoTokenizer

    options = {k: v for k, v in from_pretrained_kwargs.items() if k in _SHARED_WITH_TOKENIZER}
    if gguf_file:
        options["gguf_file"] = gguf_file
    return AutoTokenizer.from_pretrained(name_or_path, **options)


def load_model(
    name_or_path: str,
    *,
    head: str = "causal",
    dtype: Any = "float32",
    gguf_file: str | None = None,
    attn_implementation: str | Sequence[str] | None = None,
    on_fallback: Callable[[str, str], None] | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any]:
    """Model (in eval mode) and tokenizer from a folder or Hub name.

    Args:
        head: "causal" (a language model), "classification" (a sequence classifier) or "base" (the bare
            model without a head, e.g. an encoder such as MiniLM).
        dtype: the weights' dtype: a name ("float32", "bfloat16", "auto") or a torch.dtype.
        gguf_file: a GGUF file inside the folder to read weights and tokenizer from.
        attn_implementation: one implementation, or a ladder tried in order; None leaves transformers'
            default. Each rung but the last that raises ImportError or ValueError is logged and skipped.
        on_fallback: called with (implementation, reason) for each rung that failed.
        **from_pretrained_kwargs: passed to `from_pretrained` (revision, subfolder, token ... also reach
            the tokenizer).

    Returns:
        (model, tokenizer). The model's `config._attn_implementation` says which implementation loaded.

    Raises:
        ConfigError: an unknown head or dtype, an empty ladder, or a folder of GGUF weights without `gguf_file`.

    Example:
        >>> model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct", dtype="bfloat16",
        ...                               attn_implementation=ATTENTION_LADDER)  # doctest: +SKIP
    """
    model = load_weights(
        name_or_path,
        head=head,
        dtype=dtype,
        gguf_file=gguf_file,
        attn_implementation=attn_implementation,
        on_fallback=on_fallback,
        **from_pretrained_kwargs,
    )
    return model, load_tokenizer(name_or_path, gguf_file=gguf_file, **from_pretrained_kwargs)


def load_config(name_or_path: str, *, gguf_file: str | None = None, **from_pretrained_kwargs: Any) -> Any:
    """The model's config alone (no weights): enough to check layer numbers before a load."""
    check_gguf_given(name_or_path, gguf_file, from_pretrained_kwargs.get("subfolder"))
    with requires_extras(f"Reading the config of {name_or_path}"):
        from transformers import AutoConfig

    options = {k: v for k, v in from_pretrained_kwargs.items() if k in _SHARED_WITH_TOKENIZER + ("subfolder",)}
    if gguf_file:
        options["gguf_file"] = gguf_file
    return AutoConfig.from_pretrained(name_or_path, **options)
