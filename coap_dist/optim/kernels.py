"""The optimizer's math on the state pieces a rank holds (no collectives).

A layout hands these functions *work records* (:mod:`coap_dist.optim.layout`): a piece of
a COAP matrix (canonical rows with their gradient block, the projector and the piece's
state), an AdamW piece, or a whole Tucker convolution. Everything is batched over pieces
with ``torch._foreach`` where the math is element-wise. Sums over the rows of a matrix split
across ranks are the layout's job: :func:`adafactor_directions` yields the partials it needs
summed and receives the sums.

8-bit moments are read and written through :mod:`coap_dist.optim.storage`, so that the
math only sees compute tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from coap_dist.functional import adam as fadam
from coap_dist.functional import projection as fproj
from coap_dist.functional import quant as fquant
from coap_dist.functional import tucker as ftucker
from coap_dist.optim.layout import ConvWork, DenseWork, MatrixWork
from coap_dist.optim.spec import ParamSpec
from coap_dist.optim.storage import read_moment, write_moment


# ------------------------------------------------------------------------------ step sizes
def adam_alpha(group: Mapping[str, Any], t: int) -> float:
    """Step size of a COAP-AdamW matrix after t updates: lr_t alpha (bias correction folded)."""
    b1, b2 = group["betas"]
    return fadam.adam_step_size(group["lr"], b1, b2, t) * group["scale"]


def decay_keep(group: Mapping[str, Any]) -> float:
    """1 - lr wd: the factor decoupled weight decay multiplies W by."""
    return 1.0 - group["lr"] * group["weight_decay"]


# --------------------------------------------------------------------- low-rank directions
def project(work: MatrixWork) -> Tensor:
    """R = G_piece P^T (rows x r), in the gradient's dtype."""
    return fproj.project(work.grad, work.projector.to(work.grad.dtype))


def adamw_directions(works: Sequence[MatrixWork], rs: Sequence[Tensor]) -> list[Tensor]:
    """Adam on R for every piece, batched with torch._foreach per (group, moment dtype):
    M <- b1 M + (1 - b1) R; V <- b2 V + (1 - b2) R^2; D = M / (sqrt(V) + eps)."""
    out: list[Tensor | None] = [None] * len(works)
    buckets: dict[tuple[int, torch.dtype], list[int]] = {}
    ms = [read_moment(w.state, "exp_avg", True) for w in works]
    for j, (w, m) in enumerate(zip(works, ms, strict=True)):
        buckets.setdefault((id(w.group), m.dtype), []).append(j)
    for idx in buckets.values():
        group = works[idx[0]].group
        b1, b2 = group["betas"]
        m_b = [ms[j] for j in idx]
        v_b = [read_moment(works[j].state, "exp_avg_sq", False) for j in idx]
        r_b = [rs[j].to(m_b[0].dtype) for j in idx]
        d_b = fadam.adam_directions(m_b, v_b, r_b, b1, b2, group["eps"])
        for j, m, v, d in zip(idx, m_b, v_b, d_b, strict=True):
            write_moment(works[j].state, "exp_avg", m, True)
            write_moment(works[j].state, "exp_avg_sq", v, False)
            out[j] = d
    return [d for d in out if d is not None]


def adafactor_directions(
    works: Sequence[MatrixWork], rs: Sequence[Tensor], steps: Sequence[int]
) -> Generator[list[Tensor], list[Tensor], list[Tensor]]:
    """Adafactor on R for every piece, in two rounds of sums over each matrix's rows.

    Yields, per piece, a partial to be summed over the ranks holding rows of the same
    matrix (the layout does it, one collective for all pieces; for a whole piece the sum is
    the partial itself) and receives the sums: first the column statistics, then U^2.
    """
    beta2 = [
        fadam.adafactor_beta2(t, w.group["decay_rate"]) for w, t in zip(works, steps, strict=True)
    ]
    stats = [
        fadam.adafactor_row_stats(r, w.state["exp_avg_sq_row"], beta2t=b2, eps1=w.group["eps1"])
        for w, r, b2 in zip(works, rs, beta2, strict=True)
    ]
    sums = yield stats
    scaled = [
        fadam.adafactor_scaled(
            r,
            w.state["exp_avg_sq_row"],
            w.state["exp_avg_sq_col"],
            s,
            beta2t=b2,
            global_rows=w.spec.rows,
        )
        for w, r, s, b2 in zip(works, rs, sums, beta2, strict=True)
    ]
    sq_sums = yield [sq for _, sq in scaled]
    return [
        fadam.adafactor_finish(
            u,
            w.state["exp_avg"],
            sq,
            beta1=w.group["betas"][0],
            clip_threshold=w.group["clip_threshold"],
            global_rows=w.spec.rows,
        )
        for w, (u, _), sq in zip(works, scaled, sq_sums, strict=True)
    ]


