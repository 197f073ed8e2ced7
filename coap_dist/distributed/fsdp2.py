"""FSDP2 / HSDP (``fully_shard``): the LOCAL layout (default) and the owner view.

FSDP2 hands the optimizer DTensor parameters and gradients sharded ``Shard(0)`` by rows
(``torch.chunk`` split: uneven and empty shards happen); HSDP adds a replicate mesh dimension,
and everything below runs over the shard sub-mesh (every replica does the same).

:class:`Fsdp2Local` (automatic for DTensor parameters): COAP on the row shards FSDP2 already
gives each rank, with one process's side rule (``projection_side`` honoured) and its result
to rounding. Each matrix is split by its CANONICAL rows (compressed dimension last: the
weight's rows for a right side, m >= n; its columns for a left side, m < n), chunked like
``torch.chunk``; its moments are kept for this rank's canonical rows and its projector P
(r x b) is split by ITS rows, so every state tensor is a ``Shard(0)`` DTensor (8-bit: below) and per-rank
state is 1/N. A plain step costs three collectives whatever the world size and the number
of matrices:

1. the flag all-reduce (the step's one host sync);
2. one all-to-all carrying every active matrix's P rows to every rank and, for the left
   matrices, the transposed split of the gradient: rank q receives G_s[:, n_q] from each
   rank s (n_q: the columns q keeps), i.e. its canonical rows G^T[n_q, :] (this is (N-1)/N
   of each rank's gradient shard, within "gradient bytes / N");
3. one all-gather of the left matrices' directions D (n x r, padded to ceil(n / N) rows),
   after which each rank applies W_s <- keep (W_s - alpha (D P[:, s])^T) to its rows.

Right matrices need nothing more: R_local = G_local P^T, W_local <- keep (W_local - alpha
D_local P). A refresh step adds a reduce-scatter of every due matrix's canonical-row sums to
the rank computing its small SVD (or correlation step; per step LPT on a b r) and an
all-gather of the new projectors; a power iteration adds two all-reduces. The shard-aware
variant that needs no all-to-all (``projection_side="right"``: every matrix right-projected)
is an explicit option only: it measured +0.070 final validation loss (README, convergence).

8-bit state (``state_bits=8``) keeps the single-process block grid exactly. A matrix's
moment rows are cut in blocks of ``spec.row_alignment()`` rows
(:func:`~coap_dist.distributed.placement.local_rows`), so no quantization block straddles two
ranks; a right-projected matrix whose cuts then differ from FSDP2's rows is "moved": the
all-to-all above brings each rank the gradient rows of its state rows held by a neighbour
(at most one block's rows per neighbour) and the all-gather of directions gives each rank
D for its weight rows, exactly as for a left side. An AdamW parameter keeps FSDP2's row
shards, which may cut a block: each piece keeps the parameter's grid, and one MAX all-reduce
per step (only when such cuts exist) makes the shared blocks' scales those of one process.

Checkpoints (:mod:`coap_dist.distributed.fsdp2_checkpoints`): ``torch.distributed.checkpoint``
saves the state once and reshards it to any world size (and to the owner layout or one
process) on load: ``Shard(0)`` DTensors where the rows are ``torch.chunk``'s,
:class:`~coap_dist.distributed.pieces.Pieces` where they are not (8-bit matrix rows, shared
8-bit scales).

:class:`Fsdp2Owner` (``sharding="owner"``): the exact whole-matrix owner protocol of
:mod:`coap_dist.distributed.owner` on the same row shards (one process's side rule; Tucker
convolutions, 8-bit state and ``rank="auto"``), checkpointed through DCP with the pieces of
:mod:`coap_dist.distributed.serving`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from coap_dist.distributed import support
from coap_dist.distributed.comm import Comm, Expect, share_block_max
from coap_dist.distributed.fsdp2_checkpoints import LocalCheckpoints
from coap_dist.distributed.owner import OwnerLayout, check_settings
from coap_dist.distributed.placement import (
    Range,
    chunk_range,
    conv_holders,
    local_rows,
    lpt,
    refresh_buckets,
    refresh_partial_bytes,
)
from coap_dist.distributed.views import FragmentView
from coap_dist.functional import projection as fproj
from coap_dist.functional import quant as fquant
from coap_dist.optim import kernels
from coap_dist.optim.layout import (
    ConvWork,
    Core,
    DenseWork,
    Layout,
    MatrixWork,
    Update,
    Work,
)
from coap_dist.optim.spec import ParamSpec, state_shapes
from coap_dist.optim.storage import (
    RankChange,
    allocate,
    change_projector,
    nbytes_of,
    reprojected,
    store_values,
)


def _shard_dim(p: DTensor) -> int | None:
    """Mesh dimension on which p is row-sharded (Shard(0)), or None if replicated."""
    dim = None
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0 or dim is not None:
                raise ValueError(
                    f"COAP under FSDP2 needs parameters sharded by rows (one Shard(0)), got "
                    f"placements {p.placements} for a parameter of shape {tuple(p.shape)}"
                )
            dim = mesh_dim
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"COAP under FSDP2: unsupported placement {placement} of {tuple(p.shape)}"
            )
    return dim


def _attach_dtensors(
    current: list[list[Tensor]],
) -> tuple[list[DTensor], dist.ProcessGroup | None, int]:
    """The DTensor parameters, their shard group and its size (checked to be one)."""
    flat = [t for g in current for t in g]
    if not all(isinstance(t, DTensor) for t in flat):
        kinds = sorted({type(t).__name__ for t in flat})
        raise ValueError(
            f"COAP under FSDP2: every parameter must be a DTensor from fully_shard, got {kinds}; "
            "apply fully_shard to the root module (after the blocks) so that it covers all "
            "parameters"
        )
    groups = set()
    for t in flat:
        assert isinstance(t, DTensor)
        dim = _shard_dim(t)
        if dim is not None:
            groups.add(t.device_mesh.get_group(dim))
    if len(groups) > 1:
        raise ValueError(
            "COAP under FSDP2: parameters are sharded over different process groups; build "
            "one optimizer per mesh"
        )
    group = groups.pop() if groups else None
    world = dist.get_world_size(group) if group is not None else 1
    return flat, group, world  # type: ignore[return-value]


_ROW_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row")
"""A matrix piece's state values indexed by its canonical rows."""


