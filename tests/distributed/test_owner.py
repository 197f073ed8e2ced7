"""The owner protocol under DDP (``sharding="owner"``, gloo, 2 then 3 processes, then 1).

One process group per world size checks, over two full refresh cycles, against one process
fed the same gradients:

* the optimizer built BEFORE ``DistributedDataParallel`` wraps the model (late binding);
* whole matrices and AdamW pieces bitwise, matrices split over a team within 1e-5 (both kinds
  exist at 2 and at 3 ranks, left and right projections);
* the collectives counted from the dispatcher: the same number per plain step at 2 and 3
  ranks, every tensor on the parameters' device, bytes per rank exactly what the layout's own
  plan predicts (``routes.plain_step_traffic``) and under the issue's bound;
* state per rank: the ranks partition the single-process state; the largest holds at most
  1.15 x total / N plus one matrix's state;
* checkpoints: ``state_dict()`` on one rank raises at once without a collective; after
  ``consolidate_state_dict(to=0)`` rank 0 alone saves the single-process state, which resumes
  at another world size (2 -> 3, 3 -> 1 process); torch's full-state gather
  (``get_optimizer_state_dict(..., full_state_dict=True)``) returns that same state;
* ZeRO-2 (``reduce_gradients=True``, no DDP) with a parameter missing its gradient on rank 0
  and a NaN on rank 1 only (skipped on every rank); COAPAdafactor with split matrices (two
  rounds of team sums per step); ranks built with other hyperparameters fail at bind;
* ``refresh="adaptive"``: the same decisions on every rank and as one process;
  ``rank="auto"``: the same ranks on every DDP replica, and under the owner layout the
  ranks, weights and state bytes of one process, resumed from the consolidated state;
* DDP replicas bitwise equal when a matrix's update travels as rectangles of U = D P;
* ``state_bits=8`` with a Tucker convolution, replicated and owner-sharded: one process's
  weights within 1e-5.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

import coap_dist
from coap_dist.distributed import OwnerSharding
from coap_dist.distributed.routes import bound_bytes, plain_step_traffic
from coap_dist.distributed.trace import NoCollectives, count_steps
from coap_dist.optim.spec import nbytes, state_shapes
from tests.dist_harness import run_workers
from tests.nets import ConvNet

KW = dict(lr=1e-2, weight_decay=0.1, rank=4, update_interval=2, reproject_factor=2, scale=0.5)
STEPS, SAVE_AT = 10, 6  # refreshes at k = 0, 2, 4 (recalibration), 6, 8: two cycles
TOL = 1e-5


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 96x24 (right), 32x96 (left), 20x32 (left): at 2 and 3 ranks some stay whole, some split
    return nn.Sequential(
        nn.Linear(24, 96),
        nn.Tanh(),
        nn.Linear(96, 32),
        nn.Tanh(),
        nn.Linear(32, 20),
        nn.LayerNorm(20),
    )


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(8, 24, generator=torch.Generator().manual_seed(1000 * step + rank))


def _exact(t: torch.Tensor) -> torch.Tensor:
    """Round to multiples of 2^-16 so that sums over ranks are exact in any order."""
    return torch.round(t * 65536) / 65536


def _check_close(
    opt: coap_dist.COAPAdamW, model: nn.Module, ref_model: nn.Module, what: str
) -> None:
    lay = opt.layout
    # Whole pieces are bitwise the single-process run; split ones agree to rounding (split
    # matrices sum over ranks; split AdamW pieces go through torch's fused CPU kernel,
    # whose scalar tail of the last < 8 elements of a piece rounds differently).
    exact = {id(p) for i, p in enumerate(lay.params) if lay.placement.whole(i)}
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        if id(p) in exact:
            assert torch.equal(p, q), f"{what}: {name} differs from one process"
        else:
            diff = float((p - q).abs().max())
            assert diff < TOL, f"{what}: split {name} differs by {diff}"


def _lockstep(
    ddp: nn.Module,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    ref_model: nn.Module,
    ref: torch.optim.Optimizer,
    rank: int,
    step: int,
) -> None:
    """One DDP step of ``opt`` and one step of the one-process ``ref`` on the same (averaged)
    gradients."""
    ddp(_batch(rank, step)).square().mean().backward()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    opt.zero_grad()
    ref.zero_grad()


def _worker(rank: int, world: int, tmp: str) -> None:
    model = _model()
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(model, **KW), **KW, sharding="owner")
    ddp = nn.parallel.DistributedDataParallel(model)  # wrapped after the optimizer was built
    ref_model = _model()
    ref = coap_dist.COAPAdamW(coap_dist.param_groups(ref_model, **KW), **KW)
    records = count_steps(opt)
    for step in range(STEPS):
        _lockstep(ddp, model, opt, ref_model, ref, rank, step)
        _check_close(opt, model, ref_model, f"step {step}")
        if step == SAVE_AT - 1:
            _checkpoint(rank, world, opt, ref, tmp)
            _torch_full_state(rank, world, model, opt, tmp)
    lay = opt.layout
    split = [
        i for i, s in enumerate(opt.specs) if s.kind == "matrix" and not lay.placement.whole(i)
    ]
    whole = [i for i, s in enumerate(opt.specs) if s.kind == "matrix" and lay.placement.whole(i)]
    assert split, f"{world} ranks: no matrix is split (the test needs a team)"
    assert whole or world == 3, f"{world} ranks: no matrix is whole"
    sides = {opt.specs[i].side for i in split}
    if world == 3:
        assert sides == {"right", "left"}, sides
    m = opt.metrics()
    assert m["optim/refreshes"] == 5 * 3 == ref.metrics()["optim/refreshes"]
    _check_traffic(rank, world, opt, records, tmp)
    _check_state_bytes(world, opt, ref)
    _resume(rank, world, tmp)
    _zero2(rank, world)
    _adafactor(rank, world)
    _mismatch(rank)
    _interrupted(rank, world)
    _stagger(rank, world)
    _adaptive(rank, world)
    _auto_rank(rank, world)
    _replicas_bitwise(rank, world)
    _eight_bit_tucker(rank, world)
    _odd_bytes(rank, world)


def _odd_bytes(rank: int, world: int) -> None:
    """Consolidation packs each rank's state tensors back to back: 8-bit moments of odd
    length (4,099 codes) and bf16 projectors of odd element count put the tensors after
    them at offsets their dtype cannot view. Gathered on every rank (``to=None``): one
    process's state, bitwise."""
    torch.manual_seed(0)
    cases = [
        (dict(lr=1e-2, state_bits=8), [torch.randn(4099), torch.randn(8)] * 2),
        (dict(lr=1e-2, rank=1), [torch.randn(7, 7, dtype=torch.bfloat16) for _ in range(4)]),
    ]
    for kw, values in cases:
        ps = [nn.Parameter(v.clone()) for v in values]
        qs = [nn.Parameter(v.clone()) for v in values]
        opt = coap_dist.COAPAdamW(ps, **kw, sharding="owner")
        ref = coap_dist.COAPAdamW(qs, **kw)
        for step in range(2):
            for p, q in zip(ps, qs, strict=True):
                g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
                p.grad, q.grad = g.to(p.dtype), g.to(q.dtype)
            opt.step()
            ref.step()
        opt.consolidate_state_dict(to=None)
        got, want = opt.state_dict()["state"], ref.state_dict()["state"]
        for i, st in want.items():
            for key, val in st.items():
                assert torch.equal(got[i][key], val), (kw, i, key)


