"""The machine as data: `Device` (GPU name, compute capability, the archs torch was built for, versions),
`DEVICES` literals for GPUs this project cannot borrow, and `detect_device` for the real one.

The speed-up policy (`capabilities.decide`) is a pure function of a `Device`, so an RTX 5090 or an A100 is
tested here on a CPU box through these literals.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
from dataclasses import dataclass

from ..errors import MissingDependencyError

logger = logging.getLogger(__name__)

SM_PATTERN = re.compile(r"^sm_(\d+)(\d)[a-z]*$")  # sm_86 -> (8, 6); sm_120 -> (12, 0); sm_90a -> (9, 0)
TORCH_FIX = "install a torch build for it (for sm_120: the CUDA 12.8 or newer wheels)"


@dataclass(frozen=True)
class Device:
    """The accelerator training would run on, as plain data.

    Args:
        kind: "cpu", "cuda" or "mps".
        name: what the driver calls it, e.g. "NVIDIA GeForce RTX 5090".
        capability: CUDA compute capability (major, minor); None off CUDA.
        arch_list: `torch.cuda.get_arch_list()` of the installed torch; empty means unknown.
        cpu_count: CPUs this process may use (sets the dataloader workers).
        torch_version, triton_version: installed versions ("" / None when absent).

    Example:
        >>> DEVICES["rtx5090"].sm, DEVICES["rtx5090"].bf16_ok, DEVICES["rtx5090_old_torch"].torch_supports_arch
        ('sm_120', True, False)
    """

    kind: str
    name: str
    capability: tuple[int, int] | None = None
    arch_list: tuple[str, ...] = ()
    cpu_count: int = 2
    torch_version: str = ""
    triton_version: str | None = None

    @property
    def sm(self) -> str | None:
        """The CUDA architecture name, e.g. "sm_120"; None off CUDA."""
        return None if self.capability is None else f"sm_{self.capability[0]}{self.capability[1]}"

    @property
    def is_ampere_or_newer(self) -> bool:
        """A CUDA GPU of compute capability 8.0 or higher (bf16, TF32, flash-attention)."""
        return self.kind == "cuda" and self.capability is not None and self.capability >= (8, 0)

    @property
    def bf16_ok(self) -> bool:
        """bf16 *training* is sensible: CUDA Ampere or newer.

        CPU bf16 autocast exists, but `TrainingArguments(bf16=True)` raises on a GPU-less box unless
        `use_cpu=True`, and without AVX512-BF16/AMX it is ~35x slower than fp32, so CPUs train in fp32.
        """
        return self.is_ampere_or_newer

    @property
    def fp16_ok(self) -> bool:
        """fp16 mixed precision with tensor cores: CUDA compute capability 7.0 (Volta) or newer."""
        return self.kind == "cuda" and self.capability is not None and self.capability >= (7, 0)

    @property
    def torch_supports_arch(self) -> bool:
        """The installed torch ships kernels for this GPU (True off CUDA, or when the arch list is unknown).

        Like torch's own check, a cubin for sm_XY runs on sm_XZ with Z >= Y, so sm_86 kernels cover an sm_89 GPU.
        """
        if self.kind != "cuda" or self.capability is None or not self.arch_list:
            return True
        major, minor = self.capability
        built = [m for m in (SM_PATTERN.match(arch) for arch in self.arch_list) if m]
        return any(int(m.group(1)) == major and int(m.group(2)) <= minor for m in built)


_NEW_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")  # a torch 2.8 cu128 wheel
_OLD_ARCHS = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")  # a torch 2.5 cu124 wheel


def _gpu(
    name: str,
    capability: tuple[int, int],
    arch_list: tuple[str, ...] = _NEW_ARCHS,
    torch_version: str = "2.8.0+cu128",
    triton_version: str = "3.4.0",
) -> Device:
    return Device("cuda", name, capability, arch_list, 16, torch_version, triton_version)


DEVICES: dict[str, Device] = {
    "cpu": Device("cpu", "AMD EPYC (AVX2)", None, (), 2, "2.13.0+cpu", None),
    "v100": _gpu("Tesla V100-SXM2-32GB", (7, 0), _OLD_ARCHS, "2.5.1+cu124", "3.1.0"),
    "t4": _gpu("Tesla T4", (7, 5)),
    "a100": _gpu("NVIDIA A100-SXM4-80GB", (8, 0)),
    "rtx3090": _gpu("NVIDIA GeForce RTX 3090", (8, 6)),
    "rtx4090": _gpu("NVIDIA GeForce RTX 4090", (8, 9)),
    "h100": _gpu("NVIDIA H100 80GB HBM3", (9, 0)),
    "rtx5090": _gpu("NVIDIA GeForce RTX 5090", (12, 0)),
    "rtx5090_old_torch": _gpu("NVIDIA GeForce RTX 5090", (12, 0), _OLD_ARCHS, "2.5.1+cu124", "3.1.0"),
}


def version_tuple(text: str | None) -> tuple[int, ...]:
    """Leading numeric parts of a version: "3.4.0+git1" -> (3, 4, 0); "" -> ()."""
    return tuple(int(part) for part in re.findall(r"\d+", (text or "").split("+")[0])[:3])


def installed(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def detect_device() -> Device:
    """Describe the device this process would train on (CUDA, then MPS, then CPU).

    Returns:
        A `Device` with the GPU's name, capability and torch's arch list, the usable CPUs and versions.

    Raises:
        MissingDependencyError: when torch is not installed.

    Example:
        >>> detect_device().kind in ("cpu", "cuda", "mps")
        True
    """
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("Device detection needs torch: pip install 'hf_cachehooks[models]'.") from exc
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    triton = installed("triton", "pytorch-triton", "triton-windows")
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        device = Device(
            "cuda",
            torch.cuda.get_device_name(index),
            (major, minor),
            tuple(torch.cuda.get_arch_list()),
            cpus,
            torch.__version__,
            triton,
        )
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = Device("mps", "Apple MPS", None, (), cpus, torch.__version__, triton)
    else:
        device = Device("cpu", _cpu_name(), None, (), cpus, torch.__version__, triton)
    logger.debug("Detected %s", device)
    return device
