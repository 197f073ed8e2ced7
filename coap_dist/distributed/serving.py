"""Checkpoint serving of the owner protocol: the per-rank, consolidated and re-cut forms.

:class:`OwnerCheckpoints` is the part of :class:`~coap_dist.distributed.owner.OwnerLayout`
that turns its pieces into state dicts and back:

* ``state_dict``: one process (or replicated state) serves the single-process form. A sharded
  rank of a view with a DCP form (FSDP2 / HSDP ``sharding="owner"``) serves its pieces as
  :class:`~coap_dist.distributed.pieces.Pieces` of the single-process tensors, plus every
  parameter's counters, for ``torch.distributed.checkpoint``, which reshards them to any world
  size and layout (no communication; ``rank="auto"`` is refused: DCP takes the shapes from the
  loading optimizer, before the saved ranks could be read). Other sharded ranks raise at once
  naming ``consolidate_state_dict(to)`` (ZeroRedundancyOptimizer's convention); a rank-local
  view (DeepSpeed's per-rank files)
  serves this rank's pieces, tagged with the placement (``coap_layout``) and each piece's
  bounds (``coap_pieces``), so that every rank's files together assemble anywhere
  (``load_state_dict({"coap_shards": [...]})``);
* ``consolidate``: gathers every rank's pieces on one rank (point-to-point, one message per
  rank) and assembles the single-process form (:func:`~coap_dist.optim.storage.assemble_all`);
* ``load_state_dict``: keeps this rank's pieces of a single-process state dict
  (:func:`~coap_dist.optim.storage.slice_full`), at any world size and placement, or a
  tagged rank's own pieces unchanged, or the DCP form's pieces (loaded in place by DCP).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from coap_dist.distributed.comm import Comm, tensor_bytes
from coap_dist.distributed.pieces import (
    Pieces,
    counters,
    own_piece,
    refuse_auto_rank,
    state_piece,
    torch_full_state_ranks,
)
from coap_dist.distributed.placement import Piece, Placement
from coap_dist.distributed.routes import Geometry
from coap_dist.distributed.views import FragmentView
from coap_dist.optim.layout import Core
from coap_dist.optim.storage import Item, assemble_all, slice_full

__all__ = ["OwnerCheckpoints"]


class OwnerCheckpoints:
    """State-dict serving over the owner protocol's placement (module docstring); mixed
    into :class:`~coap_dist.distributed.owner.OwnerLayout`, whose attributes it reads."""

    name: str
    view: FragmentView
    comm: Comm
    world: int
    rank: int
    device: torch.device
    placement: Placement | None
    _core: Core | None
    _entries: list[Geometry]
    _mine: list[Piece | None]
    _params: list[Tensor]

    if TYPE_CHECKING:

        def _dense_shape(self, index: int) -> tuple[int, ...]:
            """The local shape of an AdamW parameter's piece (the layout's)."""
            ...

        def ensure_state(self, index: int) -> None:
            """Allocate this rank's state of parameter ``index`` (the layout's)."""
            ...

    def full_state_ranks(self) -> list[int] | None:
        if self.world == 1 or self.view.rank_local:
            return None  # (DeepSpeed saves each rank's pieces through its engine)
        return torch_full_state_ranks(self.comm)

    def state_dict(self, saved: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if self.view.rank_local:
            sd = saved()
            sd["coap_layout"] = self._tag()
            sd["coap_pieces"] = {i: (a, b) for i, a, b, _ in self._items()}
            return sd
        if self.world == 1:
            sd = saved()
            if any(e.frags is not None for e in self._entries):
                sd["state"] = self.consolidate(0)  # fragment-shaped pieces -> whole tensors
            return sd
        if self.view.dcp:
            return self._dcp_form(saved())
        raise RuntimeError(
            f"COAP under the `{self.name}` layout keeps 1/{self.world} of the optimizer state "
            "on each rank, so state_dict() on one rank cannot return all of it. Call "
            "opt.consolidate_state_dict(to=0) on EVERY rank first, then opt.state_dict() on "
            "rank 0 (ZeroRedundancyOptimizer's convention); load_state_dict() of that state "
            "works on any number of ranks. For accelerate's save_state (state_dict() on every "
            "rank) call coap_dist.integrations.accelerate.consolidate_on_save_state("
            "accelerator, opt) once after prepare; for the HF Trainer add "
            "coap_dist.integrations.hf.COAPCheckpointCallback(); under DeepSpeed stage 0 "
            "(engine.save_checkpoint calls state_dict() on every rank) drop `sharding` (the "
            "layout follows zero_optimization.stage) or call opt.consolidate_state_dict(to=None) "
            "on every rank before each save. (torch.distributed.checkpoint's "
            "set_optimizer_state_dict asks for state_dict() too, as a template: to load a "
            "full state dict here call opt.load_state_dict(sd) on every rank)"
        )

    def _dcp_form(self, sd: dict[str, Any]) -> dict[str, Any]:
        """The DCP form (module docstring) of this rank's state dict ``sd``: per trainable
        parameter (on every rank) ``step`` and the adaptive record as 0-d tensors, then
        this rank's state: counters, a projector or a whole convolution as plain tensors (one
        rank holds them, or every rank of the team the same ``exp_avg_sq_col``), pieces as
        :class:`Pieces` of the single-process tensors."""
        assert self._core is not None
        refuse_auto_rank(self.name, self._core.groups)
        state: dict[int, dict[str, Any]] = {}
        for e, pc in zip(self._entries, self._mine, strict=True):
            i = e.spec.index
            st = sd["state"].get(i, {})
            if not (st or self._params[i].requires_grad):
                continue
            out: dict[str, Any] = counters(sd, i)
            for k, v in st.items():
                if k not in out:
                    out[k] = self._dcp_value(e, pc, k, v)
            state[i] = out
        sd["state"] = state
        return sd

    @staticmethod
    def _dcp_value(e: Geometry, pc: Piece | None, key: str, v: Tensor) -> Tensor:
        """State tensor ``key`` of piece ``pc`` as DCP saves it (plain when whole)."""
        spec = e.spec
        whole = key in ("projector", "exp_avg_sq_col") or spec.kind == "conv"
        if v.ndim == 0 or pc is None or whole:
            return v
        return state_piece(spec, key, v, pc.start, pc.stop)

    def _load_pieces(self, e: Geometry, pc: Piece | None, saved: Mapping[str, Any]) -> None:
        """This rank's state of parameter ``e`` from a DCP-form entry holding Pieces (those
        built by this layout's ``state_dict()``, filled in place by DCP)."""
        assert self._core is not None
        i = e.spec.index
        self.ensure_state(i)
        st = self._core.state[self._params[i]]
        for k, v in saved.items():
            if k not in st:
                raise ValueError(
                    f"COAP ({self.name}): saved state `{k}` of parameter {i} is not kept "
                    "by this rank"
                )
            if isinstance(v, Pieces):
                want = self._dcp_value(e, pc, k, st[k])
                v = own_piece(v, want, f"`{k}` of parameter {i} ({self.name})")
            if v.data_ptr() != st[k].data_ptr():
                st[k].copy_(v)

    def _tag(self) -> dict[str, Any]:
        assert self.placement is not None
        return {
            **self.view.describe(),
            "world": self.world,
            "rank": self.rank,
            "placement": repr((self.placement.holder, self.placement.pieces)),
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        assert self._core is not None
        state = sd["state"]
        tag = sd.get("coap_layout")
        if tag is not None and tag != self._tag():
            raise ValueError(
                f"COAP: this state dict holds the pieces of rank {tag.get('rank')} of "
                f"{tag.get('world')} under another placement; it loads only into the same rank "
                "of the same job shape. Use consolidate_state_dict() for a portable checkpoint"
            )
        for e, mine in zip(self._entries, self._mine, strict=True):
            i = e.spec.index
            p = self._params[i]
            saved = state.get(i)
            if not saved:
                self._core.state.pop(p, None)
                continue
            if any(isinstance(v, Pieces) for v in saved.values()):
                self._load_pieces(e, mine, saved)
                continue
            holder = e.holder == self.rank
            if mine is not None and not any(
                isinstance(v, Tensor) and v.ndim for v in saved.values()
            ):
                raise ValueError(
                    f"COAP ({self.name}): the saved state of parameter {i} holds only its "
                    "counters, no moments for this rank's piece: it is another rank's part of "
                    "a sharded checkpoint. Load DCP checkpoints with dcp.load into "
                    "get_optimizer_state_dict(model, opt), then set_optimizer_state_dict"
                )
            if tag is not None:
                if mine is not None or holder:
                    self._core.state[p] = {
                        k: (v.to(self.device) if v.ndim else v.clone().cpu())
                        if isinstance(v, Tensor)
                        else v
                        for k, v in saved.items()
                    }
                continue
            if mine is None and not holder:
                self._core.state.pop(p, None)
                continue
            if mine is None:
                self._core.state[p] = {
                    k: (saved[k].to(self.device) if k == "projector" else saved[k].clone().cpu())
                    for k in ("step", "projector")
                }
                continue
            self._core.state[p] = slice_full(
                e.spec,
                saved,
                start=mine.start,
                stop=mine.stop,
                holder=holder,
                local_shape=self._dense_shape(i) if e.spec.kind == "dense" else None,
                device=self.device,
            )

    def _items(self) -> list[Item]:
        """This rank's pieces, in :func:`~coap_dist.optim.storage.assemble_all`'s form."""
        assert self._core is not None
        out: list[Item] = []
        for e, pc in zip(self._entries, self._mine, strict=True):
            st = self._core.state.get(self._params[e.spec.index])
            if st:
                start, stop = (pc.start, pc.stop) if pc is not None else (-1, -1)
                out.append((e.spec.index, start, stop, st))
        return out

    def consolidate(self, to: int) -> dict[int, dict[str, Any]] | None:
        me = self.rank
        mine = self._items()
        if self.world == 1:
            return self._assemble({0: mine})
        manifest = [
            (
                i,
                a,
                b,
                [(k, tuple(v.shape), v.dtype) for k, v in st.items() if isinstance(v, Tensor)],
            )
            for i, a, b, st in mine
        ]
        manifests = self.comm.all_gather_objects(manifest)
        collected: dict[int, list[Item]] = {}
        for q in range(self.world):
            if q == to:
                if me == to:
                    collected[q] = [
                        (i, a, b, {k: _cpu(v) for k, v in st.items()}) for i, a, b, st in mine
                    ]
                continue
            if me == q:
                flat = [v for _, _, _, st in mine for v in st.values() if isinstance(v, Tensor)]
                if flat:
                    buf = torch.cat(
                        [v.detach().reshape(-1).view(torch.uint8).to(self.device) for v in flat]
                    )
                    self.comm.send(buf, to)
            elif me == to:
                entries = manifests[q]
                assert isinstance(entries, list)
                total = sum(
                    tensor_bytes(shape, dtype)
                    for _, _, _, keys in entries
                    for _, shape, dtype in keys
                )
                got: list[Item] = []
                if total:
                    buf = torch.empty(total, dtype=torch.uint8, device=self.device)
                    buf = self.comm.recv(buf, q)
                    host = buf.cpu()
                    off = 0
                    for i, a, b, keys in entries:
                        recv: dict[str, Any] = {}
                        for k, shape, dtype in keys:
                            n = tensor_bytes(shape, dtype)
                            # (copied first: a tensor after an odd-sized one, a bf16 or
                            # 8-bit one, starts at an offset its dtype cannot view)
                            recv[k] = host[off : off + n].clone().view(dtype).view(shape)
                            off += n
                        got.append((i, a, b, recv))
                collected[q] = got
        return self._assemble(collected) if me == to else None

    def _assemble(self, collected: Mapping[int, list[Item]]) -> dict[int, dict[str, Any]]:
        items = [it for q in sorted(collected) for it in collected[q]]
        return assemble_all([e.spec for e in self._entries], items, f"COAP `{self.name}`")


def _cpu(v: Any) -> Any:
    return v.detach().cpu().clone() if isinstance(v, Tensor) else v