def _eight_bit_tucker(rank: int, world: int) -> None:
    """state_bits=8 with a Tucker convolution, replicated (DDP) and owner-sharded: the
    weights of one process within TOL over two refresh cycles, 8-bit moments and the
    convolution's factors each on exactly one rank under the owner layout."""
    kw = dict(KW, rank=8, state_bits=8, rank_ratio_cnn=16.0)
    for sharding in (None, "owner"):
        torch.manual_seed(0)
        model, ref_model = ConvNet(20), ConvNet(20)
        ref_model.load_state_dict(model.state_dict())
        opt = coap_dist.COAPAdamW(model.parameters(), **kw, sharding=sharding)
        ref = coap_dist.COAPAdamW(ref_model.parameters(), **kw)
        ddp = nn.parallel.DistributedDataParallel(model)
        for step in range(STEPS):
            _lockstep(ddp, model, opt, ref_model, ref, rank, step)
            for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
                assert float((p - q).abs().max()) < TOL, f"8-bit + Tucker {sharding} {step}"
        held = torch.tensor(
            [
                sum("exp_avg_q" in st for st in opt.state.values()),
                sum("factor0" in st for st in opt.state.values()),
            ]
        )
        dist.all_reduce(held)
        copies = 1 if sharding == "owner" else world
        assert held.tolist() == [2 * copies, copies], (sharding, held.tolist())


