"""FSDP1 with ``use_orig_params=True``: COAP on whole matrices rebuilt from flat fragments.

FSDP1 shards a flat concatenation of parameters, so each original parameter appears as a 1-D
fragment of its flattened matrix that may start and end mid-row (or be empty). The fragment
map comes from each handle's ``flat_param._shard_param_infos``; everything else is
:class:`~coap_dist.distributed.fragments.FragmentOwnerSharding` (owners assemble, compute,
broadcast; bitwise equal to one process; 3x parameter bytes of traffic per step).

Usage: ``COAPAdamW(fsdp_model.parameters(), ..., sharding=Fsdp1Sharding(fsdp_model))``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from coap_dist.distributed.fragments import FragmentOwnerSharding


class Fsdp1Sharding(FragmentOwnerSharding):
    """Owner-sharded COAP for a model wrapped by FSDP1 with ``use_orig_params=True``."""

    name = "fsdp1_owner"

    def __init__(
        self, fsdp_model: nn.Module, process_group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__(process_group)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        for module in FSDP.fsdp_modules(fsdp_model):
            handle = module._handle
            if handle is None:
                continue
            if not handle._use_orig_params:
                raise ValueError("Fsdp1Sharding needs FSDP(..., use_orig_params=True)")
            flat = handle.flat_param
            for p, shape, info in zip(
                flat._params, flat._shapes, flat._shard_param_infos, strict=True
            ):
                if info.in_shard:
                    start, end = info.intra_param_start_idx, info.intra_param_end_idx + 1
                else:
                    start = end = 0
                self._frag[p] = (torch.Size(shape), start, end)
