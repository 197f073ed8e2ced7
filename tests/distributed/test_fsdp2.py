"""FSDP2 ``fully_shard`` (gloo): the LOCAL layout on 2 then 3 processes then 1, the owner
layout on 3, HSDP on a 2 x 2 mesh.

LOCAL is checked against one process with the same (default) side rule over two full refresh
cycles: weights within 2e-5 (the team refresh's Gram form and summation order are the only
differences; the 10 x 16 and 2 x 40 weights are left-projected, so their canonical rows are
the weight's COLUMNS, which the layout's all-to-all brings to the rank keeping them),
gradients averaged by FSDP2, every state tensor a ``Shard(0)`` DTensor of its global shape
(moments by canonical rows, the projector by ITS rows), refresh counts, a NaN gradient on one rank's shard at a refresh, an empty shard (2-row matrix on 3
ranks), per-rank state bytes (the ranks partition the one-process state; the largest holds at
most 1.15 x total / N plus one matrix's), the collectives counted from the dispatcher (three per
plain step at 2 and at 3 ranks: the flag all-reduce, one all-to-all of the projector shards
and the left matrices' gradient blocks, one all-gather of their directions; two more at a
refresh), the shard-aware variant only on request (``projection_side="right"``), and DCP checkpoints saved on 2 ranks, resumed on 2 (bitwise),
3 and 1; ``refresh="adaptive"`` on row shards (the same decisions on every rank, DCP resume
bitwise); ``rank="auto"``: refused by the row-shard layout, one process's ranks under
``sharding="owner"``. An optimizer built before ``fully_shard`` without anyone swapping the new parameters
in fails at its first step with the advice (accelerate and the HF Trainer swap them: see
tests/integrations/test_hf.py).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

import coap_dist
from coap_dist.distributed import placement
from coap_dist.distributed.placement import Placement, chunk_range
from coap_dist.distributed.routes import bound_bytes, geometries
from coap_dist.distributed.trace import NoCollectives, count_steps
from coap_dist.optim.spec import nbytes, state_shapes
from tests.dist_harness import run_workers

KW = dict(lr=1e-2, weight_decay=0.1, rank=4, update_interval=2, reproject_factor=2, scale=0.5)
STEPS, SAVE_AT, NAN_STEP = 10, 6, 4
GLOBAL_BATCH = 12
TOL = 2e-5


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 40), nn.LayerNorm(40), nn.Linear(40, 2)
    )


def _global_batch(step: int) -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 16, generator=torch.Generator().manual_seed(step))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def _shard(model: nn.Module, mesh: object) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _sharded(world: int, **kw: object) -> tuple[nn.Module, coap_dist.COAPAdamW]:
    model = _shard(_model(), init_device_mesh("cpu", (world,)))
    return model, coap_dist.COAPAdamW(model.parameters(), **KW, **kw)


def _local_batch(step: int, rank: int, world: int) -> torch.Tensor:
    per = GLOBAL_BATCH // world
    return _global_batch(step)[rank * per : (rank + 1) * per]


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    rank: int,
    world: int,
    ref: tuple[nn.Module, torch.optim.Optimizer] | None = None,
    exact: bool = False,
) -> None:
    for step in steps:
        _loss(model, _local_batch(step, rank, world)).backward()
        if ref is not None:
            ref_model, ref_opt = ref
            for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
                q.grad = p.grad.full_tensor()
            if step == 0:
                _loss(ref_model, _global_batch(step)).backward()  # accumulates: 2x the mean
                for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
                    torch.testing.assert_close(
                        q.grad, 2 * p.grad.full_tensor(), atol=1e-6, rtol=1e-5
                    )
                    q.grad = p.grad.full_tensor()  # FSDP2 averaged the gradients
        if step == NAN_STEP:
            local = model[2].weight.grad.to_local()
            if rank == world - 1 and local.shape[0] > 0:
                local[-1, 0] = float("nan")
        opt.step()
        opt.zero_grad()
        if ref is not None:
            ref_model, ref_opt = ref
            if step == NAN_STEP:
                ref_model[2].weight.grad[-1, 0] = float("nan")
            ref_opt.step()
            ref_opt.zero_grad()
            for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
                full = p.full_tensor()
                if exact:
                    assert torch.equal(full, q), f"step {step}: differs from 1-process"
                else:
                    diff = (full - q).abs().max().item()
                    assert diff < TOL, f"step {step}: differs from 1-process by {diff}"


def _check_state(model: nn.Module, opt: coap_dist.COAPAdamW, world: int) -> None:
    assert opt.layout.name == "fsdp2"
    matrices = sum(1 for s in opt.specs if s.kind == "matrix")
    # k = 0, 2, 4 (or 5 after the NaN), 6, 8
    assert opt.metrics()["optim/refreshes"] == 5 * matrices, opt.metrics()
    sd = opt.state_dict()  # DTensor state for DCP, built without communication
    index = {p: i for i, p in enumerate(opt.layout.params)}
    for layer in model:
        if not isinstance(layer, nn.Linear):
            continue
        w = layer.weight
        st = sd["state"][index[w]]
        m, n = w.shape
        r = min(4, m, n)
        a, b = (m, n) if m >= n else (n, m)  # canonical: the compressed dimension last
        assert isinstance(st["exp_avg"], DTensor) and st["exp_avg"].shape == (a, r)
        assert st["exp_avg"].placements == (Shard(0),)
        a0, a1 = chunk_range(a, world, dist.get_rank())
        assert st["exp_avg"].to_local().shape[0] == a1 - a0
        if m >= n:
            assert a1 - a0 == w.to_local().shape[0], "right side: the weight's own row shard"
        assert isinstance(st["projector"], DTensor) and st["projector"].shape == (r, b)
        assert st["projector"].placements == (Shard(0),), "P is split by its rows, not replicated"
        p0, p1 = chunk_range(r, world, dist.get_rank())
        assert st["projector"].to_local().shape == (p1 - p0, b)


def _check_collectives(records: list, opt: coap_dist.COAPAdamW, world: int) -> None:
    """Three collectives per plain step, two more at a refresh, whatever the world size; all
    on the parameters' device; bytes under the bound."""
    plain, refresh = records[1], records[2]
    assert plain.total_calls == 3, plain.calls
    assert plain.calls == {"allreduce_": 1, "alltoall_base_": 1, "_allgather_base_": 1}
    assert refresh.calls == {
        "allreduce_": 1,
        "alltoall_base_": 1,
        "_allgather_base_": 2,
        "_reduce_scatter_base_": 1,
    }
    assert plain.devices | refresh.devices <= {"cpu"}
    lay = opt.layout
    frags = []
    for p in lay.params:
        row = math.prod(p.shape[1:])
        frags.append(
            [
                (a * row, b * row)
                for a, b in (chunk_range(p.shape[0], world, q) for q in range(world))
            ]
        )
    pl = Placement(world, tuple(-1 for _ in lay.params), tuple(() for _ in lay.params))
    geos = geometries(opt.specs, pl, frags)
    bound = bound_bytes(geos, world, dist.get_rank(), [p.dtype for p in lay.params])
    assert max(plain.sent, plain.received) <= bound, (plain.sent, bound)


