"""Rectangles of a weight that move between ranks (pure index arithmetic).

Every parameter is seen as a 2-D array W2 (m x n): a matrix as itself, anything else as one
row (1 x numel). A rank holds a *fragment*: a flat range [start, stop) of W2's row-major
flattening (FSDP1 and DeepSpeed partitions start and end mid-row; FSDP2 row shards and whole
tensors are the special cases of full rows). A COAP matrix's canonical rows owned by one
rank form a *region*: full W rows [i0, i1) for a right projection, full W columns [i0, i1)
for a left one. The part of a fragment inside a region is at most three rectangles (the
fragment's partial first row, its full middle rows, its partial last row), each a strided
view of the fragment's storage: nothing is copied until a piece is packed for sending.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Box:
    """Rows [r0, r1) x columns [c0, c1) of W2."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.r1 - self.r0, self.c1 - self.c0)

    @property
    def numel(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)


def fragment_boxes(start: int, stop: int, n: int) -> list[Box]:
    """The flat range [start, stop) of an (m x n) row-major array as at most three boxes."""
    if stop <= start:
        return []
    first, last = start // n, (stop - 1) // n
    if first == last:
        return [Box(first, first + 1, start - first * n, stop - first * n)]
    out = []
    mid0, mid1 = first, last + 1
    if start % n:
        out.append(Box(first, first + 1, start % n, n))
        mid0 = first + 1
    if stop % n:
        mid1 = last
    if mid1 > mid0:
        out.append(Box(mid0, mid1, 0, n))
    if stop % n:
        out.append(Box(last, last + 1, 0, stop % n))
    return out


def intersect(fragment: tuple[int, int], region: Box, n: int) -> list[Box]:
    """The boxes of W2 (row-major, n columns) that are both in ``fragment`` and ``region``."""
    out = []
    for b in fragment_boxes(fragment[0], fragment[1], n):
        r0, r1 = max(b.r0, region.r0), min(b.r1, region.r1)
        c0, c1 = max(b.c0, region.c0), min(b.c1, region.c1)
        if r1 > r0 and c1 > c0:
            out.append(Box(r0, r1, c0, c1))
    return out


def view_in_fragment(local: Tensor, start: int, n: int, box: Box) -> Tensor:
    """The (rows x cols) strided view of ``box`` inside ``local``, the contiguous storage of
    the fragment starting at flat index ``start`` of W2 (n columns)."""
    return torch.as_strided(
        local, box.shape, (n, 1), local.storage_offset() + box.r0 * n + box.c0 - start
    )


def view_in_region(buf: Tensor, region: Box, box: Box) -> Tensor:
    """The view of ``box`` inside a (region.shape) buffer holding ``region``."""
    return buf[box.r0 - region.r0 : box.r1 - region.r0, box.c0 - region.c0 : box.c1 - region.c0]


def region_of(rows: tuple[int, int], shape: tuple[int, int], right: bool) -> Box:
    """The W2 box of canonical rows [i0, i1): W rows for a right side, W columns for a left
    side (canonical rows of a left projection are the columns of W)."""
    m, n = shape
    i0, i1 = rows
    return Box(i0, i1, 0, n) if right else Box(0, m, i0, i1)
