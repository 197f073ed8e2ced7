"""Automatic per-matrix rank (``rank="auto"``): the spectrum measured at each SVD and the
allocation of a state-byte budget over the matrices. Local tensors, no collectives.

A group with ``rank="auto"`` and ``rank_ratio`` rho keeps, over its COAP matrices, at most
the optimizer-state bytes of the fixed ranks r_i = max(min(m_i, n_i) // rho, 1): its budget.
At every SVD (the first step and each recalibration, all matrices of the group at once under
the fixed schedule) each matrix's gradient G (canonical a x b) is sketched at the width of its
largest admissible rank h_i:

    B = G Omega (Omega = [P_old^T, seeded Gaussian columns], b x h_i);  Q = orth(B);
    s_j = sigma_j(Q^T G)^2 / sum_l sigma_l(Q^T G)^2,   j = 1..h_i

(the fraction of the sketched energy in direction j), computed from the sums
C = B^T B (h_i x h_i) and M = G^T B (b x h_i) over the rows, so that a matrix whose rows are
spread over ranks needs one sum of per-rank partials (:func:`sketch_partials`,
:func:`profile_from_sums`). The ranks then maximise the captured
fraction sum_i sum_{j <= r_i} s_{i,j} over the group within the budget, greedily by captured
fraction per byte (exact for the linear state cost when the fractions decrease along j, as
singular values do), each r_i in [max(1, r_i // 4), min(min(m_i, n_i), 2 r_i)]; directions
holding no more than :data:`NEGLIGIBLE` of the energy get none (the budget may stay unspent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor

from coap_dist.functional import projection as fproj
from coap_dist.optim.spec import ParamSpec, nbytes, state_shapes

LOW = 4
"""Smallest admissible rank: the fixed rank // LOW (at least 1)."""

HIGH = 2
"""Largest admissible rank: HIGH x the fixed rank (at most min(m, n))."""

NEGLIGIBLE = 1e-6
"""Directions whose captured fraction s_j is at most this get no state (a gradient of lower
rank than its admissible ranks: past its rank the sketch holds rounding noise, which would
cost state and make the projector's extra directions arbitrary)."""


def bounds(fixed: int, small: int) -> tuple[int, int]:
    """(lowest, highest) admissible rank of a matrix whose fixed rank is ``fixed`` and whose
    smaller dimension is ``small``."""
    return max(1, fixed // LOW), max(1, min(small, HIGH * fixed))


def state_cost(spec: ParamSpec, rank: int) -> int:
    """Bytes of a whole matrix's state at ``rank`` (moments, projector, statistics)."""
    return nbytes(state_shapes(dataclasses.replace(spec, rank=rank)))


def sketch_width(spec: ParamSpec, fixed: int) -> int:
    """h: the sketch width of a matrix, its largest admissible rank (at most a and b)."""
    return min(bounds(fixed, min(spec.rows, spec.cols))[1], spec.rows, spec.cols)


def sketch_partials(grad: Tensor, warm: Tensor | None, width: int) -> Tensor:
    """This piece's share (flat, fp64, h^2 + b h) of the sums a profile needs, for rows
    G_k (a_k x b) of the canonical gradient; summed over the pieces of a matrix they give
    C = sum_k B_k^T B_k = B^T B and M = sum_k G_k^T B_k = G^T B, where B = G Omega (a x h).

    In fp64 (and summed in fp64: ``team_sum(..., torch.float64)``): the profile's tail comes
    from C's small eigenvalues, down to 1e-6 of its largest, which an fp32 Gram matrix holds
    to about eps_32 lambda_max / lambda ~ 10% -- enough for layouts that sum the rows in
    different orders to choose different ranks from the same gradient.

    Args:
        grad: the canonical gradient rows G_k.
        warm: the current projector (r_old x b) that starts the sketch, or None.
        width: h (:func:`sketch_width`; the same on every piece).
    """
    gf = torch.nan_to_num(grad.double())
    b = gf.shape[1]
    if warm is None:
        omega = fproj.gaussian_test_matrix(b, width, device=gf.device)
    else:
        have = min(warm.shape[0], width)
        omega = warm[:have].double().t()
        if have < width:
            extra = fproj.gaussian_test_matrix(
                b, width - have, device=gf.device, seed=fproj.REFERENCE_SEED + 1
            )
            omega = torch.cat([omega, extra], dim=1)
    sketch = gf @ omega.double()
    return torch.cat([(sketch.t() @ sketch).reshape(-1), (gf.t() @ sketch).reshape(-1)])


def profile_from_sums(sums: Tensor, width: int) -> Tensor:
    """s (``width``, fp64): the captured-energy fractions of the sketched gradient, in
    decreasing order, from the summed :func:`sketch_partials`; zeros when the gradient is
    zero or not finite.

    The projection of G onto range(B) is B C^+ M^T; with C = V diag(lambda) V^T its
    singular values are those of diag(lambda)^(-1/2) V^T M^T, whose squares are the
    eigenvalues of K = W^T (M^T M) W, W = V diag(lambda)^(-1/2) (directions with
    lambda <= 1e-6 lambda_max dropped: B's numerically null space).
    """
    h = width
    flat = sums.double()
    ok = torch.isfinite(flat).all()
    flat = torch.nan_to_num(flat)
    c = flat[: h * h].reshape(h, h)
    m = flat[h * h :].reshape(-1, h)
    lam, vecs = torch.linalg.eigh((c + c.t()) / 2)
    tiny = torch.finfo(torch.float64).tiny
    kept = lam > 1e-6 * lam.max().clamp_min(tiny)
    w = vecs * torch.where(kept, lam.clamp_min(tiny).rsqrt(), torch.zeros_like(lam))
    mw = m @ w
    s2 = torch.linalg.eigvalsh(mw.t() @ mw).flip(0).clamp_min(0)
    total = s2.sum()
    good = ok & torch.isfinite(total) & (total > 0)
    return torch.where(good, s2 / total.clamp_min(tiny), torch.zeros_like(s2))


def allocate(
    profiles: Mapping[int, list[float]],
    specs: Mapping[int, ParamSpec],
    fixed: Mapping[int, int],
) -> dict[int, int]:
    """The ranks of a group's matrices that maximise the captured fraction within the bytes
    of their fixed ranks (see the module docstring); deterministic (ties by direction, then index).

    Args:
        profiles: per matrix index, s_1 >= s_2 >= ... (its :func:`energy_profile`).
        specs: the matrices' current plans (any rank).
        fixed: their fixed ranks r_i.
    """
    budget = sum(state_cost(specs[i], fixed[i]) for i in profiles)
    lim = {i: bounds(fixed[i], min(specs[i].rows, specs[i].cols)) for i in profiles}
    ranks = {i: lim[i][0] for i in profiles}
    spent = sum(state_cost(specs[i], ranks[i]) for i in profiles)
    unit = {
        i: max(1, state_cost(specs[i], ranks[i] + 1) - state_cost(specs[i], ranks[i]))
        for i in profiles
    }
    # Ties (equal fractions per byte) go to the earlier direction, then the lower index, so
    # equal spectra share the budget evenly.
    candidates = sorted(
        (-profiles[i][j] / unit[i], j, i)
        for i in profiles
        for j in range(lim[i][0], min(lim[i][1], len(profiles[i])))
        if profiles[i][j] > NEGLIGIBLE
    )
    for _, j, i in candidates:
        if ranks[i] != j:
            continue  # an earlier direction of this matrix did not fit
        extra = state_cost(specs[i], j + 1) - state_cost(specs[i], j)
        if spent + extra <= budget:
            ranks[i] = j + 1
            spent += extra
    return ranks
