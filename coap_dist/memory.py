"""Optimizer-state memory: a closed-form estimator and a measurement of real optimizers.

What is counted ("moment + projector tensors")
----------------------------------------------
Every optimizer-state tensor with ``ndim >= 1``: Adam moments, low-rank projectors (Tucker
factors for convolutions) and, for 8-bit state, the per-block quantization scales (and
bitsandbytes' shared code maps). Scalar bookkeeping (step and refresh counters: 0-d tensors or
Python numbers) is *not* counted: a few bytes per parameter that no published figure
includes. ``COAPAdamW.state_bytes()`` uses the same definition (``nbytes`` of every state
tensor with ``ndim >= 1``), so :func:`estimate_state_bytes` and :func:`measure_state_bytes`
agree to the byte on a real optimizer.

Which parameters are low-rank
-----------------------------
Exactly ``coap_dist.param_groups``: weights of linear (and convolution) layers are projected;
embeddings, output heads, norms, biases and every other tensor keep full AdamW moments.
``adamw_patterns`` / ``coap_patterns`` are its fnmatch patterns on full parameter names.

Formulas, per parameter (state element size ``b`` bytes)
--------------------------------------------------------
Matrix W (m x n), rank ``r = min(rank, m, n)`` or ``r = max(min(m, n) // rank_ratio, 1)``
(``rank_ratio`` wins when both are given, as in the optimizer). Side rule (COAP reference and
GaLore ``proj_type="std"``): m >= n projects on the right (P: r x n, moments m x r), else on
the left (P: m x r, moments r x n). So, with the default side rule,

* low-rank moments: ``2 * r * max(m, n)`` elements, projector ``r * min(m, n)`` elements;
* AdamW parameters: ``2 * numel`` moment elements, no projector;
* COAP convolutions (O x I x kh x kw, ``rank_ratio_cnn`` rho given, more than 9216 elements):
  Tucker factors ``O * r0 + I * r1`` elements (projectors) and two cores of
  ``r0 * (r1 or I) * kh * kw`` elements, with (r0, r1) from ``tucker_ranks``; otherwise AdamW.

Bytes per optimizer name (``b`` = size of ``state_dtype``, default the parameter ``dtype``):

* ``"adamw"``: moment elements * b.
* ``"galore"`` / ``"coap"``: (moment + projector elements) * b. GaLore projects 2-D
  weights only (convolutions stay in AdamW).
* ``"coap8bit"`` (``COAPAdamW(state_bits=8)``): a moment tensor of ``k >= 4096`` elements
  costs ``k + 4 * ceil(k / 4096)`` bytes (uint8 codes + one fp32 absmax per 4096-element
  block); a smaller one stays fp32 (``4 * k``). AdamW-group moments follow the same rule.
  Projectors stay unquantized at b bytes per element.
* ``"adamw8bit"`` (bitsandbytes ``AdamW8bit``, checked against bitsandbytes 0.50.2): a
  tensor of ``k >= 4096`` elements holds two uint8 moments plus ``2 * 4 * ceil(k / 256)``
  bytes of fp32 absmax; a smaller one keeps two fp32 moments (``8 * k`` bytes, whatever the
  parameter dtype). Each rank also holds the two shared 256-entry fp32 code maps (2048 B).

Sharding (``world_size > 1``)
-----------------------------
Owner mode (docs/distributed-design.md): every parameter's whole state lives on one rank.
Per-rank bytes come from greedy longest-processing-time packing (``assign_owners``, the
function ``COAPAdamW(sharding="owner")`` uses): parameters in decreasing cost, ties by
optimizer order (COAP group first), each to the least-loaded rank (ties to the lowest rank).
The cost is the state bytes (``packing="bytes"``, default) or the optimizer's compute model
(``packing="compute"``: m n r per matrix). ``projector_cache=True`` adds what owner mode
under DDP also keeps on every rank: a copy of each non-owned matrix's projector. The figure
that decides whether a run fits is ``max_per_rank``; ``mean_per_rank`` is the average.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from coap_dist.distributed.placement import lpt as assign_owners
from coap_dist.functional import projection as fproj
from coap_dist.functional import quant as fquant
from coap_dist.functional import tucker as ftucker
from coap_dist.models.llama import LLAMA_PRESETS, Llama, LlamaConfig
from coap_dist.optim.params import param_groups
from coap_dist.optim.spec import QUANT_MIN_NUMEL

__all__ = [
    "MIB",
    "OPTIMIZERS",
    "ParamStateBytes",
    "StateBytes",
    "estimate_state_bytes",
    "lowrank_names",
    "measure_state_bytes",
    "named_params_with_modules",
    "owner_costs",
]

MIB = 1024 * 1024

#: Optimizer names understood by :func:`estimate_state_bytes`.
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "galore", "coap", "coap8bit")
_LOWRANK = frozenset({"galore", "coap", "coap8bit"})

#: COAP 8-bit: elements per quantization block (one fp32 absmax each).
COAP_QUANT_BLOCK = fquant.BLOCK
#: COAP 8-bit: moments with fewer elements stay fp32.
COAP_QUANT_MIN_NUMEL = QUANT_MIN_NUMEL
#: bitsandbytes 8-bit optimizers (>= 0.45; 2048 in older releases): block size.
BNB_QUANT_BLOCK = 256
#: bitsandbytes keeps tensors smaller than this in fp32 (``min_8bit_size``).
BNB_MIN_8BIT_SIZE = 4096
#: bitsandbytes' two shared 256-entry fp32 code maps (signed and unsigned dynamic map).
BNB_QMAP_BYTES = 2 * 256 * 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParamStateBytes:
    """State bytes of one parameter.

    Attributes:
        name: parameter name.
        shape: global shape of the parameter.
        algorithm: ``"adamw"`` (full moments), ``"lowrank"`` (projected matrix),
            ``"tucker"`` (projected convolution) or ``"measured"``.
        side: ``"right"`` (P: r x n), ``"left"`` (P: m x r) or None.
        rank: r of a matrix, r0 of a convolution, None otherwise.
        moments: bytes of the moment tensors (codes only for 8-bit state).
        projectors: bytes of the projector (Tucker factors).
        quant_scales: bytes of the per-block absmax of 8-bit moments.
        other: bytes of state tensors that fit no category (measurements only).
    """

    name: str
    shape: tuple[int, ...]
    algorithm: str
    side: str | None
    rank: int | None
    moments: int
    projectors: int
    quant_scales: int
    other: int = 0

    @property
    def total(self) -> int:
        """moments + projectors + quant_scales + other."""
        return self.moments + self.projectors + self.quant_scales + self.other


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateBytes:
    """Optimizer-state bytes by category, summed over parameters (and over ranks).

    Attributes:
        optimizer: the optimizer name (or class name, for a measurement).
        moments: bytes of moment tensors.
        projectors: bytes of low-rank projectors.
        quant_scales: bytes of quantization scales and maps.
        other: bytes of state tensors that fit no category (measurements only).
        world_size: number of ranks the state is spread over.
        per_rank: bytes held by each rank (owner-mode packing); ``(total,)`` for one rank.
        per_param: optional per-parameter breakdown.
    """

    optimizer: str
    moments: int
    projectors: int
    quant_scales: int
    other: int = 0
    world_size: int = 1
    per_rank: tuple[int, ...] = ()
    per_param: tuple[ParamStateBytes, ...] | None = None

    def __post_init__(self) -> None:
        if not self.per_rank:
            object.__setattr__(self, "per_rank", (self.total,))
        if len(self.per_rank) != self.world_size:
            raise ValueError(
                f"StateBytes.per_rank has {len(self.per_rank)} entries for world_size "
                f"{self.world_size}"
            )

    @property
    def total(self) -> int:
        """moments + projectors + quant_scales + other, over all ranks."""
        return self.moments + self.projectors + self.quant_scales + self.other

    @property
    def max_per_rank(self) -> int:
        """Bytes on the most loaded rank."""
        return max(self.per_rank)

    @property
    def mean_per_rank(self) -> float:
        """sum(per_rank) / world_size (the balanced ideal)."""
        return sum(self.per_rank) / self.world_size

    def mib(self, field: str = "total") -> float:
        """A byte field (or property) expressed in MiB (2**20 bytes)."""
        return float(getattr(self, field)) / MIB

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, including the derived totals."""
        out: dict[str, Any] = {
            "optimizer": self.optimizer,
            "moments": self.moments,
            "projectors": self.projectors,
            "quant_scales": self.quant_scales,
            "other": self.other,
            "total": self.total,
            "world_size": self.world_size,
            "per_rank": list(self.per_rank),
            "max_per_rank": self.max_per_rank,
            "mean_per_rank": self.mean_per_rank,
        }
        if self.per_param is not None:
            out["per_param"] = [
                {**dataclasses.asdict(p), "shape": list(p.shape), "total": p.total}
                for p in self.per_param
            ]
        return out