def _adamw_rounds(
    works: Sequence[MatrixWork], rs: Sequence[Tensor], steps: Sequence[int]
) -> Generator[list[Tensor], list[Tensor], list[Tensor]]:
    return adamw_directions(works, rs)
    yield  # a generator with no rounds of sums: Adam on R is row-local


class AdamWRule:
    """COAP-AdamW on matrices: Adam on R, alpha = lr_t scale (bias-corrected)."""

    rounds = 0
    """Rounds of sums over a split matrix's rows per step."""

    factored = False
    """Whether the second moment of a matrix is factored (row and column statistics)."""

    def sum_sizes(self, spec: ParamSpec) -> tuple[int, ...]:
        """Length of each round's per-matrix sum (none: the update is row-local)."""
        return ()

    def directions(
        self, works: Sequence[MatrixWork], rs: Sequence[Tensor], steps: Sequence[int]
    ) -> Generator[list[Tensor], list[Tensor], list[Tensor]]:
        """Directions D per piece (a generator without rounds)."""
        return _adamw_rounds(works, rs, steps)

    def alpha(self, group: Mapping[str, Any], t: int) -> float:
        """Step size of the back-projected direction after t updates."""
        return adam_alpha(group, t)


class AdafactorRule:
    """COAP-Adafactor on matrices: factored second moment, clipping, first moment with
    momentum ``betas[0]``; alpha = lr scale (no bias correction)."""

    rounds = 2
    """Rounds of sums over a split matrix's rows per step (column statistics, RMS)."""

    factored = True
    """Whether the second moment of a matrix is factored (row and column statistics)."""

    def sum_sizes(self, spec: ParamSpec) -> tuple[int, ...]:
        """Column statistics and row normaliser (r + 1), then the sum of U^2 (1)."""
        return (spec.rank + 1, 1)

    def directions(
        self, works: Sequence[MatrixWork], rs: Sequence[Tensor], steps: Sequence[int]
    ) -> Generator[list[Tensor], list[Tensor], list[Tensor]]:
        """Directions D per piece, after two rounds of sums over each matrix's rows."""
        return adafactor_directions(works, rs, steps)

    def alpha(self, group: Mapping[str, Any], t: int) -> float:
        """Step size of the back-projected direction (absolute lr, scaled)."""
        return group["lr"] * group["scale"]


# ------------------------------------------------------------------------------ AdamW
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Weight (= moment) dtypes that take torch's fused AdamW kernel."""


@functools.cache
def _fused_devices() -> tuple[str, ...]:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return tuple(_get_fused_kernels_supported_devices())


