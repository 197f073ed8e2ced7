"""Automatic per-matrix rank (``rank="auto"``): the spectrum measured at each SVD and the
allocation of a state-byte budget over the matrices. Local tensors, no collectives.

A group with ``rank="auto"`` and ``rank_ratio`` rho keeps, over its COAP matrices, at most
the optimizer-state bytes of the fixed ranks r_i = max(min(m_i, n_i) // rho, 1): its budget.
At every SVD (the first step and each recalibration, all matrices of the group at once under
the fixed schedule) each matrix's gradient G (canonical a x b) is sketched at the width of its
largest admissible rank h_i:

    Y = G Omega (Omega = [P_old^T, seeded Gaussian columns], b x h_i);  Q = orth(Y);
    s_j = sigma_j(Q^T G)^2 / sum_l sigma_l(Q^T G)^2,   j = 1..h_i

(the fraction of the sketched energy in direction j). The ranks then maximise the captured
fraction sum_i sum_{j <= r_i} s_{i,j} over the group within the budget, greedily by captured
fraction per byte (exact for the linear state cost when the fractions decrease along j, as
singular values do), each r_i in [max(1, r_i // 4), min(min(m_i, n_i), 2 r_i)].
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


def bounds(fixed: int, small: int) -> tuple[int, int]:
    """(lowest, highest) admissible rank of a matrix whose fixed rank is ``fixed`` and whose
    smaller dimension is ``small``."""
    return max(1, fixed // LOW), max(1, min(small, HIGH * fixed))


def state_cost(spec: ParamSpec, rank: int) -> int:
    """Bytes of a whole matrix's state at ``rank`` (moments, projector, statistics)."""
    return nbytes(state_shapes(dataclasses.replace(spec, rank=rank)))


def energy_profile(grad: Tensor, warm: Tensor | None, width: int) -> Tensor:
    """s (``width``, fp64): the captured-energy fractions of the sketched gradient, in
    decreasing order; zeros when the gradient is zero or not finite.

    Args:
        grad: the canonical gradient G (a x b).
        warm: the current projector (r_old x b) that starts the sketch, or None.
        width: the sketch width (the largest admissible rank).
    """
    gf = grad.float()
    b = gf.shape[1]
    width = min(width, b, gf.shape[0])
    if warm is None:
        omega = fproj.gaussian_test_matrix(b, width, device=gf.device)
    else:
        have = min(warm.shape[0], width)
        omega = warm[:have].float().t()
        if have < width:
            extra = fproj.gaussian_test_matrix(
                b, width - have, device=gf.device, seed=fproj.REFERENCE_SEED + 1
            )
            omega = torch.cat([omega, extra], dim=1)
    q, _ = torch.linalg.qr(torch.nan_to_num(gf @ omega), mode="reduced")
    s2 = torch.linalg.svdvals(torch.nan_to_num(q.t() @ gf)).double().square()
    total = s2.sum()
    ok = torch.isfinite(total) & (total > 0)
    return torch.where(
        ok, s2 / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(s2)
    )


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
    )
    for _, j, i in candidates:
        if ranks[i] != j:
            continue  # an earlier direction of this matrix did not fit
        extra = state_cost(specs[i], j + 1) - state_cost(specs[i], j)
        if spent + extra <= budget:
            ranks[i] = j + 1
            spent += extra
    return ranks
