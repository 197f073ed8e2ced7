"""The OWNER protocol: one layout for DDP, FSDP1, FSDP2 ``sharding="owner"`` and DeepSpeed.

A :class:`FragmentView` (one per wrapper: DDP's whole tensors here, FSDP1 and FSDP2 in their
files, DeepSpeed ZeRO 1-3 in ``coap_dist.integrations.deepspeed``) says which flat range of
every parameter this rank holds and where its gradient is. :class:`OwnerLayout` does the rest
the same way for all of them, from the placement of
:func:`~coap_dist.distributed.placement.owner_placement` (every rank computes the same one):

* AdamW parameters: each rank runs AdamW on the flat piece it keeps (its own fragment on
  sharded layouts; a 1/N range of the concatenated parameters under DDP);
* a COAP matrix lives whole on one rank (exact single-process math) or, when that would put
  more than ``imbalance`` x the mean state on a rank, its canonical rows are split over a
  *team* and its projector P kept by one *holder*;
* Tucker convolutions live whole on one rank.

One plain step costs THREE collectives whatever the world size, each batching every
parameter: the gradient check (one all-reduce of a flag vector; the step's only host sync),
the gradient round (one ``all_to_all``: the gradient rectangles each rank holds go to the
ranks that compute them, P to the other members of a team) and the update round (one
``all_to_all``: for every rank holding weights a matrix piece touches, the cheaper of its
update rectangles or its factors D (rows x r) and P (r x b)). Splitting is rare at small N:
then the gradient round is empty under DDP and the update round carries D and P. A fourth,
tiny one runs only where a wrapper's partition cuts an 8-bit AdamW parameter inside a
quantization block (FSDP1, FSDP2, DeepSpeed; never under DDP, whose cuts fall on blocks): a
MAX all-reduce of those blocks' maxima (:meth:`OwnerLayout.share_block_max`), so that every
piece quantizes as one process does.

Bytes per rank per plain step are at most the gradient bytes it holds (sent) and the
gradient bytes of the rows it computes (received), plus, for every matrix it holds weights
of, min(update rectangles, D rows and P), plus AdamW pieces under DDP (ZeRO-1's parameter
all-gather, for those only). Refreshes of whole matrices are local; a team's refresh adds
two rounds (members send their partial sums, r x r and r x b, to the holder; the holder
sends the new P back), plus four per power iteration.

Fragment views live in :mod:`coap_dist.distributed.views`, the checkpoint serving (per-rank,
consolidated and re-cut state dicts) in :mod:`coap_dist.distributed.serving`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from coap_dist.distributed.boxes import Box, intersect, view_in_fragment, view_in_region
from coap_dist.distributed.comm import Comm, Expect, share_block_max
from coap_dist.distributed.placement import (
    Piece,
    Placement,
    owner_placement,
    refresh_buckets,
    refresh_partial_bytes,
)
from coap_dist.distributed.routes import Geometry, Route, geometries, plan_routes
from coap_dist.distributed.serving import OwnerCheckpoints
from coap_dist.distributed.views import FragmentView, ReplicatedView
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
from coap_dist.optim.storage import allocate, nbytes_of

__all__ = ["OwnerLayout", "OwnerSharding", "check_settings"]


def check_settings(comm: Comm, settings: Mapping[str, Any], what: str) -> None:
    """Raise the same ValueError on every rank if ranks were built with other settings (one
    object all-gather at bind: a rank with other hyperparameters would issue other
    collectives later and hang the job)."""
    if comm.world == 1 or comm.same_everywhere(repr(sorted(settings.items()))):
        return
    gathered = comm.all_gather_objects(dict(settings))
    first = gathered[0]
    assert isinstance(first, dict)
    for r, other in enumerate(gathered[1:], start=1):
        assert isinstance(other, dict)
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise ValueError(
                    f"{what}: hyperparameter `{key}` differs across ranks: {first.get(key)!r} on "
                    f"rank 0 vs {other.get(key)!r} on rank {r}; every rank must build the "
                    "optimizer with the same arguments"
                )


class OwnerLayout(OwnerCheckpoints, Layout):
    """The owner protocol over a :class:`FragmentView` (module docstring).

    Args:
        view: how the wrapper hands over parameters.
        split: allow splitting a matrix's rows over ranks to keep state balanced (False:
            every matrix whole on one rank, exact, the largest matrix then sets the floor).
        imbalance: the largest rank's state at most this multiple of the mean (with split).
    """

    def __init__(self, view: FragmentView, *, split: bool = True, imbalance: float = 1.10) -> None:
        if not imbalance >= 1.0:
            raise ValueError(f"OwnerLayout: invalid `imbalance`={imbalance!r}; must be >= 1")
        self.view = view
        self.split = split
        self.imbalance = imbalance
        self.name = view.name
        self.world = 1
        self.rank = 0
        self.placement: Placement | None = None
        self._core: Core | None = None
        self._entries: list[Geometry] = []
        self._mine: list[Piece | None] = []
        self._params: list[Tensor] = []
        self._g_out: list[list[Route]] = []
        self._g_in: list[list[Route]] = []
        self._s_out: list[list[Route]] = []
        self._s_in: list[list[Route]] = []
        self._active: list[int] = []
        self._shared_blocks: list[tuple[int, int]] = []  # (AdamW parameter, block) pieces share
        self._starts: dict[int, int] = {}  # first element of this rank's piece of each parameter

    # ------------------------------------------------------------------------------ bind
    def bind(self, core: Core) -> list[ParamSpec]:
        view = self.view
        self._core = core
        params = view.attach([list(g["params"]) for g in core.groups], core.built)
        self._params = params
        self.params = params
        self.device = view.device()
        self.comm = Comm(None if view.solo else view.group, self.device, solo=view.solo)
        self.world, self.rank = self.comm.world, self.comm.rank
        shapes = [view.global_shape(i) for i in range(len(params))]
        self.group_of = view.group_of
        specs = core.plan(shapes, [view.dtype(i) for i in range(len(params))], self.group_of)
        check_settings(self.comm, core.settings(), core.name)
        frags = view.fragments(self.comm)
        # rank="auto": state is placed by the fixed ranks' bytes (the budget), so that a
        # re-plan with other ranks keeps every piece on its rank (and a resumed run places
        # like the one that saved).
        budget = core.plan(
            shapes,
            [view.dtype(i) for i in range(len(params))],
            self.group_of,
            fixed_rank=True,
        )
        # rank="auto" with 8-bit state: a split must fall on quantization blocks at every
        # rank a re-plan may choose (the pieces stay), i.e. on multiples of BLOCK rows.
        budget = [
            dataclasses.replace(s, align_rows=fquant.BLOCK)
            if s.kind == "matrix"
            and s.fmt.quantized
            and core.groups[self.group_of[s.index]].get("rank") == "auto"
            else s
            for s in budget
        ]
        self.placement = owner_placement(
            budget, self.world, frags, split=self.split, imbalance=self.imbalance
        )
        self._entries = geometries(specs, self.placement, frags)
        self._mine = [self.placement.piece(i, self.rank) for i in range(len(specs))]
        self._starts = {i: pc.start for i, pc in enumerate(self._mine) if pc is not None}
        self._shared_blocks = sorted(
            {
                (s.index, pc.stop // fquant.BLOCK)
                for s in specs
                if s.kind == "dense" and s.quantized_moment(s.numel)
                for pc in self.placement.pieces[s.index][:-1]
                if pc.stop % fquant.BLOCK
            }
        )
        gather, scatter = plan_routes(
            self._entries, self.world, reduced=view.reduced, solo=view.solo
        )
        me = self.rank
        self._g_any = [bool(rs) for rs in gather]
        self._s_any = [bool(rs) for rs in scatter]
        self._g_out = [[r for r in rs if r.src == me] for rs in gather]
        self._g_in = [[r for r in rs if r.dst == me] for rs in gather]
        self._s_out = [[r for r in rs if r.src == me] for rs in scatter]
        self._s_in = [[r for r in rs if r.dst == me] for rs in scatter]
        return specs

    # ------------------------------------------------------------------------------ step
    def begin(self, present: Sequence[bool]) -> list[int] | None:
        assert self._core is not None
        self.comm.reset()
        current = [list(g["params"]) for g in self._core.groups]
        ids = self.view.begin(current)
        if ids is None:
            return None
        return [i for i in ids if present[self.group_of[i]]]

    def local_grad(self, index: int) -> Tensor | None:
        return self.view.grad(index)

    @property
    def uniform_grads(self) -> bool:  # type: ignore[override]
        return self.world == 1 or self.view.uniform_grads

    def reduce_sum(self, values: Tensor) -> Tensor:
        if self.world > 1:
            self.comm.all_reduce(values)
        return values

    def grad_total(self, local: Tensor, op: Literal["sum", "max"]) -> Tensor:
        if not self.view.reduced:
            raise ValueError(
                f"{self.name}: clip_grad_norm_ needs the reduced gradients, but this layout "
                "(OwnerSharding(reduce_gradients=True)) sums each rank's own gradients inside "
                "step(); clip with sharding='owner' under DDP, or do not clip"
            )
        if self.view.grads_partition and self.world > 1:
            self.comm.all_reduce(local, op)
        return local

    def share_block_max(self, maxima: dict[int, list[Tensor]]) -> dict[int, list[Tensor]]:
        """One MAX all-reduce over the blocks that pieces of 8-bit AdamW parameters share
        (the placement's cuts inside a quantization block; none under DDP, whose cuts fall
        on blocks), when this call's parameters have any."""
        if not self._shared_blocks:  # (every step: nothing to do on most layouts)
            return maxima
        return share_block_max(
            self.comm, maxima, self._shared_blocks, self._starts, set(self._active)
        )

    def ensure_state(self, index: int) -> None:
        assert self._core is not None
        p = self._params[index]
        if self._core.state.get(p):
            return
        e, mine = self._entries[index], self._mine[index]
        holder = e.holder == self.rank
        if mine is None and not holder:
            return
        if e.spec.kind == "matrix":
            if mine is None:
                shapes = {
                    k: v
                    for k, v in state_shapes(e.spec, holder=True).items()
                    if k in ("step", "projector")
                }
            else:
                shapes = state_shapes(e.spec, rows=mine.size, holder=holder)
        elif e.spec.kind == "dense":
            assert mine is not None
            shapes = state_shapes(
                e.spec, numel=mine.size, local_shape=self._dense_shape(index), start=mine.start
            )
        else:
            shapes = state_shapes(e.spec)
        self._core.state[p] = allocate(shapes, self.device)

    def _dense_shape(self, index: int) -> tuple[int, ...]:
        """Shape of an AdamW piece's moments: the shape of the tensor it updates (the
        fragment as the wrapper hands it, the parameter when whole, else flat)."""
        e, mine = self._entries[index], self._mine[index]
        assert mine is not None
        if e.frags is not None:
            local = self.view.local(index)
            assert local is not None
            return tuple(local.shape)
        return e.spec.shape if mine.size == e.spec.numel else (mine.size,)

    def _state(self, index: int) -> dict[str, Any]:
        assert self._core is not None
        return self._core.state[self._params[index]]

    def _group(self, index: int) -> dict[str, Any]:
        assert self._core is not None
        return self._core.groups[self.group_of[index]]

    def _grad_box(self, index: int, box: Box) -> Tensor:
        """This rank's gradient in ``box`` (zeros when it has none this step: a parameter
        unused on this rank under ZeRO-2 contributes nothing to the sum)."""
        e = self._entries[index]
        g = self.view.grad(index)
        if g is None:
            return torch.zeros(box.shape, dtype=self.view.dtype(index), device=self.device)
        return view_in_fragment(g, e.fragment(self.rank)[0], e.shape2[1], box)

    def gather(self, active: Sequence[int]) -> Work:
        self._active = list(active)
        sends: dict[int, list[Tensor]] = {}
        expects: dict[int, list[Expect]] = {}
        for i in self._active:
            gdt = self.view.dtype(i)
            for r in self._g_out[i]:
                if r.kind == "grad":
                    sends.setdefault(r.dst, []).extend(self._grad_box(i, b) for b in r.boxes)
                else:
                    sends.setdefault(r.dst, []).append(self._state(i)["projector"])
            for r in self._g_in[i]:
                if r.kind == "grad":
                    expects.setdefault(r.src, []).extend(Expect(b.shape, gdt) for b in r.boxes)
                else:
                    pdt = self._entries[i].spec.fmt.projector_dtype
                    expects.setdefault(r.src, []).append(Expect(r.shape, pdt))
        got = self.comm.exchange(sends, expects, needed=any(self._g_any[i] for i in self._active))
        cursor = {q: 0 for q in got}
        work = Work([], [], [])
        for i in self._active:
            received: list[tuple[Box, Tensor]] = []
            proj = None
            for r in self._g_in[i]:
                if r.kind == "grad":
                    for b in r.boxes:
                        received.append((b, got[r.src][cursor[r.src]]))
                        cursor[r.src] += 1
                else:
                    proj = got[r.src][cursor[r.src]]
                    cursor[r.src] += 1
            if self._mine[i] is not None:
                self._add_work(work, i, received, proj)
        return work

    def _add_work(
        self, work: Work, i: int, received: list[tuple[Box, Tensor]], proj: Tensor | None
    ) -> None:
        e, mine = self._entries[i], self._mine[i]
        assert mine is not None
        st, group = self._state(i), self._group(i)
        if e.spec.kind == "dense" and (
            e.frags is not None or (self.view.reduced and mine.stop - mine.start == e.spec.numel)
        ):  # the whole local piece: its weight and gradient as they are
            local, g = self.view.local(i), self.view.grad(i)
            assert local is not None and g is not None
            work.dense.append(DenseWork(i, e.spec, group, st, local, g, mine.start))
            return
        region = e.region(mine)
        block = self._region_grad(i, e, region, received)
        if e.spec.kind == "dense":
            local = self.view.local(i)
            assert local is not None
            weight = local.view(-1)[mine.start : mine.stop].view(self._dense_shape(i))
            work.dense.append(
                DenseWork(i, e.spec, group, st, weight, block.view(weight.shape), mine.start)
            )
        elif e.spec.kind == "conv":
            work.convs.append(ConvWork(i, e.spec, group, st, block.reshape(e.spec.shape)))
        else:
            canon = fproj.canonical(block, e.spec.side)
            p = st["projector"] if proj is None else proj
            rows = (mine.start, mine.stop)
            work.matrices.append(MatrixWork(i, e.spec, group, st, rows, canon, p, e.split))

    def _region_grad(
        self, i: int, e: Geometry, region: Box, received: list[tuple[Box, Tensor]]
    ) -> Tensor:
        """This rank's region of the gradient (W2 coordinates): a view of the whole local
        gradient under DDP, else assembled from its own fragment and the rectangles
        received (summed, divided by the world size, when gradients are not reduced)."""
        g = self.view.grad(i)
        if e.frags is None and self.view.reduced:
            assert g is not None
            return view_in_region(g.reshape(e.shape2), Box(0, e.shape2[0], 0, e.shape2[1]), region)
        dtype = self.view.dtype(i)
        if not self.view.reduced:
            buf = torch.zeros(region.shape, dtype=dtype, device=self.device)
            if g is not None:
                buf += view_in_region(
                    g.reshape(e.shape2), Box(0, e.shape2[0], 0, e.shape2[1]), region
                )
            for b, t in received:
                view_in_region(buf, region, b).add_(t.view(b.shape))
            return buf.div_(self.world)
        buf = torch.empty(region.shape, dtype=dtype, device=self.device)
        if g is not None:
            for b in intersect(e.fragment(self.rank), region, e.shape2[1]):
                view_in_region(buf, region, b).copy_(self._grad_box(i, b))
        for b, t in received:
            view_in_region(buf, region, b).copy_(t.view(b.shape))
        return buf

    # --------------------------------------------------------------------------- refresh
    def refresh(self, work: Work, due: Mapping[int, str]) -> list[Tensor]:
        oks = []
        for mw in work.matrices:
            kind = due.get(mw.index)
            if kind is not None and not mw.split:
                p_new, ok = kernels.refresh_whole(mw, kind)
                mw.projector = kernels.install_projector(mw, p_new, ok, kind, holder=True)
                oks.append(ok)
        for cw in work.convs:
            kind = due.get(cw.index)
            if kind is not None:
                oks.append(kernels.conv_refresh(cw, kind))
        team_due = sorted(i for i in due if self._entries[i].split)
        sizes = [
            refresh_partial_bytes(self._entries[i].spec, due[i], self._group(i)["oversample"])
            for i in team_due
        ]
        for bucket in refresh_buckets(team_due, sizes):
            oks.extend(self._team_refresh(work, bucket, due))
        return oks

    def _round(
        self,
        items: Sequence[int],
        up: bool,
        payload: Callable[[int], list[Tensor]],
        shapes: Callable[[int], list[Expect]],
    ) -> dict[int, list[list[Tensor]]]:
        """One exchange between each team's members and its holder for the matrices in
        ``items``: ``up`` members -> holder (returns, on the holder, every member's
        tensors, own included), else holder -> members (returns, on a member, the
        holder's). ``payload(i)`` is what this rank sends for i, ``shapes(i)`` what it gets
        from one peer."""
        me = self.rank
        sends: dict[int, list[Tensor]] = {}
        expects: dict[int, list[Expect]] = {}
        for i in items:
            e = self._entries[i]
            h = e.holder
            if up:
                if me in e.team and me != h:
                    sends.setdefault(h, []).extend(payload(i))
                if me == h:
                    for t in e.team:
                        if t != me:
                            expects.setdefault(t, []).extend(shapes(i))
            else:
                if me == h:
                    for t in e.team:
                        if t != me:
                            sends.setdefault(t, []).extend(payload(i))
                if me in e.team and me != h:
                    expects.setdefault(h, []).extend(shapes(i))
        got = self.comm.exchange(sends, expects, needed=bool(items))
        cursor = {q: 0 for q in got}
        out: dict[int, list[list[Tensor]]] = {}
        for i in items:
            e = self._entries[i]
            h = e.holder
            if up:
                peers = [t for t in e.team if t != me] if me == h else []
                own = me == h and me in e.team
            else:
                peers = [h] if me in e.team and me != h else []
                own = me == h
            lists = []
            for q in peers:
                k = len(shapes(i))
                lists.append(got[q][cursor[q] : cursor[q] + k])
                cursor[q] += k
            if own:
                lists.append(payload(i))
            if lists:
                out[i] = lists
        return out

    def _team_refresh(self, work: Work, items: list[int], due: Mapping[int, str]) -> list[Tensor]:
        """Refresh split matrices (the team math of :mod:`coap_dist.optim.kernels`): partial
        sums from the members to the holder, the small SVD (or correlation step) there, the
        new P back (plus four rounds per power iteration of a randomized SVD)."""
        mine = {mw.index: mw for mw in work.matrices if mw.index in set(items)}
        rsvd_items = [i for i in items if due[i] != "update"]
        sketch = {i: kernels.team_sketch(mine[i], due[i]) for i in rsvd_items if i in mine}
        iters = max((self._group(i)["power_iters"] for i in rsvd_items), default=0)
        for it in range(iters):
            self._power_round(
                mine, sketch, [i for i in rsvd_items if self._group(i)["power_iters"] > it]
            )

        def partial_shapes(i: int) -> list[Expect]:
            shapes = kernels.team_partial_shapes(self._entries[i].spec, self._group(i), due[i])
            return [Expect(shape, dtype) for shape, dtype in shapes]

        sums = self._round(
            items,
            True,
            lambda i: kernels.team_partials(mine[i], due[i], sketch.get(i)),
            partial_shapes,
        )
        results: dict[int, list[Tensor]] = {}
        oks: list[Tensor] = []
        for i, lists in sums.items():
            total = [torch.stack([lst[j] for lst in lists]).sum(0) for j in range(len(lists[0]))]
            old = self._state(i)["projector"]
            p_new, ok = kernels.team_finish(
                self._entries[i].spec, self._group(i), due[i], total, old
            )
            results[i] = [p_new.float().contiguous(), ok.reshape(1).to(torch.uint8)]
            oks.append(ok)

        def back_shapes(i: int) -> list[Expect]:
            s = self._entries[i].spec
            return [Expect((s.rank, s.cols), torch.float32), Expect((1,), torch.uint8)]

        new = self._round(items, False, lambda i: results[i], back_shapes)
        for i in items:
            if i not in new:
                continue
            p_new, ok = new[i][0][0], new[i][0][1].bool().reshape(())
            if i in mine:
                mw = mine[i]
                mw.projector = kernels.install_projector(
                    mw, p_new, ok, due[i], holder=self._entries[i].holder == self.rank
                )
            elif self._entries[i].holder == self.rank:
                proj = self._state(i)["projector"]
                proj.copy_(torch.where(ok, p_new.to(proj.dtype), proj))
        return oks

    def _power_round(
        self, mine: dict[int, MatrixWork], sketch: dict[int, Tensor], items: list[int]
    ) -> None:
        """One power iteration of a team's randomized SVD: Y <- G (G^T Q), Q = Y W^{-1/2}."""
        if not items:
            return

        def k_of(i: int) -> int:
            return self._entries[i].spec.rank + self._group(i)["oversample"]

        grams = self._round(
            items,
            True,
            lambda i: [kernels.power_gram_partial(sketch[i])],
            lambda i: [Expect((k_of(i), k_of(i)), torch.float64)],
        )
        inv = {
            i: [fproj.inverse_sqrt(torch.stack([x[0] for x in v]).sum(0))] for i, v in grams.items()
        }
        got = self._round(
            items, False, lambda i: inv[i], lambda i: [Expect((k_of(i), k_of(i)), torch.float64)]
        )
        proj_t = {
            i: kernels.power_z_partial(mine[i], sketch[i], got[i][0][0]) for i in items if i in mine
        }
        cols = lambda i: self._entries[i].spec.cols  # noqa: E731
        sums = self._round(
            items,
            True,
            lambda i: [proj_t[i]],
            lambda i: [Expect((cols(i), k_of(i)), torch.float32)],
        )
        total = {i: [torch.stack([x[0] for x in v]).sum(0)] for i, v in sums.items()}
        back = self._round(
            items, False, lambda i: total[i], lambda i: [Expect((cols(i), k_of(i)), torch.float32)]
        )
        for i in items:
            if i in mine:
                sketch[i] = kernels.power_sketch(mine[i], back[i][0][0])

    # -------------------------------------------------------------------------- team sums
    def team_sum(
        self,
        partials: Mapping[int, Tensor],
        sizes: Mapping[int, int],
        dtype: torch.dtype = torch.float32,
    ) -> dict[int, Tensor]:
        split = [i for i in sorted(sizes) if self._entries[i].split]
        out = {i: t for i, t in partials.items() if not self._entries[i].split}
        if not split:
            return out
        offsets, total = {}, 0
        for i in split:
            offsets[i] = total
            total += sizes[i]
        buf = torch.zeros(total, dtype=dtype, device=self.device)
        for i in split:
            if i in partials:
                buf[offsets[i] : offsets[i] + sizes[i]] = partials[i]
        self.comm.all_reduce(buf)
        for i in split:
            if i in partials:
                out[i] = buf[offsets[i] : offsets[i] + sizes[i]]
        return out

    # --------------------------------------------------------------------------- updates
    def scatter(self, updates: Sequence[Update], work: Work) -> None:
        ups = {u.index: u for u in updates}
        mats = {mw.index: mw for mw in work.matrices}
        sends: dict[int, list[Tensor]] = {}
        expects: dict[int, list[Expect]] = {}
        lifted: dict[int, Tensor] = {}
        for i in self._active:
            wdt = self.view.dtype(i)
            for r in self._s_out[i]:
                sends.setdefault(r.dst, []).extend(self._outgoing(i, r, ups, mats, lifted, wdt))
            for r in self._s_in[i]:
                shapes = [b.shape for b in r.boxes] if r.kind == "update" else [r.shape]
                expects.setdefault(r.src, []).extend(Expect(sh, wdt) for sh in shapes)
        got = self.comm.exchange(sends, expects, needed=any(self._s_any[i] for i in self._active))
        cursor = {q: 0 for q in got}
        for i in self._active:
            received: dict[tuple[int, str], list[Tensor]] = {}
            for r in self._s_in[i]:
                k = len(r.boxes) if r.kind == "update" else 1
                received[(r.src, r.kind)] = got[r.src][cursor[r.src] : cursor[r.src] + k]
                cursor[r.src] += k
            kind = self._entries[i].spec.kind
            if kind == "matrix":
                self._apply_matrix(i, ups, mats, received, lifted.get(i))
            elif kind == "conv":
                self._apply_conv(i, ups, received)
            else:
                for (q, _), (t,) in received.items():
                    local = self.view.local(i)
                    assert local is not None
                    pc = self.placement.piece(i, q) if self.placement else None
                    assert pc is not None
                    local.view(-1)[pc.start : pc.stop].copy_(t)

    def _outgoing(
        self,
        i: int,
        r: Route,
        ups: Mapping[int, Update],
        mats: Mapping[int, MatrixWork],
        lifted: dict[int, Tensor],
        wdt: torch.dtype,
    ) -> list[Tensor]:
        """The tensors of one scatter-round message this rank sends."""
        e = self._entries[i]
        if r.kind == "dense":
            local = self.view.local(i)
            assert local is not None
            pc = self._mine[i]
            assert pc is not None
            return [local.view(-1)[pc.start : pc.stop]]
        if r.kind == "proj":
            p = mats[i].projector if i in mats else self._state(i)["projector"]
            return [p.to(wdt)]
        if r.kind == "rows":
            return [ups[i].direction[r.rows[0] : r.rows[1]].to(wdt)]
        if e.spec.kind == "conv":
            u = ups[i].direction.to(wdt).reshape(e.shape2)
            region = Box(0, 1, 0, e.shape2[1])
        else:
            mine = self._mine[i]
            assert mine is not None
            if i not in lifted:
                lifted[i] = self._lift(ups[i].direction, mats[i].projector, e.spec, wdt)
            u, region = lifted[i], e.region(mine)
        return [view_in_region(u, region, b) for b in r.boxes]

    def _alpha_keep(self, i: int) -> tuple[float, float]:
        assert self._core is not None
        return self._core.step_size(i), kernels.decay_keep(self._group(i))

    @staticmethod
    def _lift(d: Tensor, p: Tensor, spec: ParamSpec, wdt: torch.dtype) -> Tensor:
        """U = D P of a piece, in W2 coordinates (rows x n for right, m x rows for left)."""
        u = d.to(wdt) @ p.to(wdt)
        return u if spec.side == "right" else u.t()

    def _apply_matrix(
        self,
        i: int,
        ups: Mapping[int, Update],
        mats: Mapping[int, MatrixWork],
        received: Mapping[tuple[int, str], list[Tensor]],
        sent: Tensor | None,
    ) -> None:
        """W_frag <- keep (W_frag - alpha U) on this rank's fragment, piece by piece: its own
        piece from D and P, the others from the D rows or update rectangles received. Where
        this rank also sent its piece's U (``sent``, update rectangles), it applies that same
        U with the receivers' operations, so every copy of the weights stays bitwise equal
        (one addmm of D and P rounds unlike the product followed by an add)."""
        me, e = self.rank, self._entries[i]
        local = self.view.local(i)
        frag = e.fragment(me)
        if local is None or frag[1] <= frag[0]:
            return
        alpha, keep = self._alpha_keep(i)
        wdt, start, ncols = local.dtype, frag[0], e.shape2[1]
        proj = None
        if i in mats:
            proj = mats[i].projector.to(wdt)
        elif e.holder == me:
            proj = self._state(i)["projector"].to(wdt)
        elif (e.holder, "proj") in received:
            proj = received[(e.holder, "proj")][0]
        for pc in e.pieces:
            boxes = intersect(frag, e.region(pc), ncols)
            if not boxes:
                continue
            if pc.rank == me and sent is not None:
                region = e.region(pc)
                for b in boxes:
                    view_in_fragment(local, start, ncols, b).mul_(keep).add_(
                        view_in_region(sent, region, b), alpha=-alpha * keep
                    )
            elif pc.rank == me:
                assert proj is not None
                _apply_factor(
                    local,
                    start,
                    ncols,
                    boxes,
                    ups[i].direction.to(wdt),
                    0,
                    pc,
                    proj,
                    e.spec,
                    alpha,
                    keep,
                )
            elif (pc.rank, "rows") in received:
                route = next(r for r in self._s_in[i] if r.src == pc.rank and r.kind == "rows")
                assert proj is not None
                _apply_factor(
                    local,
                    start,
                    ncols,
                    boxes,
                    received[(pc.rank, "rows")][0],
                    route.rows[0],
                    pc,
                    proj,
                    e.spec,
                    alpha,
                    keep,
                )
            else:
                for b, t in zip(boxes, received[(pc.rank, "update")], strict=True):
                    view_in_fragment(local, start, ncols, b).mul_(keep).add_(
                        t.view(b.shape), alpha=-alpha * keep
                    )

    def _apply_conv(
        self, i: int, ups: Mapping[int, Update], received: Mapping[tuple[int, str], list[Tensor]]
    ) -> None:
        me, e = self.rank, self._entries[i]
        local = self.view.local(i)
        frag = e.fragment(me)
        if local is None or frag[1] <= frag[0]:
            return
        alpha, keep = self._alpha_keep(i)
        region = Box(0, 1, 0, e.shape2[1])
        boxes = intersect(frag, region, e.shape2[1])
        if e.holder == me:
            u = ups[i].direction.to(local.dtype).reshape(e.shape2)
            parts = [view_in_region(u, region, b) for b in boxes]
        else:
            parts = received[(e.holder, "update")]
        for b, t in zip(boxes, parts, strict=True):
            view_in_fragment(local, frag[0], e.shape2[1], b).mul_(keep).add_(
                t.reshape(b.shape), alpha=-alpha * keep
            )

    # ------------------------------------------------------------------------ memory
    def state_bytes(self) -> int:
        assert self._core is not None
        return sum(nbytes_of(self._core.state[p]) for p in self._params if self._core.state.get(p))

    def metrics(self) -> dict[str, float]:
        return {
            "optim/comm_calls_per_step": float(self.comm.calls),
            "optim/comm_bytes_per_step": float(max(self.comm.sent, self.comm.received)),
        }