def dense_steps(
    works: Sequence[DenseWork],
    steps: Sequence[int],
    share: Callable[[dict[int, list[Tensor]]], dict[int, list[Tensor]]] | None = None,
) -> None:
    """AdamW (reference form) in place on each piece's weight:

        M <- b1 M + (1 - b1) G;  V <- b2 V + (1 - b2) G^2;
        W <- (1 - lr wd) (W - lr_t M / (sqrt(V) + eps))

    with lr_t = lr sqrt(1 - b2^t) / (1 - b1^t) and t the update count after this step.

    Pieces whose moments are plain tensors of the weight's dtype, on a device with torch's
    fused AdamW kernel (CPU and CUDA among them), take that kernel, one launch per (group,
    dtype, t): it computes W <- W (1 - lr' wd') - (lr' / bc1) M / (sqrt(V) / sqrt(bc2) + eps'),
    which is the update above for lr' = lr k, wd' = lr wd / lr', eps' = eps / sqrt(bc2)
    (k = 1 - lr wd, bc_i = 1 - b_i^t). The rest (8-bit moments, state in another dtype than
    the weight) runs the same math with torch._foreach. 8-bit moments are quantized on the
    whole parameter's block grid (``start % BLOCK``), with the block maxima of the pieces
    reconciled by ``share`` (``Layout.share_block_max``; called once, even with nothing).
    """
    fused: dict[tuple[int, torch.dtype, int, torch.device], list[int]] = {}
    rest: dict[tuple[int, torch.dtype, torch.dtype], list[int]] = {}
    offsets = [w.start % fquant.BLOCK for w in works]
    ms = [read_moment(w.state, "exp_avg", True, o) for w, o in zip(works, offsets, strict=True)]
    devices = _fused_devices() if works else ()
    for j, (w, m) in enumerate(zip(works, ms, strict=True)):
        plain = "exp_avg" in w.state and "exp_avg_sq" in w.state
        if (
            plain
            and m.dtype == w.weight.dtype
            and m.dtype in FUSED_DTYPES
            and w.weight.device.type in devices
            and decay_keep(w.group) > 0
        ):
            fused.setdefault((id(w.group), m.dtype, steps[j], w.weight.device), []).append(j)
        else:
            rest.setdefault((id(w.group), m.dtype, w.weight.dtype), []).append(j)
    for (_, dtype, t, _), idx in fused.items():
        group = works[idx[0]].group
        b1, b2 = group["betas"]
        keep = decay_keep(group)
        lr = group["lr"] * keep
        weights = [works[j].weight for j in idx]
        step = torch.full((), float(t), device=weights[0].device)  # read-only in the kernel
        grads = [works[j].grad for j in idx]
        torch._fused_adamw_(
            weights,
            [g if g.dtype == dtype else g.to(dtype) for g in grads],
            [ms[j] for j in idx],
            [works[j].state["exp_avg_sq"] for j in idx],
            [],
            [step] * len(idx),
            lr=lr,
            beta1=b1,
            beta2=b2,
            weight_decay=group["lr"] * group["weight_decay"] / lr if lr > 0 else 0.0,
            eps=group["eps"] / (1.0 - b2**t) ** 0.5,
            amsgrad=False,
            maximize=False,
        )
    moments: dict[int, tuple[Tensor, Tensor]] = {}
    for idx in rest.values():
        group = works[idx[0]].group
        b1, b2 = group["betas"]
        m_b = [ms[j] for j in idx]
        v_b = [read_moment(works[j].state, "exp_avg_sq", False, offsets[j]) for j in idx]
        g_b = [works[j].grad.to(m_b[0].dtype) for j in idx]
        w_b = [works[j].weight for j in idx]
        torch._foreach_mul_(m_b, b1)
        torch._foreach_add_(m_b, g_b, alpha=1.0 - b1)
        torch._foreach_mul_(v_b, b2)
        torch._foreach_addcmul_(v_b, g_b, g_b, value=1.0 - b2)
        denom = torch._foreach_sqrt(v_b)
        torch._foreach_add_(denom, group["eps"])
        sizes = [-fadam.adam_step_size(group["lr"], b1, b2, steps[j]) for j in idx]
        if w_b[0].dtype == m_b[0].dtype:
            torch._foreach_addcdiv_(w_b, m_b, denom, sizes)
        else:
            num = [m.to(w_b[0].dtype) for m in m_b]
            torch._foreach_addcdiv_(w_b, num, [d.to(w_b[0].dtype) for d in denom], sizes)
        if group["weight_decay"] > 0:
            torch._foreach_mul_(w_b, decay_keep(group))
        for j, m, v in zip(idx, m_b, v_b, strict=True):
            moments[j] = (m, v)
    maxima = {
        works[j].index: [fquant.block_absmax(x, offsets[j]) for x in mv]
        for j, mv in moments.items()
        if "exp_avg_q" in works[j].state
    }
    if share is not None:
        maxima = share(maxima)
    for j, (m, v) in moments.items():
        scales = maxima.get(works[j].index, [None, None])
        write_moment(works[j].state, "exp_avg", m, True, offsets[j], scales[0])
        write_moment(works[j].state, "exp_avg_sq", v, False, offsets[j], scales[1])


