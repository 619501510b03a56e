"""Generation shared out across the processes of one launch (torchrun, accelerate launch), one cache for all.

Rank 0 alone talks to the generation cache: it looks the sample set up, and on a miss every batch of
prompts the cache asks for is split across the ranks. Rank 0 broadcasts the work, each rank completes
its share of the batches, and a gather brings the texts back to rank 0, which stores them. The messages
travel over the same gloo group `evaluate_model` uses under a launcher (`evaluation/distributed.py`), made
beside the script's own group when that one is NCCL.
The other ranks only follow (`follow`) until rank 0 broadcasts the result. So the cache entry is the same
whatever the process count: a sample set made by 2 processes is a full hit for 1, and a run killed on 2
resumes on 3 (the cache saves after every chunk).

Batch j of a request is always generated alone with seed `seed + j`, on whichever rank takes it, so the
samples do not depend on the number of processes either. With one process nothing here imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .._core.launch import World, world_from_env
from ..errors import HFCacheHooksError
from ..evaluation.distributed import Collective
from ..generation.backends import Backend, Sampling

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes, starting the gloo group torchrun describes if needed.

    Without a launcher (no WORLD_SIZE > 1 in the environment) it is (0, 1), and torch is not imported.
    """
    world = world_from_env()
    if world.size > 1:
        Collective(world)  # starts the process group when the script has not
    return world.rank, world.size


def _comm(rank: int, world: int) -> Collective:
    return Collective(World(rank, world))


def _share(
    backend: Backend, prompts: Sequence[str], sampling: Sampling, batch_size: int, rank: int, world: int
) -> dict[int, str | None]:
    """This rank's batches (j % world == rank) of a request, each generated alone with seed `seed + j`."""
    out: dict[int, str | None] = {}
    for j, start in enumerate(range(0, len(prompts), batch_size)):
        if j % world != rank:
            continue
        seed = None if sampling.seed is None else sampling.seed + j
        texts = backend.complete(list(prompts[start : start + batch_size]), replace(sampling, seed=seed))
        out.update(zip(range(start, start + len(texts)), texts))
    return out


# the inner backend's attributes this wrapper must not show (see `ShardedBackend.__getattr__`)
_NOT_FORWARDED = frozenset({"complete_samples", "errors"})


@dataclass
class ShardedBackend:
    """The backend the generation cache sees on rank 0: each request's batches are spread over every rank.

    Args:
        inner: the real backend (every rank holds one; a lazy one loads its model only when work arrives).
        batch_size: prompts per batch, the unit of work and of seeding.
        rank, world: from `rank_and_world`.
    """

    inner: Backend
    batch_size: int = 8
    rank: int = 0
    world: int = 1
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or getattr(self.inner, "name", "?")  # recorded in the entry's metadata

    def __getattr__(self, attribute: str) -> Any:
        """Everything else is the inner backend's: what keys the samples (`use_chat_template`, `system_prompt`,
        `tokenizer`, ...) must reach the generation cache through this wrapper, whatever it reads next.

        Not forwarded: the ways to do the work that would bypass the sharding (`complete_samples`), and the
        inner backend's per-call `errors`, whose indices are those of one batch, not of the request.
        """
        if attribute in _NOT_FORWARDED or attribute.startswith("__") or attribute == "inner":
            raise AttributeError(attribute)  # "inner" too: never recurse while the object is half-built
        return getattr(self.inner, attribute)

    def render(self, prompts: Sequence[str]) -> list[str]:
        return self.inner.render(prompts)

    def complete(self, prompts: Sequence[str], sampling: Sampling) -> list[str | None]:
        if self.world == 1:
            done = _share(self.inner, prompts, sampling, self.batch_size, 0, 1)
            return [done[i] for i in range(len(prompts))]
        comm = _comm(0, self.world)
        comm.broadcast(("work", list(prompts), sampling))
        parts = comm.gather(_guarded(self.inner, prompts, sampling, self.batch_size, 0, self.world)) or []
        failed = [p[1] for p in parts if isinstance(p, tuple)]
        if failed:
            raise HFCacheHooksError(f"A rank failed while generating: {failed[0]}")
        merged: dict[int, str | None] = {}
        for part in parts:
            merged.update(part)
        return [merged[i] for i in range(len(prompts))]


def _guarded(
    backend: Backend, prompts: Sequence[str], sampling: Sampling, batch_size: int, rank: int, world: int
) -> Any:
    """A rank's share, or ("error", message): a failing rank must still answer the gather, never hang it."""
    try:
        return _share(backend, prompts, sampling, batch_size, rank, world)
    except Exception as exc:  # noqa: BLE001  (reported to rank 0, which raises it for everyone)
        log.exception("Rank %d failed while generating", rank)
        return ("error", f"rank {rank}: {type(exc).__name__}: {exc}")


def lead(result: Any, world: int) -> Any:
    """Rank 0, when done: send `result` (plain data) to the followers; returns it."""
    _last_word(("done", result), world)
    return result


def abort(message: str, world: int) -> None:
    """Rank 0, on an error: release the followers, which raise it too."""
    _last_word(("error", message), world)


def _last_word(message: tuple, world: int) -> None:
    """Rank 0's final message to the followers; every rank has it before any process may exit."""
    if world > 1:
        comm = _comm(0, world)
        comm.broadcast(message)
        comm.barrier()


def follow(backend: Backend, batch_size: int, rank: int, world: int) -> Any:
    """Ranks 1..n: complete the shares rank 0 sends until it sends the result, and return that result.

    Raises:
        HFCacheHooksError: rank 0 failed (its message).
    """
    comm = _comm(rank, world)
    while True:
        message = comm.broadcast(None)
        if message[0] in ("done", "error"):
            comm.barrier()  # as rank 0 does after sending it
        if message[0] == "done":
            return message[1]
        if message[0] == "error":
            raise HFCacheHooksError(f"Rank 0 failed: {message[1]}")
        _, prompts, sampling = message
        comm.gather(_guarded(backend, prompts, sampling, batch_size, rank, world))