def _replicas_bitwise(rank: int, world: int) -> None:
    """A whole matrix whose rank is close to its size sends its update rectangles U = D P
    (cheaper than D and P): the owner applies that same U, so every DDP replica's weights
    stay bitwise equal."""
    torch.manual_seed(0)
    model = nn.Linear(24, 20)
    kw = dict(KW, rank=16)
    whole = OwnerSharding(split=False)
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(model, **kw), **kw, sharding=whole)
    ddp = nn.parallel.DistributedDataParallel(model)
    for step in range(4):
        ddp(_batch(rank, step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    sends_u = torch.tensor([any(r.kind == "update" for rs in opt.layout._s_out for r in rs)])
    dist.all_reduce(sends_u)
    assert int(sends_u) > 0, "no update rectangles: the check needs them"
    every: list[Any] = [None] * world
    dist.all_gather_object(every, [p.detach().clone() for p in model.parameters()])
    for q in every:
        assert all(torch.equal(a, b) for a, b in zip(q, every[0], strict=True)), "replicas differ"


def _check_traffic(
    rank: int, world: int, opt: coap_dist.COAPAdamW, records: list, tmp: str
) -> None:
    """Plain steps (k = 1, 3, 5, 7, 9): calls, devices and bytes of the real collectives."""
    lay = opt.layout
    plain = [records[k] for k in (1, 3, 5, 7, 9)]
    dtypes = [lay.view.dtype(i) for i in range(len(opt.specs))]
    predicted = plain_step_traffic(lay._entries, world, dtypes, reduced=True, solo=False)[rank]
    for rec in plain:
        assert rec.devices <= {"cpu"}, rec.devices  # the parameters' device
        assert rec.total_calls == predicted.calls == 3, rec.calls
        assert (rec.sent, rec.received) == (predicted.sent, predicted.received)
        assert max(rec.sent, rec.received) <= bound_bytes(lay._entries, world, rank, dtypes)
        assert rec.calls.get("alltoall_base_") == 2 and rec.calls.get("allreduce_") == 1
    refresh = records[4]  # a recalibration: split matrices add two rounds
    assert refresh.total_calls == 5, refresh.calls
    assert opt.metrics()["optim/comm_calls_per_step"] == 3.0  # the layout's own counter agrees
    if rank == 0:
        with open(os.path.join(tmp, f"calls_w{world}.json"), "w") as f:
            json.dump({"plain": plain[0].total_calls, "sent": plain[0].sent}, f)


def _check_state_bytes(world: int, opt: coap_dist.COAPAdamW, ref: coap_dist.COAPAdamW) -> None:
    mine = torch.tensor([opt.state_bytes()], dtype=torch.int64)
    total, most = mine.clone(), mine.clone()
    dist.all_reduce(total)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    assert int(total) == ref.state_bytes(), "the ranks partition the single-process state"
    assert opt.layout.placement.state_bytes(opt.specs)[dist.get_rank()] == opt.state_bytes()
    largest = max(nbytes(state_shapes(s)) for s in opt.specs if s.kind == "matrix")
    assert int(most) <= 1.15 * int(total) / world + largest, (int(most), int(total))


def _checkpoint(
    rank: int, world: int, opt: coap_dist.COAPAdamW, ref: coap_dist.COAPAdamW, tmp: str
) -> None:
    """The common rank-0 line: refused at once (no collective entered) until the state is
    consolidated; then rank 0 alone saves the single-process state dict."""
    if rank == 0:
        with NoCollectives(), pytest.raises(RuntimeError, match=r"consolidate_state_dict\(to=0\)"):
            opt.state_dict()
    dist.barrier()
    opt.consolidate_state_dict(to=0)
    if rank != 0:
        return
    with NoCollectives():
        sd = opt.state_dict()
    ref_sd = ref.state_dict()
    assert set(sd["state"]) == set(ref_sd["state"])
    lay = opt.layout
    for i, st in ref_sd["state"].items():
        for key, val in st.items():
            got = sd["state"][i][key]
            if lay.placement.whole(i) or key == "step":
                assert torch.equal(got, val), (i, key)
            else:
                torch.testing.assert_close(got, val, atol=1e-4, rtol=1e-4, msg=f"{i} {key}")
    torch.save(sd, os.path.join(tmp, f"owner_w{world}.pt"))


def _torch_full_state(
    rank: int, world: int, model: nn.Module, opt: coap_dist.COAPAdamW, tmp: str
) -> None:
    """torch's full-state gather (``get_optimizer_state_dict(..., full_state_dict=True)`` on
    every rank) of the DDP owner layout: COAP gathers its whole state for it, the same
    state (bitwise) as ``consolidate_state_dict``'s, even right after that call left it on
    rank 0 alone (every rank enters the same collectives); with ``cpu_offload`` only rank 0
    keeps it, without it every rank does."""
    fqn = {id(p): n for n, p in model.named_parameters()}
    names = [fqn[id(p)] for p in opt.layout.params]
    for cpu in (True, False):
        options = StateDictOptions(full_state_dict=True, cpu_offload=cpu)
        full = get_optimizer_state_dict(model, opt, options=options)
        if rank != 0 and cpu:
            assert not full, "cpu_offload: torch keeps rank 0's dict only"
            continue
        saved = torch.load(os.path.join(tmp, f"owner_w{world}.pt"), weights_only=True)
        assert len(full["state"]) == len(saved["state"])
        for i, st in saved["state"].items():
            for key, val in st.items():
                assert torch.equal(full["state"][names[i]][key].cpu(), val), (names[i], key)


def _replay(model: nn.Module, step: int, world: int) -> None:
    """The DDP gradient of a step, in one process."""
    total = None
    params = list(model.parameters())
    for r in range(world):
        model.zero_grad()
        model(_batch(r, step)).square().mean().backward()
        grads = [p.grad.clone() for p in params]
        total = grads if total is None else [t + g for t, g in zip(total, grads, strict=True)]
    for p, t in zip(params, total, strict=True):
        p.grad = t / world


def _resume(rank: int, world: int, tmp: str) -> None:
    """Load the other world size's step-6 checkpoint (2 -> 3; 3 -> 2 when run first) into
    a sharded and a one-process optimizer; four more steps agree."""
    dist.barrier()
    src = 2 if world == 3 else 3
    path = os.path.join(tmp, f"owner_w{src}.pt")
    if not os.path.exists(path):
        path = os.path.join(tmp, f"owner_w{world}.pt")
        src = world
    sd = torch.load(path, weights_only=True)
    base = _model()
    base_opt = coap_dist.COAPAdamW(coap_dist.param_groups(base, **KW), **KW)
    for step in range(SAVE_AT):
        _replay(base, step, src)
        base_opt.step()
    a, b = _model(), _model()
    a.load_state_dict(base.state_dict())
    b.load_state_dict(base.state_dict())
    sharded = coap_dist.COAPAdamW(coap_dist.param_groups(a, **KW), **KW, sharding="owner")
    single = coap_dist.COAPAdamW(coap_dist.param_groups(b, **KW), **KW)
    sharded.load_state_dict(sd)  # before the first step: kept until the layout is bound
    single.load_state_dict(sd)
    for step in range(SAVE_AT, STEPS):
        _replay(a, step, world)
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            q.grad = p.grad.clone()  # the same gradients (split matrices differ by rounding)
        sharded.step()
        single.step()
        _check_close(sharded, a, b, f"resume {src} -> {world} ranks, step {step}")


def _zero2(rank: int, world: int) -> None:
    """ZeRO-2: each rank's own gradients, summed by the optimizer; rank 0 has none for the
    LayerNorm bias; a NaN on rank 1 only skips that matrix's step everywhere."""
    model, ref_model = _model(), _model()
    lay = OwnerSharding(reduce_gradients=True)
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(model, **KW), **KW, sharding=lay)
    ref = coap_dist.COAPAdamW(coap_dist.param_groups(ref_model, **KW), **KW)
    frozen = list(model.parameters())[-1]
    nan_step, nan_param = 4, model[2].weight
    for step in range(STEPS):
        model.zero_grad()
        model(_batch(rank, step)).square().mean().backward()
        for p in model.parameters():
            p.grad = _exact(p.grad)
        if rank == 0:
            frozen.grad = None
        if step == nan_step and rank == 1:
            nan_param.grad[0, 0] = float("nan")
        # The reference gets the mean of the same per-rank gradients (a missing one counts
        # as zero), summed exactly (multiples of 2^-16) by the test itself.
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            dist.all_reduce(g)
            q.grad = g / world
        opt.step()
        ref.step()
        _check_close(opt, model, ref_model, f"ZeRO-2 step {step}")
    assert opt.metrics()["optim/nonfinite_skips"] == 1 == ref.metrics()["optim/nonfinite_skips"]


def _adafactor(rank: int, world: int) -> None:
    """COAPAdafactor: a split matrix's column statistics and RMS are summed over its team."""
    kw = dict(KW, betas=(0.9, 0.999))
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = coap_dist.COAPAdafactor(coap_dist.param_groups(model, **KW), **kw, sharding="owner")
    ref_model = _model()
    ref = coap_dist.COAPAdafactor(coap_dist.param_groups(ref_model, **KW), **kw)
    records = count_steps(opt)
    for step in range(6):
        _lockstep(ddp, model, opt, ref_model, ref, rank, step)
        _check_close(opt, model, ref_model, f"Adafactor step {step}")
    assert records[1].calls.get("allreduce_") == 3  # flags + column statistics + RMS


def _mismatch(rank: int) -> None:
    model = _model()
    kw = dict(KW, rank=4 if rank == 0 else 5)
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(model, **kw), **kw, sharding="owner")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"`param_groups\[0\]\.rank` differs across ranks"):
        opt.step()
    # Groups added after sharded state exists: refused at once, with what to do instead.
    model = _model()
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(model, **KW), **KW, sharding="owner")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    extra = nn.Linear(4, 4)
    extra.weight.grad, extra.bias.grad = torch.ones(4, 4), torch.ones(4)
    with pytest.raises(RuntimeError, match=r"add_param_group after the first step is supported"):
        opt.add_param_group({"params": list(extra.parameters())})
    assert len(opt.param_groups) == len(opt.groups) == 2  # not added; the optimizer steps on
    opt.step()
    with pytest.raises(RuntimeError, match=r"cannot copy or pickle an optimizer bound to"):
        copy.deepcopy(opt)


