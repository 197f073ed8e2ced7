"""COAP as a DeepSpeed JSON-config optimizer: ``"optimizer": {"type": "COAP", "params": {...}}``.

DeepSpeed has no optimizer registry: a type it does not know resolves through
``getattr(torch.optim, name)``. :func:`register` (run by ``import coap_dist``) makes
``torch.optim.COAP`` (:class:`~coap_dist.COAPAdamW`) and ``torch.optim.COAPAdafactor`` resolvable
and installs a layout resolver that recognises construction inside a DeepSpeed engine. The JSON
``params`` become constructor keyword arguments; an unknown key fails with Python's error naming
it. Nothing here imports ``deepspeed``: the engine is found on the call stack (it constructs the
optimizer), so ``deepspeed`` is necessarily imported already.

What each ZeRO wrapper hands the optimizer (measured, DeepSpeed 0.19.8), and how COAP maps it:

* stage 0 fp32: the model's own 2-D parameters, gradients averaged -> replicated COAP, as under
  DDP (:class:`DeepSpeedReplicaLayout`, a no-op).
* stage 0 bf16/fp16 (``FP16_UnfusedOptimizer``): same-shape fp32 master copies plus one step on
  all-zero gradients at construction -> the copies are adopted as the tensors to update and the
  construction-time step is ignored (:class:`DeepSpeedReplicaLayout`).
* stages 1 and 2 (``DeepSpeedZeroOptimizer``, fp32 or bf16) and bf16 with fp32 gradient
  accumulation (``BF16_Optimizer``): one flat fp32 partition per group, step() once per group;
  every model parameter's ``_hp_mapping`` names its fragment (a range of the flattened matrix,
  possibly starting mid-row) -> :class:`DeepSpeedZeroLayout`.
* stage 3 (``DeepSpeedZeroOptimizer_Stage3``, also under ``deepspeed.zero.Init``): step() once
  per sub-group with its flat fp32 partition swapped in; rank k holds elements
  [k s, (k + 1) s) of every flattened parameter (s = ``partition_numel()``), located through the
  stage-3 optimizer's ``grad_position`` -> :class:`DeepSpeedZeroLayout`.

:class:`DeepSpeedZeroLayout` is OWNER sharding over the data-parallel group: each COAP matrix is
owned by one rank (longest-processing-time packing on m n r). Each step the ranks reduce their
gradient fragments of a matrix to its owner (disjoint fragments in a zero buffer: the sum is the
exact full gradient), the owner alone holds and updates the matrix's P, M, V and broadcasts the
rank-r factors D (a x r) and P (r x b); every rank holding a fragment applies its rows of
alpha D P (or its transpose) and the decoupled weight decay to its fp32 master fragment.
AdamW parameters (biases, norms) stay element-wise on the fragments DeepSpeed assigned.

Checkpoints: DeepSpeed's (rigid) ZeRO checkpoints store ``optimizer.state_dict()`` per rank, and
COAP's state_dict is keyed by the model parameters, so ``engine.save_checkpoint`` /
``load_checkpoint`` round-trip all COAP state with no extra file. Resuming at another
data-parallel world size is refused by DeepSpeed itself ("Automatic adjustment of ZeRO's
optimizer state partitioning with a new world size is not currently supported"); universal
checkpoints (``ds_to_universal``) only map flat-partition-shaped state and are not supported.

Unsupported, refused at ``deepspeed.initialize`` with an error saying what to use instead:
optimizer or parameter offload (CPU / NVMe), fp16 on CPU, an explicit ``sharding`` argument,
Tucker-projected convolutions (``rank_ratio_cnn``) and 8-bit state at stages 1-3.
``zero_allow_untested_optimizer`` is not needed: COAP declares itself ZeRO-supported.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from coap_dist import distributed as _distributed
from coap_dist.distributed.common import assign_owners, from_bytes, global_rank, to_bytes
from coap_dist.optim import COAPAdafactor, COAPAdamW
from coap_dist.optim.layout import (
    Layout,
    LowRankUpdate,
    MatrixGeometry,
    Update,
    set_layout_resolver,
)

logger = logging.getLogger(__name__)

OPTIMIZER_TYPES: dict[str, type] = {"COAP": COAPAdamW, "COAPAdafactor": COAPAdafactor}
"""JSON ``"type"`` names and the classes they resolve to (``torch.optim.<name>``)."""

_registered = False


def register() -> None:
    """Make the JSON types resolvable (``torch.optim.COAP``, ``torch.optim.COAPAdafactor``) and
    install the DeepSpeed-aware layout resolver. Idempotent; does not import deepspeed."""
    global _registered
    for name, cls in OPTIMIZER_TYPES.items():
        setattr(torch.optim, name, cls)
    if not _registered:
        set_layout_resolver(_resolve)
        _registered = True


def _resolve(params: Sequence[torch.nn.Parameter], sharding: Any, process_group: Any) -> Layout:
    """The layout for an optimizer built inside a DeepSpeed engine; otherwise the default one."""
    engine = _calling_engine()
    if engine is None:
        return _distributed.resolve(params, sharding, process_group)
    return layout_for_engine(engine, sharding)


def _calling_engine(max_depth: int = 16) -> Any | None:
    """The ``DeepSpeedEngine`` whose ``_configure_optimizer`` is constructing this optimizer
    (JSON type or client callable), found on the call stack; None outside DeepSpeed."""
    engine_mod = sys.modules.get("deepspeed.runtime.engine")
    if engine_mod is None:
        return None
    engine_cls = engine_mod.DeepSpeedEngine
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, engine_cls):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def layout_for_engine(engine: Any, sharding: Any = None) -> Layout:
    """Validate the engine's configuration for COAP and return the layout for its ZeRO stage.

    Raises ValueError for combinations COAP cannot run matrix-aware, naming what to use instead.
    """
    what = "COAP under DeepSpeed"
    if sharding not in (None, "none"):
        raise ValueError(
            f"{what}: invalid `sharding`={sharding!r}; under DeepSpeed the layout follows "
            "zero_optimization.stage (state is sharded over the data-parallel group at stages "
            "1-3). Remove `sharding` from the optimizer params"
        )
    stage = int(engine.zero_optimization_stage())
    offload_opt = engine.zero_offload_optimizer()
    offload_param = engine.zero_offload_param()
    for key, cfg in (("offload_optimizer", offload_opt), ("offload_param", offload_param)):
        device = getattr(cfg, "device", None)
        if device is not None and str(getattr(device, "value", device)) != "none":
            raise ValueError(
                f"{what}: zero_optimization.{key}.device={getattr(device, 'value', device)!r} "
                "is not supported: offloaded optimizers run DeepSpeed's CPU Adam on flat shards, "
                "which would silently drop COAP's matrix structure. Remove "
                f"zero_optimization.{key} (COAP's state is already ~r/min(m, n) of AdamW's), "
                'or use "type": "AdamW" if you need offload'
            )
    device_type = _engine_device_type(engine)
    if engine.fp16_enabled() and device_type == "cpu":
        raise ValueError(
            f"{what}: fp16 is not supported on CPU (DeepSpeed's fp16 wrappers need an "
            'accelerator); use "bf16": {"enabled": true} or fp32'
        )
    if getattr(engine, "has_moe_layers", False):
        raise ValueError(
            f"{what}: mixture-of-experts parameter groups (expert data-parallel groups) are not "
            "supported yet; use stage 0-3 without MoE layers or a non-COAP optimizer"
        )
    _declare_zero_supported()
    mixed = bool(engine.fp16_enabled() or engine.bfloat16_enabled())
    if stage == 0:
        return DeepSpeedReplicaLayout(master_fp32=mixed)
    group = getattr(engine, "seq_data_parallel_group", None)
    if group is None:
        from deepspeed.utils import groups  # deepspeed is imported: the engine exists

        group = groups._get_data_parallel_group()
    return DeepSpeedZeroLayout(group, stage)


def _engine_device_type(engine: Any) -> str:
    device = getattr(engine, "device", None)
    if isinstance(device, torch.device):
        return device.type
    from deepspeed.accelerator import get_accelerator

    return str(get_accelerator().device_name())


def _declare_zero_supported() -> None:
    """Add the COAP classes to DeepSpeed's ZeRO-supported optimizers, so that configs need no
    ``zero_allow_untested_optimizer`` (COAP maps flat partitions back to matrices itself)."""
    zero_utils = sys.modules.get("deepspeed.runtime.zero.utils")
    supported = getattr(zero_utils, "ZERO_SUPPORTED_OPTIMIZERS", None)
    if supported is None:
        return
    for cls in OPTIMIZER_TYPES.values():
        if cls not in supported:
            supported.append(cls)


def _shape_proxy(shape: Sequence[int], device: torch.device) -> Tensor:
    """A zero-storage fp32 tensor of ``shape`` (stride 0): shape, dtype and device for state
    allocation where no full-size tensor exists on this rank."""
    return torch.zeros(1, dtype=torch.float32, device=device).expand(tuple(shape))


def _same_tensors(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------- stage 0
class DeepSpeedReplicaLayout(Layout):
    """ZeRO stage 0: every rank holds whole parameters with averaged gradients (like DDP).

    Under bf16/fp16 the wrapper replaces the parameters by same-shape fp32 master copies; they
    are adopted position by position. The wrapper's construction-time step on all-zero
    gradients is ignored (no step counted, no weight decay applied).
    """

    name = "deepspeed_stage0"

    def __init__(self, master_fp32: bool = False) -> None:
        self.master_fp32 = master_fp32
        self._master: dict[Tensor, Tensor] = {}
        self._skip = False
        self._stepped = False

    def param(self, p: Tensor) -> Tensor:
        master = self._master.get(p)
        if master is not None:
            return master
        if self.master_fp32 and p.is_floating_point() and p.dtype != torch.float32:
            return _shape_proxy(p.shape, p.device)
        return p

    def grad(self, p: Tensor) -> Tensor | None:
        return None if self._skip else self._raw_grad(p)

    def _raw_grad(self, p: Tensor) -> Tensor | None:
        master = self._master.get(p)
        return (p if master is None else master).grad

    def adopt(
        self, current: Sequence[Sequence[Tensor]], logical: Sequence[Sequence[Tensor]]
    ) -> list[Tensor] | None:
        for cur, log in zip(current, logical, strict=True):
            if _same_tensors(cur, log):
                continue
            if len(cur) != len(log) or any(
                c.shape != q.shape for c, q in zip(cur, log, strict=True)
            ):
                return None
            for c, q in zip(cur, log, strict=True):
                self._master[q] = c
        active = [p for log in logical for p in log]
        # The wrapper's construction-time step sees all-zero gradients before any real step.
        self._skip = not self._stepped and all(
            g is None or not bool(g.any()) for g in (self._raw_grad(p) for p in active)
        )
        self._stepped = self._stepped or not self._skip
        return active


# ----------------------------------------------------------------------------- stages 1-3
@dataclasses.dataclass
class _Fragment:
    """This rank's part of a parameter: ``numel`` elements of the flattened parameter starting
    at ``param_start``, stored in the flat fp32 partition ``flat`` at ``flat_start``."""

    flat: Tensor
    flat_start: int
    param_start: int
    numel: int

    def weight(self) -> Tensor:
        return self.flat.narrow(0, self.flat_start, self.numel)

    def grad(self) -> Tensor | None:
        g = self.flat.grad
        return None if g is None else g.narrow(0, self.flat_start, self.numel)


def _fragment_of(p: Tensor, rank: int) -> _Fragment | bool | None:
    """This rank's fragment of model parameter p under ZeRO 1/2 (``_hp_mapping``) or 3
    (``_z3_optimizer``); None if this rank holds none; False if p carries no DeepSpeed mapping."""
    z3 = getattr(p, "_z3_optimizer", None)
    if z3 is not None:
        sub_group, offset, part_numel = z3.grad_position[z3.get_param_id(p)]
        start = rank * part_numel
        numel = min(part_numel, p.ds_numel - start)
        if numel <= 0:
            return None
        return _Fragment(z3.fp32_partitioned_groups_flat[sub_group], offset, start, numel)
    if hasattr(p, "_hp_mapping"):
        mapping = p._hp_mapping
        if mapping is None:
            return None
        hp = mapping.hp_fragment
        flat = hp._base if hp._base is not None else hp
        lp_addr = mapping.lp_fragment_address
        return _Fragment(flat, mapping.hp_fragment_address.start, lp_addr.start, lp_addr.numel)
    return False


class DeepSpeedZeroLayout(Layout):
    """ZeRO stages 1-3: COAP matrices owned per rank, AdamW element-wise on local fragments.

    See the module docstring for the data flow. ``owns(p)``: the owner rank for a COAP matrix,
    "holds a non-empty fragment" for an AdamW parameter.
    """

    name = "deepspeed_zero"
    supports_quantized_state = False

    def __init__(self, process_group: Any, stage: int) -> None:
        self.group = process_group
        self.stage = stage
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self._params: list[Tensor] = []
        self._owner: dict[Tensor, int] = {}
        self._geometry: dict[Tensor, MatrixGeometry] = {}
        self._frag: dict[Tensor, _Fragment | None] = {}
        self._active: list[Tensor] = []
        self._active_set: set[Tensor] = set()
        self._full_grad: dict[Tensor, Tensor] = {}
        self._comm_bytes = 0

    # ----------------------------------------------------------------------- structure
    def bind(
        self,
        params: Sequence[torch.nn.Parameter],
        costs: Sequence[float],
        geometry: Sequence[MatrixGeometry | None],
    ) -> None:
        self._params = list(params)
        matrices = [i for i, g in enumerate(geometry) if g is not None]
        owners = assign_owners([costs[i] for i in matrices], self.world)
        for i, r in zip(matrices, owners, strict=True):
            p, geo = self._params[i], geometry[i]
            assert geo is not None
            self._owner[p] = r
            self._geometry[p] = geo

    def check_config(self, config: dict[str, Any], what: str) -> None:
        from coap_dist.distributed.common import check_same_config

        check_same_config(config, self.group, what)

    def global_shape(self, p: Tensor) -> torch.Size:
        return torch.Size(getattr(p, "ds_shape", None) or p.shape)

    def supports_tucker(self, p: Tensor) -> bool:
        return False

    def owner_of(self, p: Tensor) -> int | None:
        """Data-parallel rank owning COAP matrix p (None for AdamW parameters)."""
        return self._owner.get(p)

    def owns(self, p: Tensor) -> bool:
        if p in self._owner:
            return self._owner[p] == self.rank
        return self._frag.get(p) is not None

    def param(self, p: Tensor) -> Tensor:
        if p in self._owner:  # state allocation only: COAP matrices are updated in commit()
            return _shape_proxy(self.global_shape(p), self._device(p))
        frag = self._frag.get(p)
        if frag is None:
            return _shape_proxy((0,), self._device(p))
        return frag.weight()

    def grad(self, p: Tensor) -> Tensor | None:
        if p in self._owner:
            return self._full_grad.get(p)
        frag = self._frag.get(p)
        return None if frag is None or p not in self._active_set else frag.grad()

    def _device(self, p: Tensor) -> torch.device:
        frag = self._frag.get(p)
        return frag.flat.device if frag is not None else p.device

    def adopt(
        self, current: Sequence[Sequence[Tensor]], logical: Sequence[Sequence[Tensor]]
    ) -> list[Tensor] | None:
        """Map the wrapper's flat partitions back to model parameters; the parameters whose
        fragments live in the partitions present in this call are the active ones."""
        present = {t.untyped_storage().data_ptr() for cur in current for t in cur}
        active: list[Tensor] = []
        for cur, log in zip(current, logical, strict=True):
            if _same_tensors(cur, log):
                return None  # an unwrapped group next to wrapped ones: not a ZeRO layout
            for p in log:
                frag = _fragment_of(p, self.rank)
                if frag is False:
                    return None
                assert not isinstance(frag, bool)
                self._frag[p] = frag
                # Stage 3 swaps one sub-group in per call: a parameter whose partition on this
                # rank is elsewhere (or empty) is active when its sub-group is present on the
                # ranks that hold it; all ranks see the same sub-group sequence.
                if self._in_call(p, frag, present, cur):
                    active.append(p)
        self._active = active
        self._active_set = set(active)
        return active

    def _in_call(
        self, p: Tensor, frag: _Fragment | None, present: set[int], cur: Sequence[Tensor]
    ) -> bool:
        if not cur:
            return False
        if self.stage < 3:
            return True  # stages 1/2: a group is present with all its parameters
        z3 = p._z3_optimizer
        sub_group = z3.grad_position[z3.get_param_id(p)][0]
        flat = z3.fp32_partitioned_groups_flat[sub_group]
        return flat.untyped_storage().data_ptr() in present

    # ------------------------------------------------------------------------ gradients
    def agree(self, ok: Tensor, params: Sequence[Tensor]) -> Tensor:
        flags = ok.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        return flags.bool()

    def begin_step(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Reduce each active matrix's gradient fragments to its owner (one reduce per owner)."""
        self._comm_bytes = 0
        self._full_grad = {}
        for r in range(self.world):
            mine = [p for p in self._active if self._owner.get(p) == r]
            if not mine:
                continue
            sizes = [self.global_shape(p).numel() for p in mine]
            buf = torch.zeros(sum(sizes), dtype=torch.float32, device=self._device(mine[0]))
            off = 0
            for p, n in zip(mine, sizes, strict=True):
                frag = self._frag.get(p)
                if frag is not None:
                    g = frag.grad()
                    if g is not None:
                        buf[off + frag.param_start : off + frag.param_start + frag.numel] = g
                off += n
            dist.reduce(buf, dst=global_rank(self.group, r), op=dist.ReduceOp.SUM, group=self.group)
            self._comm_bytes += buf.numel() * buf.element_size()
            if r == self.rank:
                off = 0
                for p, n in zip(mine, sizes, strict=True):
                    self._full_grad[p] = buf[off : off + n].view(self.global_shape(p))
                    off += n

    # --------------------------------------------------------------------------- updates
    def commit(
        self, updates: dict[torch.nn.Parameter, Update], params: Sequence[torch.nn.Parameter]
    ) -> None:
        """Owners broadcast (status, alpha, decay) and D, P; fragment holders apply their rows."""
        for r in range(self.world):
            mine = [p for p in self._active if self._owner.get(p) == r]
            if not mine:
                continue
            header = torch.zeros((len(mine), 3), dtype=torch.float64)
            chunks: list[Tensor] = []
            if r == self.rank:
                for i, p in enumerate(mine):
                    u = updates.get(p)
                    if isinstance(u, LowRankUpdate):
                        header[i] = torch.tensor([1.0, u.alpha, u.decay], dtype=torch.float64)
                        chunks.append(to_bytes(u.direction.float()))
                        chunks.append(to_bytes(u.projector.float()))
            dist.broadcast(header, src=global_rank(self.group, r), group=self.group)
            rows = header[:, 0].tolist()
            nbytes = sum(
                4 * (g.rows * g.rank + g.rank * g.cols)
                for p, s in zip(mine, rows, strict=True)
                if s
                for g in (self._geometry[p],)
            )
            self._comm_bytes += header.numel() * 8 + nbytes
            if nbytes == 0:
                continue
            device = self._device(mine[0])
            if r == self.rank:
                buf = torch.cat(chunks)
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            dist.broadcast(buf, src=global_rank(self.group, r), group=self.group)
            off = 0
            for p, h in zip(mine, header.tolist(), strict=True):
                if not h[0]:
                    continue
                geo = self._geometry[p]
                d, off = from_bytes(buf, off, torch.float32, (geo.rows, geo.rank))
                proj, off = from_bytes(buf, off, torch.float32, (geo.rank, geo.cols))
                frag = self._frag.get(p)
                if frag is not None:
                    self._apply_fragment(p, frag, d, proj, h[1], h[2])

    def _apply_fragment(
        self, p: Tensor, frag: _Fragment, d: Tensor, proj: Tensor, alpha: float, decay: float
    ) -> None:
        """W_frag <- W_frag - alpha U_frag; W_frag <- W_frag - decay W_frag, where U = D P
        (right) or (D P)^T (left) restricted to the rows that the fragment touches."""
        n_cols = self.global_shape(p)[1]
        r0 = frag.param_start // n_cols
        r1 = (frag.param_start + frag.numel - 1) // n_cols + 1
        right = self._geometry[p].side == "right"
        block = d[r0:r1] @ proj if right else proj[:, r0:r1].t() @ d.t()
        lo = frag.param_start - r0 * n_cols
        w = frag.weight()
        w.add_(block.reshape(-1)[lo : lo + frag.numel].to(w.dtype), alpha=-alpha)
        if decay > 0:
            w.add_(w, alpha=-decay)

    def communicated_bytes(self) -> int:
        return self._comm_bytes

    def keep_state(self, p: torch.nn.Parameter) -> bool:
        return self.owns(p)