def _phase_save(rank: int, world: int, tmp: str) -> None:
    # Built before fully_shard and never told about the new parameters: a clear error.
    stale = _model()
    stale_opt = coap_dist.COAPAdamW(stale.parameters(), **KW)
    _shard(stale, init_device_mesh("cpu", (world,)))
    _loss(stale, _local_batch(0, rank, world)).backward()
    with pytest.raises(RuntimeError, match="built before fully_shard"):
        stale_opt.step()
    model, opt = _sharded(world)
    records = count_steps(opt)
    ref_model = _model()
    ref_opt = coap_dist.COAPAdamW(ref_model.parameters(), **KW)
    _train(model, opt, range(SAVE_AT), rank, world, (ref_model, ref_opt))
    assert [s.side for s in opt.specs if s.kind == "matrix"] == ["left", "right", "left"]
    _check_collectives(records, opt, world)
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=os.path.join(tmp, "ckpt"),
    )
    _train(model, opt, range(SAVE_AT, STEPS), rank, world, (ref_model, ref_opt))
    _check_state(model, opt, world)
    assert opt.metrics()["optim/nonfinite_skips"] == 1, "every rank skipped that matrix's step"
    mine = torch.tensor([opt.state_bytes()])
    total, most = mine.clone(), mine.clone()
    dist.all_reduce(total)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    assert int(total) == ref_opt.state_bytes(), "the ranks partition the one-process state"
    largest = max(nbytes(state_shapes(s)) for s in opt.specs if s.kind == "matrix")
    assert int(most) <= 1.15 * int(total) / world + largest
    final = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(final, os.path.join(tmp, "final.pt"))
    # Resume on the same world size: bitwise equal to the uninterrupted run.
    model2, opt2 = _sharded(world)
    _load(model2, opt2, tmp)
    _train(model2, opt2, range(SAVE_AT, STEPS), rank, world)
    for n, p in model2.named_parameters():
        assert torch.equal(p.full_tensor(), final[n]), f"same-size resume differs at {n}"
    _adaptive_dcp(rank, world, tmp)
    _variants(rank, world)