def _interrupted(rank: int, world: int) -> None:
    """A step whose gradient exchange fails (here on every rank, before its collective)
    changes nothing: ``step()`` again on the same gradients keeps the run the one-process
    run. A failure after the writes began (in the weight write) makes ``step()``,
    ``state_dict()`` and ``consolidate_state_dict()`` refuse, naming it."""
    model = _model()
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(model, **KW), **KW, sharding="owner")
    ddp = nn.parallel.DistributedDataParallel(model)
    ref_model = _model()
    ref = coap_dist.COAPAdamW(coap_dist.param_groups(ref_model, **KW), **KW)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("collective failed")

    for step in range(4):
        if step not in (2, 3):
            _lockstep(ddp, model, opt, ref_model, ref, rank, step)
            continue
        lay = opt.layout
        target = lay.comm if step == 2 else lay
        name = "exchange" if step == 2 else "scatter"
        ddp(_batch(rank, step)).square().mean().backward()
        setattr(target, name, fail)  # shadows the method on this instance
        try:
            with pytest.raises(RuntimeError, match="collective failed"):
                opt.step()
        finally:
            delattr(target, name)
        if step == 3:
            for call in (opt.step, opt.state_dict, opt.consolidate_state_dict):
                with pytest.raises(RuntimeError, match=r"stopped part-way \(RuntimeError: col"):
                    call()
            break
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt.step()  # the retry
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        _check_close(opt, model, ref_model, f"step {step} retried after a failed exchange")


