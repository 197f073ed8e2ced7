"""Where optimizer state lives: the placement planners (pure, no collectives).

Every rank runs the same planner on the same inputs (global shapes, hyperparameters, the
layout's fragment map), so all ranks agree on the placement without communicating. The
memory estimator runs the same planners on shapes alone (``coap-dist memory --world-size``).

OWNER placement (:func:`owner_placement`; DDP, FSDP1, FSDP2 ``sharding="owner"``, DeepSpeed
ZeRO 1-3). Units of state are packed by longest-processing-time on their BYTES, largest first,
each to the least-loaded rank (ties: lowest rank), against a cap of ``imbalance`` times the
mean per-rank load:

* a COAP matrix that fits under the cap goes whole to one rank (its *holder*): the exact
  single-process math runs there;
* a matrix that does not fit is split: its projector P goes to the least-loaded rank (the
  holder, which also runs its small SVDs), its canonical rows go in contiguous blocks to the
  least-loaded ranks, as many as fit under the cap (row blocks aligned to 8-bit blocks);
  the ranks with rows form the matrix's *team*;
* Tucker convolutions are never split;
* AdamW parameters: on fragment layouts each rank keeps the state of its own fragment; on
  replicated layouts (DDP) their concatenation is cut into N near-equal flat ranges.

So the largest rank holds at most ``imbalance`` x total / N, plus at most one projector
when projectors alone exceed the cap.

LOCAL placement (:func:`local_state_bytes`; the FSDP2 / HSDP default): canonical rows stay
where FSDP2 put them (``torch.chunk`` of dim 0), P is split by ITS rows the same way
(``Shard(0)`` of the r x b projector), and each matrix's refresh SVD is computed by one rank
chosen by the same LPT packing on its refresh cost a b r.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from coap_dist.functional import quant as fquant
from coap_dist.optim.spec import ParamSpec, nbytes, state_shapes

Range = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of a COAP matrix (canonical orientation), or a flat range of an
    AdamW parameter, kept and computed by ``rank``."""

    rank: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class Placement:
    """Per parameter (optimizer order): the holder of its projector (-1 for AdamW) and the
    pieces whose state each rank keeps, in increasing ``start``."""

    world: int
    holder: tuple[int, ...]
    pieces: tuple[tuple[Piece, ...], ...]

    def piece(self, index: int, rank: int) -> Piece | None:
        """The piece of parameter ``index`` on ``rank`` (None if it holds none)."""
        for pc in self.pieces[index]:
            if pc.rank == rank:
                return pc
        return None

    def team(self, index: int) -> tuple[int, ...]:
        """Ranks with rows of a COAP matrix (its holder first if it has rows too)."""
        return tuple(pc.rank for pc in self.pieces[index])

    def whole(self, index: int) -> bool:
        """Whether one rank keeps all of the parameter's state (and it holds P)."""
        pcs = self.pieces[index]
        return len(pcs) == 1 and (self.holder[index] < 0 or pcs[0].rank == self.holder[index])

    def state_bytes(self, specs: Sequence[ParamSpec]) -> list[int]:
        """Bytes of state each rank keeps (ndim >= 1 tensors, as ``state_bytes()``)."""
        loads = [0] * self.world
        for spec in specs:
            loads = _add(loads, self._param_bytes(spec))
        return loads

    def _param_bytes(self, spec: ParamSpec) -> list[int]:
        out = [0] * self.world
        h = self.holder[spec.index]
        for pc in self.pieces[spec.index]:
            out[pc.rank] += piece_bytes(spec, pc.size, holder=pc.rank == h)
        if spec.kind == "matrix" and h >= 0 and h not in self.team(spec.index):
            out[h] += projector_bytes(spec)
        return out


def _add(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b, strict=True)]


