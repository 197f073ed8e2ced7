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
COAP's figures are not restated here: they are the sizes of the tensors the optimizer's own
plan allocates (:func:`coap_dist.optim.spec.state_shapes` of :func:`coap_specs`), which the
formulas below describe.

Matrix W (m x n), rank ``r = min(rank, m, n)`` or ``r = max(min(m, n) // rank_ratio, 1)``
(giving both is refused, as in the optimizer). Side rule (COAP reference and
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
Per-rank bytes of COAP come from the layouts' own planners (the code the optimizer binds):
``layout="ddp_owner"`` (DDP with ``sharding="owner"``: whole parameters on every rank),
``"fsdp2_owner"`` (FSDP2 row shards under ``sharding="owner"``), ``"zero"`` (DeepSpeed
ZeRO 1-3: each group's flat concatenation cut into N partitions), all three the owner
placement of :mod:`coap_dist.distributed.placement` (matrices whole where that keeps ranks
within 1.10 of the mean, split over a team otherwise); ``"fsdp2"`` (FSDP2's default: the side rule
of one process, moments split by their canonical rows and projectors by their own rows,
like FSDP2 splits the weights by theirs). Other optimizers' state is split evenly (what ZeRO and FSDP do with element-wise
state). The figure that decides whether a run fits is ``max_per_rank``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from coap_dist.distributed.placement import chunk_range, local_state_bytes, owner_placement
from coap_dist.functional import projection as fproj
from coap_dist.models.llama import LLAMA_PRESETS, Llama, LlamaConfig
from coap_dist.optim.coap import COAPAdamW
from coap_dist.optim.params import param_groups
from coap_dist.optim.spec import ParamSpec, state_shapes

__all__ = [
    "LAYOUTS",
    "MIB",
    "OPTIMIZERS",
    "ParamStateBytes",
    "StateBytes",
    "coap_specs",
    "estimate_state_bytes",
    "lowrank_names",
    "measure_state_bytes",
    "named_params_with_modules",
]

MIB = 1024 * 1024

#: Optimizer names understood by :func:`estimate_state_bytes`.
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "galore", "coap", "coap8bit")
_LOWRANK = frozenset({"galore", "coap", "coap8bit"})
#: Layouts the per-rank figures of :func:`estimate_state_bytes` can follow (names of
#: :data:`coap_dist.optim.layout.LAYOUT_NAMES`).
LAYOUTS: tuple[str, ...] = ("ddp_owner", "fsdp2", "fsdp2_owner", "zero")

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
    projection_side: str,
    itemsize: int,
) -> ParamStateBytes:
    """State bytes of one parameter under AdamW, bitsandbytes 8-bit AdamW or GaLore (COAP's
    come from its own plan, :func:`coap_specs`); ``kind`` is "coap" (a projected group) or
    "adamw"."""
    numel = math.prod(shape)
    side: str | None = None
    r: int | None = None
    projector = 0
    algorithm = "adamw"
    moment_shape_numel = numel
    if kind == "coap" and optimizer == "galore" and len(shape) == 2:
        m, n = shape
        side = fproj.choose_side(shape, projection_side)
        r = fproj.resolve_rank(shape, rank, rank_ratio)
        rows, cols = (m, n) if side == "right" else (n, m)
        moment_shape_numel = rows * r
        projector = r * cols * itemsize
        algorithm = "lowrank"
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


def coap_specs(
    module: nn.Module,
    *,
    rank: int | None,
    rank_ratio: float | None,
    rank_ratio_cnn: float | None,
    dtype: torch.dtype,
    state_bits: int | None,
    projection_side: str,
    adamw_patterns: Iterable[str] | None,
    coap_patterns: Iterable[str] | None,
) -> tuple[list[ParamSpec], list[str]]:
    """COAPAdamW's own plan of every trainable parameter (built on meta tensors: nothing is
    allocated) and the parameter names, in optimizer order."""
    names = {id(p): n for n, p, _ in named_params_with_modules(module)}
    groups = param_groups(
        module,
        adamw_patterns=adamw_patterns,
        coap_patterns=coap_patterns,
        **({} if rank_ratio is None else {"rank_ratio": rank_ratio}),
    )
    params = [p for g in groups for p in g["params"]]
    meta = {id(p): torch.empty(p.shape, dtype=dtype, device="meta") for p in params}
    opt = COAPAdamW(
        [{**g, "params": [meta[id(p)] for p in g["params"]]} for g in groups],
        rank=rank if rank is not None or rank_ratio is not None else 1 << 30,
        rank_ratio=rank_ratio,
        rank_ratio_cnn=rank_ratio_cnn,
        projection_side=projection_side,
        state_bits=state_bits,
    )
    group_of = [gi for gi, g in enumerate(opt.groups) for _ in g["params"]]
    specs = opt.plan([tuple(p.shape) for p in params], [dtype] * len(params), group_of)
    return specs, [names[id(p)] for p in params]