def _variants(rank: int, world: int) -> None:
    """The shard-aware variant only when asked for (``projection_side="right"``: every matrix
    right-projected, equal to one process asked the same), and COAP-Adafactor (two rounds
    of sums over the canonical rows) under the default side rule, both within TOL."""
    for cls, extra, sides in (
        (coap_dist.COAPAdamW, {"projection_side": "right"}, ["right"] * 3),
        (coap_dist.COAPAdafactor, {}, ["left", "right", "left"]),
    ):
        model = _shard(_model(), init_device_mesh("cpu", (world,)))
        opt = cls(model.parameters(), **KW, **extra)
        ref_model = _model()
        ref = cls(ref_model.parameters(), **KW, **extra)
        _train(model, opt, range(SAVE_AT), rank, world, (ref_model, ref))
        assert [s.side for s in opt.specs if s.kind == "matrix"] == sides


def _adaptive_dcp(rank: int, world: int, tmp: str) -> None:
    """refresh="adaptive" on row shards: residual sums over the shards give every rank the
    same decisions; a DCP checkpoint (per-parameter ``refresh_*`` entries: DCP keeps only
    state and param_groups) resumes bitwise, schedule records included."""
    model, opt = _sharded(world, refresh="adaptive", refresh_threshold=0.05)
    _train(model, opt, range(5), rank, world)
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=os.path.join(tmp, "adaptive"),
    )
    _train(model, opt, range(5, STEPS + 4), rank, world)
    mine = {i: st.as_list() for i, st in opt._adaptive.items()}
    every: list[object] = [None] * world
    dist.all_gather_object(every, mine)
    assert all(r == mine for r in every), "adaptive records differ across ranks"
    assert len(mine) == 3 and opt.metrics()["optim/refresh_skips"] >= 0
    model2, opt2 = _sharded(world, refresh="adaptive", refresh_threshold=0.05)
    _load(model2, opt2, tmp, "adaptive")
    _train(model2, opt2, range(5, STEPS + 4), rank, world)
    assert {i: st.as_list() for i, st in opt2._adaptive.items()} == mine
    for (n, p), q in zip(model2.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p.full_tensor(), q.full_tensor()), f"adaptive DCP resume: {n}"


def _load(model: nn.Module, opt: torch.optim.Optimizer, tmp: str, name: str = "ckpt") -> None:
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=os.path.join(tmp, name))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


def _phase_resume(rank: int, world: int, tmp: str) -> None:
    model, opt = _sharded(world)
    w = model[4].weight
    if rank == world - 1:
        assert w.to_local().shape[0] == 0, "the 2-row matrix has an empty shard on 3 ranks"
    _load(model, opt, tmp)
    _train(model, opt, range(SAVE_AT, STEPS), rank, world)
    final = torch.load(os.path.join(tmp, "final.pt"), weights_only=True)
    for n, p in model.named_parameters():
        diff = (p.full_tensor() - final[n]).abs().max().item()
        assert diff < TOL, f"resume on {world} ranks differs at {n} by {diff}"


def _phase_owner(rank: int, world: int, tmp: str) -> None:
    """``sharding="owner"`` (3 ranks, uneven and empty shards, matrices whole and split,
    reference side rule: left projections too) within 2e-5 of one process; its state is
    consolidated on rank 0 for a one-file checkpoint that resumes bitwise (its DCP form:
    tests/distributed/test_fsdp2_dcp.py)."""
    model, opt = _sharded(world, sharding="owner")
    ref_model = _model()
    ref = coap_dist.COAPAdamW(ref_model.parameters(), **KW)
    _train(model, opt, range(SAVE_AT), rank, world, (ref_model, ref))
    assert opt.layout.name == "fsdp2_owner"
    opt.consolidate_state_dict(to=0)
    path = os.path.join(tmp, "owner.pt")
    weights = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"model": weights, "optim": opt.state_dict()}, path)
    dist.barrier()
    _train(model, opt, range(SAVE_AT, STEPS), rank, world)
    final = {n: p.full_tensor() for n, p in model.named_parameters()}
    ck = torch.load(path, weights_only=True)
    model2 = _model()
    model2.load_state_dict(ck["model"])
    model2 = _shard(model2, init_device_mesh("cpu", (world,)))
    opt2 = coap_dist.COAPAdamW(model2.parameters(), **KW, sharding="owner")
    opt2.load_state_dict(ck["optim"])
    _train(model2, opt2, range(SAVE_AT, STEPS), rank, world)
    for n, p in model2.named_parameters():
        assert torch.equal(p.full_tensor(), final[n]), f"owner resume differs at {n}"
    _auto_rank(rank, world)
    _auto_rank_8bit(rank, world)


