"""The refresh schedule: which projector refresh a low-rank parameter takes before a step,
and the counters of refreshes that ``metrics()`` reports.

With k the parameter's completed updates, T_u = ``update_interval``, F =
``reproject_factor`` and o its stagger offset (:func:`coap_dist.optim.spec.with_stagger`):
k == 0 -> ``init`` (seeded randomized SVD); (k + o) % (T_u F) == 0 -> ``recalibrate``
(warm-started randomized SVD); (k + o) % T_u == 0 -> ``update`` (correlation-aware step);
otherwise none. Every rank evaluates it for every parameter from the same counts, so the
decisions are identical everywhere. Pure.
"""

from __future__ import annotations

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
)
"""Counters in ``metrics()`` (identical on every rank: every rank sees every decision)."""


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


def count_refreshes(counters: dict[str, int], due: Mapping[int, str]) -> None:
    """Add one step's refreshes to ``counters`` (keys of :data:`COUNTERS`)."""
    counters["refreshes"] += len(due)
    counters["recalibrations"] += sum(k == "recalibrate" for k in due.values())
    counters["projector_updates"] += sum(k == "update" for k in due.values())
