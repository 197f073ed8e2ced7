"""Every layout on NCCL at 1, 2, 4 and 8 GPUs (as many as present) against one process.

Per world size, one spawn runs DDP ``sharding="owner"``, FSDP2 (default and owner) and FSDP1
on the tiny LLaMA for two refresh cycles, each checked against single-process COAPAdamW fed the
same gradients (fp32, TF32 off), with the collectives counted from the dispatcher (all on the
GPU, at most 3 per plain step) and CUDA's sync debug mode counting host synchronisations (at
most one per step); then DeepSpeed ZeRO-2 from the JSON config. Results are appended to
``$OUT/gpu_layouts.jsonl`` when ``OUT`` is set.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from coap_dist.train.parallelize import close_distributed
from tests.gpu.conftest import ON_CPU, devices

KW = dict(lr=1e-3, rank=16, update_interval=2, reproject_factor=2, scale=0.5)
STEPS = 10
TOL = 1e-4


def _device(rank: int) -> torch.device:
    return torch.device("cpu") if ON_CPU else torch.device("cuda", rank)


def _tiny(device: torch.device) -> torch.nn.Module:
    from coap_dist.models.llama import LLAMA_PRESETS, Llama

    torch.manual_seed(0)
    return Llama(LLAMA_PRESETS["tiny"]).to(device)


def _batch(rank: int, step: int, device: torch.device) -> torch.Tensor:
    return torch.randint(
        0, 256, (2, 33), generator=torch.Generator().manual_seed(100 * step + rank)
    ).to(device)


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def _syncs(fn: Any) -> int:
    """Host synchronisations of ``fn()`` (CUDA sync debug mode; 0 on the CPU dry run)."""
    if ON_CPU:
        fn()
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _layout_run(rank: int, world: int, layout: str) -> dict[str, Any]:
    import coap_dist
    from coap_dist.distributed import Fsdp1Sharding
    from coap_dist.distributed.trace import count_steps

    dev = _device(rank)
    model, ref_model = _tiny(dev), _tiny(dev)
    ref = coap_dist.COAPAdamW(coap_dist.param_groups(ref_model), **KW)
    if layout in ("fsdp2", "fsdp2_owner"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(dev.type, (world,))
        opt = coap_dist.COAPAdamW(  # built before fully_shard wraps: groups swapped below
            coap_dist.param_groups(model),
            **KW,
            sharding="owner" if layout == "fsdp2_owner" else None,
        )
        names = {id(p): n for n, p in model.named_parameters()}
        order = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
        new = dict(model.named_parameters())
        for g, ns in zip(opt.param_groups, order, strict=True):
            g["params"] = [new[n] for n in ns]  # what accelerate.prepare does
    elif layout == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        net = FSDP(model, use_orig_params=True, device_id=dev)
        opt = coap_dist.COAPAdamW(coap_dist.param_groups(net), **KW, sharding=Fsdp1Sharding(net))
    else:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if ON_CPU else [rank]
        )
        opt = coap_dist.COAPAdamW(coap_dist.param_groups(model), **KW, sharding="owner")
    records = count_steps(opt)
    syncs, diffs = [], []
    for step in range(STEPS):
        _loss(net, _batch(rank, step, dev)).backward()
        if layout == "fsdp1":
            with FSDP.summon_full_params(net, with_grads=True):
                grads = [
                    p.grad.detach().clone().view_as(q)
                    for p, q in zip(net.parameters(), ref_model.parameters(), strict=True)
                ]
        else:
            grads = [_full(p.grad) for p in model.parameters()]
        for q, g in zip(ref_model.parameters(), grads, strict=True):
            q.grad = g.clone()
        syncs.append(_syncs(opt.step))
        opt.zero_grad()
        ref.step()
        ref.zero_grad()
        if layout == "fsdp1":
            with FSDP.summon_full_params(net):
                diff = max(
                    float((p.detach().view_as(q) - q).abs().max())
                    for p, q in zip(net.parameters(), ref_model.parameters(), strict=True)
                )
        else:
            diff = max(
                float((_full(p) - q).abs().max())
                for p, q in zip(model.parameters(), ref_model.parameters(), strict=True)
            )
        diffs.append(diff)
    plain = [records[k] for k in (1, 3, 5, 7, 9)]
    return {
        "world": world,
        "layout": layout,
        "max_diff": max(diffs),
        "plain_calls": max(r.total_calls for r in plain),
        "plain_mib": max(max(r.sent, r.received) for r in plain) / 2**20,
        "devices": sorted(set().union(*(r.devices for r in records))),
        "max_syncs": max(syncs),
        "refreshes": opt.metrics()["optim/refreshes"],
        "state_mib": opt.state_bytes() / 2**20,
    }


def _worker(rank: int, world: int, init: str, out: str) -> None:
    if not ON_CPU:
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group(
        "gloo" if ON_CPU else "nccl", init_method=f"file://{init}", rank=rank, world_size=world
    )
    rows = [
        _layout_run(rank, world, layout)
        for layout in ("ddp_owner", "fsdp2", "fsdp2_owner", "fsdp1")
    ]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    close_distributed(wait=True)


def _ds_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if ON_CPU:
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        torch.cuda.set_device(rank)
    import deepspeed

    import coap_dist
    from coap_dist.distributed.trace import count_steps, merged
    from coap_dist.train.optim import innermost

    deepspeed.init_distributed(dist_backend="gloo" if ON_CPU else "nccl", auto_mpi_discovery=False)
    dev = _device(rank)
    model = _tiny(dev)
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "train_batch_size": 2 * world,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "optimizer": {"type": "COAP", "params": dict(KW, lr=1e-2)},
        "steps_per_print": 1 << 30,
    }
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=coap_dist.param_groups(model),
        config=cfg,
        dist_init_required=False,
    )
    opt = innermost(engine.optimizer)
    records = count_steps(opt)
    losses = []
    for _ in range(STEPS):
        loss = _loss(engine, _batch(rank, 0, dev))  # one batch again: the loss must fall
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    steps = merged(records, len(opt.param_groups))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "world": world,
                    "layout": "deepspeed_zero2_bf16",
                    "first_loss": losses[0],
                    "last_loss": losses[-1],
                    "plain_calls": max(steps[k].total_calls for k in (1, 3, 5, 7, 9)),
                    "devices": sorted(set().union(*(r.devices for r in records))),
                    "refreshes": opt.metrics()["optim/refreshes"],
                },
                f,
            )
    engine.destroy()
    close_distributed(wait=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _record(rows: list[dict[str, Any]]) -> None:
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_layouts.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


WORLDS = [w for w in (1, 2, 4, 8) if w <= max(devices(), 1)]


@pytest.mark.parametrize("world", WORLDS)
def test_layouts_against_one_process(world: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(
            _worker,
            args=(world, os.path.join(tmp, "init"), out),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        with open(out) as f:
            rows = json.load(f)
    _record(rows)
    expected = "cpu" if ON_CPU else "cuda"
    for r in rows:
        assert r["max_diff"] < TOL, r
        assert r["devices"] in ([], [expected]), r
        assert r["plain_calls"] <= 3 and r["max_syncs"] <= 1, r
        assert r["refreshes"] > 0, r


@pytest.mark.parametrize("world", [w for w in WORLDS if w > 1])
def test_deepspeed_zero2_bf16(world: int) -> None:
    pytest.importorskip("deepspeed")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ds.json")
        mp.start_processes(
            _ds_worker,
            args=(world, _free_port(), out),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        with open(out) as f:
            row = json.load(f)
    _record([row])
    assert row["last_loss"] < row["first_loss"], row
    assert row["plain_calls"] <= 6 and row["refreshes"] > 0, row  # one step() per group