def _apply_factor(
    local: Tensor,
    start: int,
    ncols: int,
    boxes: Sequence[Box],
    d_rows: Tensor,
    lo: int,
    pc: Piece,
    proj: Tensor,
    spec: ParamSpec,
    alpha: float,
    keep: float,
) -> None:
    """W_box <- keep W_box - alpha keep (D P)_box for each box, D's rows starting at
    canonical row pc.start + lo (one addmm per box, like one process's single addmm)."""
    for b in boxes:
        view = view_in_fragment(local, start, ncols, b)
        if spec.side == "right":
            a = d_rows[b.r0 - pc.start - lo : b.r1 - pc.start - lo]
            bmat = proj[:, b.c0 : b.c1]
        else:
            a = proj[:, b.r0 : b.r1].t()
            bmat = d_rows[b.c0 - pc.start - lo : b.c1 - pc.start - lo].t()
        view.addmm_(a, bmat, beta=keep, alpha=-alpha * keep)


class OwnerSharding(OwnerLayout):
    """OWNER layout for DDP (replicated parameters): optimizer state sharded over
    ``process_group``.

    Args:
        process_group: the data-parallel group (default: the world).
        reduce_gradients: gradients are this rank's own (no DDP): the optimizer sums them
            (ZeRO-2 semantics; one reduce-scatter's worth of bytes in the gradient round).
        split: allow splitting large matrices' rows over ranks (see :class:`OwnerLayout`).
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        reduce_gradients: bool = False,
        split: bool = True,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "invalid `sharding`='owner': it needs torch.distributed to be "
                "initialized first (launch with torchrun and call "
                "dist.init_process_group), or use sharding=None in one process"
            )
        super().__init__(
            ReplicatedView(process_group, solo=False, reduced=not reduce_gradients), split=split
        )
