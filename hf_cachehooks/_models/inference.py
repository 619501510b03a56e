"""The load plan for inference: where a model given by path or name runs, in which dtype, with which
attention kernel, and whether its decode step is compiled; then what really took effect.

    plan = plan_load(device=None, dtype=None, compile_decode=False)   # decided before any weights load
    model, tokenizer, took_effect = load_planned("path/or/name", plan)  # took_effect goes into metadata

On CPU nothing changes: the model stays on the CPU in float32 (unless a dtype is given) with
transformers' default attention. On a CUDA GPU: `cuda:<LOCAL_RANK>` (so each torchrun / accelerate
rank gets its own GPU), bfloat16 when the GPU supports it and no dtype was given, the attention ladder
flash_attention_2 -> sdpa -> eager (each failed rung logged with its reason), and, when asked, a static
KV cache, with which transformers compiles the decode step. The dtype is decided without importing torch
when no NVIDIA driver is present, so a cache hit on a CPU machine stays torch-free.

The Trainer helper (`training/speedups.py`) plans training speed-ups from its own device probe; this
plan covers inference only (no optimizer, no mixed precision): the two share `loading.attention_ladder`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import loading  # called through the module, so a test's stand-in for load_weights is seen here
from .loading import ATTENTION_LADDER, attention_ladder

log = logging.getLogger(__name__)

STATIC_CACHE = "static"  # generation_config.cache_implementation that makes transformers compile the decode step


@dataclass(frozen=True)
class LoadPlan:
    """What a path-loaded model will get, decided before loading.

    Args:
        device: "cpu", "cuda:0", ... (the model is moved there after loading).
        dtype: the weights' dtype name ("float32", "bfloat16", ...); part of the cache key.
        attention: the attention ladder tried in order; None keeps transformers' default (CPU).
        compile_decode: use a static KV cache, so `generate` compiles the decode step.
        reasons: one line per decision that differs from what was asked or from the default.
    """

    device: str
    dtype: str
    attention: tuple[str, ...] | None
    compile_decode: bool
    reasons: tuple[str, ...] = ()


def cuda_present() -> bool:
    """A usable CUDA GPU: answered without importing torch when there is clearly none (CPU wheel, no driver)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if not _cuda_torch_installed():
        return False
    if not Path("/proc/driver/nvidia").exists() and not Path("/dev/nvidiactl").exists():
        return False
    import torch

    return bool(torch.cuda.is_available())


@functools.cache
def _cuda_torch_installed() -> bool:
    """torch is installed and not a CPU-only wheel: read from its metadata once per process (about 2 ms a read,
    on every cache hit otherwise); the torch a process imports cannot change under it."""
    try:
        return "+cpu" not in importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False


def _bf16_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_bf16_supported())


def resolve_device(device: str | None) -> str:
    """The device to run on: `device` when given, else this rank's GPU when there is one, else the CPU."""
    rank_gpu = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device is not None:
        return rank_gpu if device == "cuda" else device  # under a launcher, plain "cuda" means this rank's GPU
    return rank_gpu if cuda_present() else "cpu"


def resolve_dtype(dtype: str | None, device: str | None) -> str:
    """`dtype` when given; else bfloat16 on a GPU that supports it, float32 everywhere else.

    Called for the cache key, so on a CPU machine (or with an explicit dtype) it never imports torch.
    """
    if dtype is not None:
        return dtype
    return "bfloat16" if resolve_device(device).startswith("cuda") and _bf16_gpu() else "float32"


def plan_load(
    *, device: str | None = None, dtype: str | None = None, speedups: bool = True, compile_decode: bool = False
) -> LoadPlan:
    """Decide device, dtype, attention and decode compilation for a model about to be loaded.

    Args:
        device: where to run; None picks this rank's GPU, else the CPU.
        dtype: the weights' dtype; None picks bfloat16 on a bf16 GPU, else float32.
        speedups: False keeps transformers' default attention everywhere (the dtype rule still applies).
        compile_decode: ask for a compiled decode step (static KV cache); honoured on CUDA only.
    """
    where = resolve_device(device)
    on_gpu = where.startswith("cuda")
    chosen = resolve_dtype(dtype, where)
    reasons = []
    if dtype is None and chosen != "float32":
        reasons.append(f"dtype {chosen}: this GPU supports it (set model_dtype to choose another)")
    attention: tuple[str, ...] | None = None
    if speedups and on_gpu:
        first = ATTENTION_LADDER[0]
        if chosen not in ("bfloat16", "float16"):
            first = "sdpa"
            reasons.append(f"attention from sdpa: flash_attention_2 needs bfloat16 or float16 weights, not {chosen}")
        attention = attention_ladder(first)
    elif speedups:
        reasons.append("attention: transformers' default (no CUDA GPU)")
    compiled = compile_decode and on_gpu
    if compile_decode and not on_gpu:
        reasons.append("compile_decode skipped: it pays only on a CUDA GPU")
    return LoadPlan(where, chosen, attention, compiled, tuple(reasons))


def load_planned(
    name_or_path: str,
    plan: LoadPlan,
    *,
    head: str = "causal",
    gguf_file: str | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any, dict]:
    """Load model and tokenizer as `plan` says; return them with what took effect (for the entry's metadata)."""
    fallbacks: list[str] = []
    model = loading.load_weights(
        name_or_path,
        head=head,
        dtype=plan.dtype,
        gguf_file=gguf_file,
        attn_implementation=plan.attention,
        on_fallback=lambda rung, reason: fallbacks.append(f"{rung}: {reason}"),
        **from_pretrained_kwargs,
    )
    if plan.device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(plan.device)  # so a later `.to("cuda")` (e.g. EvalConfig.device) stays on this GPU
    if plan.device != "cpu":
        model.to(plan.device)
    if plan.compile_decode:
        model.generation_config.cache_implementation = STATIC_CACHE
    tokenizer = loading.load_tokenizer(name_or_path, gguf_file=gguf_file, **from_pretrained_kwargs)
    took_effect = in_effect(model)
    took_effect.update(attention_fallbacks=fallbacks, notes=list(plan.reasons))
    log.info(
        "Loaded %s on %s: dtype %s, attention %s%s.",
        name_or_path,
        took_effect["device"],
        took_effect["dtype"],
        took_effect["attention"],
        ", decode step compiled (static KV cache)" if took_effect["compile_decode"] else "",
    )
    return model, tokenizer, took_effect


def in_effect(model: Any) -> dict:
    """Device, dtype, attention implementation and decode compilation of a loaded model, as plain data."""
    params = next(iter(model.parameters()), None)
    generation = getattr(model, "generation_config", None)
    return {
        "device": str(params.device) if params is not None else "cpu",
        "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
        "attention": getattr(model.config, "_attn_implementation", None),
        "compile_decode": getattr(generation, "cache_implementation", None) == STATIC_CACHE,
    }
