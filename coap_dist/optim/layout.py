"""The interface between a COAP optimizer and a distribution layout.

The optimizer (:mod:`coap_dist.optim.coap`) runs the step as a short loop over the phases
below; a :class:`Layout` (one class per mode in :mod:`coap_dist.distributed`) says where each
parameter's state lives, moves gradients, projectors and updates between ranks with a fixed
number of collectives, and serves checkpoints. Layouts never import the optimizer class:
they see it through :class:`Core`. The optimizer never imports a layout: ``coap_dist``
installs :func:`set_layout_resolver` at import time, and the layout is bound late, from the
tensors present at the first ``step()`` (so an optimizer built before ``fully_shard``,
``accelerator.prepare`` or a DeepSpeed engine works like one built after).

One step, on every rank::

    ids   = layout.begin()              # parameters taking part in this call
    flags = ... per-parameter gradient statistics of layout.local_grad(i) ...
    host  = layout.agree(flags)         # one collective, the step's one host sync
    work  = layout.gather(active)       # gradients to the ranks that compute them
    layout.refresh(work, due)           # projector refreshes (rounds only for split rows)
    ... directions (sums over split rows: layout.team_sum) ...
    layout.scatter(updates)             # updates back to the ranks that hold the weights
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from coap_dist.optim.spec import ParamSpec
from coap_dist.optim.storage import RankChange, convert_piece

State = dict[str, Any]


@dataclasses.dataclass
class MatrixWork:
    """A piece of a COAP matrix this rank computes this step.

    Attributes:
        index: parameter index; spec / group / state: its plan, hyperparameters, this
            piece's state (moments of its rows; P on the holder).
        rows: canonical rows [start, stop) of the piece.
        grad: gradient block, canonical (rows x b).
        projector: P (r x b) to use this step (the holder's state, or a copy received).
        split: whether the matrix's rows are spread over several ranks (sums over rows
            then go through :meth:`Layout.team_sum`).
    """

    index: int
    spec: ParamSpec
    group: dict[str, Any]
    state: State
    rows: tuple[int, int]
    grad: Tensor
    projector: Tensor
    split: bool


@dataclasses.dataclass
class DenseWork:
    """An AdamW piece: ``weight`` is updated in place with ``grad`` (same shape); ``start``:
    its first element in the flat parameter (8-bit moments keep the parameter's block grid)."""

    index: int
    spec: ParamSpec
    group: dict[str, Any]
    state: State
    weight: Tensor
    grad: Tensor
    start: int = 0


@dataclasses.dataclass
class ConvWork:
    """A whole Tucker-projected convolution (full gradient) on the rank keeping its state."""

    index: int
    spec: ParamSpec
    group: dict[str, Any]
    state: State
    grad: Tensor


@dataclasses.dataclass
class Work:
    """Everything this rank computes in one step."""

    matrices: list[MatrixWork]
    dense: list[DenseWork]
    convs: list[ConvWork]


@dataclasses.dataclass(frozen=True)
class Update:
    """W <- keep (W - alpha back(D)): ``direction`` D is rows x r for a matrix piece (back:
    D P, transposed for a left side) and the full update for a convolution."""

    index: int
    direction: Tensor
    alpha: float
    keep: float


class Core(Protocol):
    """What a layout may use of the optimizer it serves.

    Attributes:
        name: the optimizer's class name (for messages).
        state: per-parameter state, keyed by the layout's ``params``.
        groups: every parameter group dict, in order (a wrapper may show only some of
            them in ``param_groups`` during a step).
        built: per group, the tensors the optimizer was built with (None where freed).
    """

    name: str
    state: Any
    groups: list[dict[str, Any]]

    @property
    def built(self) -> list[list[Tensor | None]]:
        """Per group, the tensors the optimizer was built with (None where freed)."""
        ...

    def plan(
        self,
        shapes: Sequence[tuple[int, ...]],
        dtypes: Sequence[torch.dtype],
        group_of: Sequence[int],
        *,
        fixed_rank: bool = False,
    ) -> list[ParamSpec]:
        """The plan of every parameter from its global shape, the dtype of the tensor the
        layout updates and its group (``fixed_rank``: ``rank="auto"`` matrices at their fixed ranks, the
        budget that owner layouts place state by)."""
        ...

    def settings(self) -> dict[str, Any]:
        """Hyperparameters every rank must share (checked once at bind)."""
        ...

    def step_size(self, index: int) -> float:
        """alpha of this step's update of COAP parameter ``index`` (same on every rank)."""
        ...


LAYOUT_NAMES: dict[str, str] = {
    "replicated": "every rank keeps all state (one process, DDP, DeepSpeed ZeRO 0)",
    "ddp_owner": 'DDP with sharding="owner" (OwnerSharding; app strategy ddp_owner)',
    "fsdp2": "FSDP2 / HSDP row shards, the default under fully_shard (Fsdp2Local)",
    "fsdp2_owner": 'FSDP2 / HSDP with sharding="owner" (Fsdp2Owner)',
    "fsdp1": "FSDP1 with sharding=Fsdp1Sharding(model)",
    "zero": "DeepSpeed ZeRO 1-3 partitions (coap_dist.integrations.deepspeed)",
}
"""The one vocabulary of layouts: ``Layout.name``, the memory estimator's ``layout=``, the
support table's rows and the app's strategy names use these words (the app's ``ddp`` and
``deepspeed_zero0`` strategies give ``replicated``, ``hsdp`` gives ``fsdp2``)."""


class Layout(abc.ABC):
    """A distribution mode. Subclasses implement every phase; the names say what each does.

    Attributes (set by :meth:`bind`):
        name: the mode, one of :data:`LAYOUT_NAMES`.
        device: the parameters' device, where every buffer of every collective lives.
        world: ranks the optimizer state is spread over (1: one process or replicated).
        params: the tensors ``state`` is keyed by, in optimizer order.
        group_of: the group (index in the optimizer's ``groups``) of each of them.
    """

    name = "layout"
    uniform_grads = False
    """Whether a parameter's gradient is present on this rank exactly when it is on every
    rank (the wrapper makes it so: one process, DDP's all-reduce, FSDP2's reduce-scatter).
    Then ``step()`` with ``skip_nonfinite=False`` may decide from this rank alone, without
    reading the flag vector on the host (the ranks' agreement is checked when it is read
    later). False where the ranks' pieces may differ (FSDP1, DeepSpeed ZeRO, each rank's own
    gradients)."""
    resize_refusal = ""
    """Why ``rank="auto"`` may not re-plan this layout with other ranks at a step, and what to
    use instead (empty: it may; state pieces stay where they are, owner layouts place them by the fixed ranks'
    bytes)."""
    device: torch.device
    world: int
    params: list[Tensor]
    group_of: list[int]
    _core: Core | None = None

    @abc.abstractmethod
    def bind(self, core: Core) -> list[ParamSpec]:
        """Plan from the tensors present now (called at the first step, or when a wrapper
        swapped tensors in) and return every parameter's plan; may communicate once
        (settings check, fragment maps)."""

    @abc.abstractmethod
    def begin(self, present: Sequence[bool]) -> list[int] | None:
        """Start a step: the parameter indices taking part in this ``step()`` call
        (``present``: which groups the caller shows now), or None when a wrapper swapped the
        tensors in the groups since :meth:`bind` (the optimizer then binds again)."""

    @abc.abstractmethod
    def local_grad(self, index: int) -> Tensor | None:
        """This rank's gradient of parameter ``index`` as the wrapper handed it (a shard,
        a fragment or the whole gradient), for the finiteness check; None if absent."""

    @abc.abstractmethod
    def reduce_sum(self, values: Tensor) -> Tensor:
        """Sum of a flat float vector over the ranks, in place (returned; no host read)."""

    def agree(self, values: Tensor) -> list[float]:
        """Sum of a flat float vector over the ranks, read on the host: the step's one
        collective before any work and its one host synchronisation."""
        return self.reduce_sum(values).cpu().tolist()

    @abc.abstractmethod
    def grad_total(self, local: Tensor, op: Literal["sum", "max"]) -> Tensor:
        """A whole-model reduction over the gradient entries, from ``local``: this rank's
        over its :meth:`local_grad` pieces (0-dim, float32), a sum (of squared entries, of
        |entries|^p) or a max (of |entries|). Layouts whose pieces partition the gradients
        reduce over the ranks with ``op`` (one all-reduce); where every rank holds the whole
        (reduced) gradient it is ``local``. For ``clip_grad_norm_``."""

    def share_block_max(self, maxima: dict[int, list[Tensor]]) -> dict[int, list[Tensor]]:
        """8-bit AdamW pieces: ``maxima[i]`` holds, per moment, this rank's max |x| of every
        quantization block its piece of parameter ``i`` touches. Returns them with each block
        that several ranks' pieces share replaced by its maximum over those ranks, so that
        every piece quantizes as the whole parameter would. Called on every rank at every
        step (possibly with nothing); a layout whose pieces never share a block returns
        ``maxima`` (the default)."""
        return maxima

    def resize(
        self,
        old: Layout,
        kept: Mapping[int, State],
        changes: Mapping[int, RankChange],
        projectors: Mapping[int, Tensor],
        where: str,
    ) -> None:
        """``rank="auto"``, on this layout freshly bound at the new ranks: give it the state
        of the matrices whose rank changes (``changes``, the same on every rank; ``kept``:
        this rank's state of them under ``old``, at the old rank; ``projectors``: the whole
        old P of each where this step's work held it). The default re-projects each piece
        where it is (owner layouts place pieces by the fixed ranks' bytes, so they stay;
        a holder keeps the whole P)."""
        assert self._core is not None
        for i, st in kept.items():
            self.ensure_state(i)
            into = self._core.state.get(self.params[i])
            if into is not None:
                convert_piece(st, into, changes[i], f"{where} of parameter {i}")

    @abc.abstractmethod
    def ensure_state(self, index: int) -> None:
        """Create this rank's state for parameter ``index`` if it has none (lazy state)."""

    @abc.abstractmethod
    def gather(self, active: Sequence[int]) -> Work:
        """Move gradients (and projectors) of the active parameters to the ranks that
        compute them; returns this rank's work."""

    @abc.abstractmethod
    def refresh(self, work: Work, due: Mapping[int, str]) -> list[Tensor]:
        """Refresh the projectors of ``due`` (index -> "init" | "recalibrate" | "update"),
        rotating moments, on every rank that holds a piece of those matrices. Returns the
        acceptance flags (0-dim bool, False: non-finite, old kept) of the refreshes this
        rank decided, each refresh counted on exactly one rank."""

    @abc.abstractmethod
    def team_sum(
        self,
        partials: Mapping[int, Tensor],
        sizes: Mapping[int, int],
        dtype: torch.dtype = torch.float32,
    ) -> dict[int, Tensor]:
        """Sum per-matrix partials over the ranks holding rows of each matrix, in ``dtype``
        (the same on all ranks). ``sizes`` gives the length of every active matrix's partial
        (the same on all ranks); ``partials`` this rank's. One collective when any active
        matrix is split."""

    @abc.abstractmethod
    def scatter(self, updates: Sequence[Update], work: Work) -> None:
        """Apply the updates to the weights on every rank that holds them."""

    @abc.abstractmethod
    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank keeps (tensors with ndim >= 1)."""

    @abc.abstractmethod
    def state_dict(self, saved: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The state dict this layout serves; ``saved`` builds the single-process form of the
        state this rank holds. Raises at once (no collective) if this rank cannot serve it
        alone, naming the call to make instead."""

    @abc.abstractmethod
    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Keep this rank's pieces of a state dict (any form :meth:`state_dict` or one
        process produces)."""

    @abc.abstractmethod
    def consolidate(self, to: int) -> dict[int, State] | None:
        """Collective: the single-process state of every parameter on rank ``to`` (None
        elsewhere)."""

    def full_state_ranks(self) -> list[int] | None:
        """No communication. Where ``state_dict()`` is being called by torch's full-state
        gather (``get_optimizer_state_dict(..., StateDictOptions(full_state_dict=True))``,
        which every rank runs together) and this layout's own state dict is not the whole
        state: the ranks of this layout's group that are to get the whole state (torch keeps
        only global rank 0's dict under ``cpu_offload``); None otherwise, as here (one
        process and replicated state are whole)."""
        return None

    def metrics(self) -> dict[str, float]:
        """Layout counters for loggers (collectives and bytes of the last step)."""
        return {}


def refuse_fsdp1(tensors: Sequence[Tensor]) -> None:
    """Raise if FSDP1 flattened these parameters: its layout needs the wrapped model."""
    if any(getattr(t, "_fsdp_flattened", False) for t in tensors):
        raise ValueError(
            "COAP: these parameters are flattened by FSDP1 (FullyShardedDataParallel). FSDP1 "
            "requires the optimizer to be built AFTER wrapping, with its layout: "
            "COAPAdamW(fsdp_model.parameters(), ..., sharding=Fsdp1Sharding(fsdp_model)) "
            "(use_orig_params=True), from coap_dist.distributed. Or use FSDP2 (fully_shard), "
            "where the optimizer may be built before or after wrapping"
        )


LayoutResolver = Callable[[list[dict[str, Any]], list[list[Tensor | None]], Any, Any], Layout]
"""(the optimizer's param groups now, tensors it was built with per group, sharding,
process_group) -> an unbound Layout."""

_resolver: LayoutResolver | None = None
_construction_hooks: list[Callable[[], None]] = []


def add_construction_hook(fn: Callable[[], None]) -> None:
    """Run ``fn()`` whenever a COAP optimizer is built (integrations declare themselves to a
    wrapper that inspects the optimizer right after building it, e.g. DeepSpeed's ZeRO check)."""
    if fn not in _construction_hooks:
        _construction_hooks.append(fn)


def run_construction_hooks() -> None:
    """Called by the optimizer's constructor."""
    for fn in _construction_hooks:
        fn()


def set_layout_resolver(fn: LayoutResolver) -> None:
    """Installed by ``coap_dist.distributed`` (and wrapped by the DeepSpeed integration)."""
    global _resolver
    _resolver = fn


def resolve_layout(
    groups: list[dict[str, Any]],
    built: list[list[Tensor | None]],
    sharding: Any,
    process_group: Any,
) -> Layout:
    """The layout for the tensors present now (see :data:`LayoutResolver`)."""
    if _resolver is None:
        raise RuntimeError("coap_dist.distributed is not imported (import coap_dist)")
    return _resolver(groups, built, sharding, process_group)
