"""OWNER layout for replicated parameters (DDP): optimizer state sharded by parameter.

Every parameter is owned by one rank of the data-parallel group (longest-processing-time
packing on the compute cost m n r, rank-independent tie-break). The owner alone holds the
parameter's COAP state (P, M, V), runs its projector refreshes and its Adam step. Results reach
the other ranks by one broadcast per owner and step:

* ``exchange="param"`` (default): the owner sends the updated parameter (m n per matrix,
  like ZeRO-1's parameter all-gather); no rank holds anything for parameters it does not own,
  so per-rank state is exactly 1/world of the single-process state (up to packing).
* ``exchange="factor"``: the rank-r direction D (a x r) and, when it changed, P; every rank
  then applies W <- W - alpha D P itself (exactly rank r, bitwise identical to the owner).
  Less traffic (a r instead of a b per matrix and step) but every rank caches all projectors
  (r x min(m, n) per matrix, reported as extra state bytes), which dominates per-rank memory
  at large world sizes.

Dense (AdamW) parameters always travel as updated values. Gradients either arrive averaged by
DDP (ZeRO-1 semantics) or, with ``reduce_gradients=True``, the optimizer reduces each gradient
straight to its owner at the start of ``step()`` and non-owners drop theirs (ZeRO-2 semantics:
use it without DDP). The result is bitwise equal to single-process COAPAdamW in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from coap_dist.distributed.common import (
    assign_owners,
    check_same_config,
    from_bytes,
    global_rank,
    group_size_rank,
    to_bytes,
)
from coap_dist.functional.projection import Side
from coap_dist.optim.layout import (
    Layout,
    LowRankUpdate,
    MatrixGeometry,
    Update,
    apply_low_rank,
)

_NONE, _LOW, _APPLIED = 0, 1, 2


class OwnerSharding(Layout):
    """Shard optimizer state and work by parameter owner over ``process_group``."""

    name = "owner"

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        exchange: str = "param",
        reduce_gradients: bool = False,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "invalid `sharding`='owner': it needs torch.distributed to be "
                "initialized first (launch with torchrun and call "
                "dist.init_process_group), or use sharding=None in one process"
            )
        if exchange not in ("factor", "param"):
            raise ValueError(
                f"OwnerSharding: invalid `exchange`={exchange!r}; must be 'factor' or 'param'"
            )
        self.group = process_group
        self.exchange = exchange
        self.reduce_gradients = reduce_gradients
        self.world, self.rank = group_size_rank(process_group)
        self._owner: dict[Tensor, int] = {}
        self._geometry: dict[Tensor, MatrixGeometry | None] = {}
        self._params: list[Tensor] = []
        self._proj_cache: dict[Tensor, Tensor] = {}
        self._comm_bytes = 0

    def bind(
        self,
        params: Sequence[torch.nn.Parameter],
        costs: Sequence[float],
        geometry: Sequence[MatrixGeometry | None],
    ) -> None:
        self._params = list(params)
        owners = assign_owners(costs, self.world)
        self._owner = dict(zip(self._params, owners, strict=True))
        self._geometry = dict(zip(self._params, geometry, strict=True))

    def check_config(self, config: dict[str, Any], what: str) -> None:
        check_same_config(config, self.group, what)

    def owner_of(self, p: Tensor) -> int:
        """Rank (in the process group) that owns p."""
        return self._owner[p]

    def owns(self, p: Tensor) -> bool:
        return self._owner[p] == self.rank

    def _src(self, r: int) -> int:
        return global_rank(self.group, r)

    # ----------------------------------------------------------------------- gradients
    def _with_grad_by_owner(self) -> list[list[Tensor]]:
        """Per owner rank, its parameters that have a gradient on ANY rank (one all-reduce),
        so that frozen or unused parameters on some ranks cannot desynchronise collectives."""
        have = torch.tensor([p.grad is not None for p in self._params], dtype=torch.int32)
        dist.all_reduce(have, op=dist.ReduceOp.MAX, group=self.group)
        by_owner: list[list[Tensor]] = [[] for _ in range(self.world)]
        for p, h in zip(self._params, have.tolist(), strict=True):
            if h:
                by_owner[self._owner[p]].append(p)
        return by_owner

    def begin_step(self, params: Sequence[torch.nn.Parameter]) -> None:
        self._comm_bytes = 0
        if not self.reduce_gradients or self.world == 1:
            return
        for r, mine in enumerate(self._with_grad_by_owner()):
            if not mine:
                continue
            flat = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                    for p in mine
                ]
            )
            dist.reduce(flat, dst=self._src(r), op=dist.ReduceOp.SUM, group=self.group)
            self._comm_bytes += flat.numel() * flat.element_size()
            if r == self.rank:
                flat.div_(self.world)
                off = 0
                for p in mine:
                    n = p.numel()
                    p.grad = flat[off : off + n].view_as(p).to(p.dtype)
                    off += n
        for p in self._params:
            if self._owner[p] != self.rank:
                p.grad = None

    # ------------------------------------------------------------------------- updates
    def commit(
        self, updates: dict[torch.nn.Parameter, Update], params: Sequence[torch.nn.Parameter]
    ) -> None:
        for p, u in updates.items():
            if isinstance(u, LowRankUpdate):
                apply_low_rank(p, u)
        if self.world == 1:
            return
        for r in range(self.world):
            owned = [p for p in params if self._owner[p] == r]
            if not owned:
                continue
            header = torch.zeros((len(owned), 4), dtype=torch.float64)
            chunks: list[Tensor] = []
            if r == self.rank:
                for i, p in enumerate(owned):
                    u = updates.get(p)
                    if u is None:
                        continue
                    if isinstance(u, LowRankUpdate) and self.exchange == "factor":
                        header[i] = torch.tensor(
                            [_LOW, float(u.projector_changed), u.alpha, u.decay],
                            dtype=torch.float64,
                        )
                        chunks.append(to_bytes(u.direction.to(p.dtype)))
                        if u.projector_changed:
                            chunks.append(to_bytes(u.projector.to(p.dtype)))
                    else:
                        header[i, 0] = _APPLIED
                        chunks.append(to_bytes(p.detach()))
            dist.broadcast(header, src=self._src(r), group=self.group)
            nbytes = self._payload_bytes(owned, header)
            if nbytes == 0:
                continue
            buf = torch.cat(chunks) if r == self.rank else torch.empty(nbytes, dtype=torch.uint8)
            dist.broadcast(buf, src=self._src(r), group=self.group)
            self._comm_bytes += header.numel() * 8 + nbytes
            if r != self.rank:
                self._apply_received(owned, header, buf)

    def _low_rank_shapes(self, p: Tensor) -> tuple[tuple[int, int], tuple[int, int], Side]:
        """(D shape, P shape, side) of a COAP matrix, as the owner derives them."""
        geo = self._geometry[p]
        assert geo is not None
        return (geo.rows, geo.rank), (geo.rank, geo.cols), geo.side

    def _payload_bytes(self, owned: list[Tensor], header: Tensor) -> int:
        total = 0
        for p, h in zip(owned, header.tolist(), strict=True):
            esz = p.element_size()
            if h[0] == _LOW:
                dshape, pshape, _ = self._low_rank_shapes(p)
                total += dshape[0] * dshape[1] * esz
                if h[1]:
                    total += pshape[0] * pshape[1] * esz
            elif h[0] == _APPLIED:
                total += p.numel() * esz
        return total

    def _apply_received(self, owned: list[Tensor], header: Tensor, buf: Tensor) -> None:
        off = 0
        with torch.no_grad():
            for p, h in zip(owned, header.tolist(), strict=True):
                if h[0] == _LOW:
                    dshape, pshape, side = self._low_rank_shapes(p)
                    d, off = from_bytes(buf, off, p.dtype, dshape)
                    if h[1]:
                        proj, off = from_bytes(buf, off, p.dtype, pshape)
                        self._proj_cache[p] = proj.clone()
                    apply_low_rank(
                        p, LowRankUpdate(d, self._proj_cache[p], side, h[2], h[3], bool(h[1]))
                    )  # type: ignore[arg-type]
                elif h[0] == _APPLIED:
                    val, off = from_bytes(buf, off, p.dtype, p.shape)
                    p.copy_(val)

    def extra_state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._proj_cache.values())

    def communicated_bytes(self) -> int:
        return self._comm_bytes

    # ---------------------------------------------------------------------- checkpoints
    def gather_state(
        self,
        state: dict[Tensor, dict[str, Any]],
        template: Callable[[torch.nn.Parameter], dict[str, Any]],
        params: Sequence[torch.nn.Parameter],
    ) -> dict[Tensor, dict[str, Any]]:
        """Every parameter's state on every rank: one broadcast per owner, in index order."""
        if self.world == 1:
            return state
        full: dict[Tensor, dict[str, Any]] = {}
        for r in range(self.world):
            owned = [p for p in params if self._owner[p] == r]
            if not owned:
                continue
            if r == self.rank:
                entries = [state.get(p) or template(p) for p in owned]
            else:
                entries = [template(p) for p in owned]
            tensors = [e[k] for e in entries for k in sorted(e)]
            if r == self.rank:
                buf = torch.cat([to_bytes(t.cpu()) for t in tensors])
            else:
                nbytes = sum(t.numel() * t.element_size() for t in tensors)
                buf = torch.empty(nbytes, dtype=torch.uint8)
            dist.broadcast(buf, src=self._src(r), group=self.group)
            off = 0
            for p, e in zip(owned, entries, strict=True):
                out = {}
                for k in sorted(e):
                    t = e[k]
                    val, off = from_bytes(buf, off, t.dtype, t.shape)
                    out[k] = val.clone().to(t.device)
                full[p] = out
        return full