def _overlap(a: Range, b: Range) -> Range:
    """The intersection of two ranges (empty ranges start at ``a``'s start when disjoint)."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if hi > lo else (a[0], a[0])


def _rows_range(p: DTensor, world: int, rank: int) -> Range:
    """Rows [start, stop) of p held by shard rank ``rank`` (all rows when replicated)."""
    if _shard_dim(p) is None:
        return 0, p.shape[0]
    return chunk_range(p.shape[0], world, rank)


class Fsdp2View(FragmentView):
    """FSDP2 row shards as fragments of the flattened parameters (for the owner protocol)."""

    name = "fsdp2_owner"
    dcp = True
    uniform_grads = True  # every rank holds a shard of every gradient FSDP2 reduced

    def __init__(self) -> None:
        self._params: list[DTensor] = []

    def attach(self, current: list[list[Tensor]], built: list[list[Tensor | None]]) -> list[Tensor]:
        self._params, self.group, self._world = _attach_dtensors(current)
        self.remember(current, current)  # type: ignore[arg-type]
        return list(self._params)

    def device(self) -> torch.device:
        return self._params[0]._local_tensor.device if self._params else torch.device("cpu")

    def global_shape(self, index: int) -> tuple[int, ...]:
        return tuple(self._params[index].shape)

    def dtype(self, index: int) -> torch.dtype:
        return self._params[index].dtype

    def fragments(self, comm: Comm) -> list[list[Range] | None]:
        out: list[list[Range] | None] = []
        for p in self._params:
            if _shard_dim(p) is None:
                out.append(None)
                continue
            row = math.prod(p.shape[1:])
            out.append(
                [
                    (a * row, b * row)
                    for a, b in (
                        chunk_range(p.shape[0], self._world, r) for r in range(self._world)
                    )
                ]
            )
        return out

    def local(self, index: int) -> Tensor | None:
        return self._params[index]._local_tensor

    def grad(self, index: int) -> Tensor | None:
        g = self._params[index].grad  # a DTensor parameter's grad is a DTensor
        return None if g is None else cast(DTensor, g)._local_tensor


class Fsdp2Owner(OwnerLayout):
    """``sharding="owner"`` under FSDP2 / HSDP: the owner protocol on FSDP2's row shards."""

    def __init__(self, *, split: bool = True) -> None:
        super().__init__(Fsdp2View(), split=split)


