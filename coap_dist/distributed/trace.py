"""Count the collectives an optimizer really issues, from the dispatcher (not from its own
counters): every ``torch.distributed`` collective reaches a ``c10d`` operator, which a
``TorchDispatchMode`` sees with its tensors. Bytes follow the per-rank convention of
:func:`coap_dist.distributed.comm.collective_bytes`.

    records = count_steps(opt)     # one StepRecord per opt.step() from now on
    ...
    print(records[-1].calls, records[-1].sent, records[-1].devices)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from coap_dist.distributed.comm import collective_bytes


def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


@dataclasses.dataclass
class StepRecord:
    """Collectives of one step: calls by c10d op, bytes sent and received by this rank, and
    the device types of every tensor handed to a collective."""

    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    sent: int = 0
    received: int = 0
    devices: set[str] = dataclasses.field(default_factory=set)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


class CollectiveCounter(TorchDispatchMode):
    """Records the c10d operators issued while active (see :func:`count_steps`)."""

    def __init__(self, world: int, rank: int) -> None:
        super().__init__()
        self.world, self.rank = world, rank
        self.record = StepRecord()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name
        if name.startswith("c10d::"):
            op = name.split("::", 1)[1]
            rec = self.record
            rec.calls[op] = rec.calls.get(op, 0) + 1
            for a in args:
                for t in a if isinstance(a, (list, tuple)) else [a]:
                    if isinstance(t, torch.Tensor):
                        rec.devices.add(t.device.type)
            if op == "allreduce_":
                moved = collective_bytes("all_reduce", self.world, _nbytes(args[0]))
                rec.sent += moved
                rec.received += moved
            elif op == "alltoall_base_":
                _, inp, group, out_splits, in_splits = args[:5]
                esz = inp.element_size()
                me = dist.ProcessGroup.unbox(group).rank()  # rank in the (sub-)group
                rec.sent += (sum(in_splits) - in_splits[me]) * esz
                rec.received += (sum(out_splits) - out_splits[me]) * esz
            elif op == "_allgather_base_":
                moved = collective_bytes("all_gather", self.world, _nbytes(args[1]))
                rec.sent += moved
                rec.received += moved
            elif op == "_reduce_scatter_base_":
                moved = collective_bytes("reduce_scatter", self.world, _nbytes(args[0]))
                rec.sent += moved
                rec.received += moved
            elif op in ("broadcast_", "reduce_"):  # the buffer crosses each rank once
                moved = _nbytes(args[0]) if self.world > 1 else 0
                rec.sent += moved
                rec.received += moved
        return func(*args, **(kwargs or {}))


def merged(records: list[StepRecord], calls_per_step: int) -> list[StepRecord]:
    """Records of optimizer steps made of several ``step()`` calls (DeepSpeed ZeRO 1-2
    calls it once per parameter group), summed."""
    out = []
    for k in range(0, len(records) - calls_per_step + 1, calls_per_step):
        total = StepRecord()
        for rec in records[k : k + calls_per_step]:
            for op, n in rec.calls.items():
                total.calls[op] = total.calls.get(op, 0) + n
            total.sent += rec.sent
            total.received += rec.received
            total.devices |= rec.devices
        out.append(total)
    return out


def count_steps(opt: torch.optim.Optimizer) -> list[StepRecord]:
    """Attach a counter to every ``opt.step()``; returns the list that grows by one record
    per step (the optimizer's own collectives only)."""
    records: list[StepRecord] = []
    world, rank = dist.get_world_size(), dist.get_rank()
    mode: list[CollectiveCounter] = []

    def pre(*_: Any) -> None:
        counter = CollectiveCounter(world, rank)
        counter.__enter__()
        mode.append(counter)

    def post(*_: Any) -> None:
        counter = mode.pop()
        counter.__exit__(None, None, None)
        records.append(counter.record)

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    return records


class NoCollectives(TorchDispatchMode):
    """Raises at once if any collective is issued (instead of hanging when the other ranks
    do not join): for calls that must be served by this rank alone."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func._schema.name.startswith("c10d::"):
            raise AssertionError(f"unexpected collective {func._schema.name}")
        return func(*args, **(kwargs or {}))
