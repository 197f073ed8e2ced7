"""FSDP1 with ``use_orig_params=True``: the owner protocol on FSDP1's flat fragments.

FSDP1 shards a flat concatenation of parameters, so each original parameter appears as a 1-D
fragment of its flattened tensor that may start and end mid-row (or be empty). The fragment
map comes from each handle's ``flat_param._shard_param_infos`` (every rank's, gathered once
at bind); everything else is :class:`~coap_dist.distributed.owner.OwnerLayout`.

FSDP1 requires the optimizer to be built after wrapping, with this layout::

    fsdp = FSDP(model, use_orig_params=True)
    opt = COAPAdamW(fsdp.parameters(), ..., sharding=Fsdp1Sharding(fsdp))

(An optimizer built before wrapping fails at its first step with that advice.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from coap_dist.distributed.comm import Comm
from coap_dist.distributed.owner import OwnerLayout
from coap_dist.distributed.placement import Range
from coap_dist.distributed.views import FragmentView


class Fsdp1View(FragmentView):
    """FSDP1 ``use_orig_params=True`` fragments of the wrapped model's parameters."""

    name = "fsdp1"

    def __init__(self, fsdp_model: nn.Module, process_group: dist.ProcessGroup | None) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        self.group = process_group
        self._local: dict[Tensor, tuple[tuple[int, ...], int, int]] = {}
        for module in FSDP.fsdp_modules(fsdp_model):
            handle = module._handle
            if handle is None:
                continue
            if not handle._use_orig_params:
                raise ValueError("Fsdp1Sharding needs FSDP(..., use_orig_params=True)")
            flat = handle.flat_param
            assert flat._params is not None  # set whenever use_orig_params=True
            for p, shape, info in zip(
                flat._params, flat._shapes, flat._shard_param_infos, strict=True
            ):
                if info.in_shard:
                    first, last = info.intra_param_start_idx, info.intra_param_end_idx
                    assert first is not None and last is not None  # set for in-shard params
                    start, stop = first, last + 1
                else:
                    start = stop = 0
                self._local[p] = (tuple(shape), start, stop)
        self._params: list[Tensor] = []

    def attach(self, current: list[list[Tensor]], built: list[list[Tensor | None]]) -> list[Tensor]:
        flat = [t for g in current for t in g]
        missing = [i for i, p in enumerate(flat) if p not in self._local]
        if missing:
            raise ValueError(
                f"Fsdp1Sharding: optimizer parameters {missing} are not sharded by the model "
                "this layout was built for; pass the FSDP-wrapped model's parameters"
            )
        self._params = flat
        self.remember(current, current)  # type: ignore[arg-type]
        return flat

    def device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def global_shape(self, index: int) -> tuple[int, ...]:
        return self._local[self._params[index]][0]

    def dtype(self, index: int) -> torch.dtype:
        return self._params[index].dtype

    def fragments(self, comm: Comm) -> list[list[Range] | None]:
        mine = [self._local[p][1:] for p in self._params]
        every = comm.all_gather_objects(mine)
        return [[every[r][i] for r in range(comm.world)] for i in range(len(self._params))]  # type: ignore[index]

    def local(self, index: int) -> Tensor | None:
        _, start, stop = self._local[self._params[index]]
        return self._params[index] if stop > start else None

    def grad(self, index: int) -> Tensor | None:
        _, start, stop = self._local[self._params[index]]
        return self._params[index].grad if stop > start else None


class Fsdp1Sharding(OwnerLayout):
    """The owner layout for a model wrapped by FSDP1 with ``use_orig_params=True``."""

    def __init__(
        self,
        fsdp_model: nn.Module,
        process_group: dist.ProcessGroup | None = None,
        *,
        split: bool = True,
    ) -> None:
        super().__init__(Fsdp1View(fsdp_model, process_group), split=split)