def _blocks(numel: int, block: int) -> int:
    """ceil(numel / block)."""
    return -(-numel // block)


def _moment_bytes(numel: int, optimizer: str, itemsize: int) -> tuple[int, int]:
    """(moment bytes, quant-scale bytes) of ONE moment tensor of ``numel`` elements."""
    if optimizer == "coap8bit":
        if numel >= COAP_QUANT_MIN_NUMEL:
            return numel, 4 * _blocks(numel, COAP_QUANT_BLOCK)
        return 4 * numel, 0
    if optimizer == "adamw8bit":
        if numel >= BNB_MIN_8BIT_SIZE:
            return numel, 4 * _blocks(numel, BNB_QUANT_BLOCK)
        return 4 * numel, 0
    return numel * itemsize, 0


def _param_state(
    name: str,
    shape: tuple[int, ...],
    kind: str,
    optimizer: str,
    *,
    rank: int | None,
    rank_ratio: float | None,
    rank_ratio_cnn: float | None,
    projection_side: str,
    itemsize: int,
) -> ParamStateBytes:
    """State bytes of one parameter; ``kind`` is "coap" (COAP group) or "adamw"."""
    numel = math.prod(shape)
    side: str | None = None
    r: int | None = None
    projector = 0
    algorithm = "adamw"
    moment_shape_numel = numel
    if kind == "coap" and optimizer in _LOWRANK and len(shape) == 2:
        m, n = shape
        side = fproj.choose_side(shape, projection_side)
        r = fproj.resolve_rank(shape, rank, rank_ratio)
        rows, cols = (m, n) if side == "right" else (n, m)
        moment_shape_numel = rows * r
        projector = r * cols * itemsize
        algorithm = "lowrank"
    elif (
        kind == "coap"
        and optimizer in ("coap", "coap8bit")
        and len(shape) == 4
        and rank_ratio_cnn is not None
        and numel > ftucker.SMALL_CONV_NUMEL
    ):
        o, i, kh, kw = shape
        r0, r1 = ftucker.tucker_ranks(shape, rank_ratio_cnn)
        r = r0
        projector = (o * r0 + (i * r1 if r1 is not None else 0)) * itemsize
        moment_shape_numel = r0 * (r1 if r1 is not None else i) * kh * kw
        algorithm = "tucker"
    moment, scale = _moment_bytes(moment_shape_numel, optimizer, itemsize)
    return ParamStateBytes(
        name=name,
        shape=shape,
        algorithm=algorithm,
        side=side,
        rank=r,
        moments=2 * moment,
        projectors=projector,
        quant_scales=2 * scale,
    )


def owner_costs(params: Iterable[ParamStateBytes], packing: str) -> list[float]:
    """Cost of each parameter for owner packing.

    ``"bytes"``: its state bytes. ``"compute"``: the cost model ``COAPAdamW`` uses for
    ``sharding="owner"``: m * n * r for a projected matrix, 8 * numel for a Tucker-projected
    convolution, numel for anything else.
    """
    if packing == "bytes":
        return [float(p.total) for p in params]
    if packing != "compute":
        raise ValueError(f"packing must be 'bytes' or 'compute', got {packing!r}")
    costs = []
    for p in params:
        numel = math.prod(p.shape)
        if p.algorithm == "lowrank" and p.rank is not None:
            costs.append(float(numel * p.rank))
        else:
            costs.append(float(numel) * (8.0 if p.algorithm == "tucker" else 1.0))
    return costs


def named_params_with_modules(
    model: nn.Module,
) -> Iterator[tuple[str, torch.Tensor, nn.Module]]:
    """(name, parameter, owning module) for every unique parameter of ``model``."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{module_name}.{pname}" if module_name else pname), p, module


def lowrank_names(
    model: nn.Module,
    *,
    adamw_patterns: Iterable[str] | None = None,
    coap_patterns: Iterable[str] | None = None,
) -> set[str]:
    """Names of the parameters ``coap_dist.param_groups`` puts in the COAP group."""
    names = {id(p): n for n, p, _ in named_params_with_modules(model)}
    groups = param_groups(model, adamw_patterns=adamw_patterns, coap_patterns=coap_patterns)
    return {names[id(p)] for g in groups if g.get("algorithm") != "adamw" for p in g["params"]}


def _as_model(model: nn.Module | LlamaConfig | str) -> nn.Module:
    """A module to read shapes from; presets and configs are built on the meta device."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, str):
        if model not in LLAMA_PRESETS:
            raise ValueError(
                f"unknown model preset {model!r}; choose one of {sorted(LLAMA_PRESETS)}"
            )
        model = LLAMA_PRESETS[model]
    if isinstance(model, LlamaConfig):
        with torch.device("meta"):
            return Llama(model)
    raise TypeError(f"model must be an nn.Module, LlamaConfig or preset name, got {type(model)}")


def estimate_state_bytes(
    model: nn.Module | LlamaConfig | str,
    optimizer: str,
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    rank_ratio_cnn: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
    state_dtype: torch.dtype | None = None,
    projection_side: str = "auto",
    world_size: int = 1,
    packing: str = "bytes",
    projector_cache: bool = False,
    adamw_patterns: Iterable[str] | None = None,
    coap_patterns: Iterable[str] | None = None,
    per_param: bool = False,
) -> StateBytes:
    """Closed-form optimizer-state bytes of ``model`` under ``optimizer``; allocates nothing.

    Args:
        model: a module (any device, meta included), a :class:`LlamaConfig` or a preset
            name of ``LLAMA_PRESETS``; configs and presets are instantiated on the meta device.
        optimizer: one of :data:`OPTIMIZERS`.
        rank: projection rank r (capped at min(m, n)); for ``galore``/``coap``/``coap8bit``.
        rank_ratio: rho, r = max(min(m, n) // rho, 1); wins over ``rank`` when both are given.
        rank_ratio_cnn: Tucker ratio for convolutions (COAP); None keeps them in AdamW.
        dtype: parameter dtype; unquantized state uses it unless ``state_dtype`` is given.
        state_dtype: dtype of unquantized moments and of projectors (``COAPAdamW``'s
            ``state_bits=32/16`` correspond to fp32/bf16 here).
        projection_side: "auto" (compress the smaller dim), "right" or "left" (COAP option).
        world_size: ranks to spread whole-parameter states over (owner mode, LPT packing).
        packing: owner-packing cost, "bytes" (state bytes) or "compute" (the cost model of
            ``COAPAdamW(sharding="owner")``: m n r per matrix); see :func:`owner_costs`.
        projector_cache: add, on every rank, a copy (in ``dtype``) of the projector of each
            matrix that rank does not own, as owner mode under DDP keeps to rebuild updates;
            the copies are counted in ``projectors`` (so total == sum(per_rank)).
        adamw_patterns / coap_patterns: fnmatch patterns, as in ``coap_dist.param_groups``.
        per_param: include the per-parameter breakdown.

    Returns:
        StateBytes with moments / projectors / quant_scales (bytes, summed over ranks) and
        per-rank loads; the formulas are in the module docstring.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if optimizer in _LOWRANK:
        if rank is None and rank_ratio is None:
            raise ValueError(f"optimizer {optimizer!r} needs rank or rank_ratio; neither was given")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if rank_ratio is not None and not rank_ratio > 0:
            raise ValueError(f"rank_ratio must be a positive number, got {rank_ratio!r}")
    if rank_ratio_cnn is not None and not rank_ratio_cnn > 0:
        raise ValueError(f"rank_ratio_cnn must be a positive number, got {rank_ratio_cnn!r}")
    itemsize = (state_dtype or dtype).itemsize
    module = _as_model(model)
    coap_names = lowrank_names(module, adamw_patterns=adamw_patterns, coap_patterns=coap_patterns)

    params: list[ParamStateBytes] = []
    for name, p, _ in named_params_with_modules(module):
        if not p.requires_grad:
            continue
        kind = "coap" if name in coap_names else "adamw"
        params.append(
            _param_state(
                name,
                tuple(p.shape),
                kind,
                optimizer,
                rank=rank,
                rank_ratio=rank_ratio,
                rank_ratio_cnn=rank_ratio_cnn,
                projection_side=projection_side,
                itemsize=itemsize,
            )
        )

    # Optimizer order, as COAPAdamW sees it from param_groups: COAP group first.
    ordered = sorted(params, key=lambda p: p.name not in coap_names)
    owners = assign_owners(owner_costs(ordered, packing), world_size)
    loads = [0] * world_size
    holds_8bit = [False] * world_size
    for p, r in zip(ordered, owners, strict=True):
        loads[r] += p.total
        holds_8bit[r] |= p.quant_scales > 0
    extra = 0
    if optimizer == "adamw8bit":
        for r in range(world_size):
            if holds_8bit[r]:
                loads[r] += BNB_QMAP_BYTES
                extra += BNB_QMAP_BYTES
    cached = 0
    if projector_cache and world_size > 1:
        # Each rank keeps, in the parameter dtype, the projector of every matrix it does not own.
        for p, r in zip(ordered, owners, strict=True):
            if p.algorithm == "lowrank" and p.rank is not None:
                cols = p.shape[1] if p.side == "right" else p.shape[0]
                nbytes = p.rank * cols * dtype.itemsize
                for q in range(world_size):
                    if q != r:
                        loads[q] += nbytes
                        cached += nbytes
    return StateBytes(
        optimizer=optimizer,
        moments=sum(p.moments for p in params),
        projectors=sum(p.projectors for p in params) + cached,
        quant_scales=sum(p.quant_scales for p in params) + extra,
        world_size=world_size,
        per_rank=tuple(loads),
        per_param=tuple(params) if per_param else None,
    )


# ----------------------------------------------------------------------------- measurement

_PROJECTOR_KEY = re.compile(r"(proj|ortho|^p$|^u[01]$|factor)", re.IGNORECASE)
_QUANT_KEY = re.compile(r"(absmax|qmap|scale|code)", re.IGNORECASE)
_MOMENT_KEY = re.compile(
    r"(exp_avg|state[12]|momentum|^m$|^v$|moment|^m_|^v_|_m$|_v$|sq)", re.IGNORECASE
)


def _category(path: str) -> str:
    """Category of a state entry from its key path ("moments", "projectors", ...)."""
    leaf = path.rsplit(".", 1)[-1]
    if _QUANT_KEY.search(leaf):
        return "quant_scales"
    if _PROJECTOR_KEY.search(leaf) or _PROJECTOR_KEY.search(path.split(".", 1)[0]):
        return "projectors"
    if _MOMENT_KEY.search(leaf):
        return "moments"
    return "other"


def _walk_tensors(value: Any, path: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(key path, tensor) for tensors inside a state value: containers and plain objects
    (GaLore keeps its projector in a Python object's ``ortho_matrix``) are searched."""
    if depth > 4:
        return
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _walk_tensors(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk_tensors(v, f"{path}.{i}", depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, (type, nn.Module)):
        for k, v in vars(value).items():
            yield from _walk_tensors(v, f"{path}.{k}", depth + 1)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def measure_state_bytes(
    optimizer: torch.optim.Optimizer,
    *,
    model: nn.Module | None = None,
    per_param: bool = False,
) -> StateBytes:
    """Bytes of the state tensors a constructed optimizer holds on this process.

    Sums ``nbytes`` of every tensor with ``ndim >= 1`` found in ``optimizer.state`` (nested
    containers and plain objects included; DTensors count their local shard), each storage
    region counted once (bitsandbytes shares its code maps between parameters). Entries are
    put into categories by key name: ``absmax``/``qmap``/``scale`` -> quant_scales,
    ``proj``/``ortho``/``P`` -> projectors, ``exp_avg``/``state1``/``M``/``V``... -> moments,
    anything else -> other. Works for torch, GaLore, bitsandbytes and COAP optimizers; for
    an optimizer with ``layout.extra_state_bytes()`` (COAP) those bytes (projector copies of
    owner mode) are added to projectors, as ``COAPAdamW.state_bytes()`` does.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (usually after one ``step()``).
        model: when given, names parameters in the per-parameter breakdown.
        per_param: include a per-parameter breakdown (``algorithm`` is "measured").
    """
    names: dict[int, str] = {}
    if model is not None:
        names = {id(p): n for n, p in model.named_parameters()}
    seen: set[tuple[str, int, int, tuple[int, ...]]] = set()
    totals = {"moments": 0, "projectors": 0, "quant_scales": 0, "other": 0}
    rows: list[ParamStateBytes] = []
    for index, (param, state) in enumerate(optimizer.state.items()):
        row = {"moments": 0, "projectors": 0, "quant_scales": 0, "other": 0}
        for path, tensor in _walk_tensors(state, ""):
            t = _local(tensor)
            if t.ndim < 1:
                continue
            ptr = t.data_ptr()
            key = (str(t.device), ptr if ptr else id(t), t.nbytes, tuple(t.shape))
            if key in seen:
                continue
            seen.add(key)
            row[_category(path.lstrip("."))] += t.nbytes
        for k, v in row.items():
            totals[k] += v
        if per_param:
            rows.append(
                ParamStateBytes(
                    name=names.get(id(param), f"param{index}"),
                    shape=tuple(param.shape),
                    algorithm="measured",
                    side=None,
                    rank=None,
                    moments=row["moments"],
                    projectors=row["projectors"],
                    quant_scales=row["quant_scales"],
                    other=row["other"],
                )
            )
    # COAP's owner layout keeps copies of non-owned projectors outside optimizer.state.
    extra_state_bytes = getattr(getattr(optimizer, "layout", None), "extra_state_bytes", None)
    if callable(extra_state_bytes):
        totals["projectors"] += int(extra_state_bytes())
    return StateBytes(
        optimizer=type(optimizer).__name__,
        moments=totals["moments"],
        projectors=totals["projectors"],
        quant_scales=totals["quant_scales"],
        other=totals["other"],
        per_param=tuple(rows) if per_param else None,
    )
