"""Distribution layouts for COAP: one class per mode behind :class:`coap_dist.optim.layout.Layout`.

* :class:`OwnerSharding` (``sharding="owner"``): DDP / replicated parameters, state sharded by
  parameter owner (ZeRO-1, or ZeRO-2 with ``reduce_gradients=True``).
* :class:`Fsdp2Local` (automatic for FSDP2/HSDP DTensor parameters, or ``sharding="local"``).
* :class:`Fsdp2Owner` (FSDP2/HSDP with ``sharding="owner"``): exact whole-matrix COAP.
* :class:`Fsdp1Sharding` (``sharding=Fsdp1Sharding(fsdp_model)``): FSDP1 with
  ``use_orig_params=True``; whole matrices assembled from flat fragments on their owners.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from coap_dist.distributed.fragments import FragmentOwnerSharding
from coap_dist.distributed.fsdp1 import Fsdp1Sharding
from coap_dist.distributed.fsdp2 import Fsdp2Local, Fsdp2Owner
from coap_dist.distributed.owner import OwnerSharding
from coap_dist.optim.layout import Layout, set_layout_resolver

SHARDING_NAMES = ("none", "owner", "local")


def resolve(params: Sequence[torch.nn.Parameter], sharding: Any, process_group: Any) -> Layout:
    """Pick the layout: a Layout instance as given; FSDP2 DTensors -> LOCAL; 'owner' -> OWNER."""
    if isinstance(sharding, Layout):
        return sharding
    from torch.distributed.tensor import DTensor

    is_dtensor = any(isinstance(p, DTensor) for p in params)
    if sharding is not None and sharding not in SHARDING_NAMES:
        raise ValueError(
            f"invalid `sharding`={sharding!r}; must be one of {SHARDING_NAMES}, "
            "None (automatic) or a coap_dist.distributed layout instance"
        )
    if is_dtensor:
        return Fsdp2Owner(params) if sharding == "owner" else Fsdp2Local()
    if sharding == "owner":
        return OwnerSharding(process_group)
    if sharding == "local":
        raise ValueError(
            "`sharding`='local' needs FSDP2 (DTensor) parameters; for DDP use sharding='owner'"
        )
    return Layout()


set_layout_resolver(resolve)

__all__ = [
    "FragmentOwnerSharding",
    "Fsdp1Sharding",
    "Fsdp2Local",
    "Fsdp2Owner",
    "OwnerSharding",
    "resolve",
]
