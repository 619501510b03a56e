"""Where this process stands in a launch (torchrun, accelerate launch): its rank, the process count, a barrier.

Read at call time from the environment (WORLD_SIZE, RANK) or the running process group; torch is imported
only inside the functions that need a process group, never when this module loads.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)
_GLOO: dict[int, Any] = {}  # process count -> the gloo group small objects travel over, made once per process


@dataclass(frozen=True)
class World:
    """This process's place in the launch: `rank` of `size` processes (size 1 without a launcher)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The launch as torchrun and accelerate describe it in the environment, read now."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return World()
    return World(rank, size) if size > 1 and 0 <= rank < size else World()


def current_world() -> World:
    """The running process group's rank and size when the script started one, else `world_from_env()`."""
    try:
        import torch.distributed as dist
    except ImportError:
        return world_from_env()
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return world_from_env()


def barrier(world: World) -> bool:
    """Wait until every process of a running group gets here; True when it waited.

    False with one process, or with ranks started by hand (RANK and WORLD_SIZE set, no process group):
    the caller then waits on something it can see, such as a file on disk.
    """
    if world.size <= 1:
        return False
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return True
    return False


def start_group(world: World, backend: str | None = "gloo", timeout: timedelta | None = None) -> None:
    """Start the process group the launcher describes when the script has not started one, and destroy it at
    exit (a group left to the interpreter's teardown can abort the process with "terminate called without an
    active exception"). `backend` None is torch's default for the device (NCCL for CUDA, else gloo)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    log.info("Starting a process group for rank %d of %d (from the launcher's environment).", world.rank, world.size)
    dist.init_process_group(backend, timeout=timeout)  # None: torch's default timeout
    atexit.register(_destroy_group)


def gloo_group() -> Any:
    """The gloo group over the running process group's processes that Python objects travel over, made once per
    process: None (the default group) when that is gloo already, else a gloo group beside it (e.g. beside NCCL)."""
    import torch.distributed as dist

    size = dist.get_world_size()
    if size not in _GLOO:
        _GLOO[size] = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _GLOO[size]


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