# ------------------------------------------------------------------------------ refreshes
def refresh_whole(work: MatrixWork, due: str) -> tuple[Tensor, Tensor]:
    """New projector (fp32) of a matrix whose rows are all on this rank, and ok (0-dim bool):
    a seeded (``init``) or warm-started (``recalibrate``) randomized SVD, or the
    correlation-aware step (``update``). The exact single-process math."""
    group, spec = work.group, work.spec
    reference = group["projector_update"] == "reference"
    if due == "update":
        p_new, _ = fproj.correlation_update(
            work.grad,
            work.projector,
            read_moment(work.state, "exp_avg", True),
            global_rows=spec.rows,
            cos_axis=_cos_axis(spec),
            scale_free=not reference,
            orthonormal=not reference,
            lr=group["projector_lr"],
        )
        return p_new, fproj.all_finite(p_new)
    return fproj.rsvd(
        work.grad,
        spec.rank,
        None if due == "init" else work.projector,
        oversample=group["oversample"],
        power_iters=group["power_iters"],
        fix_signs=not reference,
    )


# ----------------------------------------------------------- row-split (team) refreshes
# A matrix whose canonical rows are spread over several ranks (a team) refreshes from sums
# over rows: every member computes partials on its rows, the layout moves and sums them
# (its transport), and one rank finishes from the sums. The math of each phase is here once.
def team_sketch(work: MatrixWork, due: str) -> Tensor:
    """Y_t = G_t Omega (rows x k, fp32): this member's rows of a randomized SVD's sketch
    (Omega: the seeded Gaussian for ``init``, the warm start P_old^T otherwise)."""
    omega = fproj.sketch_matrix(
        work.spec.cols,
        work.spec.rank,
        None if due == "init" else work.projector,
        oversample=work.group["oversample"],
        device=work.grad.device,
    )
    return work.grad.float() @ omega


def power_gram_partial(sketch: Tensor) -> Tensor:
    """Y_t^T Y_t (k x k, fp64): this member's share of a power iteration's Gram matrix."""
    yd = sketch.double()
    return yd.t() @ yd


def power_z_partial(work: MatrixWork, sketch: Tensor, inv_sqrt: Tensor) -> Tensor:
    """G_t^T Q_t (b x k, fp32) with Q_t = Y_t W^{-1/2} (``inv_sqrt``: W^{-1/2} of the summed
    Gram matrix, :func:`coap_dist.functional.projection.inverse_sqrt`)."""
    q = (sketch.double() @ inv_sqrt.double()).float()
    return work.grad.float().t() @ q


def power_sketch(work: MatrixWork, z: Tensor) -> Tensor:
    """The next sketch rows Y_t = G_t Z from the summed Z = G^T Q (one power iteration)."""
    return work.grad.float() @ z.float()


def _cos_axis(spec: ParamSpec) -> Literal["row", "col"]:
    return "row" if spec.side == "right" else "col"


def team_partials(work: MatrixWork, due: str, sketch: Tensor | None) -> list[Tensor]:
    """This member's partial sums for a refresh of kind ``due``: the correlation step's sums
    (``update``, one fp32 vector) or the Gram pair (Y_t^T Y_t fp64, Y_t^T G_t fp32) of a
    randomized SVD from ``sketch`` = Y_t."""
    if due == "update":
        return [
            fproj.correlation_partials(
                work.grad,
                work.projector,
                read_moment(work.state, "exp_avg", True),
                cos_axis=_cos_axis(work.spec),
                orthonormal=work.group["projector_update"] != "reference",
            )
        ]
    assert sketch is not None
    return list(fproj.gram_partials(sketch, work.grad))