def _stagger(rank: int, world: int) -> None:
    """stagger=True under the owner layout keeps one process's schedule (the same offsets on
    every rank, j T_u // J over all J matrices) and every matrix refreshes once per T_u."""
    model = _model()
    kw = dict(KW, update_interval=4, stagger=True)
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(model, **kw), **kw, sharding="owner")
    alone = _model()
    one = coap_dist.COAPAdamW(coap_dist.param_groups(alone, **kw), **kw)
    for p in [*model.parameters(), *alone.parameters()]:
        p.grad = torch.ones_like(p)
    opt.step()
    one.step()
    plan = [(s.index, s.offset) for s in opt.specs if s.lowrank]
    every: list[Any] = [None] * world
    dist.all_gather_object(every, plan)
    assert all(p == plan for p in every), "the stagger plan differs across ranks"
    single = [(s.index, s.offset) for s in one.specs if s.lowrank]
    assert plan == single, (plan, single)
    assert [off for _, off in plan] == [(j * 4) // len(plan) for j in range(len(plan))]
    before = opt.metrics()["optim/refreshes"]
    for _ in range(4):
        opt.step()
    assert opt.metrics()["optim/refreshes"] - before == len(plan)  # each once per T_u


def _adaptive(rank: int, world: int) -> None:
    """refresh="adaptive" under the owner layout: every rank takes the same decisions, the
    same as one process (residuals of split matrices summed over their team), and the
    consolidated checkpoint carries every matrix's schedule record."""
    kw = dict(KW, refresh="adaptive", refresh_threshold=0.05)
    model = _model()
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(model, **kw), **kw, sharding="owner")
    ddp = nn.parallel.DistributedDataParallel(model)
    ref_model = _model()
    ref = coap_dist.COAPAdamW(coap_dist.param_groups(ref_model, **kw), **kw)
    for step in range(16):
        _lockstep(ddp, model, opt, ref_model, ref, rank, step)
    mine = {i: st.as_list() for i, st in opt._adaptive.items()}
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    assert all(r == mine for r in every), "adaptive records differ across ranks"
    lay = opt.layout
    for i, st in opt._adaptive.items():
        one = ref._adaptive[i]
        assert (st.credit, st.last_svd) == (one.credit, one.last_svd), f"matrix {i}"
        exact = lay.placement.whole(i)
        for a, b in ((st.base, one.base), (st.last_rho, one.last_rho)):
            assert a == b if exact else abs(a - b) < 1e-5, f"matrix {i}: rho {a} vs {b}"
    keys = ("recalibrations", "projector_updates", "refresh_skips")
    m, m1 = opt.metrics(), ref.metrics()
    assert [m[f"optim/{k}"] for k in keys] == [m1[f"optim/{k}"] for k in keys]
    assert m["optim/refresh_skips"] + m["optim/projector_updates"] > 0
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        assert opt.state_dict()["coap_refresh"] == mine


