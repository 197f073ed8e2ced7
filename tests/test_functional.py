"""Functional math against the slow oracle and against autograd."""

from __future__ import annotations

import pytest
import torch

from coap_dist import COAPAdamW, param_groups
from coap_dist.functional import projection as fproj
from coap_dist.functional import quant, tucker
from coap_dist.reference import ReferenceCOAPAdamW


def _lowrank_grads(
    shapes: list[tuple[int, ...]], steps: int, scale: float
) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    basis = [torch.randn(s, generator=gen) for s in shapes]
    return [
        [(b + 0.3 * torch.randn(b.shape, generator=gen)) * scale for b in basis]
        for _ in range(steps)
    ]


@pytest.mark.parametrize("mode", ["reference", "scale_free"])
@pytest.mark.parametrize("moments", ["keep", "rotate"])
@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_optimizer_matches_oracle(mode: str, moments: str, scale: float) -> None:
    """Fast COAPAdamW == formula-by-formula oracle over 2+ refresh cycles (right, left, dense)."""
    torch.manual_seed(0)
    shapes = [(48, 32), (24, 40), (16,), (33, 33)]
    init = [torch.randn(s) for s in shapes]
    fast = [w.clone().requires_grad_() for w in init]
    slow = [w.clone() for w in init]
    kw = dict(
        lr=1e-2,
        weight_decay=0.1,
        rank=6,
        update_interval=3,
        reproject_factor=2,
        scale=0.5,
        projector_update=mode,
        moments=moments,
    )
    opt, ref = COAPAdamW(fast, **kw), ReferenceCOAPAdamW(slow, **kw)
    for grads in _lowrank_grads(shapes, 14, scale):  # refreshes at 0, 3, 6, 9, 12
        for w, g in zip(fast, grads, strict=True):
            w.grad = g.clone()
        opt.step()
        ref.step(grads)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a.detach(), b, atol=5e-6, rtol=1e-5)
    assert opt.metrics()["optim/refreshes"] == 15  # 5 refreshes x 3 matrices


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("scale_free", [False, True])
def test_correlation_gradient_matches_autograd(side: str, scale_free: bool) -> None:
    """Closed-form dL/dP (both cosine axes) equals autograd on the written-out objective."""
    torch.manual_seed(0)
    m, n = (30, 12) if side == "right" else (12, 30)
    r = 4
    g = torch.randn(m, n, dtype=torch.float64)
    mom = torch.randn(m if side == "right" else r, r if side == "right" else n, dtype=torch.float64)
    gc = fproj.canonical(g, side)
    mc = mom if side == "right" else mom.t()
    p0 = torch.linalg.qr(torch.randn(gc.shape[1], r, dtype=torch.float64))[0].t()
    p0 = p0 + 0.01 * torch.randn_like(p0)  # not exactly orthonormal: exercises the (2I - Q) term
    lr = 1e-3  # small enough that the clip does not act
    new, loss = fproj.correlation_update(
        gc.float(),
        p0.float(),
        mc.float(),
        global_rows=gc.shape[0],
        cos_axis="row" if side == "right" else "col",
        scale_free=scale_free,
        lr=lr,
    )
    # autograd in the paper's orientation
    pp = (p0 if side == "right" else p0.t()).clone().requires_grad_(True)
    if side == "right":
        recon, lifted = g @ pp.t() @ pp, mom @ pp
    else:
        recon, lifted = pp @ pp.t() @ g, pp @ mom
    err = (recon - g).pow(2).sum() / (g.pow(2).sum() if scale_free else g.numel())
    obj = err * (1 - torch.nn.functional.cosine_similarity(lifted, g, dim=1).mean())
    obj.backward()
    grad = pp.grad if side == "right" else pp.grad.t()
    assert float(loss) == pytest.approx(float(obj), rel=1e-4)
    expect = p0 - lr * grad
    if scale_free:
        expect = fproj.orthonormalize_rows(expect).double()
    torch.testing.assert_close(new.double(), expect, atol=1e-5, rtol=1e-4)


def test_orthonormalize_rows_cholesky_form_is_householders_q() -> None:
    """Within its step bound the Cholesky form returns Householder's Q (diag(R) > 0) to fp32
    rounding; beyond the bound, or without one, it is Householder's bitwise; a P without full
    rank gives NaN (rejected by all_finite), never a wrong basis."""
    torch.manual_seed(0)
    r, b = 16, 64
    p = torch.linalg.qr(torch.randn(b, r))[0].t()
    for size in (0.05, fproj.CHOLESKY_QR_MAX_STEP):
        d = torch.randn(r, b)
        moved = p + size * d / torch.linalg.matrix_norm(d, ord=2)
        chol = fproj.orthonormalize_rows(moved, step=size)
        torch.testing.assert_close(chol, fproj.orthonormalize_rows(moved), atol=2e-6, rtol=0)
        torch.testing.assert_close(chol @ chol.t(), torch.eye(r), atol=2e-6, rtol=0)
        too_far = fproj.orthonormalize_rows(moved, step=2 * size + 0.5)
        assert torch.equal(too_far, fproj.orthonormalize_rows(moved))
    moved[3] = 0.0  # rank r - 1
    assert not bool(fproj.all_finite(fproj.orthonormalize_rows(moved, step=0.1)))
    assert bool(fproj.all_finite(fproj.orthonormalize_rows(moved)))