def team_partial_shapes(
    spec: ParamSpec, group: Mapping[str, Any], due: str
) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each tensor :func:`team_partials` returns (known on every rank)."""
    if due == "update":
        ortho = group["projector_update"] != "reference"
        n = fproj.correlation_partials_numel(spec.rank, spec.cols, _cos_axis(spec), ortho)
        return [((n,), torch.float32)]
    k = spec.rank + group["oversample"]
    return [((k, k), torch.float64), ((k, spec.cols), torch.float32)]


def team_finish(
    spec: ParamSpec, group: Mapping[str, Any], due: str, sums: Sequence[Tensor], old: Tensor
) -> tuple[Tensor, Tensor]:
    """New projector (r x b, fp32) and ok (0-dim bool) from the team's summed partials
    (``old``: the projector before the refresh): the same math as :func:`refresh_whole`."""
    reference = group["projector_update"] == "reference"
    if due == "update":
        p_new, _ = fproj.correlation_from_sums(
            sums[0].float(),
            old,
            global_rows=spec.rows,
            cos_axis=_cos_axis(spec),
            scale_free=not reference,
            orthonormal=not reference,
            lr=group["projector_lr"],
        )
        return p_new, fproj.all_finite(p_new)
    return fproj.basis_from_gram(sums[0], sums[1].float(), spec.rank, fix_signs=not reference)


def install_projector(
    work: MatrixWork, p_new: Tensor, ok: Tensor, due: str, *, holder: bool
) -> Tensor:
    """Accept a refreshed projector where ``ok`` (device-side, no host sync): rotate this
    piece's moments into the new basis (``moments="rotate"``: M <- M C, V <- V (C*C), or
    Adafactor's M <- M C, with C = P_old P_new^T) and, on the holder, store P. Returns the
    projector to use from now on (P_new, or the old one where not ok)."""
    old = work.projector
    use = torch.where(ok, p_new.to(old.dtype), old)
    if due != "init" and work.group["moments"] == "rotate":
        c = fproj.rotation(old, p_new)
        st = work.state
        m = read_moment(st, "exp_avg", True)
        if "exp_avg_sq_row" in st:
            write_moment(st, "exp_avg", torch.where(ok, m @ c.to(m.dtype), m), True)
        else:
            v = read_moment(st, "exp_avg_sq", False)
            m2, v2 = fproj.rotate_moments(m, v, c)
            write_moment(st, "exp_avg", torch.where(ok, m2, m), True)
            write_moment(st, "exp_avg_sq", torch.where(ok, v2, v), False)
    if holder:
        work.state["projector"].copy_(use)
    return use


# ------------------------------------------------------------------------------ convs
def conv_refresh(work: ConvWork, due: str) -> Tensor:
    """Refresh the Tucker factors of a whole convolution in place (one HOOI sweep; rotate
    the core moments with ``moments="rotate"``); returns ok (0-dim bool, old kept if not)."""
    st = work.state
    f0, f1 = st["factor0"], st.get("factor1")
    warm = due != "init"
    n0, n1, ok = ftucker.refresh_factors(
        work.grad, *work.spec.ranks_cnn, f0 if warm else None, f1 if warm else None
    )
    if warm and work.group["moments"] == "rotate":
        c0 = f0.float().t() @ n0
        c1 = None if n1 is None or f1 is None else f1.float().t() @ n1
        # Lifted core M x0 U0 x1 U1 re-projected: M x0 (U0_new^T U0) x1 (U1_new^T U1).
        m = read_moment(st, "exp_avg", True)
        v = read_moment(st, "exp_avg_sq", False)
        m2 = ftucker.core(m.float(), c0, c1)
        v2 = ftucker.core(v.float(), c0 * c0, None if c1 is None else c1 * c1)
        write_moment(st, "exp_avg", torch.where(ok, m2.to(m.dtype), m), True)
        write_moment(st, "exp_avg_sq", torch.where(ok, v2.to(v.dtype), v), False)
    f0.copy_(torch.where(ok, n0.to(f0.dtype), f0))
    if n1 is not None and f1 is not None:
        f1.copy_(torch.where(ok, n1.to(f1.dtype), f1))
    return ok


def conv_update(work: ConvWork, t: int) -> Tensor:
    """Adam on the Tucker core; returns back(D), the full-size update direction U with
    W <- (1 - lr wd) (W - alpha U) done by the layout."""
    st, group = work.state, work.group
    b1, b2 = group["betas"]
    core = ftucker.core(work.grad, st["factor0"], st.get("factor1"))
    m = read_moment(st, "exp_avg", True)
    v = read_moment(st, "exp_avg_sq", False)
    (d,) = fadam.adam_directions([m], [v], [core.to(m.dtype)], b1, b2, group["eps"])
    write_moment(st, "exp_avg", m, True)
    write_moment(st, "exp_avg_sq", v, False)
    return ftucker.back(d, st["factor0"], st.get("factor1"))
