"""The interface between a COAP optimizer and a distribution strategy.

The optimizer computes *updates*; a :class:`Layout` says which parameters this rank computes,
how to see local shards, how to sum over a shard group and how updates reach every rank.
The base class is the one-process layout; strategies in :mod:`coap_dist.distributed` subclass
it. Strategies never import the optimizer class, and the optimizer never imports a strategy:
``coap_dist`` installs :func:`set_layout_resolver` at import time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from coap_dist.functional.projection import ShardGroup, Side


@dataclasses.dataclass(frozen=True)
class MatrixGeometry:
    """Canonical geometry of a COAP matrix: side, rank r, global rows a, columns b."""

    side: Side
    rank: int
    rows: int
    cols: int


@dataclasses.dataclass
class LowRankUpdate:
    """W <- W - alpha * back(D) (canonical: D P, transposed for a left side), then
    W <- W - decay * W. ``projector`` is the (local view of the) projector P (r x b) and
    ``projector_changed`` says whether it differs from the previous step's."""

    direction: Tensor
    projector: Tensor
    side: Side
    alpha: float
    decay: float
    projector_changed: bool


@dataclasses.dataclass
class AppliedUpdate:
    """The parameter was already updated in place by this rank (dense AdamW, Tucker)."""


Update = LowRankUpdate | AppliedUpdate


def apply_low_rank(w: Tensor, u: LowRankUpdate) -> None:
    """In place: W <- (1 - decay) (W - alpha back(D)), back(D) = D P (right) or (D P)^T (left).

    This is the update followed by decoupled weight decay W <- W - decay W, folded into one
    ``addmm_`` (beta = 1 - decay): the rank-r product goes straight into W, with no full-size
    temporary and one pass over W.
    """
    d = u.direction.to(w.dtype)
    p = u.projector.to(w.dtype)
    keep = 1.0 - u.decay
    a, b = (d, p) if u.side == "right" else (p.t(), d.t())
    w.addmm_(a, b, beta=keep, alpha=-u.alpha * keep)


class Layout:
    """One process, or any layout where every rank holds and updates whole parameters
    identically (plain DDP after its all-reduce). Subclasses override what differs."""

    name = "single"
    supports_quantized_state = True

    def bind(
        self,
        params: Sequence[torch.nn.Parameter],
        costs: Sequence[float],
        geometry: Sequence[MatrixGeometry | None],
    ) -> None:
        """Called once with every parameter in optimizer order, its compute cost and, for
        COAP matrices, its geometry."""

    def check_config(self, config: dict[str, Any], what: str) -> None:
        """Fail on every rank if ranks sharing parameters were given different settings."""

    def owns(self, p: Tensor) -> bool:
        """Whether this rank computes the update of p (and holds its state)."""
        return True

    def local(self, t: Tensor) -> Tensor:
        """The local tensor behind t (DTensor -> its shard)."""
        return t

    def global_shape(self, p: Tensor) -> torch.Size:
        return p.shape

    def param(self, p: Tensor) -> Tensor:
        """The tensor the optimizer updates in place for p (its local shard by default)."""
        return self.local(p)

    def grad(self, p: Tensor) -> Tensor | None:
        """The gradient matching :meth:`param` (None if p has none this step)."""
        return None if p.grad is None else self.local(p.grad)

    def adopt(
        self, current: Sequence[Sequence[Tensor]], logical: Sequence[Sequence[Tensor]]
    ) -> list[Tensor] | None:
        """A wrapper swapped other tensors into the optimizer's groups (``current``, per group;
        ``logical``: the parameters the optimizer was built with). Map them so that
        :meth:`param` / :meth:`grad` reach them, and return the parameters this step() call
        covers; None if this layout cannot map them (the optimizer then raises)."""
        return None

    def forced_side(self, p: Tensor) -> Side | None:
        """A projection side imposed by the layout (row shards must be right-projected)."""
        return None

    def shard_group(self, p: Tensor) -> ShardGroup | None:
        """Collectives over the ranks holding row shards of p (None: p is whole here)."""
        return None

    def supports_tucker(self, p: Tensor) -> bool:
        return True

    def wrap_state(self, p: Tensor, t: Tensor, rows_like_param: bool) -> Tensor:
        """Turn a freshly allocated local state tensor into what the state dict stores."""
        return t

    def agree(self, ok: Tensor, params: Sequence[Tensor]) -> Tensor:
        """Logical AND of per-parameter flags over the ranks sharing each parameter."""
        return ok

    def begin_step(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Before the step (e.g. reduce gradients to their owners)."""

    def commit(
        self, updates: dict[torch.nn.Parameter, Update], params: Sequence[torch.nn.Parameter]
    ) -> None:
        """Make every rank's parameters reflect the updates computed on this rank."""
        for p, u in updates.items():
            if isinstance(u, LowRankUpdate):
                apply_low_rank(self.param(p), u)

    def extra_state_bytes(self) -> int:
        """Bytes held for the optimizer outside ``optimizer.state`` (e.g. projector caches)."""
        return 0

    def communicated_bytes(self) -> int:
        """Bytes this rank sent and received for the optimizer in the last step."""
        return 0

    def gather_state(
        self,
        state: dict[Tensor, dict[str, Any]],
        template: Callable[[torch.nn.Parameter], dict[str, Any]],
        params: Sequence[torch.nn.Parameter],
    ) -> dict[Tensor, dict[str, Any]]:
        """The full per-parameter state, layout-independent, on every rank."""
        return state

    def keep_state(self, p: torch.nn.Parameter) -> bool:
        """Whether loaded state for p stays on this rank."""
        return self.owns(p)


LayoutResolver = Callable[[Sequence[torch.nn.Parameter], str | None, Any], Layout]
_resolver: LayoutResolver | None = None


def set_layout_resolver(fn: LayoutResolver) -> None:
    """Installed by ``coap_dist.distributed``: picks a layout from params and arguments."""
    global _resolver
    _resolver = fn


def resolve_layout(
    params: Sequence[torch.nn.Parameter], sharding: str | None, process_group: Any
) -> Layout:
    """The layout for these parameters: one process unless a resolver says otherwise."""
    if _resolver is None:
        if sharding not in (None, "none"):
            raise ValueError(
                f"sharding={sharding!r} needs coap_dist.distributed (import coap_dist)"
            )
        return Layout()
    return _resolver(params, sharding, process_group)
