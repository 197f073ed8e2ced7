"""Tucker-2 projection of 4-D convolution gradients on their channel modes.

For G of shape (O, I, kh, kw) and factors U0 (O x r0), U1 (I x r1) with orthonormal columns:

    core(G) = G x_0 U0^T x_1 U1^T          shape (r0, r1, kh, kw)
    back(C) = C x_0 U0 x_1 U1              shape (O, I, kh, kw)

When only the output mode is compressed (1x1 kernels) U1 is absent and the core is
(r0, I, kh, kw). Factors are refreshed by one warm-started HOOI sweep: U0 from the randomized
SVD of the mode-0 unfolding of G x_1 U1^T started at the previous U0, then U1 likewise with the
new U0. All factor maths runs in fp32 and the factors are returned in fp32; the caller stores
them in its working dtype (bf16 works).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from coap_dist.functional.projection import rsvd

SMALL_CONV_NUMEL = 9216
"""Convolution weights with at most this many elements stay in plain AdamW."""


def tucker_ranks(
    shape: tuple[int, ...] | torch.Size, rank_ratio_cnn: float
) -> tuple[int, int | None]:
    """(r0, r1) for a conv weight (O, I, kh, kw): kw == 1 -> (O // rho, None), else
    (O // sqrt(rho), I // sqrt(rho)), each at least 1 and at most the rank its unfolding in
    a HOOI sweep can have: mode 0 of G x_1 U1^T (O x r1 kh kw) and mode 1 of G x_0 U0^T
    (I x r0 kh kw), so r0 <= r1 kh kw and r1 <= r0 kh kw (unbalanced channels: a 21 x 256 x 3
    x 3 head at rho = 4 gets (10, 90), not (10, 128))."""
    o, i, kh, kw = shape
    if kw == 1:
        return min(max(int(o // rank_ratio_cnn), 1), i * kh * kw), None
    root = math.sqrt(rank_ratio_cnn)
    r0, r1 = max(int(o // root), 1), max(int(i // root), 1)
    r1 = min(r1, r0 * kh * kw)
    return min(r0, r1 * kh * kw), r1


def core(g: Tensor, u0: Tensor, u1: Tensor | None) -> Tensor:
    """G x_0 U0^T (x_1 U1^T): (O, I, kh, kw) -> (r0, r1 or I, kh, kw)."""
    c = torch.einsum("oikl,or->rikl", g, u0.to(g.dtype))
    if u1 is not None:
        c = torch.einsum("rikl,is->rskl", c, u1.to(g.dtype))
    return c


def back(c: Tensor, u0: Tensor, u1: Tensor | None) -> Tensor:
    """C x_0 U0 (x_1 U1): the full-size tensor of a core."""
    if u1 is not None:
        c = torch.einsum("rskl,is->rikl", c, u1.to(c.dtype))
    return torch.einsum("rikl,or->oikl", c, u0.to(c.dtype))


def _mode_basis(x: Tensor, mode: int, rank: int, warm: Tensor | None) -> tuple[Tensor, Tensor]:
    """Leading `rank` left singular vectors (columns, dim x rank) of the mode-`mode` unfolding
    of x, warm-started at ``warm`` (dim x rank), and whether they are finite."""
    unfold = x.movedim(mode, 0).reshape(x.shape[mode], -1)  # (dim x rest)
    p, ok = rsvd(unfold.t(), rank, None if warm is None else warm.t())
    return p.t().contiguous(), ok


def refresh_factors(
    g: Tensor, r0: int, r1: int | None, u0: Tensor | None, u1: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """New (U0, U1, ok): HOSVD from the seeded Gaussian when no factors exist, otherwise one
    warm-started HOOI sweep. Returns fp32 factors; ``ok`` (0-dim bool) is False when G made
    them non-finite (the caller keeps the old ones)."""
    gf = g.float()
    if u0 is None:
        new_u0, ok0 = _mode_basis(gf, 0, r0, None)
        if r1 is None:
            return new_u0, None, ok0
        new_u1, ok1 = _mode_basis(gf, 1, r1, None)
        return new_u0, new_u1, ok0 & ok1
    y = gf if u1 is None else torch.einsum("oikl,is->oskl", gf, u1.float())
    new_u0, ok0 = _mode_basis(y, 0, r0, u0)
    if r1 is None:
        return new_u0, None, ok0
    z = torch.einsum("oikl,or->rikl", gf, new_u0)
    new_u1, ok1 = _mode_basis(z, 1, r1, u1)
    return new_u0, new_u1, ok0 & ok1
