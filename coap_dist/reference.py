"""Slow, formula-by-formula COAP-AdamW used as the test oracle.

Written in the paper's own orientation (no canonical transposes), one parameter at a time,
with the correlation-aware objective differentiated by autograd, so that it shares no code
path with :mod:`coap_dist.functional` beyond torch itself. ``projector_update="reference"``
with ``moments="keep"`` reproduces the published coap_torch behaviour step for step;
``"scale_free"`` / ``"rotate"`` are this project's defaults, restated the plain way.
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch
from torch import Tensor

SEED = 3407


class _ParamState(TypedDict, total=False):
    """Per-tensor state: step count, and for 2-D tensors the side, projector and moments."""

    k: int
    side: str
    P: Tensor
    M: Tensor
    V: Tensor


class ReferenceCOAPAdamW:
    """COAP-AdamW over a list of tensors: ``step(grads)`` updates ``params`` in place.

    2-D tensors are projected (side by the reference rule unless ``side`` forces one); all
    other tensors get the reference AdamW. Hyperparameters as in ``coap_dist.COAPAdamW``.
    """

    def __init__(
        self,
        params: list[Tensor],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int,
        update_interval: int,
        reproject_factor: int,
        scale: float = 1.0,
        projector_update: str = "scale_free",
        moments: str = "rotate",
        side: str = "auto",
        projector_lr: float = 0.1,
    ) -> None:
        self.params = params
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.rank, self.tu, self.f, self.scale = rank, update_interval, reproject_factor, scale
        self.mode, self.moments, self.side_rule, self.plr = (
            projector_update,
            moments,
            side,
            projector_lr,
        )
        self.state: list[_ParamState] = [{"k": 0} for _ in params]

    # --- helpers in the paper's orientation -------------------------------------------------
    def _side(self, w: Tensor) -> str:
        if self.side_rule != "auto":
            return self.side_rule
        return "right" if w.shape[0] >= w.shape[1] else "left"

    @staticmethod
    def _project(g: Tensor, p: Tensor, side: str) -> Tensor:
        return g @ p.T if side == "right" else p.T @ g

    @staticmethod
    def _lift(d: Tensor, p: Tensor, side: str) -> Tensor:
        return d @ p if side == "right" else p @ d

    def _fix_signs(self, p: Tensor, side: str) -> Tensor:
        if self.mode == "reference":
            return p
        rows = p if side == "right" else p.T  # one singular vector per row
        idx = rows.abs().argmax(dim=1)
        sign = torch.sign(rows[torch.arange(rows.shape[0]), idx])
        sign[sign == 0] = 1
        rows = rows * sign[:, None]
        return rows if side == "right" else rows.T

    def _rsvd(self, g: Tensor, side: str, p_old: Tensor | None) -> Tensor:
        a = g.float() if side == "right" else g.float().T
        n = a.shape[1]
        if p_old is None:
            gen = torch.Generator().manual_seed(SEED)
            omega = torch.randn((n, self.rank), generator=gen)
        else:
            omega = (p_old.T if side == "right" else p_old).float()
        y = a @ omega
        q, _ = torch.linalg.qr(y, mode="reduced")
        b = q.T @ a
        _, _, vh = torch.linalg.svd(b, full_matrices=False)
        vh = vh[: self.rank]
        return self._fix_signs(vh if side == "right" else vh.T, side)

    def _correlation_step(self, g: Tensor, p: Tensor, m: Tensor, side: str) -> Tensor:
        g = g.float()
        proj = p.float().clone().requires_grad_(True)
        with torch.enable_grad():
            if side == "right":
                lifted = m.float() @ proj
                recon = g @ proj.T @ proj
            else:
                lifted = proj @ m.float()
                recon = proj @ proj.T @ g
            if self.mode == "reference":
                err = torch.nn.functional.mse_loss(recon, g)
            else:
                err = (recon - g).pow(2).sum() / g.pow(2).sum()
            cos = torch.nn.functional.cosine_similarity(lifted, g, dim=1)
            loss = err * (1 - cos.mean())
            loss.backward()
        grad = proj.grad
        assert grad is not None  # loss.backward() above populated it
        norm = grad.norm()
        coef = min(1.0, 1.0 / (float(norm) + 1e-6))
        new = (proj - self.plr * coef * grad).detach()
        if self.mode != "reference":
            rows = new.T if side == "right" else new  # columns = basis vectors
            q, r = torch.linalg.qr(rows, mode="reduced")
            d = torch.sign(torch.diagonal(r))
            d[d == 0] = 1
            q = q * d
            new = q.T if side == "right" else q
        return new

    # --- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, grads: list[Tensor]) -> None:
        b1, b2 = self.betas
        for w, g, st in zip(self.params, grads, self.state, strict=True):
            k = int(st["k"])
            if w.ndim == 2:
                side = self._side(w)
                st["side"] = side
                if k == 0:
                    st["P"] = self._rsvd(g, side, None)
                elif k % self.tu == 0:
                    p_old = st["P"]
                    if k % (self.tu * self.f) == 0:
                        p_new = self._rsvd(g, side, p_old)
                    else:
                        p_new = self._correlation_step(g, p_old, st["M"], side)
                    if self.moments == "rotate":
                        if side == "right":
                            c = p_old.float() @ p_new.float().T
                            st["M"] = st["M"] @ c
                            st["V"] = st["V"] @ (c * c)
                        else:
                            c = p_new.float().T @ p_old.float()
                            st["M"] = c @ st["M"]
                            st["V"] = (c * c) @ st["V"]
                    st["P"] = p_new
                r = self._project(g.float(), st["P"].float(), side)
            else:
                r = g.float()
            if k == 0:
                st["M"] = torch.zeros_like(r)
                st["V"] = torch.zeros_like(r)
            t = k + 1
            st["M"] = b1 * st["M"] + (1 - b1) * r
            st["V"] = b2 * st["V"] + (1 - b2) * r * r
            step_size = self.lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            d = st["M"] / (st["V"].sqrt() + self.eps)
            if w.ndim == 2:
                d = self.scale * self._lift(d, st["P"].float(), side)
            w.sub_(step_size * d)
            if self.wd > 0:
                w.sub_(self.lr * self.wd * w)
            st["k"] = t
