"""Helpers shared by the distribution layouts: groups, owner assignment, byte packing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, this rank) of a process group (the default group if None)."""
    return dist.get_world_size(group), dist.get_rank(group)


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Longest-processing-time packing: owner rank of each item.

    Items are taken in decreasing cost with the item index as tie-break, each given to the
    least-loaded rank (lowest rank on ties). Every input is rank-independent, so every rank
    computes the same assignment without communicating. Max load <= 4/3 of the optimum.
    """
    loads = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda q: (loads[q], q))
        owner[i] = r
        loads[r] += costs[i]
    return owner


def to_bytes(t: Tensor) -> Tensor:
    """A flat uint8 view of a tensor's data (copy only if it is not contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def from_bytes(
    buf: Tensor, offset: int, dtype: torch.dtype, shape: Sequence[int]
) -> tuple[Tensor, int]:
    """Read a tensor of (dtype, shape) from a uint8 buffer at offset; returns it and the end."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    t = buf[offset : offset + nbytes].view(dtype).view(tuple(shape))
    return t, offset + nbytes


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """Global rank of a rank of ``group``."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def check_same_config(
    config: dict[str, object], group: dist.ProcessGroup | None, what: str
) -> None:
    """Raise the same ValueError on every rank if ``config`` differs between ranks.

    One all_gather_object at construction: a rank built with other hyperparameters would
    otherwise issue different collectives later and hang the job.
    """
    world, _ = group_size_rank(group)
    if world == 1:
        return
    gathered: list[dict[str, object] | None] = [None] * world
    dist.all_gather_object(gathered, config, group=group)
    first = gathered[0]
    assert first is not None
    for r, other in enumerate(gathered[1:], start=1):
        assert other is not None
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise ValueError(
                    f"{what}: hyperparameter `{key}` differs across ranks: {first.get(key)!r} on "
                    f"rank 0 vs {other.get(key)!r} on rank {r}; every rank must build the "
                    "optimizer with the same arguments"
                )