class Fsdp2Local(LocalCheckpoints, Layout):
    """The LOCAL layout (module docstring): COAP on FSDP2's row shards, state split by
    canonical rows, P by its rows."""

    name = "fsdp2"
    uniform_grads = True  # every rank holds a shard of every gradient FSDP2 reduced

    def __init__(self) -> None:
        self._core: Core | None = None
        self._dparams: list[DTensor] = []
        self.specs: list[ParamSpec] = []
        self._sizes: list[int] = []
        self._current: list[Tensor] = []
        self._full_p: dict[int, Tensor] = {}
        self._moved: set[int] = set()
        self._shared: list[tuple[int, int]] = []
        self._active: list[int] = []
        self._conv_holder: dict[int, int] = {}

    # ------------------------------------------------------------------------------ bind
    def bind(self, core: Core) -> list[ParamSpec]:
        current = [list(g["params"]) for g in core.groups]
        self._core = core
        self._dparams, self.group, self.world = _attach_dtensors(current)
        self.params = list(self._dparams)
        self._sizes = [len(g) for g in current]
        self._current = [t for g in current for t in g]
        self.device = self._dparams[0]._local_tensor.device
        self.comm = Comm(self.group, self.device, solo=self.group is None)
        self.rank = self.comm.rank
        shapes = [tuple(p.shape) for p in self._dparams]
        self.group_of = [gi for gi, g in enumerate(current) for _ in g]
        specs = core.plan(shapes, [p.dtype for p in self._dparams], self.group_of)
        support.check_specs("fsdp2", specs, core.name)
        check_settings(self.comm, core.settings(), core.name)
        self.specs = specs
        self._moved = {
            i
            for i, s in enumerate(specs)
            if s.kind == "matrix"
            and self._sharded(i)
            and (
                s.side == "left"
                or any(self._rows(i, q) != self._weight_rows(i, q) for q in range(self.world))
            )
        }
        self._conv_holder = {
            i: h for i, h in conv_holders(specs, self.world).items() if self._sharded(i)
        }
        self._shared = sorted(
            {
                (i, start // fquant.BLOCK)
                for i, s in enumerate(specs)
                if s.kind == "dense" and self._sharded(i) and s.quantized_moment(s.numel)
                for start in (self._dense_start(i, q) for q in range(1, self.world))
                if 0 < start < s.numel and start % fquant.BLOCK
            }
        )
        return specs

    def _rows(self, i: int, rank: int | None = None) -> Range:
        """Rows [start, stop) of parameter i's state kept by ``rank`` (default: here): a COAP
        matrix's CANONICAL rows (:func:`~coap_dist.distributed.placement.local_rows`: for a
        right side the weight rows FSDP2 gives the rank unless 8-bit blocks need other cuts;
        for a left side a chunk of the n columns; the exchange of :meth:`gather` brings rows
        held elsewhere), else the weight rows of the shard."""
        s = self.specs[i]
        if s.kind != "matrix":
            return self._weight_rows(i, rank)
        if not self._sharded(i):
            return 0, s.rows
        return local_rows(s, self.world, self.rank if rank is None else rank)

    def _keeps(self, i: int) -> bool:
        """Whether this rank keeps state of parameter i (a sharded Tucker convolution's is
        whole on its holder; everything else is split over every rank)."""
        return self._conv_holder.get(i, self.rank) == self.rank

    @property
    def resize_refusal(self) -> str:  # type: ignore[override]
        """``rank="auto"`` re-plans at SVD steps: refused for matrices FSDP2 does not shard
        (every rank would add its copy to the spectrum sums)."""
        assert self._core is not None
        for i, s in enumerate(self.specs):
            if s.kind != "matrix" or self._core.groups[self.group_of[i]].get("rank") != "auto":
                continue
            if self.world > 1 and not self._sharded(i):
                return (
                    "a matrix FSDP2 does not shard (replicated placement) would enter the "
                    "spectrum sums once per rank; shard every matrix, or use sharding='owner'"
                )
        return ""

    def _dense_start(self, i: int, rank: int | None = None) -> int:
        """First flat element of AdamW parameter i's shard on ``rank`` (default: here)."""
        shape = self.specs[i].shape
        return self._weight_rows(i, rank)[0] * math.prod(shape[1:])

    def _weight_rows(self, i: int, rank: int | None = None) -> Range:
        """Weight rows of parameter i held by ``rank`` (FSDP2's ``Shard(0)`` chunk)."""
        return _rows_range(self._dparams[i], self.world, self.rank if rank is None else rank)

    def _sharded(self, i: int) -> bool:
        return self.world > 1 and _shard_dim(self._dparams[i]) is not None

    def _p_rows(self, i: int, rank: int | None = None) -> Range:
        """Rows of matrix i's projector kept by ``rank`` (all when not sharded)."""
        s = self.specs[i]
        if not self._sharded(i):
            return 0, s.rank
        return chunk_range(s.rank, self.world, self.rank if rank is None else rank)

    # ------------------------------------------------------------------------------ step
    def begin(self, present: Sequence[bool]) -> list[int] | None:
        assert self._core is not None
        self.comm.reset()
        current = [list(g["params"]) for g in self._core.groups]
        if [len(g) for g in current] != self._sizes or any(
            a is not b for a, b in zip((t for g in current for t in g), self._current, strict=True)
        ):
            return None
        return [i for i in range(len(self._dparams)) if present[self.group_of[i]]]

    def local_grad(self, index: int) -> Tensor | None:
        g = self._dparams[index].grad  # a DTensor parameter's grad is a DTensor
        return None if g is None else cast(DTensor, g)._local_tensor

    def reduce_sum(self, values: Tensor) -> Tensor:
        if self.world > 1:
            self.comm.all_reduce(values)
        return values

    def grad_total(self, local: Tensor, op: Literal["sum", "max"]) -> Tensor:
        if self.world > 1:  # shards of the shard sub-mesh; HSDP replicas hold the same
            self.comm.all_reduce(local, op)
        return local

    def _state(self, i: int) -> dict[str, Any]:
        assert self._core is not None
        return self._core.state[self._dparams[i]]

    def ensure_state(self, index: int) -> None:
        assert self._core is not None
        p = self._dparams[index]
        if self._core.state.get(p) or not self._keeps(index):
            return
        s = self.specs[index]
        local = p._local_tensor
        if s.kind == "conv":
            shapes = state_shapes(s)
        elif s.kind == "matrix":
            a0, a1 = self._rows(index)
            p0, p1 = self._p_rows(index)
            shapes = state_shapes(s, rows=a1 - a0, holder=False)
            shapes["projector"] = ((p1 - p0, s.cols), s.fmt.projector_dtype)
        else:
            shapes = state_shapes(
                s,
                numel=local.numel(),
                local_shape=tuple(local.shape),
                start=self._dense_start(index),
            )
        self._core.state[p] = allocate(shapes, self.device)

    def gather(self, active: Sequence[int]) -> Work:
        assert self._core is not None
        self._active = list(active)
        mats = [i for i in self._active if self.specs[i].kind == "matrix"]
        grads: dict[int, Tensor] = {}
        for i in self._active:
            g = self._dparams[i].grad
            assert g is not None
            grads[i] = cast(DTensor, g)._local_tensor  # a DTensor parameter's grad is a DTensor
        convs = [i for i in self._active if self.specs[i].kind == "conv"]
        self._full_p, canon = self._exchange(mats, grads, convs)
        work = Work([], [], [])
        for i in self._active:
            p, s = self._dparams[i], self.specs[i]
            group = self._core.groups[self.group_of[i]]
            if s.kind == "conv":
                if self._keeps(i):
                    work.convs.append(ConvWork(i, s, group, self._state(i), canon[i]))
                continue
            st = self._state(i)
            if s.kind == "matrix":
                if i not in canon:
                    canon[i] = fproj.canonical(grads[i], s.side)
                work.matrices.append(
                    MatrixWork(
                        i, s, group, st, self._rows(i), canon[i], self._full_p[i], self._sharded(i)
                    )
                )
            else:
                work.dense.append(
                    DenseWork(i, s, group, st, p._local_tensor, grads[i], self._dense_start(i))
                )
        return work

    def share_block_max(self, maxima: dict[int, list[Tensor]]) -> dict[int, list[Tensor]]:
        """One MAX all-reduce over the quantization blocks that FSDP2's row shards of 8-bit
        AdamW parameters cut (when this call's parameters have any)."""
        if not self._shared:
            return maxima
        starts = {i: self._dense_start(i) for i, _ in self._shared}
        return share_block_max(self.comm, maxima, self._shared, starts, set(self._active))

    def _exchange(
        self, mats: Sequence[int], grads: Mapping[int, Tensor], convs: Sequence[int] = ()
    ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """One all-to-all for every active sharded matrix: its projector rows to every rank
        (the whole P everywhere) and, for a matrix whose canonical rows are not the weight
        rows this rank holds (``_moved``), those rows of its gradient. Left side: rank q
        receives from each rank s the block G_s[:, n_q] (m_s x n_q) of the weight rows s
        holds and the columns n_q that q keeps, i.e. q's canonical rows G^T[n_q, :] (n_q x
        m): (N - 1) / N of each rank's gradient shard. Right side with 8-bit rows cut on
        quantization blocks: the rows of q's state rows that s holds (at most one block's
        rows per neighbour). A Tucker convolution's shards go to its holder. Returns (P per
        matrix, canonical gradient rows per moved matrix, the whole gradient per convolution
        held here)."""
        full_p = {i: self._state(i)["projector"] for i in mats if not self._sharded(i)}
        split = [i for i in mats if self._sharded(i)]
        whole = {i: grads[i] for i in convs if i not in self._conv_holder}
        convs = [i for i in convs if i in self._conv_holder]
        if not split and not convs:
            return full_p, whole
        left = [i for i in split if i in self._moved]
        me = self.rank
        sends: dict[int, list[Tensor]] = {}
        expects: dict[int, list[Expect]] = {}
        for q in range(self.world):
            if q == me:
                continue
            sends[q] = [self._state(i)["projector"] for i in split]
            expects[q] = []
            for i in split:
                p0, p1 = self._p_rows(i, q)
                s = self.specs[i]
                expects[q].append(Expect((p1 - p0, s.cols), s.fmt.projector_dtype))
            for i in left:
                sends[q].append(self._rows_for(i, q, grads[i]))
                if self.specs[i].side == "left":
                    w0, w1 = self._weight_rows(i, q)
                    a0, a1 = self._rows(i)
                    expects[q].append(Expect((w1 - w0, a1 - a0), grads[i].dtype))
                else:
                    a0, a1 = _overlap(self._rows(i), self._weight_rows(i, q))
                    expects[q].append(Expect((a1 - a0, self.specs[i].cols), grads[i].dtype))
            for i in convs:
                h, shape = self._conv_holder[i], self.specs[i].shape
                if q == h:
                    sends[q].append(grads[i])
                if me == h:
                    w0, w1 = self._weight_rows(i, q)
                    expects[q].append(Expect((w1 - w0, *shape[1:]), grads[i].dtype))
        got = self.comm.exchange(sends, expects, needed=True)
        for k, i in enumerate(split):
            own = self._state(i)["projector"]
            full_p[i] = torch.cat([got[q][k] if q != me else own for q in range(self.world)])
        canon: dict[int, Tensor] = {}
        for k, i in enumerate(left, start=len(split)):
            blocks = [
                got[q][k] if q != me else self._rows_for(i, me, grads[i]) for q in range(self.world)
            ]
            if self.specs[i].side == "left":
                canon[i] = torch.cat(blocks).t()  # (m x n_q)^T: the canonical rows kept here
            else:
                canon[i] = torch.cat(blocks)  # in weight-row order: the rows kept here
        cursor = {q: len(split) + len(left) for q in got if q != me}
        for i in convs:
            if self._conv_holder[i] != me:
                continue
            parts = []
            for q in range(self.world):
                if q == me:
                    parts.append(grads[i])
                else:
                    parts.append(got[q][cursor[q]])
                    cursor[q] += 1
            whole[i] = torch.cat(parts)
        canon.update(whole)
        return full_p, canon

    def _rows_for(self, i: int, q: int, grad: Tensor) -> Tensor:
        """The part of this rank's gradient shard of moved matrix i that rank q keeps as
        canonical rows: G_s[:, n_q] for a left side, G_s[rows of q] for a right one."""
        if self.specs[i].side == "left":
            n0, n1 = self._rows(i, q)
            return grad[:, n0:n1]
        w0 = self._weight_rows(i)[0]
        a0, a1 = _overlap(self._rows(i, q), self._weight_rows(i))
        return grad[a0 - w0 : a1 - w0]

    # --------------------------------------------------------------------------- refresh
    def refresh(self, work: Work, due: Mapping[int, str]) -> list[Tensor]:
        oks: list[Tensor] = []
        split = [i for i in sorted(due) if self._sharded(i) and self.specs[i].kind == "matrix"]
        for cw in work.convs:
            kind = due.get(cw.index)
            if kind is not None:
                oks.append(kernels.conv_refresh(cw, kind))
        for mw in work.matrices:
            kind = due.get(mw.index)
            if kind is not None and not mw.split:
                p_new, ok = kernels.refresh_whole(mw, kind)
                mw.projector = kernels.install_projector(mw, p_new, ok, kind, holder=False)
                self._store(mw.index, mw.projector)
                oks.append(ok)
        if split:
            group = {mw.index: mw.group for mw in work.matrices}
            sizes = [
                refresh_partial_bytes(self.specs[i], due[i], group[i]["oversample"]) for i in split
            ]
            for bucket in refresh_buckets(split, sizes):
                oks.extend(self._split_refresh(work, bucket, due))
        return oks

    def _store(self, i: int, proj: Tensor) -> None:
        """Keep this rank's rows of a (new) projector."""
        p0, p1 = self._p_rows(i)
        self._state(i)["projector"].copy_(proj[p0:p1])

    def _split_refresh(self, work: Work, items: list[int], due: Mapping[int, str]) -> list[Tensor]:
        """Refresh row-split matrices (the team math of :mod:`coap_dist.optim.kernels`): power
        iterations by all-reduces, the partial sums by one reduce-scatter to the rank
        finishing each refresh (LPT on a b r), the new projectors by one all-gather."""
        mine = {mw.index: mw for mw in work.matrices}
        cost = [float(self.specs[i].rows * self.specs[i].cols * self.specs[i].rank) for i in items]
        holder = dict(zip(items, lpt(cost, self.world), strict=True))
        rsvd_items = [i for i in items if due[i] != "update"]
        sketch = {i: kernels.team_sketch(mine[i], due[i]) for i in rsvd_items}
        iters = max((mine[i].group["power_iters"] for i in rsvd_items), default=0)
        for it in range(iters):
            part = [i for i in rsvd_items if mine[i].group["power_iters"] > it]
            grams = self.comm.all_reduce_list([kernels.power_gram_partial(sketch[i]) for i in part])
            zs = self.comm.all_reduce_list(
                [
                    kernels.power_z_partial(mine[i], sketch[i], fproj.inverse_sqrt(w))
                    for i, w in zip(part, grams, strict=True)
                ]
            )
            for i, z in zip(part, zs, strict=True):
                sketch[i] = kernels.power_sketch(mine[i], z)
        partials = {i: kernels.team_partials(mine[i], due[i], sketch.get(i)) for i in items}
        sums = self._reduce_to_holders(items, holder, partials)
        results: dict[int, Tensor] = {}
        oks: list[Tensor] = []
        for i, total in sums.items():
            mw = mine[i]
            p_new, ok = kernels.team_finish(mw.spec, mw.group, due[i], total, mw.projector)
            results[i] = torch.cat([p_new.float().reshape(-1), ok.float().reshape(1)])
            oks.append(ok)
        news = self._gather_from_holders(items, holder, results)
        for i in items:
            mw, s = mine[i], self.specs[i]
            flat = news[i]
            p_new, ok = flat[:-1].view(s.rank, s.cols), flat[-1] > 0.5
            mw.projector = kernels.install_projector(mw, p_new, ok, due[i], holder=False)
            self._store(i, mw.projector)
        return oks

    def _reduce_to_holders(
        self, items: list[int], holder: Mapping[int, int], partials: Mapping[int, list[Tensor]]
    ) -> dict[int, list[Tensor]]:
        """One reduce-scatter (fp64): rank q receives the sums of the matrices it holds."""
        seg: list[list[int]] = [[] for _ in range(self.world)]
        for i in items:
            seg[holder[i]].append(i)
        sizes = [sum(t.numel() for i in s for t in partials[i]) for s in seg]
        width = max(sizes)
        buf = torch.zeros(self.world * width, dtype=torch.float64, device=self.device)
        for q, s in enumerate(seg):
            off = q * width
            for i in s:
                for t in partials[i]:
                    buf[off : off + t.numel()] = t.reshape(-1).double()
                    off += t.numel()
        got = self.comm.reduce_scatter(buf)
        out: dict[int, list[Tensor]] = {}
        off = 0
        for i in seg[self.rank]:
            parts = []
            for t in partials[i]:
                parts.append(got[off : off + t.numel()].view(t.shape))
                off += t.numel()
            out[i] = parts
        return out

    def _gather_from_holders(
        self, items: list[int], holder: Mapping[int, int], results: Mapping[int, Tensor]
    ) -> dict[int, Tensor]:
        """One all-gather: every holder's results (flat fp32), on every rank."""
        seg: list[list[int]] = [[] for _ in range(self.world)]
        for i in items:
            seg[holder[i]].append(i)
        size = {i: self.specs[i].rank * self.specs[i].cols + 1 for i in items}
        width = max(sum(size[i] for i in s) for s in seg)
        mine = torch.zeros(width, dtype=torch.float32, device=self.device)
        off = 0
        for i in seg[self.rank]:
            mine[off : off + size[i]] = results[i]
            off += size[i]
        got = self.comm.all_gather(mine).view(self.world, width)
        out: dict[int, Tensor] = {}
        for q, s in enumerate(seg):
            off = 0
            for i in s:
                out[i] = got[q, off : off + size[i]]
                off += size[i]
        return out

    def team_sum(
        self,
        partials: Mapping[int, Tensor],
        sizes: Mapping[int, int],
        dtype: torch.dtype = torch.float32,
    ) -> dict[int, Tensor]:
        split = [i for i in sorted(sizes) if self._sharded(i)]
        out = {i: t for i, t in partials.items() if not self._sharded(i)}
        if split:
            summed = self.comm.all_reduce_list([partials[i].to(dtype) for i in split])
            out.update(zip(split, summed, strict=True))
        return out

    def scatter(self, updates: Sequence[Update], work: Work) -> None:
        """W_local <- keep (W_local - alpha back(D)). Right side: back(D) = D P on the rows
        held, no traffic. Moved matrices (left side, or 8-bit rows cut on blocks): the
        directions D (rows x r) of the canonical rows are spread over the ranks, so one
        all-gather (every moved matrix, padded to the largest rank's rows) gives each rank
        the whole D, and its weight rows get (D P[:, rows])^T (left) or D[rows] P (right)."""
        mats = {mw.index: mw for mw in work.matrices}
        left = [mw.index for mw in work.matrices if mw.index in self._moved]
        whole = self._gather_directions(left, {u.index: u.direction for u in updates})
        self._scatter_convs({u.index: u for u in updates})
        for u in updates:
            if self.specs[u.index].kind == "conv":
                continue
            w = self._dparams[u.index]._local_tensor
            proj = mats[u.index].projector.to(w.dtype)
            if self.specs[u.index].side == "right":
                d = u.direction
                if u.index in whole:
                    w0, w1 = self._weight_rows(u.index)
                    d = whole[u.index][w0:w1]
                w.addmm_(d.to(w.dtype), proj, beta=u.keep, alpha=-u.alpha * u.keep)
                continue
            d = whole.get(u.index, u.direction).to(w.dtype)
            w0, w1 = self._weight_rows(u.index) if self._sharded(u.index) else (0, w.shape[0])
            w.addmm_(proj[:, w0:w1].t(), d.t(), beta=u.keep, alpha=-u.alpha * u.keep)

    def _scatter_convs(self, updates: Mapping[int, Update]) -> None:
        """Tucker convolutions: W_s <- keep (W_s - alpha U[rows of s]) on every rank, the
        holder sending each rank its rows of the update U (one all-to-all, only in steps
        with sharded convolutions)."""
        assert self._core is not None
        convs = [i for i in self._active if self.specs[i].kind == "conv"]
        sharded = [i for i in convs if i in self._conv_holder]
        me, got = self.rank, {}
        if sharded:
            sends: dict[int, list[Tensor]] = {}
            expects: dict[int, list[Expect]] = {}
            for i in sharded:
                h, w = self._conv_holder[i], self._dparams[i]._local_tensor
                for q in range(self.world):
                    if q == me:
                        continue
                    if me == h:
                        w0, w1 = self._weight_rows(i, q)
                        sends.setdefault(q, []).append(updates[i].direction[w0:w1].to(w.dtype))
                    elif q == h:
                        expects.setdefault(q, []).append(Expect(tuple(w.shape), w.dtype))
            got = self.comm.exchange(sends, expects, needed=True)
        cursor = dict.fromkeys(got, 0)
        for i in convs:
            w = self._dparams[i]._local_tensor
            h = self._conv_holder.get(i, me)
            if h == me:
                w0, w1 = self._weight_rows(i) if i in self._conv_holder else (0, w.shape[0])
                u = updates[i].direction[w0:w1].to(w.dtype)
            else:
                u = got[h][cursor[h]]
                cursor[h] += 1
            alpha, keep = (
                self._core.step_size(i),
                kernels.decay_keep(self._core.groups[self.group_of[i]]),
            )
            w.mul_(keep).add_(u.reshape(w.shape), alpha=-alpha * keep)

    def _gather_directions(
        self, items: Sequence[int], local: Mapping[int, Tensor]
    ) -> dict[int, Tensor]:
        """Whole D (rows x r) of every matrix in ``items`` from each rank's canonical rows:
        one all-gather per direction dtype, each matrix padded to the largest rank's rows."""
        out: dict[int, Tensor] = {}
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in items:
            by_dtype.setdefault(local[i].dtype, []).append(i)
        for dtype, group in by_dtype.items():
            width = [
                max(b - a for a, b in (self._rows(i, q) for q in range(self.world)))
                * self.specs[i].rank
                for i in group
            ]
            buf = torch.zeros(sum(width), dtype=dtype, device=self.device)
            off = 0
            for i, c in zip(group, width, strict=True):
                buf[off : off + local[i].numel()] = local[i].reshape(-1)
                off += c
            got = self.comm.all_gather(buf).view(self.world, -1)
            off = 0
            for i, c in zip(group, width, strict=True):
                s = self.specs[i]
                parts = []
                for q in range(self.world):
                    a0, a1 = self._rows(i, q)
                    parts.append(got[q, off : off + (a1 - a0) * s.rank].view(a1 - a0, s.rank))
                out[i] = torch.cat(parts)
                off += c
        return out

    def resize(
        self,
        old: Layout,
        kept: Mapping[int, dict[str, Any]],
        changes: Mapping[int, RankChange],
        projectors: Mapping[int, Tensor],
        where: str,
    ) -> None:
        """Re-project the changed matrices' moment rows where they are, then move the rows
        whose owner the new rank changes (8-bit rows are cut on blocks of
        ``spec.row_alignment()`` rows, which follows the rank) in one all-to-all of fp32
        values; P, split by its rows (which follow the rank too), is re-projected whole from
        ``projectors`` and each rank keeps its new rows."""
        assert self._core is not None and isinstance(old, Fsdp2Local)
        items = sorted(changes)
        values = {
            i: reprojected({k: v for k, v in kept[i].items() if k != "projector"}, changes[i])
            for i in items
        }
        rowed = {i: [k for k in _ROW_KEYS if k in values[i]] for i in items}
        moving = [i for i in items if self._sharded(i)]
        me = self.rank
        sends: dict[int, list[Tensor]] = {}
        expects: dict[int, list[Expect]] = {}
        for q in range(self.world):
            if q == me:
                continue
            for i in moving:
                o0 = old._rows(i)[0]
                n0, n1 = _overlap(old._rows(i), self._rows(i, q))
                a0, a1 = _overlap(self._rows(i), old._rows(i, q))
                for k in rowed[i]:
                    v = values[i][k]
                    sends.setdefault(q, []).append(v[n0 - o0 : n1 - o0].float().to(self.device))
                    expects.setdefault(q, []).append(Expect((a1 - a0, *v.shape[1:]), torch.float32))
        got = self.comm.exchange(sends, expects, needed=bool(moving))
        cursor = dict.fromkeys(got, 0)
        for i in items:
            new = dict(values[i])
            if i in moving:
                o0 = old._rows(i)[0]
                for k in rowed[i]:
                    parts = []
                    for q in range(self.world):
                        if q == me:
                            a0, a1 = _overlap(self._rows(i), old._rows(i))
                            parts.append(values[i][k][a0 - o0 : a1 - o0].float())
                        else:
                            parts.append(got[q][cursor[q]].cpu())
                            cursor[q] += 1
                    new[k] = torch.cat(parts)
            p0, p1 = self._p_rows(i)
            # (on the host, with the moments: store_values puts them on the device)
            new["projector"] = change_projector(projectors[i].cpu(), changes[i])[p0:p1]
            self.ensure_state(i)
            store_values(self._state(i), new, f"{where} of parameter {i}")

    def metrics(self) -> dict[str, float]:
        return {
            "optim/comm_calls_per_step": float(self.comm.calls),
            "optim/comm_bytes_per_step": float(max(self.comm.sent, self.comm.received)),
        }

    # ------------------------------------------------------------------------ checkpoints
    def state_bytes(self) -> int:
        assert self._core is not None
        return sum(nbytes_of(self._core.state[p]) for p in self._dparams if self._core.state.get(p))
