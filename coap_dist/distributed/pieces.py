"""The owner layouts' form for ``torch.distributed.checkpoint`` (DCP): state as global tensors.

DCP saves and reshards tensors described as *chunks* (boxes) of a global tensor. The owner
protocol keeps each parameter's state in pieces that DTensor placements cannot describe
(a matrix's rows split at any row, a whole matrix on its owner, an AdamW parameter cut at any
element), so :class:`Pieces` describes them directly: a tensor subclass holding this rank's
boxes of one state tensor in the single-process (full) form of
:func:`coap_dist.optim.spec.state_shapes`. It implements DCP's checkpointable protocol
(``__create_write_items__``, ``__create_chunk_list__``, ``__get_tensor_shard__``, as DTensor
does) and nothing else: every other operation raises. Because the global tensors are the
single-process ones, a DCP checkpoint of an owner layout loads at any world size, under the
FSDP2 default layout (whose DTensors have the same global shapes) and in one process, and the
other way round.

* A piece of rows [a, b) of a matrix moment (or code) tensor is one box; a flat range
  [a, b) of an AdamW moment of shape ``(d0, d1, ...)`` is at most ``2 * ndim - 1`` boxes
  (:func:`flat_boxes`), each a contiguous slice of the piece's storage: the boxes are views,
  nothing is copied when saving, and DCP loads into the live state.
* 8-bit scales (one per ``quant.BLOCK`` elements of the flat moment): pieces cut inside a
  block share that block's scale (the same value on both, ``Layout.share_block_max``), so a
  piece WRITES the blocks that start inside it and READS every block it touches.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from coap_dist.functional import quant as fquant
from coap_dist.optim.checkpoint import refresh_entries
from coap_dist.optim.spec import ParamSpec, state_shapes

if TYPE_CHECKING:
    from types import FrameType

    from coap_dist.distributed.comm import Comm

__all__ = [
    "Pieces",
    "counters",
    "flat_boxes",
    "own_piece",
    "piece_range",
    "piece_tensor",
    "refuse_auto_rank",
    "state_piece",
    "torch_full_state_ranks",
]

Chunk = tuple[torch.Size, Tensor]
"""A box of a global tensor: its offsets and the local tensor holding it."""

_NOT_A_TENSOR = (
    "COAP: this is one rank's part of the optimizer's sharded checkpoint form, which only "
    "torch.distributed.checkpoint can save and load (dcp.save / dcp.load of "
    "get_optimizer_state_dict with its default options); a per-rank torch.save (of "
    "opt.state_dict(), or accelerate's use_dcp=False) cannot write it. Use dcp.save "
    "(SHARDED_STATE_DICT), or for one file get_optimizer_state_dict(model, opt, "
    "options=StateDictOptions(full_state_dict=True, cpu_offload=True)) on every rank "
    "(accelerate's and the HF Trainer's FULL_STATE_DICT; COAP gathers its whole state for it) "
    "or opt.consolidate_state_dict(to=0) on every rank, then opt.state_dict() on that rank"
)


class Pieces(Tensor):
    """This rank's boxes of a global state tensor (module docstring).

    Args:
        shape: the global (single-process) shape.
        local: the piece's tensor (the live state; ``unwrap`` returns it).
        reads: the boxes this rank loads, views of ``local``.
        writes: the boxes this rank saves (a subset of ``reads``; default all of them).
    """

    _local: Tensor
    _reads: list[Chunk]
    _writes: list[Chunk]

    @staticmethod
    def __new__(
        cls,
        shape: Sequence[int],
        local: Tensor,
        reads: Sequence[Chunk],
        writes: Sequence[Chunk] | None = None,
    ) -> Pieces:
        out = Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=local.dtype, device=local.device
        )
        out._local = local
        out._reads = list(reads)
        out._writes = list(reads if writes is None else writes)
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        raise RuntimeError(f"{_NOT_A_TENSOR} (attempted {func})")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise RuntimeError(_NOT_A_TENSOR)

    def __repr__(self) -> str:  # type: ignore[override]
        boxes = [(tuple(o), tuple(t.shape)) for o, t in self._reads]
        return f"Pieces(shape={tuple(self.shape)}, boxes={boxes})"

    def unwrap(self) -> Tensor:
        """The piece's local tensor."""
        return self._local

    def offsets(self) -> list[tuple[int, ...]]:
        """The offsets of the boxes this rank reads (which piece of the tensor it is)."""
        return [tuple(o) for o, _ in self._reads]

    # ------------------------------------------------- DCP's checkpointable protocol
    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, off),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=off, sizes=t.size()),
                    properties=TensorProperties.create_from_tensor(t),
                    size=self.size(),
                ),
            )
            for off, t in self._writes
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=off, sizes=t.size()) for off, t in self._reads]

    def __get_tensor_shard__(self, index: MetadataIndex) -> Tensor:
        for off, t in (*self._reads, *self._writes):
            if off == index.offset:
                return t
        raise ValueError(f"COAP: no box at offset {index.offset} of {index.fqn} on this rank")