def piece_bytes(spec: ParamSpec, size: int, *, holder: bool) -> int:
    """State bytes of a piece of ``size`` rows (matrix) or elements (AdamW); whole for convs."""
    if spec.kind == "matrix":
        return nbytes(state_shapes(spec, rows=size, holder=holder))
    if spec.kind == "dense":
        return nbytes(state_shapes(spec, numel=size))
    return nbytes(state_shapes(spec))


def projector_bytes(spec: ParamSpec) -> int:
    """Bytes of a COAP matrix's projector P (r x b)."""
    return spec.rank * spec.cols * spec.fmt.projector_dtype.itemsize


def dense_pieces(
    specs: Sequence[ParamSpec], world: int, fragments: Sequence[Sequence[Range] | None]
) -> dict[int, tuple[Piece, ...]]:
    """Flat ranges of the AdamW parameters each rank updates.

    On fragment layouts a rank updates its own fragment. Replicated parameters (fragments
    None) are concatenated in optimizer order and cut into ``world`` near-equal ranges (cuts
    inside an 8-bit parameter fall on its quantization blocks), as ZeRO-1 partitions.
    """
    out: dict[int, tuple[Piece, ...]] = {}
    replicated = [s for s in specs if s.kind == "dense" and fragments[s.index] is None]
    for s in specs:
        frag = fragments[s.index]
        if s.kind == "dense" and frag is not None:
            out[s.index] = tuple(Piece(r, a, b) for r, (a, b) in enumerate(frag) if b > a)
    total = sum(s.numel for s in replicated)
    if not replicated:
        return out
    bounds = [round(total * k / world) for k in range(world + 1)]
    offset = 0
    for s in replicated:
        align = fquant.BLOCK if s.quantized_moment(s.numel) else 1
        cuts = [0]
        for k in range(1, world):
            local = min(max(bounds[k] - offset, 0), s.numel)
            local = min(s.numel, -(-local // align) * align) if 0 < local < s.numel else local
            cuts.append(max(local, cuts[-1]))
        cuts.append(s.numel)
        out[s.index] = tuple(
            Piece(r, cuts[r], cuts[r + 1]) for r in range(world) if cuts[r + 1] > cuts[r]
        )
        offset += s.numel
    return out


def owner_placement(
    specs: Sequence[ParamSpec],
    world: int,
    fragments: Sequence[Sequence[Range] | None],
    *,
    split: bool = True,
    imbalance: float = 1.10,
) -> Placement:
    """The OWNER placement (module docstring). ``fragments[i]``: per rank, the flat range of
    parameter i that rank holds on a fragment layout, or None when every rank holds it
    whole (replicated, DDP). ``split=False`` keeps every matrix whole (exact, but the
    largest rank then holds at least the largest matrix's state)."""
    holder = [-1] * len(specs)
    pieces: list[tuple[Piece, ...]] = [()] * len(specs)
    loads = [0] * world
    for index, pcs in dense_pieces(specs, world, fragments).items():
        pieces[index] = pcs
        for pc in pcs:
            loads[pc.rank] += piece_bytes(specs[index], pc.size, holder=False)
    units = [s for s in specs if s.lowrank]
    whole = {s.index: nbytes(state_shapes(s)) for s in units}
    cap = imbalance * (sum(loads) + sum(whole.values())) / world if split else math.inf
    for s in sorted(units, key=lambda u: (-whole[u.index], u.index)):
        q = min(range(world), key=lambda r: (loads[r], r))
        align = s.row_alignment()
        if s.kind == "conv" or loads[q] + whole[s.index] <= cap or s.rows < 2 * align:
            holder[s.index] = q
            pieces[s.index] = (Piece(q, 0, s.rows if s.kind == "matrix" else 1),)
            loads[q] += whole[s.index]
            continue
        holder[s.index] = q
        loads[q] += projector_bytes(s)
        pieces[s.index] = _split_rows(s, loads, cap, align, first=q)
    return Placement(world, tuple(holder), tuple(pieces))


def _split_rows(
    s: ParamSpec, loads: list[int], cap: float, align: int, first: int
) -> tuple[Piece, ...]:
    """Contiguous row blocks of matrix ``s``: the holder ``first`` filled up to ``cap``
    first (its rows need no projector copy), then the least-loaded ranks; rows left over
    once every rank is at the cap are spread evenly. ``loads`` is updated with the exact
    bytes of each block."""
    fixed = piece_bytes(s, 0, holder=False)
    per_row = (piece_bytes(s, s.rows, holder=False) - fixed) / s.rows
    world = len(loads)
    sizes = [0] * world
    left = s.rows
    for r in sorted(range(world), key=lambda q: (q != first, loads[q], q)):
        if left == 0:
            break
        room = cap - loads[r] - fixed
        take = min(left, int(room // per_row) // align * align) if room > 0 else 0
        if take <= 0:
            continue
        sizes[r] += take
        left -= take
    while left > 0:  # every rank is at the cap: spread the rest over the least loaded
        share = max(align, -(-left // world) // align * align)
        for r in sorted(range(world), key=lambda q: (loads[q] + sizes[q] * per_row, q)):
            take = min(left, share)
            sizes[r] += take
            left -= take
            if left == 0:
                break
    out = []
    start = 0
    for r in range(world):
        if sizes[r]:
            out.append(Piece(r, start, start + sizes[r]))
            loads[r] += piece_bytes(s, sizes[r], holder=False)
            start += sizes[r]
    return tuple(out)


def chunk_range(length: int, world: int, rank: int) -> Range:
    """Rank ``rank``'s part [start, stop) of ``length`` under ``torch.chunk`` (FSDP2's and
    DTensor ``Shard(0)``'s split): blocks of ceil(length / world), the last ones short or
    empty."""
    size = -(-length // world) if length else 0
    start = min(rank * size, length)
    return start, min(start + size, length)


def lpt(costs: Sequence[float], world: int) -> list[int]:
    """Longest-processing-time packing: a rank for each item (decreasing cost, ties by index;
    each to the least-loaded rank, ties to the lowest). Max load <= 4/3 of the optimum."""
    loads = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda q: (loads[q], q))
        owner[i] = r
        loads[r] += costs[i]
    return owner


def local_svd_holders(specs: Sequence[ParamSpec], world: int) -> dict[int, int]:
    """LOCAL layout: the rank that computes each COAP matrix's refresh SVD (LPT on a b r)."""
    mats = [s for s in specs if s.kind == "matrix"]
    ranks = lpt([float(s.rows * s.cols * s.rank) for s in mats], world)
    return {s.index: r for s, r in zip(mats, ranks, strict=True)}


def local_state_bytes(specs: Sequence[ParamSpec], world: int) -> list[int]:
    """Per-rank state bytes of the LOCAL layout: every tensor split by its dim 0 like FSDP2
    (COAP matrices right-projected: their moment rows follow the weight's rows, and the
    projector is split by its own rows; Adafactor's column statistics are replicated)."""
    loads = [0] * world
    for s in specs:
        for r in range(world):
            if s.kind == "matrix":
                a0, a1 = chunk_range(s.rows, world, r)
                p0, p1 = chunk_range(s.rank, world, r)
                loads[r] += piece_bytes(s, a1 - a0, holder=False)
                loads[r] += (p1 - p0) * s.cols * s.fmt.projector_dtype.itemsize
            elif s.kind == "dense":
                d0, d1 = chunk_range(s.shape[0] if s.shape else 1, world, r)
                row = math.prod(s.shape[1:]) if s.shape else 1
                loads[r] += piece_bytes(s, (d1 - d0) * row, holder=False)
            else:
                raise ValueError(
                    "the LOCAL layout does not Tucker-project convolutions (set "
                    "rank_ratio_cnn=None or sharding='owner')"
                )
    return loads