def test_default_update_moves_projector_reference_does_not() -> None:
    """At gradient entries of 1e-4 the scale-free update moves P and lowers the residual; the
    published update does not move P at all (its gradient scales with |G|^2)."""
    torch.manual_seed(0)
    m, n, r = 256, 128, 16
    u = torch.linalg.qr(torch.randn(m, r))[0]
    v = torch.linalg.qr(torch.randn(n, r))[0]
    g = (u @ torch.diag(torch.linspace(3, 1, r)) @ v.t() + 0.05 * torch.randn(m, n)) * 1e-4
    g = g / g.abs().mean() * 1e-4
    p, _ = fproj.rsvd(torch.randn(m, n), r, None)  # a poor subspace
    before = float(fproj.projection_residual(g, fproj.project(g, p)))
    new, ref = p, p
    residuals = []
    for _ in range(20):  # 20 projector updates (T_u apart in training), same gradient statistics
        new, _ = fproj.correlation_update(
            g, new, g @ new.t(), global_rows=m, cos_axis="row", scale_free=True
        )
        residuals.append(float(fproj.projection_residual(g, fproj.project(g, new))))
        ref, _ = fproj.correlation_update(
            g, ref, g @ ref.t(), global_rows=m, cos_axis="row", scale_free=False
        )
    moved = float((new - p).norm() / p.norm())
    assert moved > 0.05
    assert all(b < a for a, b in zip([before, *residuals], residuals, strict=False))
    assert residuals[-1] < before - 0.01
    torch.testing.assert_close(new @ new.t(), torch.eye(r), atol=1e-5, rtol=0)
    assert float((ref - p).norm() / p.norm()) < 1e-9  # the documented defect: P never moves


def test_rsvd_captures_energy_and_warm_start_converges() -> None:
    torch.manual_seed(0)
    a = torch.randn(200, 20) @ torch.randn(20, 100) + 0.01 * torch.randn(200, 100)
    p, ok = fproj.rsvd(a, 20, None)
    assert bool(ok)
    torch.testing.assert_close(p @ p.t(), torch.eye(20), atol=1e-5, rtol=0)
    assert float(fproj.projection_residual(a, fproj.project(a, p))) < 0.02
    p2, _ = fproj.rsvd(a, 20, p, oversample=4, power_iters=1)

    def residual(q: torch.Tensor) -> float:  # in fp64: the fp32 estimate resolves ~1e-3 here
        ad, qd = a.double(), q.double()
        return float(torch.linalg.norm(ad - ad @ qd.t() @ qd) / torch.linalg.norm(ad))

    best = torch.linalg.svd(a.double())[2][:20]
    assert residual(p2) <= residual(p) + 1e-9
    assert residual(p2) == pytest.approx(residual(best), rel=1e-6)


def test_rotate_moments_is_exact_for_first_moment() -> None:
    torch.manual_seed(0)
    p_old, _ = fproj.rsvd(torch.randn(40, 30), 6, None)
    p_new, _ = fproj.rsvd(torch.randn(40, 30), 6, None)
    m, v = torch.randn(40, 6), torch.rand(40, 6)
    m2, v2 = fproj.rotate_moments(m, v, fproj.rotation(p_old, p_new))
    torch.testing.assert_close(m2, (m @ p_old) @ p_new.t())  # lift, then re-project
    assert bool((v2 >= 0).all())


def test_quantization_round_trip_and_unsigned_map() -> None:
    torch.manual_seed(0)
    x = torch.randn(10_000) * 1e-3
    q, s = quant.quantize(x, signed=True)
    assert q.dtype == torch.uint8 and s.numel() == quant.num_blocks(10_000)
    err = (quant.dequantize(q, s, signed=True) - x).abs().max() / x.abs().max()
    assert float(err) < 0.01
    v = x.square()
    for signed, bound in ((False, 0.02), (True, 0.04)):
        qv, sv = quant.quantize(v, signed=signed)
        rel = ((quant.dequantize(qv, sv, signed=signed) - v).abs() / v.clamp_min(1e-12)).median()
        assert float(rel) < bound
    # the unsigned map uses all 256 codes for v >= 0: twice the resolution of the signed one
    code_u, _ = quant.codebook(False)
    code_s, _ = quant.codebook(True)
    assert int((code_u >= 0).sum()) == 256 and int((code_s >= 0).sum()) == 129
    # block maxima are stored exactly
    xb = torch.tensor([0.5, -2.0, 1.0])
    qb, sb = quant.quantize(xb, signed=True)
    assert float(quant.dequantize(qb, sb, signed=True)[1]) == -2.0


