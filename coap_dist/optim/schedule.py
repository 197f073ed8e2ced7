"""The refresh schedule: which projector refresh a low-rank parameter takes before a step,
and the counters of refreshes that ``metrics()`` reports.

With k the parameter's completed updates, T_u = ``update_interval``, F =
``reproject_factor`` and o its stagger offset (:func:`coap_dist.optim.spec.with_stagger`):
k == 0 -> ``init`` (seeded randomized SVD); (k + o) % (T_u F) == 0 -> ``recalibrate``
(warm-started randomized SVD); (k + o) % T_u == 0 -> ``update`` (correlation-aware step);
otherwise none. Every rank evaluates it for every parameter from the same counts, so the
decisions are identical everywhere.

``refresh="adaptive"`` (matrices; convolutions keep the fixed schedule) decides at the same
candidate steps, (k + o) % T_u == 0, from the projection residual

    rho = ||G - G P^T P||_F / ||G||_F = sqrt(1 - ||R||^2 / ||G||^2)     (R = G P^T, rows x r)

that the step gets from R at the cost of one more sum of squares: measured out of sample on
the step after each SVD (rho_0) and on the step before each candidate (rho). With the drift
s = rho / rho_0 - 1 and c the matrix's SVD credit (it grows by ``refresh_budget`` / (T_u F)
per step, at most :data:`BANK`):

* c >= 1 and (s > ``refresh_threshold`` or no SVD for :data:`STALE` T_u F steps):
  ``recalibrate`` (c -= 1);
* else s > ``refresh_threshold`` / 2 (the subspace captures less than after its SVD, or
  no credit is left): ``update``;
* else nothing (the projector still fits, within noise; the step saves its cost).

So a matrix takes at most ``refresh_budget`` SVDs per T_u F steps on average (plus the banked
one), fewer when its subspace holds. The residuals are sums over the ranks holding the
matrix's rows (read at one host synchronisation at the end of a measuring step), so every
rank takes the same decisions; :class:`AdaptiveState` is host data that checkpoints carry.
Pure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

from coap_dist.optim.spec import ParamSpec

Refresh = Literal["init", "recalibrate", "update"]

COUNTERS = (
    "refreshes",
    "recalibrations",
    "projector_updates",
    "nonfinite_skips",
    "refresh_keep_old",
    "init_deferred",
    "refresh_skips",
)
"""Counters in ``metrics()`` (identical on every rank: every rank sees every decision)."""

BANK = 2.0
"""Most SVD credits an adaptive matrix banks (it starts with one)."""

STALE = 4
"""An adaptive matrix is recalibrated (credit permitting) after STALE T_u F steps without an
SVD, whatever its residual says."""


@dataclasses.dataclass
class AdaptiveState:
    """The adaptive schedule's record of one matrix (identical on every rank).

    Attributes:
        credit: SVD credit c.
        base: rho_0, the residual measured on the step after the last SVD (nan: not yet).
        last_rho: rho measured on the step before the coming candidate (nan: not yet).
        last_svd: the update count k at the last SVD.
    """

    credit: float = 1.0
    base: float = math.nan
    last_rho: float = math.nan
    last_svd: int = 0

    def drift(self) -> float:
        """s = rho / rho_0 - 1 (0 until both are measured)."""
        if not (math.isfinite(self.base) and math.isfinite(self.last_rho)) or self.base <= 0:
            return 0.0
        return self.last_rho / self.base - 1.0

    def as_list(self) -> list[float]:
        """[credit, base, last_rho, last_svd] (checkpoint form)."""
        return [self.credit, self.base, self.last_rho, float(self.last_svd)]

    @classmethod
    def from_list(cls, values: Any) -> AdaptiveState:
        """Inverse of :meth:`as_list`."""
        credit, base, last_rho, last_svd = (float(v) for v in values)
        return cls(credit, base, last_rho, int(last_svd))


def adaptive(spec: ParamSpec, group: Mapping[str, Any]) -> bool:
    """Whether a parameter follows the adaptive schedule."""
    return spec.kind == "matrix" and group["refresh"] == "adaptive"


def refresh_due(spec: ParamSpec, group: Mapping[str, Any], k: int) -> Refresh | None:
    """The refresh due before update k + 1 of a parameter (None for AdamW parameters)."""
    if not spec.lowrank:
        return None
    if k == 0:
        return "init"
    kk = k + spec.offset
    tu = group["update_interval"]
    if kk % (tu * group["reproject_factor"]) == 0:
        return "recalibrate"
    if kk % tu == 0:
        return "update"
    return None


def candidate(spec: ParamSpec, group: Mapping[str, Any], k: int) -> bool:
    """Whether the refresh before update k + 1 is an adaptive decision point,
    (k + o) % T_u == 0 with k >= 1."""
    return k > 0 and (k + spec.offset) % group["update_interval"] == 0


def adaptive_due(
    spec: ParamSpec, group: Mapping[str, Any], k: int, st: AdaptiveState
) -> Refresh | None:
    """The adaptive refresh before update k + 1 (see the module docstring); called once per
    update of the matrix, it accrues the credit and records an SVD in ``st``."""
    tu, f = group["update_interval"], group["reproject_factor"]
    if k == 0:
        st.last_svd = 0
        return "init"
    st.credit = min(BANK, st.credit + group["refresh_budget"] / (tu * f))
    if not candidate(spec, group, k):
        return None
    s = st.drift()
    stale = k - st.last_svd >= STALE * tu * f
    if st.credit >= 1.0 and (s > group["refresh_threshold"] or stale):
        st.credit -= 1.0
        st.last_svd = k
        st.base = st.last_rho = math.nan
        return "recalibrate"
    return "update" if s > group["refresh_threshold"] / 2 else None


def measure_due(spec: ParamSpec, group: Mapping[str, Any], k: int, st: AdaptiveState) -> bool:
    """Whether update k + 1 (taken with the projector chosen for it) measures the residual:
    the step after an SVD (rho_0) or the step before a candidate (rho)."""
    return k == st.last_svd + 1 or candidate(spec, group, k + 1)


def record_residual(
    spec: ParamSpec, group: Mapping[str, Any], k: int, st: AdaptiveState, rho: float
) -> None:
    """Store the residual measured by update k + 1 (see :func:`measure_due`)."""
    if k == st.last_svd + 1:
        st.base = rho
    if candidate(spec, group, k + 1):
        st.last_rho = rho


def count_refreshes(counters: dict[str, int], due: Mapping[int, str]) -> None:
    """Add one step's refreshes to ``counters`` (keys of :data:`COUNTERS`)."""
    counters["refreshes"] += len(due)
    counters["recalibrations"] += sum(k == "recalibrate" for k in due.values())
    counters["projector_updates"] += sum(k == "update" for k in due.values())