def _auto_rank(rank: int, world: int) -> None:
    """rank="auto" under FSDP2, both layouts: every rank chooses the ranks one process
    chooses, within 2e-5 of it (the default layout re-projects its moment rows in place and
    each projector whole, every rank keeping its new rows of P), and resumes from the
    consolidated state; neither has a DCP form for it (``state_dict()`` refuses, naming the
    consolidated form, without a collective). With 8-bit matrices: :func:`_auto_rank_8bit`."""
    kw = {**KW, "rank": "auto", "rank_ratio": 2}
    for sharding in (None, "owner"):
        model = _shard(_model(), init_device_mesh("cpu", (world,)))
        opt = coap_dist.COAPAdamW(model.parameters(), **kw, sharding=sharding)
        ref_model = _model()
        ref = coap_dist.COAPAdamW(ref_model.parameters(), **kw)
        _train(model, opt, range(SAVE_AT), rank, world, (ref_model, ref))
        with NoCollectives(), pytest.raises(RuntimeError, match=r"rank='auto'.*consolidate"):
            opt.state_dict()
        opt.consolidate_state_dict(to=None)  # the whole state on every rank
        box = [opt.state_dict()]
        assert len(box[0]["state"]) == len(opt.specs), sharding
        weights = {n: p.full_tensor() for n, p in model.named_parameters()}
        _train(model, opt, range(SAVE_AT, STEPS), rank, world, (ref_model, ref))
        ranks = [s.rank for s in opt.specs if s.kind == "matrix"]
        assert ranks == [s.rank for s in ref.specs if s.kind == "matrix"], sharding
        assert ranks != [max(min(s.shape) // 2, 1) for s in ref.specs if s.kind == "matrix"]
        every: list[object] = [None] * world
        dist.all_gather_object(every, ranks)
        assert all(r == ranks for r in every), every
        # Resumed from the consolidated state (its ranks): the uninterrupted run, bitwise.
        model2 = _model()
        model2.load_state_dict(weights)
        model2 = _shard(model2, init_device_mesh("cpu", (world,)))
        opt2 = coap_dist.COAPAdamW(model2.parameters(), **kw, sharding=sharding)
        opt2.load_state_dict(box[0])
        _train(model2, opt2, range(SAVE_AT, STEPS), rank, world)
        for (n, p), q in zip(model2.named_parameters(), model.parameters(), strict=True):
            assert torch.equal(p.full_tensor(), q.full_tensor()), f"auto resume: {n} ({sharding})"


def _auto_rank_8bit(rank: int, world: int) -> None:
    """rank="auto" with 8-bit moments: the first SVD moves the ranks (32 -> 24 and 40, one
    process's choice) and with them the quantization blocks' row count (128 -> 512 rows).
    The default layout cuts its state rows on those blocks, so the re-plan moves moment rows
    between ranks: right after it the consolidated state is one process's (projectors to
    1e-4, moment codes equal but for a ~1e-7 difference landing on a neighbouring code, at
    most 0.1% of them, one code apart) and the weights stay within 1e-3 for 4 steps (8-bit
    code flips, see test_matrix.py). The owner layout keeps its pieces at a re-plan, so it
    splits 8-bit auto matrices only on multiples of 4,096 rows (a block at any rank): these
    1,024-row matrices stay whole, one process's weights to 2e-5."""
    for sharding, bar in ((None, 1e-3), ("owner", 2e-5)):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 64))
        ref_net = copy.deepcopy(net)
        kw = dict(lr=1e-2, rank="auto", rank_ratio=2, update_interval=2, reproject_factor=2)
        ref = coap_dist.COAPAdamW(ref_net.parameters(), **kw, state_bits=8)
        model = _shard(net, init_device_mesh("cpu", (world,)))
        opt = coap_dist.COAPAdamW(model.parameters(), **kw, state_bits=8, sharding=sharding)
        assert opt.layout.name == ("fsdp2" if sharding is None else "fsdp2_owner")
        mats = [i for i, s in enumerate(opt.specs) if s.kind == "matrix"]
        fixed = [opt.specs[i].row_alignment() for i in mats]
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(96, 24, generator=g) @ torch.randn(24, 64, generator=g)
            y = torch.randn(96, 64, generator=g)
            per = 96 // world
            part = slice(rank * per, (rank + 1) * per)
            (model(x[part]) - y[part]).square().mean().backward()
            for p, q in zip(model.parameters(), ref_net.parameters(), strict=True):
                q.grad = p.grad.full_tensor()
            opt.step()
            ref.step()
            opt.zero_grad()
            ref.zero_grad()
            if step == 0:
                ranks = [opt.specs[i].rank for i in mats]
                assert ranks == [ref.specs[i].rank for i in mats] == [24, 40], ranks
                moved = [opt.specs[i].row_alignment() for i in mats]
                assert fixed == [128, 128] and moved == [512, 512], (fixed, moved)
                opt.consolidate_state_dict(to=0)
                if rank == 0:
                    mine, want = opt.state_dict()["state"], ref.state_dict()["state"]
                    for i in mats:
                        torch.testing.assert_close(
                            mine[i]["projector"], want[i]["projector"], atol=1e-4, rtol=0
                        )
                        for k in ("exp_avg_q", "exp_avg_sq_q"):
                            gap = (mine[i][k].int() - want[i][k].int()).abs()
                            assert gap.max() <= 1 and (gap > 0).float().mean() <= 1e-3, (i, k)
            for p, q in zip(model.parameters(), ref_net.parameters(), strict=True):
                diff = float((p.full_tensor() - q).norm() / q.norm())
                assert diff <= bar, f"step {step}: 8-bit auto ({sharding}) is {diff:.1e} off"


