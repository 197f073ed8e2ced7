"""LOCAL layout for FSDP2 / HSDP (``fully_shard``): COAP on row shards, no per-step traffic.

FSDP2 hands the optimizer DTensor parameters and gradients sharded ``Shard(0)`` by rows
(torch.chunk split: uneven and empty shards happen); HSDP adds a replicate mesh dimension.
A right projection is row-decomposable, so every matrix is right-projected (the shard-aware
variant: P is r x n whatever m vs n) and

* the step needs no communication: R_local = G_local P^T, moments sharded by rows,
  W_local <- W_local - alpha D_local P;
* refreshes use small collectives on the shard sub-mesh only: TSQR (one all-reduce of the
  stacked r x r factors) and B = sum_k Q_k^T G_k (r x n all-reduce) for the randomized SVD,
  whose tiny SVD is broadcast; the correlation objective's scalars and r x n gradient (one all-reduce);
* a flag vector (one int per parameter) is all-reduced per step so that a non-finite
  gradient on any shard skips the step of that parameter on every shard.

State is stored as DTensors: moments ``Shard(0)`` with the global shape, P ``Replicate``, so
``torch.distributed.checkpoint`` (``get_optimizer_state_dict``) saves it once and reshards it
to any world size on load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from coap_dist.distributed.common import check_same_config
from coap_dist.distributed.fragments import FragmentOwnerSharding
from coap_dist.functional.projection import ShardGroup, Side
from coap_dist.optim.layout import Layout, MatrixGeometry


def _shard_dim(p: DTensor) -> int | None:
    """Mesh dimension on which p is row-sharded (Shard(0)), or None."""
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise ValueError(f"COAP LOCAL layout needs Shard(0) row shards, got {p.placements}")
            return mesh_dim
    return None


class Fsdp2Local(Layout):
    """Row-shard layout for DTensor parameters from ``fully_shard`` (FSDP2) and HSDP meshes."""

    name = "fsdp2_local"
    supports_quantized_state = False

    def __init__(self) -> None:
        self._group: dist.ProcessGroup | None = None
        self._group_size = 1
        self._shards: ShardGroup | None = None
        self._comm_bytes = 0

    def bind(
        self,
        params: Sequence[torch.nn.Parameter],
        costs: Sequence[float],
        geometry: Sequence[MatrixGeometry | None],
    ) -> None:
        groups = set()
        for p in params:
            if isinstance(p, DTensor):
                dim = _shard_dim(p)
                if dim is not None:
                    groups.add(p.device_mesh.get_group(dim))
        if len(groups) > 1:
            raise ValueError(
                "COAP LOCAL layout: parameters are sharded over different process "
                "groups; build one optimizer per mesh"
            )
        if groups:
            self._group = group = groups.pop()
            self._group_size = dist.get_world_size(group)
            src = dist.get_global_rank(group, 0)

            def total(t: Tensor) -> Tensor:
                t = t.contiguous()
                dist.all_reduce(t, group=group)
                self._comm_bytes += t.numel() * t.element_size()
                return t

            def from_first(t: Tensor) -> Tensor:
                t = t.contiguous()
                dist.broadcast(t, src=src, group=group)
                self._comm_bytes += t.numel() * t.element_size()
                return t

            self._shards = ShardGroup(total, from_first, dist.get_rank(group), self._group_size)

    def check_config(self, config: dict[str, Any], what: str) -> None:
        if self._group is not None:
            check_same_config(config, self._group, what)

    def _sharded(self, p: Tensor) -> bool:
        return isinstance(p, DTensor) and _shard_dim(p) is not None and self._group_size > 1

    def local(self, t: Tensor) -> Tensor:
        return t._local_tensor if isinstance(t, DTensor) else t

    def forced_side(self, p: Tensor) -> Side | None:
        return "right" if isinstance(p, DTensor) and _shard_dim(p) is not None else None

    def supports_tucker(self, p: Tensor) -> bool:
        return not self._sharded(p)

    def shard_group(self, p: Tensor) -> ShardGroup | None:
        if not self._sharded(p):
            return None
        return self._shards

    def wrap_state(self, p: Tensor, t: Tensor, rows_like_param: bool) -> Tensor:
        if not isinstance(p, DTensor):
            return t
        mesh = p.device_mesh
        if rows_like_param and _shard_dim(p) is not None:
            placements = p.placements
            shape = (p.shape[0], *t.shape[1:])
        else:
            placements = tuple(Replicate() for _ in range(mesh.ndim))
            shape = tuple(t.shape)
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            t, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
        )

    def agree(self, ok: Tensor, params: Sequence[Tensor]) -> Tensor:
        if self._group is None or self._group_size == 1:
            return ok
        flags = ok.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self._group)
        self._comm_bytes += flags.numel() * flags.element_size()
        return flags.bool()

    def begin_step(self, params: Sequence[torch.nn.Parameter]) -> None:
        self._comm_bytes = 0

    def communicated_bytes(self) -> int:
        """Bytes all-reduced or broadcast by this rank in the last step: the flag vector
        every step, plus the refresh collectives on steps with projector refreshes."""
        return self._comm_bytes


class Fsdp2Owner(FragmentOwnerSharding):
    """OWNER strategy for FSDP2 / HSDP (``sharding="owner"``): exact whole-matrix COAP.

    Each rank's ``Shard(0)`` row block is a fragment of the flattened parameter; owners
    assemble full gradients and values over the shard group, run the single-process math
    (reference side rule, any rank, Tucker and 8-bit state included) and broadcast the updated
    parameters (see :class:`~coap_dist.distributed.fragments.FragmentOwnerSharding`). With
    HSDP every replica does the same work over its own shard group. The state is plain
    per-owner tensors; ``state_dict()`` returns the full state, identical on every rank (so
    DCP may deduplicate it safely) and loadable at any world size.
    """

    name = "fsdp2_owner"

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        groups = set()
        for p in params:
            dim = _shard_dim(p) if isinstance(p, DTensor) else None
            if dim is None:
                raise ValueError(
                    "sharding='owner' under FSDP2 needs every parameter to be a Shard(0) "
                    f"DTensor; got a {type(p).__name__} of shape {tuple(p.shape)}"
                )
            groups.add(p.device_mesh.get_group(dim))
        if len(groups) != 1:
            raise ValueError("COAP OWNER layout: parameters are sharded over different groups")
        super().__init__(groups.pop())
        for p in params:
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            row = 1
            for s in p.shape[1:]:
                row *= s
            start = offset[0] * row if p._local_tensor.numel() else 0
            self._frag[p] = (p.shape, start, start + p._local_tensor.numel())

    def local(self, t: Tensor) -> Tensor:
        return t._local_tensor if isinstance(t, DTensor) else t
