"""Checkpoints of FSDP2's default layout (:class:`~coap_dist.distributed.fsdp2.Fsdp2Local`).

:class:`LocalCheckpoints` is the part of ``Fsdp2Local`` that turns its state into state dicts
and back, without a collective except :meth:`~LocalCheckpoints.consolidate`:

* ``state_dict``: each state tensor as ``torch.distributed.checkpoint`` saves it, a
  ``Shard(0)`` DTensor of its single-process shape where the rows are ``torch.chunk``'s
  (moments by canonical rows, the projector by its rows), a
  :class:`~coap_dist.distributed.pieces.Pieces` where they are not (8-bit matrix rows cut on
  quantization blocks, 8-bit AdamW scales shared by two shards), plain tensors for a Tucker
  convolution on its holder (the other ranks carry its counters); ``rank="auto"`` refused;
* ``load_state_dict``: this rank's part of any of those, or of a whole single-process state;
* ``consolidate``: the single-process state on one rank (padded all-gathers of the rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from coap_dist.distributed.comm import Comm
from coap_dist.distributed.pieces import (
    Pieces,
    counters,
    own_piece,
    piece_range,
    refuse_auto_rank,
    state_piece,
    torch_full_state_ranks,
)
from coap_dist.distributed.placement import Range
from coap_dist.functional import quant as fquant
from coap_dist.optim.layout import Core
from coap_dist.optim.spec import ParamSpec, state_shapes

__all__ = ["LocalCheckpoints"]


class LocalCheckpoints:
    """State-dict serving of the row-shard layout (module docstring); mixed into
    :class:`~coap_dist.distributed.fsdp2.Fsdp2Local`, whose attributes it reads."""

    name: str
    comm: Comm
    world: int
    rank: int
    device: torch.device
    specs: list[ParamSpec]
    _core: Core | None
    _dparams: list[DTensor]
    _conv_holder: dict[int, int]

    if TYPE_CHECKING:

        def _rows(self, i: int, rank: int | None = None) -> Range: ...

        def _p_rows(self, i: int, rank: int | None = None) -> Range: ...

        def _sharded(self, i: int) -> bool: ...

        def _keeps(self, i: int) -> bool: ...

        def _state(self, i: int) -> dict[str, Any]: ...

        def ensure_state(self, index: int) -> None: ...

    def _wrap(self, i: int, key: str, t: Tensor) -> Tensor:
        """A local state tensor as the DTensor a checkpoint stores (no communication), or as
        :class:`~coap_dist.distributed.pieces.Pieces` where its rows are not ``torch.chunk``'s
        (8-bit matrix rows cut on blocks) or its blocks are shared (an 8-bit AdamW scale)."""
        p, s = self._dparams[i], self.specs[i]
        if t.ndim == 0 or s.kind == "conv":
            return t  # (a convolution's state is whole on one rank)
        moved_rows = s.kind == "matrix" and s.row_alignment() > 1
        whole, scale = key in ("projector", "exp_avg_sq_col"), key.endswith("_scale")
        if self._sharded(i) and not whole and (moved_rows or scale):
            return self._piece(i, key, t)
        mesh = p.device_mesh
        # Replicated: column statistics, and the 8-bit scales of an unsplit state (a scale
        # vector's global shape is its block count, not the moment's rows).
        if key == "exp_avg_sq_col" or scale or not any(isinstance(x, Shard) for x in p.placements):
            placements: tuple[Any, ...] = tuple(Replicate() for _ in range(mesh.ndim))
            shape: tuple[int, ...] = tuple(t.shape)
        else:
            placements = p.placements
            if s.kind == "matrix":
                rows = s.rank if key == "projector" else s.rows
                shape = (rows, *t.shape[1:])
            else:
                shape = s.shape
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            t, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
        )

    def _flat(self, i: int, key: str) -> Range:
        """Flat elements [lo, hi) of the single-process tensor ``key`` (for an 8-bit scale,
        of the moment it scales) that this rank's state rows cover."""
        s = self.specs[i]
        return piece_range(s, key, *self._rows(i), math.prod(s.shape[1:]))

    def _piece(self, i: int, key: str, t: Tensor) -> Pieces:
        s = self.specs[i]
        return state_piece(s, key, t, *self._rows(i), math.prod(s.shape[1:]))

    def full_state_ranks(self) -> list[int] | None:
        # (torch gathers the fp32 DTensors itself, but not 8-bit rows cut on blocks or a
        # convolution whole on one rank; one gather to the ranks that keep the dict moves
        # less than its all-gather of every DTensor)
        return None if self.world == 1 else torch_full_state_ranks(self.comm)

    def state_dict(self, saved: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        assert self._core is not None
        if self.world > 1:
            refuse_auto_rank(self.name, self._core.groups)
        sd = saved()
        state = {
            i: {k: self._wrap(i, k, v) if isinstance(v, Tensor) else v for k, v in st.items()}
            for i, st in sd["state"].items()
        }
        for i in self._conv_holder:
            if i not in state and self._dparams[i].requires_grad:
                state[i] = counters(sd, i)  # held elsewhere: DCP still asks for an entry
        sd["state"] = dict(sorted(state.items()))
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        assert self._core is not None
        for i, p in enumerate(self._dparams):
            saved = sd["state"].get(i)
            if not saved or not self._keeps(i):
                self._core.state.pop(p, None)
                continue
            self.ensure_state(i)
            st = self._state(i)
            for k, v in saved.items():
                st[k] = self._local_piece(i, k, v, st[k])

    def _local_piece(self, i: int, key: str, v: Any, mine: Tensor) -> Tensor:
        """This rank's part of a saved tensor: the local shard of a DTensor, or the rows of a
        whole (single-process) tensor that this rank keeps."""
        if isinstance(v, Pieces):
            v = own_piece(v, self._wrap(i, key, mine), f"`{key}` of parameter {i} (fsdp2)")
        elif isinstance(v, DTensor):
            v = v._local_tensor
        elif v.ndim and tuple(v.shape) != tuple(mine.shape):
            if key.endswith("_scale"):  # one fp32 absmax per block of the flat codes:
                # those from the piece's first on (as many as its allocation: every block
                # it touches; none for an empty matrix piece)
                first = self._flat(i, key)[0] // fquant.BLOCK
                v = v[first : first + mine.shape[0]]
            else:
                if key == "projector":
                    a, b = self._p_rows(i)
                elif key == "exp_avg_sq_col":
                    a, b = 0, v.shape[0]
                else:
                    a, b = self._rows(i)
                matrix = self.specs[i].kind == "matrix"
                v = v.reshape(-1, *mine.shape[1:])[a:b] if matrix else v[a:b]
        if tuple(v.shape) != tuple(mine.shape):
            raise ValueError(
                f"COAP (fsdp2): saved `{key}` of parameter {i} has local shape "
                f"{tuple(v.shape)}, expected {tuple(mine.shape)}"
            )
        return v.to(mine.device if mine.ndim else torch.device("cpu"), copy=True)

    def consolidate(self, to: int) -> dict[int, dict[str, Any]] | None:
        """Whole single-process state on rank ``to``: every rank sends its row shards."""
        assert self._core is not None
        full: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(self._dparams):
            if i in self._conv_holder:
                conv = self._gather_conv(i, to)
                if conv:
                    full[i] = conv
                continue
            st = self._core.state.get(p)
            if not st:
                continue
            out: dict[str, Any] = {}
            for k, v in st.items():
                if v.ndim == 0:
                    out[k] = v.clone()
                elif k == "exp_avg_sq_col" or not self._sharded(i):
                    out[k] = v.detach().cpu().clone()
                elif k.endswith("_scale"):  # blocks shared with the rank before: once
                    lo = self._flat(i, k)[0]
                    out[k] = self._gather_rows(v[-(-lo // fquant.BLOCK) - lo // fquant.BLOCK :], to)
                else:
                    out[k] = self._gather_rows(v, to)
            if self.rank == to:
                full[i] = out
        return full if self.rank == to else None

    def _gather_conv(self, i: int, to: int) -> dict[str, Any] | None:
        """A sharded convolution's whole state from its holder on rank ``to`` (every rank
        takes part in the gathers; only the holder contributes rows)."""
        assert self._core is not None
        st = self._core.state.get(self._dparams[i]) if self._keeps(i) else None
        out: dict[str, Any] = {}
        for k, (shape, dtype) in state_shapes(self.specs[i]).items():
            rows = shape or (1,)
            if st:
                v = st[k].reshape(rows).to(self.device)
            else:
                v = torch.empty((0, *rows[1:]), dtype=dtype, device=self.device)
            got = self._gather_rows(v, to)
            if got is not None:
                out[k] = got.reshape(shape) if got.numel() else None
        if self.rank != to or any(v is None for v in out.values()):
            return None
        return out

    def _gather_rows(self, v: Tensor, to: int) -> Tensor | None:
        """Row shards of every rank concatenated on rank ``to`` (padded all-gather)."""
        rows = torch.tensor([v.shape[0]], device=self.device)
        counts = self.comm.all_gather(rows).tolist()
        width = max(counts)
        pad = torch.zeros((width, *v.shape[1:]), dtype=v.dtype, device=self.device)
        pad[: v.shape[0]] = v
        got = self.comm.all_gather(pad).view(self.world, width, *v.shape[1:])
        if self.rank != to:
            return None
        return torch.cat([got[q, : counts[q]] for q in range(self.world)]).cpu()
