"""Projector math of COAP on local tensors: sides, projection, randomized SVD, the
correlation-aware projector update and moment rotation.

Everything here works in a *canonical* orientation in which the compressed dimension is the
last one. For a weight of global shape (m, n):

* side ``"right"`` (the reference rule picks it when m >= n): the canonical gradient is
  G itself (a x b = m x n); P is r x b with orthonormal rows; R = G P^T (a x r);
  back(D) = D P.
* side ``"left"`` (m < n): the canonical gradient is G^T (a x b = n x m) and the stored P is
  the transpose of the paper's m x r projector; all formulas are then the right-case ones.

Functions only see local tensors. Where a quantity is a sum over the rows of a row-sharded
matrix (FSDP ``Shard(0)``), they call the caller's :class:`ShardGroup` (None in one process),
so a distributed caller gets the single-process result up to floating-point summation order.
No function here communicates by itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

Side = Literal["right", "left"]


@dataclasses.dataclass(frozen=True)
class ShardGroup:
    """The collectives a row-sharded caller provides (None stands for one process).

    ``sum`` returns the element-wise sum of a tensor over the ranks holding row shards;
    ``broadcast`` returns the first rank's tensor on every rank; ``rank``/``world`` place this
    shard among them.
    """

    sum: Callable[[Tensor], Tensor]
    broadcast: Callable[[Tensor], Tensor]
    rank: int
    world: int


REFERENCE_SEED = 3407
"""Seed of the Gaussian test matrix of the first randomized SVD (the reference uses it)."""


def choose_side(global_shape: tuple[int, ...] | torch.Size, rule: str = "auto") -> Side:
    """Side to compress for a weight of GLOBAL shape (m, n).

    ``auto`` is the reference rule (compress the smaller dimension: right if m >= n);
    ``right``/``left`` force a side (``right`` is the shard-aware variant for row shards).
    """
    if rule in ("right", "left"):
        return rule  # type: ignore[return-value]
    if rule != "auto":
        raise ValueError(f"projection_side must be 'auto', 'right' or 'left', got {rule!r}")
    m, n = global_shape
    return "right" if m >= n else "left"


def resolve_rank(
    global_shape: tuple[int, ...] | torch.Size, rank: int | None, rank_ratio: float | None
) -> int:
    """r = min(rank, min(m, n)), or max(min(m, n) // rank_ratio, 1) when a ratio is given."""
    small = min(global_shape[0], global_shape[1])
    if rank_ratio is not None:
        return max(int(small // rank_ratio), 1)
    if rank is None:
        raise ValueError(
            "COAP needs `rank` or `rank_ratio` for matrix parameters; neither was given"
        )
    return min(int(rank), small)


def canonical(g: Tensor, side: Side) -> Tensor:
    """The canonical (a x b) view of a local 2-D tensor: g for right, g^T for left."""
    return g if side == "right" else g.t()


def project(g: Tensor, p: Tensor) -> Tensor:
    """R = G P^T: (a x b) x (r x b)^T -> (a x r), in canonical orientation."""
    return g @ p.t()


def gaussian_test_matrix(
    b: int, r: int, *, seed: int = REFERENCE_SEED, device: torch.device | str = "cpu"
) -> Tensor:
    """Omega (b x r), N(0, 1) from a private generator: identical on every rank."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((b, r), generator=gen, dtype=torch.float32).to(device)


def canonicalize_signs(p: Tensor) -> Tensor:
    """Flip each row of P (r x b) so that its largest-magnitude entry is positive.

    Singular vectors are defined up to sign; fixing it makes P independent of how the QR
    basis was computed (Householder vs CholeskyQR, one process vs many).
    """
    idx = p.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(torch.gather(p, 1, idx))
    sign[sign == 0] = 1
    return p * sign


def rsvd(
    g: Tensor,
    rank: int,
    omega: Tensor | None,
    *,
    oversample: int = 0,
    power_iters: int = 0,
    shards: ShardGroup | None = None,
    fix_signs: bool = True,
    seed: int = REFERENCE_SEED,
) -> Tensor:
    """Randomized SVD basis of the rows' span: P (r x b) with orthonormal rows.

    Y = G Omega (a x k, k = r + oversample); Q = orth(Y); B = Q^T G (k x b);
    P = first r right singular vectors of B. ``power_iters`` replaces Y by G (G^T Q) q times.
    With ``omega=None`` Omega is a seeded Gaussian; a warm start passes Omega = P_old^T.

    One process: Householder QR, as the reference. Row-sharded: TSQR (each rank QR-factors its
    Y_k = Q_k R_k, the stacked R_k (world k x k, one all-reduce) are QR-factored once more and
    Q's rows are Q_k times their block), as stable as Householder QR even for the
    ill-conditioned Y of low-rank gradients (CholeskyQR squares the condition number), then
    B = sum_k Q_k^T G_k (one k x b all-reduce); the small SVD is broadcast from the first rank.
    P does not depend on which orthonormal basis of Y is used (B changes by a k x k rotation
    on the left), so sharded and single-process runs agree to rounding. Computed in fp32; the
    caller casts. Returns a non-finite P if G is non-finite: the caller keeps the old one.
    """
    gf = g.float()
    b = gf.shape[1]
    if omega is None:
        omega = gaussian_test_matrix(b, rank + oversample, seed=seed, device=gf.device)
    else:
        omega = omega.float()
        if oversample:
            extra = gaussian_test_matrix(b, oversample, seed=seed + 1, device=gf.device)
            omega = torch.cat([omega, extra], dim=1)
    y = gf @ omega
    for _ in range(power_iters):
        q = _orthonormal_columns(y, shards)
        z = gf.t() @ q
        if shards is not None:
            z = shards.sum(z)
        y = gf @ z
    q = _orthonormal_columns(y, shards)
    bmat = q.t() @ gf
    if shards is not None:
        bmat = shards.sum(bmat)
    if not torch.isfinite(bmat).all():
        return torch.full((rank, b), float("nan"), device=gf.device)
    _, _, vh = torch.linalg.svd(bmat, full_matrices=False)
    p = vh[:rank].contiguous()
    if fix_signs:
        p = canonicalize_signs(p)
    if shards is not None:
        p = shards.broadcast(p)
    return p


def _orthonormal_columns(y: Tensor, shards: ShardGroup | None) -> Tensor:
    """Q with orthonormal columns spanning Y (a x k): Householder QR, or TSQR over row shards."""
    q_loc, r_loc = torch.linalg.qr(y, mode="reduced")
    if shards is None:
        return q_loc
    k = y.shape[1]
    rows = r_loc.shape[0]  # min(local rows, k): short or empty shards give fewer rows
    stacked = torch.zeros((shards.world * k, k), dtype=y.dtype, device=y.device)
    stacked[shards.rank * k : shards.rank * k + rows] = r_loc
    stacked = shards.sum(stacked)
    q_top, _ = torch.linalg.qr(stacked, mode="reduced")
    return q_loc @ q_top[shards.rank * k : shards.rank * k + rows]


def orthonormalize_rows(p: Tensor) -> Tensor:
    """Nearest-in-span P with orthonormal rows: QR of P^T, signs chosen so diag(R) > 0."""
    q, rr = torch.linalg.qr(p.t().float(), mode="reduced")
    d = torch.sign(torch.diagonal(rr))
    d[d == 0] = 1
    return (q * d).t().contiguous()


def correlation_update(
    g: Tensor,
    p: Tensor,
    m: Tensor,
    *,
    global_rows: int,
    cos_axis: Literal["row", "col"],
    scale_free: bool,
    lr: float = 0.1,
    max_norm: float = 1.0,
    shards: ShardGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """One clipped gradient step on COAP's correlation-aware objective; returns (P_new, L).

    In canonical orientation (G: a x b, P: r x b, M: a x r, all fp32):

        e(P) = ||G - G P^T P||_F^2 / Z,   Z = a b (reference) or ||G||_F^2 (scale-free)
        c(P) = mean_j cos(U_j, G_j),      U = M P (first moment lifted with P)
        L(P) = e(P) (1 - c(P))
        P <- P - lr * clip(dL/dP, max_norm)

    ``cos_axis`` is "row" (rows of length b) for a right projection and "col" for a left one,
    which is the reference's row-wise cosine of the original m x n matrix in both cases.
    Closed-form gradient, with R = G P^T, E = G - R P, S = R^T G, K = R^T R, Q = P P^T:

        ||E||^2 = ||G||^2 - 2 tr(K) + tr(K Q)
        d||E||^2/dP = -2 [(2I - Q) S - K P]
        row cosine: dc/dP = (1/a) [(M * w1)^T G - ((M * w2)^T M) P],
                    w1_i = 1 / (|u_i| |g_i|), w2_i = cos_i / |u_i|^2
        col cosine: dc/dP = (1/b) [(M^T G) * w1 - (M^T M P) * w2]   (column weights)

    Every sum over rows goes through ``shards.sum`` in one flat buffer (so row shards get the
    global objective); the clip uses the global gradient norm. The scale-free mode then
    re-orthonormalizes P (QR). The reference mode reproduces the published update exactly
    (MSE normalisation, no re-orthonormalization): its step vanishes as |G|^2.
    """
    red = shards.sum if shards is not None else (lambda t: t)
    gf, pf, mf = g.float(), p.float(), m.float()
    b = gf.shape[1]
    r = pf.shape[0]
    rr = gf @ pf.t()
    qq = pf @ pf.t()
    eps = 1e-8
    if cos_axis == "row":
        gn2 = (gf * gf).sum(1)
        un2 = ((mf @ qq) * mf).sum(1)
        ug = (mf * rr).sum(1)
        gn, un = gn2.sqrt().clamp_min(eps), un2.sqrt().clamp_min(eps)
        cos = ug / (gn * un)
        w1 = 1.0 / (gn * un)
        w2 = torch.where(un2 > 0, cos / un.square(), torch.zeros_like(cos))
        stacked = torch.cat([rr, mf * w1[:, None]], dim=1).t() @ gf  # (2r x b)
        kk = rr.t() @ rr
        t2 = (mf * w2[:, None]).t() @ mf
        scalars = torch.stack([gn2.sum(), cos.sum()])
        flat = red(torch.cat([scalars, stacked.flatten(), kk.flatten(), t2.flatten()]))
        gsq, cos_sum = flat[0], flat[1]
        off = 2
        s = flat[off : off + r * b].view(r, b)
        t1 = flat[off + r * b : off + 2 * r * b].view(r, b)
        off += 2 * r * b
        kk = flat[off : off + r * r].view(r, r)
        t2 = flat[off + r * r :].view(r, r)
        c = cos_sum / global_rows
        dc = (t1 - t2 @ pf) / global_rows
    else:
        stacked = torch.cat([rr, mf], dim=1).t() @ gf  # (2r x b): S and M^T G
        kk = rr.t() @ rr
        mm = mf.t() @ mf
        gcol2 = (gf * gf).sum(0)
        flat = red(torch.cat([gcol2, stacked.flatten(), kk.flatten(), mm.flatten()]))
        gcol2 = flat[:b]
        gsq = gcol2.sum()
        off = b
        s = flat[off : off + r * b].view(r, b)
        mg = flat[off + r * b : off + 2 * r * b].view(r, b)
        off += 2 * r * b
        kk = flat[off : off + r * r].view(r, r)
        mm = flat[off + r * r :].view(r, r)
        mmp = mm @ pf
        ug = (pf * mg).sum(0)
        un2 = (pf * mmp).sum(0)
        gn, un = gcol2.sqrt().clamp_min(eps), un2.sqrt().clamp_min(eps)
        cos = ug / (gn * un)
        w1 = 1.0 / (gn * un)
        w2 = torch.where(un2 > 0, cos / un.square(), torch.zeros_like(cos))
        c = cos.sum() / b
        dc = (mg * w1[None, :] - mmp * w2[None, :]) / b
    # ||G - G P^T P||^2 = ||G||^2 - 2 tr(K) + tr(K Q): no full-size residual matrix.
    f = (gsq - 2.0 * torch.trace(kk) + (kk * qq).sum()).clamp_min(0.0)
    z = gsq.clamp_min(torch.finfo(torch.float32).tiny) if scale_free else float(global_rows * b)
    eye = torch.eye(r, device=pf.device, dtype=pf.dtype)
    de = -2.0 * ((2.0 * eye - qq) @ s - kk @ pf) / z
    err = f / z
    grad = (1.0 - c) * de - err * dc
    norm = torch.linalg.vector_norm(grad)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    p_new = pf - lr * coef * grad
    if scale_free:
        p_new = orthonormalize_rows(p_new)
    return p_new, err * (1.0 - c)


def projection_residual(g: Tensor, r: Tensor, shards: ShardGroup | None = None) -> Tensor:
    """Relative residual ||G - G P^T P||_F / ||G||_F from R = G P^T (global over row shards).

    For P with orthonormal rows ||G - G P^T P||^2 = ||G||^2 - ||R||^2, so this costs two sums
    of squares, no matrix product (an estimate when P is not exactly orthonormal, as in the
    reference mode).
    """
    sums = torch.stack([r.float().square().sum(), g.float().square().sum()])
    if shards is not None:
        sums = shards.sum(sums)
    ratio = sums[0] / sums[1].clamp_min(torch.finfo(torch.float32).tiny)
    return (1.0 - ratio).clamp_min(0.0).sqrt()


def rotation(p_old: Tensor, p_new: Tensor) -> Tensor:
    """C = P_old P_new^T (r x r): maps coordinates in the old basis to the new one."""
    return p_old.float() @ p_new.float().t()


def rotate_moments(m: Tensor, v: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Re-express low-rank moments (a x r) in a new basis through C (r x r).

    M <- M C exactly (the lifted first moment M P_old is projected onto the new subspace).
    V <- V (C * C): the second moment of the rotated coordinates under the diagonal
    (independent-coordinates) model Adam already assumes; non-negative by construction.
    """
    cf = c.to(m.dtype)
    return m @ cf, v @ (cf * cf)
