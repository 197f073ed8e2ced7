"""OWNER sharding for layouts that hand each rank a contiguous fragment of every parameter.

A *fragment* is the slice [start, end) of a parameter's flattened (row-major) global tensor
that this rank holds: FSDP1 flat shards (may start and end mid-row, or be empty) and FSDP2
``Shard(0)`` row blocks are both fragments. Every parameter is owned by one rank (LPT packing,
:class:`~coap_dist.distributed.owner.OwnerSharding`), and each step

1. assembles on each owner the full gradient and the full current value of its parameters:
   every rank writes its fragments into zero buffers of the full size, one ``reduce`` per
   owner (fragments are disjoint, so the sum is exact);
2. runs the single-process COAP math on the full tensors (owner state only);
3. broadcasts the updated parameters from their owners; every rank copies its fragment.

Communication per step: 3x the parameter bytes (a reduce of values and gradients, one
broadcast). The trajectory is bitwise equal to single-process COAPAdamW fed the same
gradients, and the state dict is the full, layout-independent one of ``OwnerSharding``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from coap_dist.distributed.owner import OwnerSharding
from coap_dist.optim.layout import LowRankUpdate, MatrixGeometry, Update, apply_low_rank


class FragmentOwnerSharding(OwnerSharding):
    """Owner sharding over per-rank fragments; subclasses fill ``self._frag``:
    param -> (global shape, start, end) of the fragment in the flattened parameter, and
    override :meth:`local` when the fragment is not the parameter tensor itself."""

    name = "fragment_owner"

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(process_group, exchange="param")
        self._frag: dict[Tensor, tuple[torch.Size, int, int]] = {}
        self._full: dict[Tensor, Tensor] = {}
        self._full_grad: dict[Tensor, Tensor] = {}

    def bind(
        self,
        params: Sequence[torch.nn.Parameter],
        costs: Sequence[float],
        geometry: Sequence[MatrixGeometry | None],
    ) -> None:
        missing = [i for i, p in enumerate(params) if p not in self._frag]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: optimizer parameters {missing} are not sharded by the "
                "model this layout was built for"
            )
        super().bind(params, costs, geometry)

    def global_shape(self, p: Tensor) -> torch.Size:
        return self._frag[p][0]

    def param(self, p: Tensor) -> Tensor:
        if p not in self._full:  # state allocation at construction: shape and device only
            return torch.empty(self._frag[p][0], dtype=p.dtype, device=p.device)
        return self._full[p]

    def grad(self, p: Tensor) -> Tensor | None:
        return self._full_grad.get(p)

    def begin_step(self, params: Sequence[torch.nn.Parameter]) -> None:
        self._comm_bytes = 0
        self._full.clear()
        self._full_grad.clear()
        for r, mine in enumerate(self._with_grad_by_owner()):
            if not mine:
                continue
            sizes = [self._frag[p][0].numel() for p in mine]
            values = torch.zeros(sum(sizes), dtype=mine[0].dtype)
            grads = torch.zeros(sum(sizes), dtype=mine[0].dtype)
            off = 0
            for p, n in zip(mine, sizes, strict=True):
                _, start, end = self._frag[p]
                values[off + start : off + end] = self.local(p).detach().reshape(-1)
                if p.grad is not None:
                    grads[off + start : off + end] = self.local(p.grad).reshape(-1)
                off += n
            both = torch.cat([values, grads])
            dist.reduce(both, dst=self._src(r), op=dist.ReduceOp.SUM, group=self.group)
            self._comm_bytes += both.numel() * both.element_size() * (self.world > 1)
            if r == self.rank:
                values, grads = both[: sum(sizes)], both[sum(sizes) :]
                off = 0
                for p, n in zip(mine, sizes, strict=True):
                    shape = self._frag[p][0]
                    self._full[p] = values[off : off + n].view(shape)
                    self._full_grad[p] = grads[off : off + n].view(shape)
                    off += n

    def commit(
        self, updates: dict[torch.nn.Parameter, Update], params: Sequence[torch.nn.Parameter]
    ) -> None:
        for p, u in updates.items():
            if isinstance(u, LowRankUpdate):
                apply_low_rank(self._full[p], u)
        for r in range(self.world):
            owned = [p for p in params if self._owner[p] == r]
            if not owned:
                continue
            flags = torch.tensor([p in updates for p in owned], dtype=torch.int32)
            dist.broadcast(flags, src=self._src(r), group=self.group)
            moved = [p for p, f in zip(owned, flags.tolist(), strict=True) if f]
            if not moved:
                continue
            if r == self.rank:
                buf = torch.cat([self._full[p].reshape(-1) for p in moved])
            else:
                buf = torch.empty(
                    sum(self._frag[p][0].numel() for p in moved), dtype=moved[0].dtype
                )
            dist.broadcast(buf, src=self._src(r), group=self.group)
            self._comm_bytes += buf.numel() * buf.element_size() * (self.world > 1)
            off = 0
            with torch.no_grad():
                for p in moved:
                    shape, start, end = self._frag[p]
                    if end > start:
                        self.local(p).view(-1).copy_(buf[off + start : off + end])
                    off += shape.numel()
        self._full.clear()
        self._full_grad.clear()
