"""What COAP keeps for each parameter: its plan (kind, side, rank) and its state shapes.

Pure and side-effect free: built from a parameter's GLOBAL shape and its group's
hyperparameters, so that the optimizer, the distribution layouts and the memory estimator
derive the same plan and the same state sizes (:func:`state_shapes` is the one place that
says which tensors a parameter's state holds; allocation and byte counts both read it).

A *piece* of a parameter is what one rank keeps state for:

* COAP matrix: canonical rows [start, stop) (all of them when the matrix is whole on a rank),
  plus the projector P (r x b) on exactly one rank, its *holder*;
* Tucker convolution: the whole tensor;
* AdamW parameter: a flat range [start, stop) of the flattened tensor (or all of it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from coap_dist.functional import projection as fproj
from coap_dist.functional import quant as fquant
from coap_dist.functional import tucker as ftucker
from coap_dist.functional.projection import Side

Kind = Literal["matrix", "conv", "dense"]

QUANT_MIN_NUMEL = 4096
"""8-bit state applies to moments with at least this many elements (of the whole tensor:
a x r for a COAP matrix, the parameter for AdamW); smaller ones keep the parameter's dtype."""


@dataclasses.dataclass(frozen=True)
class StateFormat:
    """How state tensors are stored.

    Attributes:
        moment_dtype: dtype of unquantized moments (and of 8-bit state's small moments: the
            parameter's dtype).
        projector_dtype: dtype of projectors and Tucker factors (never quantized).
        quantized: 8-bit blockwise moments for tensors of at least QUANT_MIN_NUMEL elements.
        adafactor: factored second moment (row and column statistics) for COAP matrices.
    """

    moment_dtype: torch.dtype
    projector_dtype: torch.dtype
    quantized: bool = False
    adafactor: bool = False


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Static facts about one parameter, derived from its global shape and its group.

    Attributes:
        index: position in optimizer order (over all groups).
        group: index of its parameter group.
        kind: "matrix" (COAP), "conv" (Tucker-2 COAP) or "dense" (AdamW).
        shape: global shape.
        side, rank, rows, cols: COAP matrices: side, r, canonical a x b.
        ranks_cnn: Tucker ranks (r0, r1 or None).
        offset: refresh-schedule stagger in steps.
        fmt: the state format.
    """

    index: int
    group: int
    kind: Kind
    shape: tuple[int, ...]
    fmt: StateFormat
    side: Side = "right"
    rank: int = 0
    rows: int = 0
    cols: int = 0
    ranks_cnn: tuple[int, int | None] = (0, None)
    offset: int = 0
    align_rows: int = 0
    """Row granularity a layout forces on splits of this matrix (0: :meth:`row_alignment`
    derives it from the rank)."""

    @property
    def numel(self) -> int:
        """Elements of the whole parameter."""
        return math.prod(self.shape)

    @property
    def lowrank(self) -> bool:
        """Whether this is a COAP matrix or convolution (has a projector)."""
        return self.kind != "dense"

    def quantized_moment(self, whole_numel: int) -> bool:
        """Whether a moment of ``whole_numel`` elements (whole tensor) is stored in 8 bits."""
        return self.fmt.quantized and whole_numel >= QUANT_MIN_NUMEL

    def row_alignment(self) -> int:
        """Row granularity of a matrix split: block boundaries of 8-bit moments (a x r,
        blocks of ``quant.BLOCK`` flat elements) must fall on row boundaries."""
        if self.align_rows:
            return self.align_rows
        if self.kind != "matrix" or not self.quantized_moment(self.rows * self.rank):
            return 1
        return fquant.BLOCK // math.gcd(fquant.BLOCK, self.rank)


def make_spec(
    *,
    index: int,
    group_index: int,
    group: Mapping[str, Any],
    shape: tuple[int, ...],
    fmt: StateFormat,
    where: str,
    rank: int | None = None,
) -> ParamSpec:
    """The plan of one parameter (``where`` prefixes error messages; ``rank``: a matrix's
    rank chosen by ``rank="auto"``, instead of the group's fixed one)."""
    algo = group["algorithm"]
    if algo == "adamw":
        return ParamSpec(index, group_index, "dense", shape, fmt)
    if len(shape) == 2:
        side = fproj.choose_side(shape, group["projection_side"])
        fixed = None if group["rank"] == "auto" else group["rank"]
        small = min(shape)
        if rank is None:
            rank = fproj.resolve_rank(shape, fixed, group["rank_ratio"])
        rank = min(rank, small)
        rows, cols = (shape[0], shape[1]) if side == "right" else (shape[1], shape[0])
        return ParamSpec(index, group_index, "matrix", shape, fmt, side, rank, rows, cols)
    if len(shape) == 4:
        if group["rank_ratio_cnn"] is not None and math.prod(shape) > ftucker.SMALL_CONV_NUMEL:
            ranks = ftucker.tucker_ranks(shape, group["rank_ratio_cnn"])
            return ParamSpec(index, group_index, "conv", shape, fmt, ranks_cnn=ranks)
        return ParamSpec(index, group_index, "dense", shape, fmt)
    if algo == "coap":
        raise ValueError(
            f"{where}: a {len(shape)}-D parameter of shape {shape} was put in a group with "
            "algorithm='coap'; COAP projects 2-D matrices and 4-D convolutions only. Use "
            "algorithm='adamw' (or 'auto') for this parameter"
        )
    return ParamSpec(index, group_index, "dense", shape, fmt)


def with_stagger(specs: list[ParamSpec], groups: Sequence[Mapping[str, Any]]) -> list[ParamSpec]:
    """Specs with refresh offsets: with ``stagger`` the j-th of J low-rank parameters starts
    its schedule (j T_u) // J steps early, spreading refreshes over the interval. The same
    offsets under every layout (so a sharded run keeps one process's schedule)."""
    lowrank = [s for s in specs if s.lowrank]
    order = {s.index: j for j, s in enumerate(lowrank)}
    out = []
    for s in specs:
        group = groups[s.group]
        if s.lowrank and group["stagger"]:
            offset = (order[s.index] * group["update_interval"]) // max(len(lowrank), 1)
            s = dataclasses.replace(s, offset=offset)
        out.append(s)
    return out


TensorShape = tuple[tuple[int, ...], torch.dtype]


def _moment(
    spec: ParamSpec, name: str, shape: tuple[int, ...], whole_numel: int, offset: int = 0
) -> dict[str, TensorShape]:
    numel = math.prod(shape)
    if spec.quantized_moment(whole_numel):
        return {
            f"{name}_q": (shape, torch.uint8),
            f"{name}_scale": ((fquant.num_blocks(numel, offset=offset),), torch.float32),
        }
    dtype = torch.float32 if spec.fmt.quantized else spec.fmt.moment_dtype
    return {name: (shape, dtype)}


def state_shapes(
    spec: ParamSpec,
    *,
    rows: int | None = None,
    numel: int | None = None,
    holder: bool = True,
    local_shape: tuple[int, ...] | None = None,
    start: int = 0,
) -> dict[str, TensorShape]:
    """(shape, dtype) of every state tensor of one piece (0-d counters included).

    Args:
        spec: the parameter.
        rows: COAP matrix: canonical rows of the piece (default: all).
        numel: AdamW parameter: elements of the flat piece (default: all, in ``shape``).
        holder: COAP matrix: whether this piece's rank holds the projector.
        local_shape: AdamW parameter: shape of the piece's moments (default: flat, or the
            parameter's shape when the piece is whole).
        start: AdamW parameter: the piece's first element in the flat parameter. 8-bit
            moments keep the whole parameter's block grid, so a piece holds one scale per
            block it touches (:func:`~coap_dist.functional.quant.num_blocks` with offset
            ``start % BLOCK``), partial blocks at its ends included.
    """
    out: dict[str, TensorShape] = {"step": ((), torch.float32)}
    if spec.kind == "dense":
        n = spec.numel if numel is None else numel
        shape = local_shape or (spec.shape if n == spec.numel else (n,))
        offset = start % fquant.BLOCK
        out.update(_moment(spec, "exp_avg", shape, spec.numel, offset))
        out.update(_moment(spec, "exp_avg_sq", shape, spec.numel, offset))
        return out
    if spec.kind == "conv":
        o, i = spec.shape[:2]
        r0, r1 = spec.ranks_cnn
        out["factor0"] = ((o, r0), spec.fmt.projector_dtype)
        if r1 is not None:
            out["factor1"] = ((i, r1), spec.fmt.projector_dtype)
        core = (r0, r1 if r1 is not None else i, *spec.shape[2:])
        out.update(_moment(spec, "exp_avg", core, math.prod(core)))
        out.update(_moment(spec, "exp_avg_sq", core, math.prod(core)))
        return out
    a = spec.rows if rows is None else rows
    whole = spec.rows * spec.rank
    if holder:
        out["projector"] = ((spec.rank, spec.cols), spec.fmt.projector_dtype)
    out.update(_moment(spec, "exp_avg", (a, spec.rank), whole))
    if spec.fmt.adafactor:
        out["exp_avg_sq_row"] = ((a,), torch.float32)
        out["exp_avg_sq_col"] = ((spec.rank,), torch.float32)
    else:
        out.update(_moment(spec, "exp_avg_sq", (a, spec.rank), whole))
    return out


def nbytes(shapes: Mapping[str, TensorShape]) -> int:
    """Bytes of the state tensors with ndim >= 1 (0-d counters are not counted, as
    ``state_bytes()`` and the memory estimator define it)."""
    return sum(
        math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values() if len(shape) >= 1
    )