def flat_boxes(shape: Sequence[int], start: int, stop: int) -> list[tuple[list[int], list[int]]]:
    """The flat (row-major) range [start, stop) of a tensor of ``shape`` as (offsets, sizes)
    boxes, in flat order; each covers a contiguous flat range. At most ``2 * ndim - 1``:
    a partial leading slab, full slabs of the first dimension, a partial trailing one, the
    partial slabs recursing into the remaining dimensions."""
    if stop <= start:
        return []
    if len(shape) <= 1:
        return [([start], [stop - start])]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    rest = list(shape[1:])

    def within(row: int, lo: int, hi: int) -> list[tuple[list[int], list[int]]]:
        return [([row, *o], [1, *s]) for o, s in flat_boxes(rest, lo, hi)]

    if first == last:
        return within(first, start - first * inner, stop - first * inner)
    out: list[tuple[list[int], list[int]]] = []
    mid0, mid1 = first, last + 1
    if start % inner:
        out += within(first, start % inner, inner)
        mid0 = first + 1
    if stop % inner:
        mid1 = last
    if mid1 > mid0:
        out.append(([mid0, *([0] * len(rest))], [mid1 - mid0, *rest]))
    if stop % inner:
        out += within(last, 0, stop % inner)
    return out


def piece_range(spec: ParamSpec, key: str, start: int, stop: int, unit: int = 1) -> tuple[int, int]:
    """Flat elements [lo, hi) of the single-process tensor ``key`` (for an 8-bit scale, of
    the moment it scales) that a piece covers: canonical rows [start, stop) of a matrix, or
    of an AdamW parameter [start, stop) in units of ``unit`` elements (1: a flat range;
    the elements per row: FSDP2's row shards)."""
    if spec.kind == "matrix":
        unit = spec.rank if key.endswith("_scale") else math.prod(state_shapes(spec)[key][0][1:])
    return start * unit, stop * unit


def state_piece(
    spec: ParamSpec, key: str, local: Tensor, start: int, stop: int, unit: int = 1
) -> Pieces:
    """:func:`piece_tensor` of state tensor ``key`` of the piece [start, stop) (as
    :func:`piece_range`) held in ``local``."""
    lo, hi = piece_range(spec, key, start, stop, unit)
    return piece_tensor(key, state_shapes(spec)[key][0], local, lo, hi)


