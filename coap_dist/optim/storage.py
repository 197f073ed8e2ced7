"""State tensors of one piece: allocation, 8-bit moments, and the single-process form.

The *full* (single-process) form of a parameter's state is what one process holding the
whole parameter keeps (:func:`coap_dist.optim.spec.state_shapes` with no piece). A rank of a
sharded layout keeps a *piece* of it: some canonical rows of a matrix's moments (and P if it
is the holder), a flat range of an AdamW parameter's moments, or a whole convolution.
:func:`slice_full` cuts a piece out of the full form (loading a checkpoint) and
:func:`assemble` puts pieces back together (consolidating one); both are exact, 8-bit codes
included: a split matrix's rows fall on quantization blocks (the placement aligns them), and
an AdamW piece keeps the whole parameter's block grid, partial blocks at its ends, whose
scales the layout makes the maxima over the pieces sharing them (``Layout.share_block_max``).

8-bit moments are stored as ``<name>_q`` (uint8 codes of the moment's shape) and
``<name>_scale`` (fp32 maxima of consecutive ``quant.BLOCK``-element blocks of its flat
view); :func:`read_moment` / :func:`write_moment` convert at the boundary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from coap_dist.functional import quant as fquant
from coap_dist.optim.spec import ParamSpec, TensorShape, state_shapes

State = dict[str, Any]

MOMENTS = {"exp_avg": True, "exp_avg_sq": False}
"""Moment names that may be 8-bit -> whether their map is signed."""


def allocate(shapes: Mapping[str, TensorShape], device: torch.device) -> State:
    """Zero state tensors of the given (shape, dtype); 0-d counters live on the CPU (they
    never reach a collective, and updating them needs no device kernel)."""
    return {
        k: torch.zeros(shape, dtype=dtype, device=device if shape else torch.device("cpu"))
        for k, (shape, dtype) in shapes.items()
    }


def read_moment(st: State, name: str, signed: bool, offset: int = 0) -> Tensor:
    """The moment as a compute tensor (dequantized fp32 for 8-bit state; ``offset``: the
    piece's position in its first block, ``start % BLOCK`` of an AdamW piece)."""
    if name in st:
        return st[name]
    return fquant.dequantize(st[f"{name}_q"], st[f"{name}_scale"], signed, offset=offset)


def write_moment(
    st: State,
    name: str,
    value: Tensor,
    signed: bool,
    offset: int = 0,
    scales: Tensor | None = None,
) -> None:
    """Store ``value`` into the moment (quantizing 8-bit state on the block grid given by
    ``offset``, with the block maxima ``scales`` when given; no-op if it is the tensor)."""
    if name in st:
        if value.data_ptr() != st[name].data_ptr():
            st[name].copy_(value)
        return
    q, scales = fquant.quantize(value, signed, offset=offset, scales=scales)
    st[f"{name}_q"].copy_(q)
    st[f"{name}_scale"].copy_(scales)


def nbytes_of(st: Mapping[str, Any]) -> int:
    """Bytes of the tensors with ndim >= 1 in a state dict."""
    return sum(
        v.numel() * v.element_size() for v in st.values() if isinstance(v, Tensor) and v.ndim
    )


# ------------------------------------------------------------------------ pieces and full
def _flat_rows(spec: ParamSpec) -> int:
    """Elements of a moment per unit of piece: r per canonical row (matrix), 1 (AdamW)."""
    return spec.rank if spec.kind == "matrix" else 1


def _slice_moment(
    full: Mapping[str, Any], name: str, lo: int, hi: int, shape: tuple[int, ...]
) -> dict[str, Tensor]:
    """Flat elements [lo, hi) of a full moment, as the piece's tensors of ``shape``."""
    if name in full:
        return {name: full[name].reshape(-1)[lo:hi].reshape(shape).clone()}
    q, scales = full[f"{name}_q"], full[f"{name}_scale"]
    block = fquant.BLOCK  # pieces keep the whole tensor's block grid: an exact cut
    return {
        f"{name}_q": q.reshape(-1)[lo:hi].reshape(shape).clone(),
        f"{name}_scale": scales[lo // block : -(-hi // block)].clone(),
    }


def slice_full(
    spec: ParamSpec,
    full: Mapping[str, Any],
    *,
    start: int,
    stop: int,
    holder: bool,
    local_shape: tuple[int, ...] | None = None,
    device: torch.device,
) -> State:
    """This rank's piece (rows [start, stop) of a matrix, flat range of an AdamW parameter;
    a convolution is always whole) of a parameter's full-form state."""
    expect = _piece_shapes(spec, start, stop, holder, local_shape)
    unit = _flat_rows(spec)
    out: State = {}
    for key, (shape, _) in expect.items():
        base = key[:-2] if key.endswith("_q") else key[:-6] if key.endswith("_scale") else key
        if key.endswith("_scale"):
            continue
        if base in MOMENTS and spec.kind != "conv":
            out.update(_slice_moment(full, base, start * unit, stop * unit, shape))
        elif key == "exp_avg_sq_row":
            out[key] = full[key][start:stop].clone()
        else:
            out[key] = full[key].clone() if isinstance(full[key], Tensor) else full[key]
    return {k: _on(v, device) for k, v in out.items()}


def _on(v: Any, device: torch.device) -> Any:
    if isinstance(v, Tensor):
        return v.to(device) if v.ndim else v.to("cpu")
    return v


def _piece_shapes(
    spec: ParamSpec, start: int, stop: int, holder: bool, local_shape: tuple[int, ...] | None
) -> dict[str, TensorShape]:
    if spec.kind == "matrix":
        return state_shapes(spec, rows=stop - start, holder=holder)
    if spec.kind == "dense":
        return state_shapes(spec, numel=stop - start, local_shape=local_shape, start=start)
    return state_shapes(spec)


def assemble(
    spec: ParamSpec, pieces: Sequence[tuple[int, int, State]], holder_state: State | None
) -> State:
    """The full-form state of a parameter from its pieces ((start, stop, state) in order of
    start, covering every row or element) and, for a split matrix whose holder keeps no
    rows, the holder's state (its projector). Tensors end on the CPU."""
    first = pieces[0][2]
    full = state_shapes(spec)
    out: State = {}
    for key, (shape, _) in full.items():
        if key.endswith("_scale"):
            continue
        base = key[:-2] if key.endswith("_q") else key
        if base in MOMENTS and spec.kind != "conv" and len(pieces) > 1:
            unit = _flat_rows(spec)
            starts = [p[0] * unit for p in pieces]
            out.update(_join_moment(base, shape, [p[2] for p in pieces], starts))
        elif key == "exp_avg_sq_row" and len(pieces) > 1:
            out[key] = torch.cat([p[2][key].cpu() for p in pieces])
        elif key == "projector":
            owner = next((p[2] for p in pieces if "projector" in p[2]), holder_state)
            assert owner is not None, "a split matrix's holder state is missing"
            out[key] = owner["projector"].cpu()
        else:
            out[key] = _reshape(first, key, shape, spec).cpu()
            if base in MOMENTS and f"{base}_scale" in first:
                out[f"{base}_scale"] = first[f"{base}_scale"].cpu()
    return out


Item = tuple[int, int, int, State]
"""One rank's piece of one parameter: ``(index, start, stop, state)``; ``start < 0`` marks a
split matrix's holder that keeps no rows (its state is the projector and counters)."""


def assemble_all(specs: Sequence[ParamSpec], items: Sequence[Item], where: str) -> dict[int, State]:
    """The full-form state of every parameter with state from the pieces of every rank
    (:data:`Item`, any order), checking that each parameter's pieces tile it: canonical rows
    [0, a) of a matrix, elements [0, numel) of an AdamW parameter, one whole convolution.
    ``where`` prefixes the error naming a parameter whose pieces are missing or overlap
    (e.g. the per-rank files of a checkpoint are not all there)."""
    by_param: dict[int, list[tuple[int, int, State]]] = {}
    holders: dict[int, State] = {}
    for i, a, b, st in items:
        if a < 0:
            holders[i] = st
        else:
            by_param.setdefault(i, []).append((a, b, st))
    out = {}
    for i, pieces in sorted(by_param.items()):
        spec = specs[i]
        pieces.sort(key=lambda x: x[0])
        extent = spec.rows if spec.kind == "matrix" else spec.numel if spec.kind == "dense" else 0
        bounds = [(a, b) for a, b, _ in pieces]
        ends = [0, *(b for _, b in bounds)]
        tiled = all(a == e for (a, _), e in zip(bounds, ends, strict=False)) and ends[-1] == extent
        if not (tiled or (spec.kind == "conv" and len(pieces) == 1)):
            raise ValueError(
                f"{where}: the pieces of parameter {i} (shape {spec.shape}) cover {bounds} of "
                f"[0, {extent}): some ranks' state is missing or from another job"
            )
        out[i] = assemble(spec, pieces, holders.get(i))
    return out


def _reshape(st: State, key: str, shape: tuple[int, ...], spec: ParamSpec) -> Tensor:
    v = st[key]
    return v.reshape(shape) if spec.kind == "dense" and v.ndim else v


def _join_moment(
    name: str, shape: tuple[int, ...], states: Sequence[State], starts: Sequence[int]
) -> dict[str, Tensor]:
    """A moment from its pieces (flat ``starts`` in the whole tensor, in order). 8-bit
    pieces share the whole tensor's block grid: the codes concatenate and each block's scale
    is any piece's that touches it (equal in all of them)."""
    if name in states[0]:
        return {name: torch.cat([s[name].cpu().reshape(-1) for s in states]).reshape(shape)}
    codes = torch.cat([s[f"{name}_q"].cpu().reshape(-1) for s in states])
    scales = torch.zeros(fquant.num_blocks(codes.numel()), dtype=torch.float32, device=codes.device)
    for s, a in zip(states, starts, strict=True):
        piece = s[f"{name}_scale"].cpu()
        scales[a // fquant.BLOCK : a // fquant.BLOCK + piece.numel()] = piece
    return {f"{name}_q": codes.reshape(shape), f"{name}_scale": scales}


# ------------------------------------------------------------------------ conversion
RESEED = 0x5EED
"""Seed of the orthonormal directions a rank increase adds (every rank draws the same)."""


@dataclasses.dataclass(frozen=True)
class RankChange:
    """A COAP matrix's rank r_old -> r (:func:`rank_change`), applied alike to every piece.

    Attributes:
        old, new: r_old and r.
        keep: a decrease: the (r,) sorted indices of the directions kept.
        directions: an increase: the (r - r_old, b) rows appended to P (None on a piece
            that keeps no projector: it only widens its moments).
    """

    old: int
    new: int
    keep: Tensor | None = None
    directions: Tensor | None = None


def rank_change(old: int, new: int, energy: Tensor, projector: Tensor | None) -> RankChange:
    """The re-projection of a matrix from rank ``old`` to ``new``.

    Smaller: keep the r directions of P with the largest second moment (``energy``: the
    column sums of V over all rows; Adafactor: its column statistic), so P_new = P_old[keep],
    M_new = M[:, keep], V_new = V[:, keep] (the rotation C = P_old P_new^T is that
    selection). Larger: append r - r_old directions orthonormal to P_old (``projector``,
    r_old x b; seeded, identical on every rank), with M = 0 and V set to each row's mean of V
    (the step along a new direction starts at the size of the others).
    """
    if new < old:
        keep = torch.topk(energy.double().cpu(), new).indices.sort().values
        return RankChange(old, new, keep=keep)
    if new == old or projector is None:
        return RankChange(old, new)
    p = projector.detach().double().cpu()
    gen = torch.Generator().manual_seed(RESEED)
    q = torch.randn(new - old, p.shape[1], generator=gen, dtype=torch.float64)
    for _ in range(2):  # twice: orthogonal to P to rounding
        q = q - (q @ p.T) @ p
    return RankChange(old, new, directions=torch.linalg.qr(q.T).Q.T)


def change_projector(projector: Tensor, change: RankChange) -> Tensor:
    """The whole P (r_old x b) at the new rank: its kept rows, or the appended directions
    (fp64, on P's device: the change is computed on the host)."""
    p = projector.double()
    if change.keep is not None:
        return p[change.keep.to(p.device)]
    if change.new <= change.old:
        return p
    if change.directions is None:
        raise AssertionError("a rank increase of a piece keeping P needs its directions")
    return torch.cat([p, change.directions.to(p.device)])


def apply_rank_change(values: dict[str, Tensor], change: RankChange) -> None:
    """Re-project a piece's compute values (moments of its rows, P if it keeps it) in place."""
    factored = "exp_avg_sq_col" in values
    m = values["exp_avg"].double()
    if "projector" in values:
        values["projector"] = change_projector(values["projector"], change)
    if change.keep is not None:
        keep = change.keep
        values["exp_avg"] = m[:, keep]
        if factored:
            values["exp_avg_sq_col"] = values["exp_avg_sq_col"][keep]
        else:
            values["exp_avg_sq"] = values["exp_avg_sq"][:, keep]
        return
    extra = change.new - change.old
    if extra <= 0:
        return
    values["exp_avg"] = torch.cat([m, m.new_zeros(m.shape[0], extra)], 1)
    if factored:
        col = values["exp_avg_sq_col"].double()
        values["exp_avg_sq_col"] = torch.cat([col, col.mean().expand(extra)])
    else:
        v = values["exp_avg_sq"].double()
        values["exp_avg_sq"] = torch.cat([v, v.mean(1, keepdim=True).expand(-1, extra)], 1)


def _read_values(saved: Mapping[str, Any]) -> dict[str, Tensor]:
    """A state's values by name, 8-bit moments dequantized, on the CPU."""
    names = {k[:-2] if k.endswith("_q") else k for k in saved if not k.endswith("_scale")}
    values: dict[str, Tensor] = {}
    for name in names:
        v = saved.get(name)
        if v is None:  # only an 8-bit moment's name is not a key: it is `<name>_q`
            v = fquant.dequantize(saved[f"{name}_q"], saved[f"{name}_scale"], MOMENTS[name])
        values[name] = v.detach().cpu() if isinstance(v, Tensor) else torch.tensor(float(v))
    return values


def reprojected(saved: Mapping[str, Any], change: RankChange) -> dict[str, Tensor]:
    """A piece's compute values (8-bit moments dequantized, on the CPU; counters too) at the
    new rank (:func:`rank_change`)."""
    values = _read_values(saved)
    apply_rank_change(values, change)
    return values


def convert_piece(saved: Mapping[str, Any], into: State, change: RankChange, where: str) -> None:
    """Fill ``into`` (a piece's state allocated at the new rank by its layout) from the same
    piece's state ``saved`` at the old rank (:func:`rank_change`); 8-bit moments re-coded."""
    store_values(into, reprojected(saved, change), where)


def store_values(into: State, values: Mapping[str, Tensor], where: str) -> None:
    """Store compute values into a piece's state ``into`` (8-bit moments quantized on the
    piece's own block grid: pieces of matrices start on a block)."""
    for key, t in into.items():
        if key.endswith("_scale"):
            continue
        base = key[:-2] if key.endswith("_q") else key
        v = values[base]
        if v.numel() != t.numel():
            raise AssertionError(
                f"{where}: `{base}` re-projected to {tuple(v.shape)}, not {tuple(t.shape)}"
            )
        for k, encoded in _encode(key, v.reshape(t.shape), t.dtype).items():
            into[k].copy_(encoded)


def convert_full(
    spec: ParamSpec, saved: Mapping[str, Any], where: str, optional: Sequence[str] = ()
) -> State:
    """A parameter's full-form state converted to the format ``spec`` plans.

    * dtype and ``state_bits``: moments are read (dequantized) and stored in the planned
      format; projectors and factors are cast;
    * rank of a COAP matrix, r_old -> r: a re-projection (:func:`rank_change`);
    * anything else that differs (another projection side or shape, another optimizer's or
      algorithm's keys, Tucker ranks) raises ValueError naming the key and the reason.

    ``optional``: planned keys that may be absent and then stay absent, for a rank that does
    not keep them (a matrix's ``projector`` held by another rank: DCP's full-state-dict load
    hands each rank only the keys of its own state dict); a matrix without its projector
    cannot change rank.

    Tensors end on the CPU (the layout places them).
    """
    expect = state_shapes(spec)
    have = {k: v for k, v in saved.items()}
    names = {k[:-2] if k.endswith("_q") else k for k in have if not k.endswith("_scale")}
    planned = {k[:-2] if k.endswith("_q") else k for k in expect if not k.endswith("_scale")}
    if not (names <= planned and planned - names <= set(optional)):
        raise ValueError(
            f"{where}: the saved state holds {sorted(names)} but this optimizer keeps "
            f"{sorted(planned)} for a {spec.kind} parameter of shape {spec.shape}; it was saved "
            "by another optimizer or for another algorithm (COAPAdamW vs COAPAdafactor, "
            "algorithm='adamw' vs COAP). Load it into the optimizer that saved it"
        )
    values = _read_values(have)
    if spec.kind == "matrix" and "projector" in values:
        _reproject(spec, values, where)
    elif spec.kind == "matrix" and values["exp_avg"].numel() != spec.rows * spec.rank:
        raise ValueError(
            f"{where}: the saved moments have {values['exp_avg'].numel() // spec.rows} columns, "
            f"this optimizer's rank is {spec.rank}, and the projector a rank change needs is "
            "not in this rank's part of the state dict (DCP's full-state-dict load hands each "
            "rank the keys it keeps). Load the full state dict with opt.load_state_dict(sd) on "
            "every rank"
        )
    out: State = {}
    for key, (shape, dtype) in expect.items():
        base = key[:-2] if key.endswith("_q") else key[:-6] if key.endswith("_scale") else key
        if key.endswith("_scale") or base not in values:
            continue
        v = values[base]
        if v.numel() != math.prod(shape) or (spec.kind != "dense" and tuple(v.shape) != shape):
            raise ValueError(
                f"{where}: saved `{base}` has shape {tuple(v.shape)}, this optimizer expects "
                f"{tuple(shape)} (the projection side, the parameter's shape or the Tucker "
                "ranks differ; only a matrix's rank and the state format can be converted)"
            )
        out.update(_encode(key, v.reshape(shape), dtype))
    return out


def _encode(key: str, value: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """A compute value stored under ``key``: 8-bit codes and block scales for a ``_q`` key,
    else a copy in ``dtype``."""
    if key.endswith("_q"):
        base = key[:-2]
        codes, scales = fquant.quantize(value.float(), MOMENTS[base])
        return {key: codes, f"{base}_scale": scales}
    return {key: value.to(dtype).clone()}


def _reproject(spec: ParamSpec, values: dict[str, Tensor], where: str) -> None:
    """Re-project a matrix's moments and projector to rank ``spec.rank`` (in place)."""
    p = values["projector"].double()
    if p.ndim != 2 or p.shape[1] != spec.cols:
        raise ValueError(
            f"{where}: the saved projector has shape {tuple(p.shape)}, this optimizer projects "
            f"{spec.rows} x {spec.cols} (side {spec.side!r}, r = {spec.rank}): the projection "
            "side or the parameter's shape differ, or the state is another parameter's (the "
            "parameters in another order or split into other groups). Build the optimizer "
            "with the saving one's parameter order and groups, and its projection_side"
        )
    r_old, r = p.shape[0], spec.rank
    if r_old != r:
        factored = "exp_avg_sq_col" in values
        energy = values["exp_avg_sq_col"] if factored else values["exp_avg_sq"].double().sum(0)
        apply_rank_change(values, rank_change(r_old, r, energy, p))
