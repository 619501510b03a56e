"""What every benchmark records about the machine it ran on, so figures can be compared honestly."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version


def machine(libraries: Iterable[str]) -> dict:
    """Python, platform, CPU model and count, torch threads (if torch is loaded) and library versions."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for lib in libraries:
        try:
            versions[lib] = version(lib)
        except PackageNotFoundError:
            versions[lib] = None
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "versions": versions}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    return info
