"""What the owner protocol moves in a plain step, and what it costs (pure, no collectives).

From the placement and the fragment map (both the same on every rank), :func:`plan_routes`
lists every message of the two exchange rounds of a plain step:

* gather round: gradient rectangles from the ranks holding them to the ranks computing
  them (``"grad"``), a team's projector from its holder to the other members (``"proj"``);
* scatter round: for each rank holding weights of a matrix piece computed elsewhere, the
  cheaper of the rows of D it needs (``"rows"``, plus ``"proj"`` from the holder when it
  has no P) or the update rectangles (``"update"``); the new values of AdamW pieces under
  DDP (``"dense"``); a convolution's update rectangles.

:class:`~coap_dist.distributed.owner.OwnerLayout` sends exactly these messages, and
:func:`plain_step_traffic` adds them up per rank (with the flag all-reduce), so the figures
``benchmarks/distributed.py`` prints for 7B shapes at N = 512 come from the layout's own
plan, and the tests check them against the collectives counted on real process groups.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from coap_dist.distributed.boxes import Box, intersect, region_of
from coap_dist.distributed.comm import collective_bytes, padded
from coap_dist.distributed.placement import (
    Piece,
    Placement,
    Range,
    chunk_range,
    conv_holders,
    local_rows,
)
from coap_dist.functional import quant as fquant
from coap_dist.optim.spec import ParamSpec


@dataclasses.dataclass(frozen=True)
class Route:
    """One message of a plain step: ``kind`` of parameter ``index`` from ``src`` to ``dst``.

    ``boxes``: W2 rectangles (grad, update); ``rows``: rows [lo, hi) of the sender's D,
    relative to its piece (rows); ``shape``: the tensor sent (proj, rows, dense).
    """

    index: int
    kind: str
    src: int
    dst: int
    boxes: tuple[Box, ...] = ()
    rows: tuple[int, int] = (0, 0)
    shape: tuple[int, ...] = ()

    def numel(self) -> int:
        if self.boxes:
            return sum(b.numel for b in self.boxes)
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A parameter seen as W2 (m x n): a matrix itself, anything else one row."""

    spec: ParamSpec
    frags: list[Range] | None
    pieces: tuple[Piece, ...]
    holder: int

    @property
    def shape2(self) -> tuple[int, int]:
        s = self.spec
        return (s.shape[0], s.shape[1]) if s.kind == "matrix" else (1, s.numel)

    def region(self, pc: Piece) -> Box:
        """W2 box of a piece: rows / columns of a matrix, the whole conv, a flat range."""
        if self.spec.kind == "matrix":
            return region_of((pc.start, pc.stop), self.shape2, self.spec.side == "right")
        if self.spec.kind == "conv":
            return Box(0, 1, 0, self.shape2[1])
        return Box(0, 1, pc.start, pc.stop)

    def fragment(self, rank: int) -> Range:
        return (0, self.spec.numel) if self.frags is None else self.frags[rank]

    @property
    def team(self) -> tuple[int, ...]:
        return tuple(p.rank for p in self.pieces)

    @property
    def split(self) -> bool:
        return self.spec.lowrank and not (
            len(self.pieces) == 1 and self.pieces[0].rank == self.holder
        )


def geometries(
    specs: Sequence[ParamSpec], placement: Placement, frags: Sequence[list[Range] | None]
) -> list[Geometry]:
    """The :class:`Geometry` of every parameter."""
    return [
        Geometry(s, frags[s.index], placement.pieces[s.index], placement.holder[s.index])
        for s in specs
    ]


def plan_routes(
    geos: Sequence[Geometry], world: int, *, reduced: bool, solo: bool
) -> tuple[list[list[Route]], list[list[Route]]]:
    """Per parameter, the messages of the gather round and of the scatter round, in the
    order they are packed (both ends iterate the same lists)."""
    gather: list[list[Route]] = []
    scatter: list[list[Route]] = []
    for g in geos:
        gather.append(_gather_routes(g, world, reduced))
        scatter.append(_scatter_routes(g, world, solo))
    return gather, scatter


def _gather_routes(g: Geometry, world: int, reduced: bool) -> list[Route]:
    s = g.spec
    out: list[Route] = []
    if s.kind == "dense" and g.frags is not None:
        return out  # AdamW on each rank's own fragment: nothing moves
    if g.frags is None and reduced:
        sources: Sequence[int] = ()  # every rank holds the whole averaged gradient
    else:
        sources = range(world)
    n = g.shape2[1]
    for pc in g.pieces:
        region = g.region(pc)
        for q in sources:
            if q == pc.rank:
                continue
            boxes = intersect(g.fragment(q), region, n)
            if boxes:
                out.append(Route(s.index, "grad", q, pc.rank, boxes=tuple(boxes)))
    if s.kind == "matrix" and g.split:
        for t in g.team:
            if t != g.holder:
                out.append(Route(s.index, "proj", g.holder, t, shape=(s.rank, s.cols)))
    return out


