"""Where this process stands in a launch (torchrun, accelerate launch): its rank, the process count, a barrier.

Read at call time from the environment (WORLD_SIZE, RANK) or the running process group; torch is imported
only inside the functions that need a process group, never when this module loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


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
