"""What every benchmark records about the machine it ran on, so figures can be compared honestly; and a cold
page cache for the benchmarks that time cold reads."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LOAD_AT_START = os.getloadavg()  # taken when the benchmark imports this module, before it measures anything


def machine(libraries: Iterable[str]) -> dict:
    """Python, platform, CPU, load average at start and end, thread settings and library versions."""
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
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "loadavg_at_start": list(LOAD_AT_START),
        "loadavg_at_end": list(os.getloadavg()),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    return info


def drop_page_cache(folder: Path) -> None:
    """Drop the files under `folder` from the page cache (clean pages only: os.sync() first), for a cold read."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