def _state_bits(optimizer: str, dtype: torch.dtype, state_dtype: torch.dtype | None) -> int | None:
    if optimizer == "coap8bit":
        return 8
    if state_dtype is None or state_dtype == dtype:
        return None
    if state_dtype in (torch.float32, torch.bfloat16):
        return 32 if state_dtype == torch.float32 else 16
    raise ValueError(
        f"state_dtype={state_dtype} for COAP: state_bits offers fp32 (32), bf16 (16) or the "
        "parameter dtype (None)"
    )


def _split_shapes(
    shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
) -> tuple[int, int, int]:
    """(moment, projector, quant-scale) bytes of a state_shapes() result."""
    moments = projectors = scales = 0
    for key, (shape, dtype) in shapes.items():
        if not shape:
            continue
        n = math.prod(shape) * dtype.itemsize
        if key.endswith("_scale"):
            scales += n
        elif key in ("projector", "factor0", "factor1"):
            projectors += n
        else:
            moments += n
    return moments, projectors, scales


def _fragments(
    specs: list[ParamSpec], world: int, layout: str, groups: list[int]
) -> list[list[tuple[int, int]] | None]:
    """The fragment map a layout hands the optimizer (see ``FragmentView.fragments``)."""
    if layout == "ddp_owner":
        return [None] * len(specs)
    if layout == "fsdp2_owner":
        out: list[list[tuple[int, int]] | None] = []
        for s in specs:
            row = math.prod(s.shape[1:])
            out.append(
                [
                    (a * row, b * row)
                    for a, b in (chunk_range(s.shape[0], world, r) for r in range(world))
                ]
            )
        return out
    # DeepSpeed ZeRO 1-3: each group's parameters concatenated, cut into N equal partitions.
    out = [None] * len(specs)
    for g in sorted(set(groups)):
        members = [s for s, gi in zip(specs, groups, strict=True) if gi == g]
        total = sum(s.numel for s in members)
        part = -(-total // world)
        offset = 0
        for s in members:
            out[s.index] = [
                (
                    min(max(r * part - offset, 0), s.numel),
                    min(max((r + 1) * part - offset, 0), s.numel),
                )
                for r in range(world)
            ]
            offset += s.numel
    return out


def estimate_state_bytes(
    model: nn.Module | LlamaConfig | str,
    optimizer: str,
    *,
    rank: int | str | None = None,
    rank_ratio: float | None = None,
    rank_ratio_cnn: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
    state_dtype: torch.dtype | None = None,
    projection_side: str = "auto",
    world_size: int = 1,
    layout: str = "ddp_owner",
    adamw_patterns: Iterable[str] | None = None,
    coap_patterns: Iterable[str] | None = None,
    per_param: bool = False,
) -> StateBytes:
    """Optimizer-state bytes of ``model`` under ``optimizer``; allocates nothing.

    Args:
        model: a module (any device, meta included), a :class:`LlamaConfig` or a preset
            name of ``LLAMA_PRESETS``; configs and presets are instantiated on the meta device.
        optimizer: one of :data:`OPTIMIZERS`.
        rank: projection rank r (capped at min(m, n)); for ``galore``/``coap``/``coap8bit``;
            ``"auto"`` (COAP, with ``rank_ratio``): the automatic ranks' budget, which is the
            fixed ranks' bytes (the state never exceeds it).
        rank_ratio: rho, r = max(min(m, n) // rho, 1); not together with ``rank``.
        rank_ratio_cnn: Tucker ratio for convolutions (COAP); None keeps them in AdamW.
        dtype: parameter dtype; unquantized state uses it unless ``state_dtype`` is given.
        state_dtype: dtype of unquantized moments and of projectors (``COAPAdamW``'s
            ``state_bits=32/16`` correspond to fp32/bf16 here).
        projection_side: "auto" (compress the smaller dim), "right" or "left" (COAP option).
        world_size: ranks the state is spread over.
        layout: how COAP spreads it (:data:`LAYOUTS`, see the module docstring).
        adamw_patterns / coap_patterns: fnmatch patterns, as in ``coap_dist.param_groups``.
        per_param: include the per-parameter breakdown.

    Returns:
        StateBytes with moments / projectors / quant_scales (bytes, summed over ranks) and
        per-rank loads; COAP's come from the optimizer's own plan (``state_shapes``).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
    # COAP's automatic ranks share the bytes of rank_ratio's fixed ranks: that budget is
    # what the state never exceeds, so it is the estimate.
    if rank == "auto" and (optimizer not in ("coap", "coap8bit") or rank_ratio is None):
        raise ValueError(
            f"rank='auto' is a COAP setting that needs rank_ratio (its budget: the bytes "
            f"of the fixed ranks); got optimizer={optimizer!r}, rank_ratio={rank_ratio!r}"
        )
    if isinstance(rank, str) and rank != "auto":
        raise ValueError(f"rank must be a positive integer or 'auto', got {rank!r}")
    fixed = None if isinstance(rank, str) else rank
    if optimizer in _LOWRANK:
        if fixed is None and rank_ratio is None:
            raise ValueError(f"optimizer {optimizer!r} needs rank or rank_ratio; neither was given")
        if fixed is not None and rank_ratio is not None:
            raise ValueError(
                f"rank={fixed} and rank_ratio={rank_ratio} are both given; give one of them"
            )
        if fixed is not None and (
            isinstance(fixed, bool) or not isinstance(fixed, int) or fixed < 1
        ):
            raise ValueError(f"rank must be a positive integer, got {fixed!r}")
        if rank_ratio is not None and not rank_ratio > 0:
            raise ValueError(f"rank_ratio must be a positive number, got {rank_ratio!r}")
    if rank_ratio_cnn is not None and not rank_ratio_cnn > 0:
        raise ValueError(f"rank_ratio_cnn must be a positive number, got {rank_ratio_cnn!r}")
    module = _as_model(model)
    if optimizer in ("coap", "coap8bit"):
        return _coap_estimate(
            module,
            optimizer,
            rank=fixed,
            rank_ratio=rank_ratio,
            rank_ratio_cnn=rank_ratio_cnn,
            dtype=dtype,
            state_dtype=state_dtype,
            projection_side=projection_side,
            world_size=world_size,
            layout=layout,
            adamw_patterns=adamw_patterns,
            coap_patterns=coap_patterns,
            per_param=per_param,
        )
    itemsize = (state_dtype or dtype).itemsize
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
                rank=fixed,
                rank_ratio=rank_ratio,
                projection_side=projection_side,
                itemsize=itemsize,
            )
        )
    total = sum(p.total for p in params)
    extra = (
        BNB_QMAP_BYTES if optimizer == "adamw8bit" and any(p.quant_scales for p in params) else 0
    )
    # Element-wise state is split evenly by ZeRO / FSDP; bitsandbytes' code maps on every rank.
    per_rank = tuple(
        total // world_size + (r < total % world_size) + extra for r in range(world_size)
    )
    return StateBytes(
        optimizer=optimizer,
        moments=sum(p.moments for p in params),
        projectors=sum(p.projectors for p in params),
        quant_scales=sum(p.quant_scales for p in params) + extra * world_size,
        world_size=world_size,
        per_rank=per_rank,
        per_param=tuple(params) if per_param else None,
    )


def _coap_estimate(
    module: nn.Module,
    optimizer: str,
    *,
    rank: int | None,
    rank_ratio: float | None,
    rank_ratio_cnn: float | None,
    dtype: torch.dtype,
    state_dtype: torch.dtype | None,
    projection_side: str,
    world_size: int,
    layout: str,
    adamw_patterns: Iterable[str] | None,
    coap_patterns: Iterable[str] | None,
    per_param: bool,
) -> StateBytes:
    specs, names = coap_specs(
        module,
        rank=rank,
        rank_ratio=rank_ratio,
        rank_ratio_cnn=rank_ratio_cnn,
        dtype=dtype,
        state_bits=_state_bits(optimizer, dtype, state_dtype),
        projection_side=projection_side,
        adamw_patterns=adamw_patterns,
        coap_patterns=coap_patterns,
    )
    rows = []
    for s, name in zip(specs, names, strict=True):
        mom, proj, scales = _split_shapes(state_shapes(s))
        algorithm = {"matrix": "lowrank", "conv": "tucker", "dense": "adamw"}[s.kind]
        rows.append(
            ParamStateBytes(
                name=name,
                shape=s.shape,
                algorithm=algorithm,
                side=s.side if s.kind == "matrix" else None,
                rank=s.rank if s.kind == "matrix" else s.ranks_cnn[0] if s.kind == "conv" else None,
                moments=mom,
                projectors=proj,
                quant_scales=scales,
            )
        )
    order = {n: i for i, (n, _, _) in enumerate(named_params_with_modules(module))}
    rows.sort(key=lambda r: order[r.name])  # model order, as for the other optimizers
    total = sum(r.total for r in rows)
    if world_size == 1:
        per_rank: tuple[int, ...] = (total,)
    elif layout == "fsdp2":
        per_rank = tuple(local_state_bytes(specs, world_size))
    else:
        groups = [s.group for s in specs]
        frags = _fragments(specs, world_size, layout, groups)
        per_rank = tuple(owner_placement(specs, world_size, frags).state_bytes(specs))
    return StateBytes(
        optimizer=optimizer,
        moments=sum(r.moments for r in rows),
        projectors=sum(r.projectors for r in rows),
        quant_scales=sum(r.quant_scales for r in rows),
        world_size=world_size,
        per_rank=per_rank,
        per_param=tuple(rows) if per_param else None,
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
    anything else -> other. Works for torch, GaLore, bitsandbytes and COAP optimizers (COAP
    keeps all of its state in ``optimizer.state``, so this equals ``COAPAdamW.state_bytes()``).

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
    return StateBytes(
        optimizer=type(optimizer).__name__,
        moments=totals["moments"],
        projectors=totals["projectors"],
        quant_scales=totals["quant_scales"],
        other=totals["other"],
        per_param=tuple(rows) if per_param else None,
    )