def _auto_rank(rank: int, world: int) -> None:
    """rank="auto": DDP replicas (replicated state) choose the same ranks and keep the same
    weights. Under the owner layout (state sharded; matrices split over a team at 2 and 3
    ranks) every rank chooses at each SVD the ranks one process chooses from the same
    gradients, the ranks partition that process's state bytes, weights match it within
    TOL, and the consolidated state resumes in one process
    with the chosen ranks."""
    kw = dict(KW, rank="auto", rank_ratio=2)
    model = _model()
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(model, **kw), **kw)
    ddp = nn.parallel.DistributedDataParallel(model)
    for step in range(6):
        ddp(_batch(rank, step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    mine = (
        [s.rank for s in opt.specs if s.kind == "matrix"],
        [float(p.sum()) for p in model.parameters()],
    )
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    assert all(e == mine for e in every), f"replicas disagree: {every}"

    model = _model()
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(model, **kw), **kw, sharding="owner")
    ddp = nn.parallel.DistributedDataParallel(model)
    ref_model = _model()
    ref = coap_dist.COAPAdamW(coap_dist.param_groups(ref_model, **kw), **kw)
    fixed = [min(s.shape) // 2 for s in ref.specs if s.kind == "matrix"]
    chosen = set()
    for step in range(10):  # SVDs at k = 0, 4, 8
        _lockstep(ddp, model, opt, ref_model, ref, rank, step)
        ranks = [s.rank for s in opt.specs if s.kind == "matrix"]
        assert ranks == [s.rank for s in ref.specs if s.kind == "matrix"], f"step {step}"
        chosen.add(tuple(ranks))
        # (within TOL even for whole matrices: a rank raised past the point where the
        # update rectangles are cheaper than D and P sends U, which rounds unlike addmm)
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            assert float((p - q).abs().max()) < TOL, f"rank='auto' step {step}"
    assert any(r != tuple(fixed) for r in chosen), f"ranks never left {fixed}: {chosen}"
    lay = opt.layout
    split = [
        i for i, s in enumerate(opt.specs) if s.kind == "matrix" and not lay.placement.whole(i)
    ]
    assert split or world == 2, "3 ranks: no matrix is split (the test needs a team)"
    total = torch.tensor([opt.state_bytes()])
    dist.all_reduce(total)
    assert int(total) == ref.state_bytes(), (int(total), ref.state_bytes())
    opt.consolidate_state_dict(to=0)
    if rank != 0:
        return
    sd = opt.state_dict()
    assert sd["coap_ranks"] == ref.state_dict()["coap_ranks"]
    again_model = copy.deepcopy(ref_model)
    again = coap_dist.COAPAdamW(coap_dist.param_groups(again_model, **kw), **kw)
    again.load_state_dict(sd)
    ref_model(_batch(0, 10)).square().mean().backward()
    for p, q in zip(ref_model.parameters(), again_model.parameters(), strict=True):
        q.grad = p.grad.clone()
    ref.step()
    again.step()
    assert [s.rank for s in again.specs] == [s.rank for s in ref.specs]
    for p, q in zip(ref_model.parameters(), again_model.parameters(), strict=True):
        assert float((p - q).abs().max()) < TOL


@pytest.mark.distributed
def test_owner_sharding_2_then_3_ranks(tmp_path: os.PathLike[str]) -> None:
    tmp = str(tmp_path)
    run_workers(_worker, 2, tmp)
    run_workers(_worker, 3, tmp)
    calls = []
    for w in (2, 3):
        with open(os.path.join(tmp, f"calls_w{w}.json")) as f:
            calls.append(json.load(f)["plain"])
    assert calls[0] == calls[1], f"collectives per plain step grow with the world size: {calls}"
    # The 3-rank checkpoint loads into one process.
    model = _model()
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(model, **KW), **KW)
    opt.load_state_dict(torch.load(os.path.join(tmp, "owner_w3.pt"), weights_only=True))
    _replay(model, SAVE_AT, 3)
    opt.step()
    assert opt.state_bytes() > 0
    assert all(float(st["step"]) == SAVE_AT + 1 for st in opt.state.values())
