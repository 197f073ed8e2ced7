"""FSDP1 (``use_orig_params=True``) with Fsdp1Sharding, and torch's ZeroRedundancyOptimizer
and fairscale's OSS wrapping COAPAdamW, on 2 and 3 gloo processes, against single-process
COAPAdamW fed the same averaged gradients over two full refresh cycles (fragments starting
and ending mid-row; empty fragments on 3 ranks): FSDP1 within 1e-5 (updates applied to
fragments by rectangle), the wrappers bitwise. An optimizer built before FSDP1 wrapping
fails at its first step, one built after without the layout at construction, both with the
advice; torch's get_optimizer_state_dict on the FSDP1 model is refused naming the route that
works, whose consolidated state equals the single-process state."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.optim import ZeroRedundancyOptimizer

import coap_dist
from coap_dist.distributed import Fsdp1Sharding
from coap_dist.distributed.routes import bound_bytes, plain_step_traffic
from coap_dist.distributed.trace import count_steps
from tests.dist_harness import run_workers

KW = dict(lr=1e-2, weight_decay=0.1, rank=3, update_interval=2, reproject_factor=2, scale=0.5)
STEPS = 9


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    # 7x5 = 35 elements etc.: flat shard boundaries fall mid-row
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 4))


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(100 * step + rank))


def _fsdp1(rank: int, world: int) -> None:
    # Built before wrapping (FSDP1 requires after): fails at the first step with the advice.
    early = _model()
    early_opt = coap_dist.COAPAdamW(coap_dist.param_groups(early), **KW)
    early_fsdp = FSDP(early, use_orig_params=True, device_id=torch.device("cpu"))
    early_fsdp(_batch(rank, 0)).square().mean().backward()
    with pytest.raises(ValueError, match=r"FSDP1 requires the optimizer to be built AFTER"):
        early_opt.step()
    fsdp = FSDP(_model(), use_orig_params=True, device_id=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"sharding=Fsdp1Sharding\(fsdp_model\)"):
        coap_dist.COAPAdamW(coap_dist.param_groups(fsdp), **KW)  # after wrapping, no layout
    ref_model = _model()
    ref = coap_dist.COAPAdamW(coap_dist.param_groups(ref_model), **KW)
    lay = Fsdp1Sharding(fsdp)
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(fsdp), **KW, sharding=lay)
    records = count_steps(opt)
    frag_sizes = [p.numel() for p in fsdp.parameters()]
    full_sizes = [p.numel() for p in ref_model.parameters()]
    assert sum(frag_sizes) < sum(full_sizes)  # really sharded
    for step in range(STEPS):
        fsdp(_batch(rank, step)).square().mean().backward()
        with FSDP.summon_full_params(fsdp, with_grads=True):
            for p, q in zip(fsdp.parameters(), ref_model.parameters(), strict=True):
                q.grad = p.grad.detach().clone().view_as(q)
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        with FSDP.summon_full_params(fsdp):
            for i, (p, q) in enumerate(zip(fsdp.parameters(), ref_model.parameters(), strict=True)):
                diff = float((p.detach().view_as(q) - q.detach()).abs().max())
                assert diff < 1e-5, f"step {step} param {i}: {diff}"
    # Plain steps (k = 1, 3, 5, 7): the calls and bytes the plan predicts, under the bound.
    dtypes = [lay.view.dtype(i) for i in range(len(opt.specs))]
    predicted = plain_step_traffic(lay._entries, world, dtypes, reduced=True, solo=False)[rank]
    for rec in records[1::2]:
        assert rec.total_calls == predicted.calls <= 3 and rec.devices <= {"cpu"}, rec.calls
        assert (rec.sent, rec.received) == (predicted.sent, predicted.received)
        assert max(rec.sent, rec.received) <= bound_bytes(lay._entries, world, rank, dtypes)
    assert opt.metrics()["optim/refreshes"] == 3 * 5  # k = 0, 2, 4, 6, 8
    # torch's state-dict API on an FSDP1 model would hand COAP's state to
    # FSDP.optim_state_dict (AdamW-shaped state only): refused on every rank alike, before
    # any collective, naming the route that works (it used to gather, then fail in torch).
    saves = [
        lambda: get_optimizer_state_dict(fsdp, opt, options=StateDictOptions(full_state_dict=True)),
        lambda: get_optimizer_state_dict(fsdp, opt),
        lambda: FSDP.optim_state_dict(fsdp, opt),
        lambda: FSDP.full_optim_state_dict(fsdp, opt),
    ]
    for save in saves:
        with pytest.raises(RuntimeError, match=r"FSDP\.optim_state_dict.*consolidate_state_dict"):
            save()
    # The whole state, consolidated on rank 0, is the single-process state.
    opt.consolidate_state_dict(to=0)
    with pytest.raises(RuntimeError, match=r"FSDP\.optim_state_dict"):
        FSDP.optim_state_dict(fsdp, opt)  # also with the whole state at hand on rank 0
    if rank == 0:
        sd = opt.state_dict()
        for k, st in ref.state_dict()["state"].items():
            for key, val in st.items():
                torch.testing.assert_close(sd["state"][k][key], val, atol=1e-4, rtol=1e-4)
    mine = torch.tensor([opt.state_bytes()])
    dist.all_reduce(mine)
    assert int(mine) == ref.state_bytes()


def _train_wrapped(rank: int, make: Any, what: str) -> tuple[nn.Module, Any]:
    """DDP + an optimizer wrapper around COAPAdamW vs 1-process COAPAdamW, bitwise per step."""
    model, ref_model = _model(), _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = make(model.parameters())
    ref = coap_dist.COAPAdamW(ref_model.parameters(), **KW)
    for step in range(STEPS):
        ddp(_batch(rank, step)).square().mean().backward()
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(p, q), f"{what} step {step}"
    return model, opt


def _zero_redundancy(rank: int, world: int) -> None:
    _, opt = _train_wrapped(
        rank,
        lambda ps: ZeroRedundancyOptimizer(ps, optimizer_class=coap_dist.COAPAdamW, **KW),
        "ZeroRedundancyOptimizer",
    )
    local = opt.optim
    assert isinstance(local, coap_dist.COAPAdamW)
    matrices = [p for g in local.param_groups for p in g["params"] if p.ndim == 2]
    assert local.metrics()["optim/refreshes"] == 5 * len(matrices)


def _fairscale_oss(rank: int, world: int) -> None:
    from fairscale.optim import OSS

    model, opt = _train_wrapped(
        rank, lambda ps: OSS(ps, optim=coap_dist.COAPAdamW, **KW), "fairscale OSS"
    )
    assert isinstance(opt.optim, coap_dist.COAPAdamW)
    opt.consolidate_state_dict(recipient_rank=0)
    if rank == 0:
        sd = opt.state_dict()
        assert len(sd["state"]) == len(list(model.parameters()))


def _worker(rank: int, world: int) -> None:
    _fsdp1(rank, world)
    _zero_redundancy(rank, world)
    _fairscale_oss(rank, world)


@pytest.mark.distributed
def test_fsdp1_and_zero_redundancy_2_and_3_ranks() -> None:
    run_workers(_worker, 2)
    run_workers(_worker, 3)
