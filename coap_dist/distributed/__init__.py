"""Distribution layouts for COAP: one class per mode behind :class:`coap_dist.optim.layout.Layout`.

The layout is bound at the first ``step()`` from the tensors in the optimizer's groups:

* one process, or DDP with replicated state (default): :class:`OwnerLayout` over whole
  tensors with one rank (``"single"``);
* :class:`OwnerSharding` (``sharding="owner"`` under DDP): state sharded over the
  data-parallel group (ZeRO-1; ZeRO-2 with ``reduce_gradients=True``);
* :class:`Fsdp2Local` (automatic for FSDP2 / HSDP DTensor parameters, or
  ``sharding="local"``): row shards, projectors split by rows;
* :class:`Fsdp2Owner` (FSDP2 / HSDP with ``sharding="owner"``): the owner protocol;
* :class:`Fsdp1Sharding` (``sharding=Fsdp1Sharding(fsdp_model)``): FSDP1 with
  ``use_orig_params=True``;
* DeepSpeed ZeRO 0-3: ``coap_dist.integrations.deepspeed``, from the partitions the engine
  hands the optimizer.

:mod:`coap_dist.distributed.placement` plans where state lives (pure, shared with the
memory estimator); :mod:`coap_dist.distributed.comm` counts every collective.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.distributed.tensor import DTensor

from coap_dist.distributed.fsdp1 import Fsdp1Sharding
from coap_dist.distributed.fsdp2 import Fsdp2Local, Fsdp2Owner
from coap_dist.distributed.owner import OwnerLayout, OwnerSharding, ReplicatedView
from coap_dist.optim.layout import Layout, set_layout_resolver


def resolve(
    groups: list[dict[str, Any]],
    built: list[list[Tensor | None]],
    sharding: Any,
    process_group: Any,
) -> Layout:
    """The layout for the tensors in the optimizer's groups now (see the module docstring)."""
    if isinstance(sharding, Layout):
        return sharding
    if any(isinstance(t, DTensor) for g in groups for t in g["params"]):
        return Fsdp2Owner() if sharding == "owner" else Fsdp2Local()
    if sharding == "local":
        raise ValueError(
            "invalid `sharding`='local': it needs FSDP2 (DTensor) parameters; for DDP use "
            "sharding='owner'"
        )
    if sharding == "owner":
        return OwnerSharding(process_group)
    return OwnerLayout(ReplicatedView(solo=True))


set_layout_resolver(resolve)

__all__ = [
    "Fsdp1Sharding",
    "Fsdp2Local",
    "Fsdp2Owner",
    "OwnerLayout",
    "OwnerSharding",
    "ReplicatedView",
    "resolve",
]
