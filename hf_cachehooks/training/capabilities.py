"""What this machine can run (`probe_availability`) and what a `SpeedupConfig` becomes on it (`decide`).

`decide` is a pure function of (config, device, availability), so the policy for an RTX 5090 or an A100 is
unit-tested on a CPU box with the literals in `DEVICES`; only the two probes touch torch.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

from ..errors import MissingDependencyError
from .config import SpeedupConfig
from .devices import TORCH_FIX, Device, version_tuple

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Availability:
    """What actually runs here, found by execution rather than version strings.

    Args:
        flash_attn: flash-attention 2 imports *and* (on CUDA) ran a tiny forward and backward.
        flash_attn_reason: the version when it works, else why not (the import or kernel error).
        sdpa: torch has `scaled_dot_product_attention`.
        compile, compile_reason: `torch.compile` can build kernels here, else why not.
        fused_adamw, fused_reason: `AdamW(fused=True)` took a step on this device, else the error.
    """

    flash_attn: bool
    flash_attn_reason: str
    sdpa: bool = True
    compile: bool = True
    compile_reason: str = ""
    fused_adamw: bool = True
    fused_reason: str = ""


def _describe(device: Device) -> str:
    return f"{device.name} ({device.sm})" if device.kind == "cuda" else device.kind.upper()


def _probe_flash_attn(device: Device, smoke_test: bool, *, torch_device: str = "cuda") -> tuple[bool, str]:
    try:
        import flash_attn
    except Exception as exc:  # ImportError, but also OSError / "undefined symbol" from a wheel built for another torch
        problem = (
            f"flash_attn does not import ({type(exc).__name__}: {exc}); pip install flash-attn --no-build-isolation"
        )
        if device.kind != "cuda":
            return False, f"flash-attention needs a CUDA GPU (this is {_describe(device)}); {problem}"
        return False, problem
    version = getattr(flash_attn, "__version__", "?")
    if device.kind != "cuda":
        return False, f"flash-attention needs a CUDA GPU (this is {_describe(device)}; flash_attn {version} installed)"
    if not smoke_test:
        return True, f"flash_attn {version} (imports; kernels not tested)"
    import torch

    try:  # importable is no proof: a build without this arch fails only when a kernel launches
        q = torch.randn(1, 8, 2, 64, device=torch_device, dtype=torch.float16, requires_grad=True)  # (b, seq, h, d)
        flash_attn.flash_attn_func(q, q, q, causal=True).float().sum().backward()
        if torch_device.startswith("cuda"):
            torch.cuda.synchronize()
    except Exception as exc:  # RuntimeError "no kernel image is available", "only supports Ampere GPUs or newer"
        return False, f"flash_attn {version} is installed but its kernels fail on {_describe(device)}: {exc}"
    return True, f"flash_attn {version} (forward+backward ran on {_describe(device)})"


def _triton_problem(device: Device, version: str) -> str | None:
    if device.capability and device.capability >= (12, 0) and version_tuple(version) < (3, 3):
        return f"Triton {version} cannot compile for {device.sm} (needs Triton >= 3.3); pip install -U triton"
    return None


def _probe_compile(device: Device) -> tuple[bool, str]:
    import torch

    if not hasattr(torch, "compile"):
        return False, f"torch {torch.__version__} has no torch.compile (needs torch >= 2.0)"
    if device.kind == "cuda":
        try:
            import triton
        except Exception as exc:
            return False, f"torch.compile on CUDA needs Triton ({type(exc).__name__}: {exc}); pip install -U triton"
        version = getattr(triton, "__version__", "")
        problem = _triton_problem(device, version)
        return (False, problem) if problem else (True, f"inductor with Triton {version}")
    if device.kind == "mps":
        return True, "inductor's MPS backend (experimental)"
    compilers = [c for c in (os.environ.get("CXX"), "g++", "c++") if c]
    found = next((path for path in map(shutil.which, compilers) if path), None)
    if found is None:
        return False, (
            "inductor on CPU needs a C++ compiler and none is on PATH (g++, c++ or $CXX); "
            "install one (apt-get install g++) or use torch_compile_backend='aot_eager'"
        )
    return True, f"inductor with C++ compiler {found}"


def _probe_fused_adamw(device: Device) -> tuple[bool, str]:
    import torch

    try:
        param = torch.zeros(1, requires_grad=True, device=device.kind)
        optimizer = torch.optim.AdamW([param], fused=True)
        param.grad = torch.ones_like(param)
        optimizer.step()
    except Exception as exc:  # "fused=True requires all the params to be ... supported devices", old torch on CPU
        return False, f"{type(exc).__name__}: {exc}"
    return True, f"fused AdamW stepped on {device.kind}"


def probe_availability(device: Device, smoke_test: bool = True) -> Availability:
    """Find out, by trying, which fast paths work on `device`.

    Args:
        device: from `detect_device()`; the probes run on its kind ("cuda" means the current GPU).
        smoke_test: on CUDA, run a tiny flash-attention forward+backward instead of trusting the import.

    Returns:
        An `Availability` whose reasons carry the versions or the exact errors.

    Raises:
        MissingDependencyError: when torch is not installed.

    Example:
        >>> probe_availability(DEVICES["cpu"]).flash_attn
        False
    """
    try:
        import torch.nn.functional as F
    except ImportError as exc:
        raise MissingDependencyError("Probing needs torch: pip install 'hf_cachehooks[models]'.") from exc

    flash_ok, flash_reason = _probe_flash_attn(device, smoke_test)
    compile_ok, compile_reason = _probe_compile(device)
    fused_ok, fused_reason = _probe_fused_adamw(device)
    available = Availability(
        flash_ok,
        flash_reason,
        hasattr(F, "scaled_dot_product_attention"),
        compile_ok,
        compile_reason,
        fused_ok,
        fused_reason,
    )
    logger.debug("Probed %s: %s", _describe(device), available)
    return available


@dataclass(frozen=True)
class Decision:
    """One setting: what was asked, what will run, and why.

    Args:
        setting: the `SpeedupConfig` field, e.g. "precision".
        requested: the config value ("auto", True, None = pick for me, ...).
        chosen: the value handed to `from_pretrained` / `TrainingArguments`.
        active: the speed-up runs in the asked-for form ("auto": its top rung); False when it is off or fell back.
        reason: why, in words for the log.
    """

    setting: str
    requested: Any
    chosen: Any
    active: bool
    reason: str


def _arch_problem(device: Device) -> str | None:
    if device.torch_supports_arch:
        return None
    return (
        f"torch {device.torch_version} has no {device.sm} kernels (built for {' '.join(device.arch_list)}), "
        f"so CUDA ops fail with 'no kernel image'; {TORCH_FIX}"
    )


def _precision(config: SpeedupConfig, device: Device) -> Decision:
    best = "bf16" if device.bf16_ok else "fp16" if device.fp16_ok else "fp32"
    where = _describe(device)
    asked = config.precision
    if asked == "auto":
        chosen, active = best, best != "fp32"
        reason = {
            "bf16": f"{where} supports bf16",
            "fp16": f"{where} has no bf16 (needs compute capability 8.0+); fp16 with loss scaling",
            "fp32": f"{where}: no fast bf16/fp16 training here; fp32",
        }[best]
    elif asked == "fp32" or (asked == "bf16" and device.bf16_ok) or (asked == "fp16" and device.fp16_ok):
        chosen, active, reason = asked, True, "as requested"
    else:
        chosen, active = ("fp16" if asked == "bf16" and device.fp16_ok else "fp32"), False
        if device.kind == "cpu" and asked == "bf16":
            reason = (
                "CPU: TrainingArguments(bf16=True) raises without use_cpu=True and CPU bf16 matmuls are slow "
                "on AVX2; training in fp32"
            )
        elif device.kind == "cuda":
            need = "8.0 (Ampere)" if asked == "bf16" else "7.0 (Volta)"
            reason = f"{where} has no {asked} (needs compute capability {need}); training in {chosen}"
        else:
            reason = f"{where}: {asked} mixed precision needs a CUDA GPU; training in {chosen}"
    problem = _arch_problem(device)
    return Decision("precision", asked, chosen, active, f"{reason}; warning: {problem}" if problem else reason)


def _attention(config: SpeedupConfig, device: Device, available: Availability, precision: str) -> Decision:
    asked = config.attn_implementation
    fallback = "sdpa" if available.sdpa else "eager"
    if asked in ("sdpa", "eager"):
        if asked == "sdpa" and not available.sdpa:
            return Decision("attn_implementation", asked, "eager", False, "torch has no scaled_dot_product_attention")
        return Decision("attn_implementation", asked, asked, True, "as requested")
    if device.kind != "cuda":
        why = f"flash-attention needs a CUDA GPU (this is {_describe(device)})"
    elif not device.is_ampere_or_newer:
        why = f"FA2 needs an Ampere or newer GPU; {_describe(device)} is compute capability {device.capability}"
    elif not device.torch_supports_arch:
        why = f"torch {device.torch_version} has no {device.sm} kernels"
    elif not available.flash_attn:
        why = available.flash_attn_reason
    elif precision not in ("bf16", "fp16"):
        why = f"FA2 needs fp16/bf16; precision is {precision}"
    else:
        return Decision("attn_implementation", asked, "flash_attention_2", True, available.flash_attn_reason)
    return Decision("attn_implementation", asked, fallback, False, f"{why}; using {fallback}")


def _compile(config: SpeedupConfig, device: Device, available: Availability) -> Decision:
    if not config.torch_compile:
        return Decision("torch_compile", False, False, False, "off")
    if not available.compile:
        why = available.compile_reason
    elif device.kind == "cuda" and not device.torch_supports_arch:
        why = _arch_problem(device) or ""
    elif device.kind == "cuda" and device.capability and device.capability < (7, 0):
        why = f"Triton needs compute capability 7.0+; {_describe(device)} is older"
    elif device.kind == "cuda" and device.triton_version and _triton_problem(device, device.triton_version):
        why = _triton_problem(device, device.triton_version) or ""
    else:
        mode = config.torch_compile_mode or "default"
        return Decision(
            "torch_compile",
            True,
            True,
            True,
            f"backend={config.torch_compile_backend}, mode={mode}; the first steps include compile time",
        )
    return Decision("torch_compile", True, False, False, why)


def decide(config: SpeedupConfig, device: Device, available: Availability) -> list[Decision]:
    """Turn a `SpeedupConfig` into what will really run on `device`, one `Decision` per setting, with reasons.

    Pure: no torch calls, so every device is testable with `DEVICES` and a hand-made `Availability`.

    Args:
        config: what the user asked for.
        device: from `detect_device()` or `DEVICES`.
        available: from `probe_availability()`.

    Returns:
        Decisions for precision, tf32, attn_implementation, torch_compile, optimizer, dataloader_num_workers,
        pad_to_multiple_of and gradient_checkpointing, in that order.

    Example:
        >>> full = Availability(flash_attn=True, flash_attn_reason="flash_attn 2.8.3")
        >>> [d.chosen for d in decide(SpeedupConfig(), DEVICES["a100"], full)][:3]
        ['bf16', True, 'flash_attention_2']
    """
    where = _describe(device)
    precision = _precision(config, device)
    if not config.tf32:
        tf32 = Decision("tf32", False, False, False, "off")
    elif device.is_ampere_or_newer:
        note = " (under bf16 autocast only the remaining fp32 matmuls)" if precision.chosen == "bf16" else ""
        tf32 = Decision("tf32", True, True, True, f"TF32 matmuls on {where}{note}")
    else:
        tf32 = Decision("tf32", True, False, False, f"TF32 needs an Ampere or newer GPU (this is {where})")
    compiled = _compile(config, device, available)
    if config.optimizer != "adamw_torch_fused":
        optimizer = Decision("optimizer", config.optimizer, config.optimizer, True, "as requested")
    elif available.fused_adamw:
        optimizer = Decision("optimizer", config.optimizer, config.optimizer, True, f"fused AdamW kernel on {where}")
    else:
        optimizer = Decision(
            "optimizer",
            config.optimizer,
            "adamw_torch",
            False,
            f"fused AdamW does not run here ({available.fused_reason}); using adamw_torch",
        )
    if config.num_workers is not None:
        workers, why = config.num_workers, "as requested"
    else:
        workers = min(4, max(0, device.cpu_count - 1))
        why = (
            f"min(4, CPUs - 1) with {device.cpu_count} CPUs, one left for the training loop"
            if workers
            else f"{device.cpu_count} CPU: batches load in the main process"
        )
    if config.pad_to_multiple_of is not None:
        pad, pad_why = config.pad_to_multiple_of, "as requested"
    elif compiled.active:
        pad, pad_why = 64, "fixed shapes avoid recompiles under torch.compile"
    elif device.kind == "cuda":
        pad, pad_why = 8, "tensor-core friendly"
    else:
        pad, pad_why = None, f"no compile and no tensor cores on {where}: pad to the longest in each batch"
    checkpointing = config.gradient_checkpointing
    return [
        precision,
        tf32,
        _attention(config, device, available, precision.chosen),
        compiled,
        optimizer,
        Decision("dataloader_num_workers", config.num_workers, workers, workers > 0, why),
        Decision("pad_to_multiple_of", config.pad_to_multiple_of, pad, pad is not None, pad_why),
        Decision(
            "gradient_checkpointing",
            checkpointing,
            checkpointing,
            checkpointing,
            "trades ~20% speed for activation memory" if checkpointing else "off",
        ),
    ]


def decisions_table(decisions: list[Decision]) -> str:
    """A fixed-width table (setting | requested | chosen | active | reason) for the log.

    `None` shows as "auto" under requested and "off" under chosen.

    Example:
        >>> print(decisions_table([Decision("tf32", True, False, False, "TF32 needs an Ampere or newer GPU")]))
        setting | requested | chosen | active | reason
        --------+-----------+--------+--------+----------------------------------
        tf32    | True      | False  | ✗      | TF32 needs an Ampere or newer GPU
    """
    header = ("setting", "requested", "chosen", "active", "reason")
    rows = [header] + [
        (
            d.setting,
            "auto" if d.requested is None else str(d.requested),
            "off" if d.chosen is None else str(d.chosen),
            "✓" if d.active else "✗",
            d.reason,
        )
        for d in decisions
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)