def test_tucker_projection_round_trip() -> None:
    torch.manual_seed(0)
    g = torch.randn(32, 16, 3, 3)
    r0, r1 = tucker.tucker_ranks(g.shape, 4.0)
    assert (r0, r1) == (16, 8)
    u0, u1, ok = tucker.refresh_factors(g, r0, r1, None, None)
    assert bool(ok)
    torch.testing.assert_close(u0.t() @ u0, torch.eye(r0), atol=1e-5, rtol=0)
    assert u1 is not None
    core = tucker.core(g, u0, u1)
    assert core.shape == (16, 8, 3, 3)
    full = tucker.back(tucker.core(g, torch.eye(32), torch.eye(16)), torch.eye(32), torch.eye(16))
    torch.testing.assert_close(full, g)
    w0, w1, _ = tucker.refresh_factors(g, r0, r1, u0, u1)  # warm HOOI sweep: no worse
    res = lambda a, b: float((g - tucker.back(tucker.core(g, a, b), a, b)).norm())  # noqa: E731
    assert res(w0, w1) <= res(u0, u1) + 1e-4
    assert tucker.tucker_ranks((64, 32, 1, 1), 4.0) == (16, None)


@pytest.mark.parametrize(
    "shape", [(21, 256, 3, 3), (256, 21, 3, 3), (160, 8, 3, 3), (8, 160, 5, 5)]
)
def test_tucker_ranks_of_unbalanced_channels_fit_the_hooi_sweep(shape: tuple[int, ...]) -> None:
    """A warm HOOI sweep factors G x_1 U1^T (O x r1 kh kw) and G x_0 U0^T (I x r0 kh kw):
    the planned ranks fit both, so the factors keep their shapes at every refresh, and a
    COAPAdamW step on such a convolution (a segmentation head) runs its refreshes."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    r0, r1 = tucker.tucker_ranks(shape, 4.0)
    assert r1 is not None and r0 <= r1 * shape[2] * shape[3] and r1 <= r0 * shape[2] * shape[3]
    u0, u1, _ = tucker.refresh_factors(g, r0, r1, None, None)
    w0, w1, ok = tucker.refresh_factors(g, r0, r1, u0, u1)
    assert bool(ok) and u1 is not None and w1 is not None
    assert w0.shape == u0.shape == (shape[0], r0) and w1.shape == u1.shape == (shape[1], r1)
    conv = torch.nn.Conv2d(shape[1], shape[0], shape[2])
    opt = COAPAdamW(param_groups(conv, rank=4, rank_ratio_cnn=4.0), update_interval=1)
    for _ in range(3):
        conv(torch.randn(2, shape[1], 6, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(conv.weight).all()


@pytest.mark.parametrize("side", ["right", "left"])
def test_row_split_refresh_equals_whole(side: str) -> None:
    """A team's partial sums over row blocks give the single-process refresh: the Gram form of
    the randomized SVD spans what Householder QR spans, and the correlation step and
    Adafactor's statistics summed over blocks equal the whole-matrix ones."""
    torch.manual_seed(0)
    a, b, r = 60, 24, 5
    g = torch.randn(a, 8) @ torch.randn(8, b) + 0.01 * torch.randn(a, b)
    blocks = [(0, 17), (17, 18), (18, 60)]  # uneven, one single row
    whole, ok = fproj.rsvd(g, r, None)
    omega = fproj.sketch_matrix(b, r, None, oversample=0, device=torch.device("cpu"))
    parts = [fproj.gram_partials(g[i:j] @ omega, g[i:j]) for i, j in blocks]
    team, ok2 = fproj.basis_from_gram(sum(w for w, _ in parts), sum(z for _, z in parts), r)
    assert bool(ok) and bool(ok2)
    torch.testing.assert_close(team.t() @ team, whole.t() @ whole, atol=1e-4, rtol=0)
    torch.testing.assert_close(team, whole, atol=1e-4, rtol=0)  # signs fixed the same way
    m = torch.randn(a, r)
    axis = "row" if side == "right" else "col"
    ref, _ = fproj.correlation_update(g, whole, m, global_rows=a, cos_axis=axis, scale_free=True)
    for ortho in (False, True):  # the orthonormal shortcut (P P^T = I) is the same step
        flat = sum(
            fproj.correlation_partials(g[i:j], whole, m[i:j], cos_axis=axis, orthonormal=ortho)
            for i, j in blocks
        )
        assert flat.numel() == fproj.correlation_partials_numel(r, b, axis, ortho)
        new, _ = fproj.correlation_from_sums(
            flat, whole, global_rows=a, cos_axis=axis, scale_free=True, orthonormal=ortho
        )
        torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-5)
    # rank-deficient sketch (Y of rank 3 < k = 5): still an orthonormal basis, finite
    low = torch.randn(a, 3) @ torch.randn(3, b)
    wz = [fproj.gram_partials(low[i:j] @ omega, low[i:j]) for i, j in blocks]
    p_low, ok3 = fproj.basis_from_gram(sum(w for w, _ in wz), sum(z for _, z in wz), r)
    assert bool(ok3) and bool(torch.isfinite(p_low).all())
    torch.testing.assert_close(p_low @ p_low.t(), torch.eye(r), atol=1e-4, rtol=0)