def _phase_hsdp(rank: int, world: int, tmp: str) -> None:
    """HSDP on a (replicate 2 x shard 2) mesh: collectives on the shard sub-mesh only; then
    again with a refresh-round limit under any matrix's partial sums
    (``REFRESH_BUCKET_BYTES``): the refresh goes in one round per matrix, same result."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    _hsdp_run(mesh, None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(placement, "REFRESH_BUCKET_BYTES", 1)
        _hsdp_run(mesh, 1)


def _hsdp_run(mesh: object, bucket: int | None) -> None:
    model = _shard(_model(), mesh)
    opt = coap_dist.COAPAdamW(model.parameters(), **KW)
    records = count_steps(opt)
    ref_model = _model()
    ref_opt = coap_dist.COAPAdamW(ref_model.parameters(), **KW)
    shard_rank = mesh.get_local_rank("shard")
    replica = mesh.get_local_rank("replicate")
    for step in range(STEPS):
        x = _global_batch(step)
        per = GLOBAL_BATCH // 4
        part = x[(2 * replica + shard_rank) * per : (2 * replica + shard_rank + 1) * per]
        _loss(model, part).backward()
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            q.grad = p.grad.full_tensor()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert opt.layout.world == 2, "the shard sub-mesh, not the world"
    # Step 0 refreshes all three matrices: one round of partial sums, or one per matrix when
    # the round limit is smaller than any matrix's sums.
    rounds = 1 if bucket is None else 3
    assert records[0].calls["_reduce_scatter_base_"] == rounds, records[0].calls
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        diff = (p.full_tensor() - q).abs().max().item()
        assert diff < TOL, f"HSDP differs from 1-process by {diff}"
    sd = opt.state_dict()
    st = sd["state"][0]
    w = model[0].weight
    assert st["exp_avg"].placements == w.placements == (Replicate(), Shard(0))
    assert st["projector"].placements == (Replicate(), Shard(0))


@pytest.mark.distributed
def test_fsdp2_hsdp_2x2_mesh(tmp_path: os.PathLike[str]) -> None:
    run_workers(_phase_hsdp, 4, str(tmp_path))


@pytest.mark.distributed
def test_fsdp2_default_save_on_2_resume_on_3_and_1(tmp_path: os.PathLike[str]) -> None:
    tmp = str(tmp_path)
    run_workers(_phase_save, 2, tmp)
    run_workers(_phase_resume, 3, tmp)
    run_workers(_phase_owner, 3, tmp)
    # One process, no process group: plain tensors loaded from the sharded checkpoint.
    model = _model()
    opt = coap_dist.COAPAdamW(model.parameters(), **KW)
    _load(model, opt, tmp)
    for step in range(SAVE_AT, STEPS):
        _loss(model, _global_batch(step)).backward()
        if step == NAN_STEP:
            model[2].weight.grad[-1, 0] = float("nan")
        opt.step()
        opt.zero_grad()
    assert opt.state[model[0].weight]["exp_avg"].shape == (16, 4), "left: canonical n x r"
    final = torch.load(os.path.join(tmp, "final.pt"), weights_only=True)
    for n, p in model.named_parameters():
        diff = (p.detach() - final[n]).abs().max().item()
        assert diff < TOL, f"resume on 1 process differs at {n} by {diff}"