def piece_tensor(key: str, shape: Sequence[int], local: Tensor, lo: int, hi: int) -> Pieces:
    """The :class:`Pieces` of state tensor ``key`` (global ``shape``) held in ``local`` (a
    contiguous piece): its flat elements [lo, hi), or for an 8-bit scale vector (``key``
    ending in ``_scale``; [lo, hi) are then elements of the moment it scales) the blocks those
    elements touch, writing those that start inside them."""
    if not local.is_contiguous():
        raise ValueError(f"COAP: state `{key}` is not contiguous; its boxes would be copies")
    if key.endswith("_scale"):
        block = fquant.BLOCK
        first, end = lo // block, -(-hi // block)
        own = -(-lo // block)  # the first block that starts inside the piece
        reads = [(torch.Size([first]), local)]
        writes = [(torch.Size([own]), local[own - first :])] if end > own else []
        return Pieces(shape, local, reads, writes)
    flat = local.view(-1)
    chunks: list[Chunk] = []
    off = 0
    for offsets, sizes in flat_boxes(shape, lo, hi):
        n = math.prod(sizes)
        chunks.append((torch.Size(offsets), flat[off : off + n].view(sizes)))
        off += n
    return Pieces(shape, local, chunks)


_FSDP1_MODULE = "torch.distributed.fsdp.fully_sharded_data_parallel"
_FSDP1_SAVES = frozenset({"optim_state_dict", "full_optim_state_dict", "sharded_optim_state_dict"})
FSDP1_STATE_DICT_REFUSAL = (
    "COAP: FSDP.optim_state_dict (which torch's get_optimizer_state_dict calls on an FSDP1 "
    "model) reshapes only optimizer state laid out like FSDP1's flat-parameter "
    "shards (AdamW's moments), not COAP's low-rank moments and projectors. Save with "
    "opt.consolidate_state_dict(to=0) on EVERY rank, then torch.save(opt.state_dict(), path) "
    "on rank 0; opt.load_state_dict(torch.load(path)) on every rank resumes it at any world "
    "size and under any layout"
)
"""Raised (on every rank alike, before any collective) when torch's state-dict API meets an
FSDP1 model: what it would do next with COAP's state fails inside torch."""


def torch_full_state_ranks(comm: Comm) -> list[int] | None:
    """The ranks of ``comm``'s group to get the whole state when torch's full-state gather
    (``torch.distributed.checkpoint.state_dict._get_optim_state_dict`` with
    ``full_state_dict=True``) is what called this rank's ``state_dict()``: the rank that is
    global rank 0 under ``cpu_offload`` (torch keeps only its dict), else every rank. None
    when the caller is anything else (torch's load asks for a template with
    ``full_state_dict=False``; a direct ``opt.state_dict()``).

    Raises :data:`FSDP1_STATE_DICT_REFUSAL` when that call is on an FSDP1 model (its
    ``info.fsdp_modules``), with or without ``full_state_dict``, and when the caller is
    FSDP1's own ``FSDP.optim_state_dict`` / ``full_optim_state_dict`` /
    ``sharded_optim_state_dict``.

    The gather gives no sign but its own frame, which is read here (its ``info``); a torch
    that renamed it leaves the old behaviour: the pieces refuse at ``torch.save`` naming
    the routes that work (tests/integrations/test_hf.py catches that on the pinned torch).
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(24):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name in _FSDP1_SAVES and frame.f_globals.get("__name__") == _FSDP1_MODULE:
            raise RuntimeError(FSDP1_STATE_DICT_REFUSAL)
        if (
            code.co_name == "_get_optim_state_dict"
            and frame.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict"
        ):
            info = frame.f_locals.get("info")
            if getattr(info, "fsdp_modules", None):
                raise RuntimeError(FSDP1_STATE_DICT_REFUSAL)
            if not getattr(info, "full_state_dict", False):
                return None
            everyone = list(range(comm.world))
            if not getattr(info, "cpu_offload", False):
                return everyone
            group = comm.group
            first = [
                r for r in everyone if (r if group is None else dist.get_global_rank(group, r)) == 0
            ]
            return first or everyone
        frame = frame.f_back
    return None


def own_piece(saved: Pieces, want: Tensor, where: str) -> Tensor:
    """The local tensor of ``saved`` after checking that it is the piece this rank keeps
    (``want``: what this rank's ``state_dict()`` serves for that tensor now)."""
    if not isinstance(want, Pieces) or (
        want.offsets(),
        tuple(want.shape),
        tuple(want.unwrap().shape),
    ) != (saved.offsets(), tuple(saved.shape), tuple(saved.unwrap().shape)):
        raise ValueError(
            f"COAP: the DCP pieces of {where} ({saved!r}) are not this rank's ({want!r}); "
            "build the state dict to load into with get_optimizer_state_dict(model, opt) of "
            "this optimizer"
        )
    return saved.unwrap()


def counters(sd: Mapping[str, Any], index: int) -> dict[str, Tensor]:
    """What every rank's DCP state dict holds for parameter ``index`` whether or not it keeps
    state of it (DCP's strict load asks every trainable parameter for an entry, and every
    rank keeps these): its update count ``step`` and its adaptive refresh record, as 0-d
    tensors, from the host records of ``sd`` (a COAP ``state_dict()``)."""
    out = {"step": torch.tensor(float(sd["coap_steps"][index]))}
    record = sd.get("coap_refresh", {}).get(index)
    if record is not None:
        out.update(refresh_entries(record))
    return out


def refuse_auto_rank(layout: str, groups: Sequence[Mapping[str, Any]]) -> None:
    """Raise, before anything is written, if a group has ``rank="auto"``: DCP takes every
    tensor's shape from the loading optimizer before it reads any state, so ranks chosen
    during training could not come back."""
    auto = [gi for gi, g in enumerate(groups) if g.get("rank") == "auto"]
    if auto:
        raise RuntimeError(
            f"COAP under the `{layout}` layout: param_groups {auto} have rank='auto', which "
            "has no torch.distributed.checkpoint form (DCP takes every tensor's shape from the "
            "loading optimizer, before the ranks chosen during training could be read). Call "
            "opt.consolidate_state_dict(to=0) on every rank, then opt.state_dict() on rank 0 "
            "(loads at any world size and layout), or set a fixed rank"
        )
