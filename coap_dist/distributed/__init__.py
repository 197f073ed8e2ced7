"""Distribution layouts for COAP: one class per mode behind :class:`coap_dist.optim.layout.Layout`.

The layout is bound at the first ``step()`` from the tensors in the optimizer's groups. One
vocabulary names each layout everywhere (``Layout.name``, ``coap-dist memory --layout``, the
README's support table, the app's ``strategy=``; :data:`~coap_dist.optim.layout.LAYOUT_NAMES`):

===============  ==============================================  ===========================
name             how you get it                                  class (view)
===============  ==============================================  ===========================
``replicated``   one process, DDP, DeepSpeed ZeRO 0 (default);   :class:`OwnerLayout`
                 app ``single`` / ``ddp`` / ``deepspeed_zero0``  (:class:`ReplicatedView`)
``ddp_owner``    DDP with ``sharding="owner"``; app              :class:`OwnerSharding`
                 ``ddp_owner`` (ZeRO-1; ZeRO-2 with
                 ``reduce_gradients=True``)
``fsdp2``        FSDP2 / HSDP DTensor parameters (default);      :class:`Fsdp2Local`
                 app ``fsdp2`` / ``hsdp``
``fsdp2_owner``  FSDP2 / HSDP with ``sharding="owner"``          :class:`Fsdp2Owner`
``fsdp1``        ``sharding=Fsdp1Sharding(fsdp_model)``          :class:`Fsdp1Sharding`
                 (``use_orig_params=True``)
``zero``         DeepSpeed ZeRO 1-3 (``coap_dist.integrations    ``OwnerLayout`` over the
                 .deepspeed``); app ``deepspeed_zero1..3``       DeepSpeed views
===============  ==============================================  ===========================

Every layout but ``fsdp2`` runs the owner protocol (:mod:`coap_dist.distributed.owner`) over a
fragment view (:mod:`coap_dist.distributed.views`), with checkpoint serving in
:mod:`coap_dist.distributed.serving`. :mod:`coap_dist.distributed.placement` plans where
state lives (pure, shared with the memory estimator); :mod:`coap_dist.distributed.comm`
counts every collective; :mod:`coap_dist.distributed.support` declares what each supports.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.distributed.tensor import DTensor

from coap_dist.distributed.fsdp1 import Fsdp1Sharding
from coap_dist.distributed.fsdp2 import Fsdp2Local, Fsdp2Owner
from coap_dist.distributed.owner import OwnerLayout, OwnerSharding
from coap_dist.distributed.views import FragmentView, ReplicatedView
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
    "FragmentView",
    "Fsdp1Sharding",
    "Fsdp2Local",
    "Fsdp2Owner",
    "OwnerLayout",
    "OwnerSharding",
    "ReplicatedView",
    "resolve",
]
