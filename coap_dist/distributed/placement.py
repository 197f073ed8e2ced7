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

from coap_dist.functional import projection as fproj
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
            out[pc.rank] += piece_bytes(spec, pc.size, holder=pc.rank == h, start=pc.start)
        if spec.kind == "matrix" and h >= 0 and h not in self.team(spec.index):
            out[h] += projector_bytes(spec)
        return out


def _add(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b, strict=True)]


def piece_bytes(spec: ParamSpec, size: int, *, holder: bool, start: int) -> int:
    """State bytes of a piece of ``size`` rows (matrix) or elements (AdamW, from flat
    element ``start``); whole for convs."""
    if spec.kind == "matrix":
        return nbytes(state_shapes(spec, rows=size, holder=holder))
    if spec.kind == "dense":
        return nbytes(state_shapes(spec, numel=size, start=start))
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
    largest rank then holds at least the largest matrix's state).

    Locality: a whole matrix goes to the rank holding most of it among those with room; the
    matrices that must be split keep each rank's natural rows (those its fragment holds, if
    at least r / 2 of them) as far as the cap allows, so that under DeepSpeed's partitions
    and FSDP2's row shards most gradients and updates never move.
    """
    holder = [-1] * len(specs)
    pieces: list[tuple[Piece, ...]] = [()] * len(specs)
    loads: list[float] = [0] * world  # bytes; split rows add fractional per-row shares
    for index, pcs in dense_pieces(specs, world, fragments).items():
        pieces[index] = pcs
        for pc in pcs:
            loads[pc.rank] += piece_bytes(specs[index], pc.size, holder=False, start=pc.start)
    units = [s for s in specs if s.lowrank]
    whole = {s.index: nbytes(state_shapes(s)) for s in units}
    cap = imbalance * (sum(loads) + sum(whole.values())) / world if split else math.inf
    deferred = []
    for s in sorted(units, key=lambda u: (-whole[u.index], u.index)):
        frag = fragments[s.index]
        held = [0] * world if frag is None else [max(0, b - a) for a, b in frag]
        order = sorted(range(world), key=lambda r: (-held[r], loads[r], r))
        fits = [r for r in order if loads[r] + whole[s.index] <= cap]
        if fits or s.kind == "conv" or s.rows < 2 * s.row_alignment():
            # (one that fits nowhere exceeds the cap wherever it goes: where most of it is)
            q = fits[0] if fits else order[0]
            holder[s.index] = q
            pieces[s.index] = (Piece(q, 0, s.rows if s.kind == "matrix" else 1),)
            loads[q] += whole[s.index]
        else:
            deferred.append(s)
    if deferred:
        _place_split(deferred, fragments, loads, cap, holder, pieces)
    return Placement(world, tuple(holder), tuple(pieces))


NATURAL_SHARE = 0.5
"""A rank keeps natural rows of a split matrix only if it has at least this fraction of r
of them: fewer would cost more as a projector copy than they save in moved gradients."""


def _place_split(
    mats: Sequence[ParamSpec],
    fragments: Sequence[Sequence[Range] | None],
    loads: list[float],
    cap: float,
    holder: list[int],
    pieces: list[tuple[Piece, ...]],
) -> None:
    """Place the matrices that fit on no single rank, all together: projectors by LPT, then
    every rank's natural rows, trimmed where a rank would exceed ``cap``, then the other rows
    in contiguous runs to the ranks with room (at most one block per rank and matrix)."""
    world = len(loads)
    for s in sorted(mats, key=lambda u: (-projector_bytes(u), u.index)):
        q = min(range(world), key=lambda r: (loads[r], r))
        holder[s.index] = q
        loads[q] += projector_bytes(s)
    per_row = {s.index: _row_bytes(s) for s in mats}
    blocks: dict[int, dict[int, list[int]]] = {s.index: {} for s in mats}
    for s in mats:
        align = s.row_alignment()
        least = max(align, int(NATURAL_SHARE * s.rank))
        for r, (a, b) in enumerate(_natural_rows(s, fragments[s.index], world)):
            a, b = -(-a // align) * align, min(s.rows, -(-b // align) * align)
            if b - a >= least:
                blocks[s.index][r] = [a, b]
                loads[r] += (b - a) * per_row[s.index]
    for r in range(world):  # trim natural blocks of ranks over the cap, largest rows first
        mine = sorted((s for s in mats if r in blocks[s.index]), key=lambda u: -per_row[u.index])
        for s in mine:
            if loads[r] <= cap:
                break
            a, b = blocks[s.index][r]
            align = s.row_alignment()
            cut = min(b - a, -(-int((loads[r] - cap) / per_row[s.index]) // align) * align)
            blocks[s.index][r] = [a, b - cut]
            loads[r] -= cut * per_row[s.index]
            if b - cut <= a:
                del blocks[s.index][r]
    for s in sorted(mats, key=lambda u: (-per_row[u.index] * u.rows, u.index)):
        pieces[s.index] = _fill_gaps(
            s, blocks[s.index], loads, cap, per_row[s.index], holder[s.index]
        )


def _row_bytes(s: ParamSpec) -> float:
    """State bytes per canonical row of a matrix (its moments' share)."""
    fixed = piece_bytes(s, 0, holder=False, start=0)
    return (piece_bytes(s, s.rows, holder=False, start=0) - fixed) / s.rows


def _natural_rows(s: ParamSpec, frag: Sequence[Range] | None, world: int) -> list[Range]:
    """Per rank, the canonical rows [a, b) whose first element its fragment holds (a right
    projection's rows are W's rows); empty for replicated or left-projected matrices."""
    if frag is None or s.side != "right":
        return [(0, 0)] * world
    n = s.cols
    return [(-(-a // n), -(-b // n)) if b > a else (0, 0) for a, b in frag]


def _fill_gaps(
    s: ParamSpec,
    blocks: dict[int, list[int]],
    loads: list[float],
    cap: float,
    per_row: float,
    holder: int,
) -> tuple[Piece, ...]:
    """The rows of ``s`` outside ``blocks`` in contiguous runs: to the holder first (its rows
    need no projector copy), then the least-loaded ranks with room; rows left once every
    rank is full extend a neighbouring block. Returns all blocks as pieces."""
    align = s.row_alignment()
    fixed = piece_bytes(s, 0, holder=False, start=0)
    world = len(loads)
    gaps, cursor = [], 0
    for a, b in sorted(blocks.values()):
        if a > cursor:
            gaps.append([cursor, a])
        cursor = b
    if cursor < s.rows:
        gaps.append([cursor, s.rows])

    def room(r: int) -> int:
        free = cap - loads[r] - fixed
        return int(free // per_row) // align * align if free > 0 else 0

    rest = sorted(
        (r for r in range(world) if r not in blocks), key=lambda r: (r != holder, loads[r], r)
    )
    for a, b in gaps:
        while a < b:
            r = next((q for q in rest if room(q) > 0), None)
            if r is None:
                if not blocks:  # nothing to extend: the least-loaded rank takes the run
                    r = min(range(world), key=lambda q: (loads[q], q))
                    blocks[r] = [a, b]
                else:  # every rank is full: the neighbouring block takes the rest
                    r = min(
                        (q for q, (x, y) in blocks.items() if y == a or x == b),
                        key=lambda q: (loads[q], q),
                    )
                    blocks[r] = [min(blocks[r][0], a), max(blocks[r][1], b)]
                loads[r] += (b - a) * per_row
                break
            rest.remove(r)
            take = min(b - a, room(r))
            blocks[r] = [a, a + take]
            loads[r] += take * per_row + fixed
            a += take
    out = sorted((Piece(r, a, b) for r, (a, b) in blocks.items()), key=lambda pc: pc.start)
    return tuple(out)


def chunk_range(length: int, world: int, rank: int, align: int = 1) -> Range:
    """Rank ``rank``'s part [start, stop) of ``length`` under ``torch.chunk`` (FSDP2's and
    DTensor ``Shard(0)``'s split): blocks of ceil(length / world), the last ones short or
    empty; with ``align``, blocks of that size rounded up to a multiple of ``align``."""
    size = -(-length // world) if length else 0
    size = -(-size // align) * align
    start = min(rank * size, length)
    return start, min(start + size, length)


def local_rows(spec: ParamSpec, world: int, rank: int) -> Range:
    """The canonical rows of a COAP matrix's moments that rank ``rank`` keeps under FSDP2's
    default layout: ``torch.chunk``'s split, in blocks of ``spec.row_alignment()`` rows so
    that 8-bit moments' quantization blocks never straddle two ranks."""
    return chunk_range(spec.rows, world, rank, spec.row_alignment())


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


def conv_holders(specs: Sequence[ParamSpec], world: int) -> dict[int, int]:
    """The rank keeping each Tucker-projected convolution's whole state under FSDP2's default
    layout (LPT on its state bytes, so that convolutions spread over the ranks)."""
    convs = [s for s in specs if s.kind == "conv"]
    ranks = lpt([float(piece_bytes(s, 0, holder=True, start=0)) for s in convs], world)
    return {s.index: r for s, r in zip(convs, ranks, strict=True)}


def local_state_bytes(specs: Sequence[ParamSpec], world: int) -> list[int]:
    """Per-rank state bytes of the LOCAL layout: every tensor split by its dim 0 like FSDP2
    (COAP matrices: moments by their canonical rows, :func:`local_rows`, the weight's rows
    for a right side and its columns for a left one; the projector by its own rows;
    Adafactor's column statistics are replicated), Tucker convolutions whole on their
    :func:`conv_holders` rank."""
    loads = [0] * world
    for i, r in conv_holders(specs, world).items():
        loads[r] += piece_bytes(specs[i], 0, holder=True, start=0)
    for s in specs:
        for r in range(world):
            if s.kind == "matrix":
                a0, a1 = local_rows(s, world, r)
                p0, p1 = chunk_range(s.rank, world, r)
                loads[r] += piece_bytes(s, a1 - a0, holder=False, start=0)
                loads[r] += (p1 - p0) * s.cols * s.fmt.projector_dtype.itemsize
            elif s.kind == "dense":
                d0, d1 = chunk_range(s.shape[0] if s.shape else 1, world, r)
                row = math.prod(s.shape[1:]) if s.shape else 1
                loads[r] += piece_bytes(s, (d1 - d0) * row, holder=False, start=d0 * row)
    return loads


REFRESH_BUCKET_BYTES = 256 * 2**20
"""Most bytes of partial sums one round of a split refresh carries. A refresh of split
matrices (FSDP2 / HSDP rows, owner teams) reduces per-matrix partial sums to the rank that
computes each SVD; sending all due matrices in one round would hold every matrix's partials,
the packed send buffer and the received sums at once (LLaMA-1B, rank 512: about 6 GiB per
rank; 7B, rank 1024: about 25 GiB), so the due matrices go in rounds of at most this many
bytes, in index order. The number of rounds depends on the model and the rank, never on the
world size."""


def refresh_partial_bytes(spec: ParamSpec, kind: str, oversample: int) -> int:
    """Upper bound of the bytes of one matrix's refresh partial sums (fp64): the Gram pair
    ``Y^T Y`` (k x k) and ``G^T Y`` (b x k), k = r + oversample, of a randomized SVD, or the
    correlation step's sums (``kind="update"``)."""
    if kind == "update":
        return 8 * fproj.correlation_partials_numel(spec.rank, spec.cols, "col")
    k = spec.rank + oversample
    return 8 * k * (k + spec.cols)


def refresh_buckets(
    items: Sequence[int], sizes: Sequence[int], limit: int | None = None
) -> list[list[int]]:
    """``items`` cut, in order, into consecutive rounds whose ``sizes`` add up to at most
    ``limit`` (default :data:`REFRESH_BUCKET_BYTES`); an item larger than the limit is a
    round of its own. Every rank cuts the same global list the same way."""
    limit = REFRESH_BUCKET_BYTES if limit is None else limit
    rounds: list[list[int]] = []
    load = 0
    for item, size in zip(items, sizes, strict=True):
        if rounds and load + size <= limit:
            rounds[-1].append(item)
            load += size
        else:
            rounds.append([item])
            load = size
    return rounds
