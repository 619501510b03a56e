"""`evaluate_model` under `torchrun` / `accelerate launch`: shard the examples, gather on rank 0.

Nothing here is rank-specific on disk: every rank writes its finished batches as per-example shards of
the shared prediction cache (keyed by predictor and example, never by rank), and rank 0 writes the one
run entry. So a run made on 2 processes is a full hit on 1, and a run killed on 2 resumes on 3.

    rank 0: reads the per-example shards, decides what is left ----broadcast----> every rank
    every rank: predicts its share (balanced by prompt length), saving each batch as it finishes
    every rank ----gather----> rank 0: merges, computes metrics, saves the run entry ----broadcast----> all

The process group comes from the launcher's environment (WORLD_SIZE, RANK, MASTER_ADDR, ...; read as a `World` by
`_core.launch`). When the
script has not started one, a gloo group is started here; when it has (e.g. NCCL), a gloo group is made
beside it, since only small Python objects travel (example hashes and predictions, never tensors).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from typing import Any

from .._core.launch import World, gloo_group, start_group

log = logging.getLogger(__name__)


def shard(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Positions of the items for each of `size` ranks, with about equal total length per rank.

    Longest first onto the least-loaded rank (ties to the lower rank), so it depends only on the
    lengths and the count: every rank computes the same split. Each rank's list is longest first, so
    its batches hold prompts of similar length (less padding).

    Example:
        >>> shard([5, 1, 4, 2], 2)
        [[0, 1], [2, 3]]
    """
    loads = [(0, rank) for rank in range(size)]
    parts: list[list[int]] = [[] for _ in range(size)]
    for position in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, rank = heapq.heappop(loads)
        parts[rank].append(position)
        heapq.heappush(loads, (load + lengths[position], rank))
    return parts


class Collective:
    """The three collectives a sharded evaluation needs, over a gloo group of the launch's processes."""

    def __init__(self, world: World) -> None:
        import torch.distributed as dist

        self.world = world
        self.dist = dist
        start_group(world, "gloo")
        if dist.get_world_size() != world.size:
            from ..errors import ConfigError

            raise ConfigError(
                f"WORLD_SIZE is {world.size} but the process group has {dist.get_world_size()} "
                "processes; launch with torchrun or accelerate launch, or unset WORLD_SIZE."
            )
        self.group = gloo_group()

    def all_true(self, flag: bool) -> bool:
        """True when `flag` is true on every rank (e.g. every rank found the run entry)."""
        flags: list[Any] = [None] * self.world.size
        self.dist.all_gather_object(flags, bool(flag), group=self.group)
        return all(flags)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        box = [value if self.world.is_main else None]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        self.dist.barrier(group=self.group)

    def gather(self, value: Any) -> list | None:
        """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
        out: list[Any] | None = [None] * self.world.size if self.world.is_main else None
        self.dist.gather_object(value, out, dst=0, group=self.group)
        return out


def predict_sharded(
    world: World,
    comm: Collective,
    prompts: Sequence[str],
    hashes: Sequence[str],
    known: dict[str, Any] | None,
    predict: Callable[[list[int]], dict[str, Any]],
) -> tuple:
    """Predict what the cache lacks, spread over the ranks; every rank gets the same answer.

    Args:
        known: rank 0's cached per-example predictions ({example hash: prediction}); ignored elsewhere.
        predict: predicts the examples at the given positions (saving each batch to the cache as it
            goes) and returns {example hash: prediction}.

    Returns:
        (all predictions by hash on rank 0 / None elsewhere, number reused, {"wait_seconds": waiting for
        the slowest rank, "gather_seconds": the gather itself}).
    """
    import time

    todo = comm.broadcast([i for i, h in enumerate(hashes) if h not in (known or {})] if world.is_main else None)
    reused = len(hashes) - len(todo)
    mine = [todo[p] for p in shard([len(prompts[i]) for i in todo], world.size)[world.rank]]
    if world.is_main and todo:
        log.info(
            "Predicting %d examples on %d processes (this rank: %d)%s.",
            len(todo),
            world.size,
            len(mine),
            f"; reusing {reused} cached" if reused else "",
        )
    fresh = predict(mine)
    started = time.perf_counter()
    comm.barrier()  # waiting for the slowest rank is imbalance, not the gather's cost
    waited = time.perf_counter() - started
    parts = comm.gather(fresh)
    timing = {"wait_seconds": round(waited, 4), "gather_seconds": round(time.perf_counter() - started - waited, 4)}
    if not world.is_main:
        return None, reused, timing
    merged = dict(known or {})
    for part in parts or []:
        merged.update(part)
    return merged, reused, timing
