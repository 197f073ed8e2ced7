"""Fragment views: the narrow interface a wrapper implements to run the owner protocol.

A :class:`FragmentView` says which flat range of every parameter this rank holds, where its
gradient is, and which process group the state is sharded over; the owner protocol
(:class:`~coap_dist.distributed.owner.OwnerLayout`) does everything else the same way for
every wrapper. :class:`ReplicatedView` is the view of whole tensors (one process, DDP,
DeepSpeed stage 0); FSDP1's and FSDP2's views live in their layout files and DeepSpeed ZeRO
1-3's in :mod:`coap_dist.integrations.deepspeed`. A new wrapper implements the abstract
methods below (about 60 lines for FSDP2) and passes its view to ``OwnerLayout``.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from coap_dist.distributed.comm import Comm
from coap_dist.distributed.placement import Range
from coap_dist.optim.layout import refuse_fsdp1

__all__ = ["FragmentView", "ReplicatedView"]


class FragmentView(abc.ABC):
    """How a wrapper hands this rank its share of every parameter.

    Attributes:
        name: the layout name reported by the optimizer.
        group: process group the state is sharded over (ignored when ``solo``).
        group_of: the optimizer group of each parameter :meth:`attach` returned.
        solo: one rank keeps all state (one process, or DDP with replicated state).
        reduced: gradients arrive averaged over the group (False: this rank's own, to be
            summed by the optimizer, ZeRO-2 without DDP).
        grads_partition: the ranks' gradient pieces partition each gradient (sharded
            wrappers), rather than every rank holding all of it (DDP).
        rank_local: checkpoints hold each rank's pieces (DeepSpeed's per-rank files).
        uniform_grads: a gradient is present on this rank iff on every rank (see
            :attr:`coap_dist.optim.layout.Layout.uniform_grads`).
        dcp: ``state_dict()`` on a sharded rank serves the form of
            :mod:`~coap_dist.distributed.pieces` for ``torch.distributed.checkpoint``
            (False: it raises, naming ``consolidate_state_dict``).
    """

    name = "fragments"
    group: dist.ProcessGroup | None = None
    solo = False
    grads_partition = True
    reduced = True
    uniform_grads = False
    rank_local = False
    dcp = False

    @abc.abstractmethod
    def attach(self, current: list[list[Tensor]], built: list[list[Tensor | None]]) -> list[Tensor]:
        """The tensors state is keyed by, in optimizer order, from the tensors in the
        optimizer's groups now (``current``) and those it was built with (``built``; None
        where one was freed). Raises ValueError naming what to do if they cannot be mapped."""

    @abc.abstractmethod
    def device(self) -> torch.device:
        """Device of every tensor this rank updates."""

    @abc.abstractmethod
    def global_shape(self, index: int) -> tuple[int, ...]:
        """Shape of the whole parameter."""

    @abc.abstractmethod
    def dtype(self, index: int) -> torch.dtype:
        """dtype of the tensor updated (a wrapper's fp32 master copy, if any)."""

    @abc.abstractmethod
    def fragments(self, comm: Comm) -> list[list[Range] | None]:
        """Per parameter, the flat range [start, stop) of its row-major flattening that each
        rank holds (empty ranges allowed), or None when every rank holds it whole."""

    @abc.abstractmethod
    def local(self, index: int) -> Tensor | None:
        """Contiguous storage of this rank's fragment (1-D), or the whole tensor; None if it
        holds no element."""

    @abc.abstractmethod
    def grad(self, index: int) -> Tensor | None:
        """Gradient matching :meth:`local` (None if absent this step)."""

    def begin(self, current: list[list[Tensor]]) -> list[int] | None:
        """Indices taking part in this ``step()`` call; None if the tensors in the groups
        changed since :meth:`attach` (the optimizer then binds again)."""
        if [len(g) for g in current] != self._sizes or any(
            a is not b for a, b in zip((t for g in current for t in g), self._current, strict=True)
        ):
            return None
        return list(range(len(self.group_of)))

    def remember(self, current: list[list[Tensor]], params: list[list[Tensor | None]]) -> None:
        """Keep the identity of the group tensors seen at attach (for :meth:`begin`) and the
        group of each parameter (``params``: the per-group lists the state is keyed by)."""
        self._sizes = [len(g) for g in current]
        self._current = [t for g in current for t in g]
        self.group_of = [gi for gi, g in enumerate(params) for _ in g]

    def describe(self) -> dict[str, Any]:
        """What a rank-local checkpoint records to refuse loading elsewhere."""
        return {"view": self.name}


class ReplicatedView(FragmentView):
    """Every rank holds whole parameters: one process, DDP, DeepSpeed stage 0. ``solo``:
    state replicated, no communication; otherwise state sharded over ``group``
    (``reduced=False``: each rank's own gradients, summed by the optimizer).

    When a wrapper put same-shape copies in the groups (DeepSpeed stage 0's fp32 masters),
    the copies are what is updated and the parameters the optimizer was built with stay the
    keys of its state."""

    name = "replicated"

    def __init__(
        self, group: dist.ProcessGroup | None = None, *, solo: bool, reduced: bool = True
    ) -> None:
        self.group = group
        self.solo = solo
        self.reduced = reduced
        self.grads_partition = False
        self.uniform_grads = solo or reduced  # DDP's all-reduce (or nothing to agree on)
        self.name = "replicated" if solo else "ddp_owner"
        self._tensors: list[Tensor] = []

    def attach(self, current: list[list[Tensor]], built: list[list[Tensor | None]]) -> list[Tensor]:
        flat = [t for g in current for t in g]
        refuse_fsdp1(flat)
        for t in flat:
            if not t.is_contiguous():
                raise ValueError(
                    f"COAP: a parameter of shape {tuple(t.shape)} is not contiguous (e.g. "
                    "channels_last, or a transposed view): COAP steps each parameter in "
                    "place through views of its memory in row-major order. Convert the model "
                    "before the first step with model.to(memory_format=torch.contiguous_format) "
                    "(its parameters stay the same tensors: the optimizer keeps them)"
                )
        devices = {t.device for t in flat}
        if len(devices) > 1:
            raise ValueError(
                f"COAP: parameters are on several devices {sorted(map(str, devices))}; build "
                "one optimizer per device"
            )
        keys = [t for g in built for t in g]
        copies = [len(g) for g in current] == [len(g) for g in built] and all(
            k is not None and k.shape == t.shape for k, t in zip(keys, flat, strict=True)
        )
        self._tensors = flat
        self.remember(current, current)  # type: ignore[arg-type]
        return keys if copies else flat  # type: ignore[return-value]

    def device(self) -> torch.device:
        return self._tensors[0].device if self._tensors else torch.device("cpu")

    def global_shape(self, index: int) -> tuple[int, ...]:
        return tuple(self._tensors[index].shape)

    def dtype(self, index: int) -> torch.dtype:
        return self._tensors[index].dtype

    def fragments(self, comm: Comm) -> list[list[Range] | None]:
        return [None] * len(self._tensors)

    def local(self, index: int) -> Tensor | None:
        return self._tensors[index]

    def grad(self, index: int) -> Tensor | None:
        return self._tensors[index].grad