def _scatter_routes(g: Geometry, world: int, solo: bool) -> list[Route]:
    s = g.spec
    out: list[Route] = []
    n = g.shape2[1]
    if s.kind == "dense":
        if g.frags is None and not solo:
            for pc in g.pieces:
                for d in range(world):
                    if d != pc.rank:
                        out.append(Route(s.index, "dense", pc.rank, d, shape=(pc.size,)))
        return out
    if s.kind == "conv":
        region = Box(0, 1, 0, n)
        for d in range(world):
            boxes = intersect(g.fragment(d), region, n)
            if d != g.holder and boxes:
                out.append(Route(s.index, "update", g.holder, d, boxes=tuple(boxes)))
        return out
    for d in range(world):
        frag = g.fragment(d)
        if frag[1] <= frag[0]:
            continue
        parts = []
        for pc in g.pieces:
            if pc.rank == d:
                continue
            boxes = intersect(frag, g.region(pc), n)
            if boxes:
                if s.side == "right":
                    lo, hi = min(b.r0 for b in boxes), max(b.r1 for b in boxes)
                else:
                    lo, hi = min(b.c0 for b in boxes), max(b.c1 for b in boxes)
                parts.append((pc, tuple(boxes), (lo - pc.start, hi - pc.start)))
        if not parts:
            continue
        upd = sum(b.numel for _, boxes, _ in parts for b in boxes)
        needs_p = d not in g.team and d != g.holder
        fac = sum((hi - lo) * s.rank for _, _, (lo, hi) in parts) + (
            s.rank * s.cols if needs_p else 0
        )
        for pc, part_boxes, rows in parts:
            if fac < upd:
                out.append(
                    Route(s.index, "rows", pc.rank, d, rows=rows, shape=(rows[1] - rows[0], s.rank))
                )
            else:
                out.append(Route(s.index, "update", pc.rank, d, boxes=part_boxes))
        if fac < upd and needs_p:
            out.append(Route(s.index, "proj", g.holder, d, shape=(s.rank, s.cols)))
    return out


def _itemsizes(spec: ParamSpec, weight: torch.dtype) -> dict[str, int]:
    return {
        "grad": weight.itemsize,
        "update": weight.itemsize,
        "rows": weight.itemsize,
        "dense": weight.itemsize,
        "proj": spec.fmt.projector_dtype.itemsize,
    }


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Collectives and bytes of one rank in a plain step (all parameters active)."""

    calls: int
    sent: int
    received: int

    @property
    def bytes(self) -> int:
        """max(sent, received): what the slower direction carries."""
        return max(self.sent, self.received)


def plain_step_traffic(
    geos: Sequence[Geometry],
    world: int,
    weight_dtypes: Sequence[torch.dtype],
    *,
    reduced: bool,
    solo: bool,
    adafactor: bool = False,
) -> list[Traffic]:
    """Per rank, the collectives and bytes of a plain step of the owner protocol: the flag
    all-reduce, the gather and scatter exchanges (empty rounds are skipped), and, with
    Adafactor, two all-reduces of the split matrices' statistics. Proj messages in the
    scatter round use the weight dtype (the holder sends P as applied)."""
    n = len(geos)
    if world == 1:
        return [Traffic(0, 0, 0)]
    gather, scatter = plan_routes(geos, world, reduced=reduced, solo=solo)
    flags = collective_bytes("all_reduce", world, 4 * (5 * n + 1))
    sent = [flags] * world
    received = [flags] * world
    calls = 1
    for rounds, phase in ((gather, "gather"), (scatter, "scatter")):
        any_msg = False
        for g, routes, wdt in zip(geos, rounds, weight_dtypes, strict=True):
            sizes = _itemsizes(g.spec, wdt)
            for r in routes:
                any_msg = True
                esize = (
                    sizes[r.kind] if not (phase == "scatter" and r.kind == "proj") else wdt.itemsize
                )
                if r.kind == "grad" or r.kind == "update":
                    nbytes = sum(padded(b.numel * esize) for b in r.boxes)
                else:
                    nbytes = padded(r.numel() * esize)
                sent[r.src] += nbytes
                received[r.dst] += nbytes
        calls += any_msg
    if adafactor:
        split = [g for g in geos if g.spec.kind == "matrix" and g.split]
        if split:
            calls += 2
            stats = collective_bytes("all_reduce", world, 4 * sum(g.spec.rank + 1 for g in split))
            rms = collective_bytes("all_reduce", world, 4 * len(split))
            sent = [x + stats + rms for x in sent]
            received = [x + stats + rms for x in received]
    return [Traffic(calls, s, r) for s, r in zip(sent, received, strict=True)]


def local_plain_step_traffic(
    specs: Sequence[ParamSpec], world: int, grad_dtype: torch.dtype
) -> list[Traffic]:
    """Per rank, a plain step of FSDP2's default layout (:mod:`coap_dist.distributed.fsdp2`):
    the flag all-reduce; one all-to-all of every matrix's projector rows to every rank and of
    the moved matrices' gradient rows (a left side's blocks G_s[:, n_q], m_s x n_q; an 8-bit
    right side's rows of a neighbour's block-aligned state rows; in ``grad_dtype``); one
    all-gather per moment dtype of the moved matrices' directions (each padded to the largest
    rank's rows of r); when FSDP2's shards cut an 8-bit AdamW parameter inside a quantization
    block, one MAX all-reduce of those blocks' maxima; with Tucker convolutions, their shards
    to the holder in the first all-to-all and one more all-to-all of the update rows back
    (fp32, the weights' dtype assumed)."""
    if world == 1:
        return [Traffic(0, 0, 0)]
    flag = collective_bytes("all_reduce", world, 4 * (5 * len(specs) + 1))
    sent, received = [flag] * world, [flag] * world
    mats = [s for s in specs if s.kind == "matrix"]
    gi = grad_dtype.itemsize

    def sizes(total: int) -> list[int]:
        return [b - a for a, b in (chunk_range(total, world, q) for q in range(world))]

    dir_dtypes = set()
    for s in mats:
        p_rows = sizes(s.rank)
        proj = [padded(k * s.cols * s.fmt.projector_dtype.itemsize) for k in p_rows]
        state = [local_rows(s, world, q) for q in range(world)]
        weight = [chunk_range(s.shape[0], world, q) for q in range(world)]
        moved = s.side == "left" or state != weight
        for me in range(world):
            others = [q for q in range(world) if q != me]
            sent[me] += (world - 1) * proj[me]
            received[me] += sum(proj[q] for q in others)
            if not moved:
                continue
            if s.side == "left":
                rows = [b - a for a, b in state]
                m = [b - a for a, b in weight]
                sent[me] += sum(padded(m[me] * rows[q] * gi) for q in others)
                received[me] += sum(padded(m[q] * rows[me] * gi) for q in others)
            else:
                sent[me] += sum(padded(_span(state[q], weight[me]) * s.cols * gi) for q in others)
                received[me] += sum(
                    padded(_span(state[me], weight[q]) * s.cols * gi) for q in others
                )
            width = max(b - a for a, b in state) * s.rank * s.fmt.moment_dtype.itemsize
            gathered = collective_bytes("all_gather", world, width)
            sent[me] += gathered
            received[me] += gathered
        if moved:
            dir_dtypes.add(s.fmt.moment_dtype)
    holders = conv_holders(specs, world)
    for i, h in holders.items():  # shards to the holder, its update rows back
        s = specs[i]
        row = math.prod(s.shape[1:])
        for q in range(world):
            if q == h:
                continue
            w0, w1 = chunk_range(s.shape[0], world, q)
            grad, update = padded((w1 - w0) * row * gi), padded((w1 - w0) * row * 4)
            sent[q] += grad
            received[h] += grad
            sent[h] += update
            received[q] += update
    shared = 0
    for s in specs:
        if s.kind == "dense" and s.shape and s.quantized_moment(s.numel):
            row = math.prod(s.shape[1:])
            starts = (chunk_range(s.shape[0], world, q)[0] * row for q in range(1, world))
            shared += len(
                {a // fquant.BLOCK for a in starts if 0 < a < s.numel and a % fquant.BLOCK}
            )
    if shared:
        maxima = collective_bytes("all_reduce", world, 8 * shared)
        sent = [x + maxima for x in sent]
        received = [x + maxima for x in received]
    calls = 1 + bool(mats or holders) + len(dir_dtypes) + bool(shared) + bool(holders)
    return [Traffic(calls, a, b) for a, b in zip(sent, received, strict=True)]


def _span(a: Range, b: Range) -> int:
    """Length of the intersection of two ranges."""
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def bound_bytes(
    geos: Sequence[Geometry], world: int, rank: int, weight_dtypes: Sequence[torch.dtype]
) -> int:
    """The issue's per-rank ceiling for a plain step: fp32 gradient bytes / N, plus the fp32
    factors D (rows x r) and P (r x b) of every matrix whose weights this rank holds, plus
    the fp32 values of AdamW pieces it receives under DDP, plus the flag vector."""
    total_grad = 4 * sum(g.spec.numel for g in geos)
    out = total_grad // world + 4 * 2 * (5 * len(geos) + 1)
    for g, _wdt in zip(geos, weight_dtypes, strict=True):
        frag = g.fragment(rank)
        held = frag[1] - frag[0]
        if held <= 0:
            continue
        s = g.spec
        if s.kind == "matrix":
            touched = (
                min(s.rows, held // s.shape[1] + 2) if s.side == "right" else min(s.rows, held)
            )
            out += 4 * (touched * s.rank + s.rank * s.cols)
        elif s.kind == "conv" or g.frags is None:
            out += 4 * held
    return out
