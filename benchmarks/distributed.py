"""Per-rank optimizer state, projector-refresh time and optimizer traffic per strategy.

World sizes 1, 2 and 3 on this machine (gloo, one thread per process), for every strategy:

* ``owner`` (DDP, ZeRO-1 semantics, parameter exchange), ``owner_factor`` (D and P exchange),
* ``fsdp2_local`` (FSDP2 ``fully_shard``, row shards), ``fsdp1_owner`` (FSDP1, flat fragments).

The model is a stack of LLaMA-60M-shaped linear layers (d = 512, f = 1376); each run takes one
full refresh cycle (T_u * F + 1 steps) from fresh optimizer state. Reported per strategy and
world size: the largest per-rank ``state_bytes()``, the largest per-rank share of the refresh
work (sum of a_local b r over the projectors a rank computes, over the total of all ranks), the
largest per-rank wall time in projector refreshes (``optim/projector_time_s``; on this 2-core
machine it includes waiting for the other processes in collectives), and the mean per-step
bytes the optimizer communicated (``optim/comm_bytes_per_step``; DDP/FSDP gradient reduction
is not included).

Run (about 4 minutes on 2 cores)::

    python benchmarks/distributed.py [--layers 2] [--rank 128]

Writes ``benchmarks/results/distributed.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, machine_markdown, markdown_table, write_results

STRATEGIES = ("owner", "owner_factor", "fsdp2_local", "fsdp1_owner")


def _model(layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [
            nn.Linear(512, 512, bias=False),
            nn.Linear(512, 1376, bias=False),
            nn.Linear(1376, 512, bias=False),
            nn.LayerNorm(512),
        ]
    return nn.Sequential(*blocks)


def _refresh_work(opt: torch.optim.Optimizer) -> int:
    """This rank's share of the refresh work: sum of a_local * b * r over the matrices whose
    projector it computes (a_local: its rows of the moments; randomized SVD costs ~ a b r)."""
    from torch.distributed.tensor import DTensor

    work = 0
    for st in opt.state.values():
        if "projector" in st:
            moments, proj = st["exp_avg"], st["projector"]
            rows = moments.to_local().shape[0] if isinstance(moments, DTensor) else moments.shape[0]
            work += rows * proj.shape[0] * proj.shape[1]
    return work


def _worker(
    rank: int, world: int, init: str, strategy: str, args: argparse.Namespace, out: str
) -> None:
    import coap_dist
    from coap_dist.distributed import Fsdp1Sharding, OwnerSharding

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    kw: dict[str, Any] = dict(
        lr=1e-3,
        rank=args.rank,
        update_interval=args.update_interval,
        reproject_factor=args.reproject_factor,
    )
    model = _model(args.layers)
    if strategy.startswith("owner"):
        net: nn.Module = nn.parallel.DistributedDataParallel(model)
        exchange = "factor" if strategy == "owner_factor" else "param"
        opt = coap_dist.COAPAdamW(
            model.parameters(), **kw, sharding=OwnerSharding(exchange=exchange)
        )
    elif strategy == "fsdp2_local":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
        opt = coap_dist.COAPAdamW(model.parameters(), **kw)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        net = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
        opt = coap_dist.COAPAdamW(net.parameters(), **kw, sharding=Fsdp1Sharding(net))
    steps = args.update_interval * args.reproject_factor + 1
    comm = 0
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        net(torch.randn(4, 512, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        comm += int(opt.metrics()["optim/comm_bytes_per_step"])
    m = opt.metrics()
    row = torch.tensor(
        [
            float(opt.state_bytes()),
            m["optim/projector_time_s"],
            comm / steps,
            float(_refresh_work(opt)),
        ],
        dtype=torch.float64,
    )
    rows = [torch.zeros_like(row) for _ in range(world)]
    dist.all_gather(rows, row)
    if rank == 0:
        torch.save(torch.stack(rows), out)
    dist.destroy_process_group()


def _run(strategy: str, world: int, args: argparse.Namespace) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.start_processes(
            _worker,
            args=(world, os.path.join(tmp, "init"), strategy, args, out),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return torch.load(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--update-interval", type=int, default=4)
    parser.add_argument("--reproject-factor", type=int, default=2)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    for strategy in STRATEGIES:
        for world in args.worlds:
            rows = _run(strategy, world, args)
            rec = {
                "strategy": strategy,
                "world": world,
                "state_mib_max": float(rows[:, 0].max()) / 2**20,
                "state_mib_sum": float(rows[:, 0].sum()) / 2**20,
                "refresh_s_max": float(rows[:, 1].max()),
                "refresh_work_share_max": float(rows[:, 3].max() / rows[:, 3].sum()),
                "comm_kib_per_step_max": float(rows[:, 2].max()) / 1024,
            }
            results.append(rec)
            print(rec, flush=True)
    smallest = min(args.worlds)  # ratios are relative to the smallest world size run
    base = {r["strategy"]: r for r in results if r["world"] == smallest}
    table = markdown_table(
        [
            "strategy",
            "ranks",
            "state MiB / rank (max)",
            f"vs {smallest} rank(s)",
            "refresh work share / rank (max)",
            "refresh s / rank (max)",
            f"vs {smallest} rank(s)",
            "optimizer comm KiB / step",
        ],
        [
            [
                r["strategy"],
                r["world"],
                f"{r['state_mib_max']:.2f}",
                f"{r['state_mib_max'] / base[r['strategy']]['state_mib_max']:.2f}",
                f"{r['refresh_work_share_max']:.2f}",
                f"{r['refresh_s_max']:.3f}",
                f"{r['refresh_s_max'] / base[r['strategy']]['refresh_s_max']:.2f}",
                f"{r['comm_kib_per_step_max']:.1f}",
            ]
            for r in results
        ],
    )
    info = machine_info()
    md = (
        f"# Distributed COAP: per-rank state, refresh time, traffic\n\n"
        f"{args.layers} x (512x512, 1376x512, 512x1376) linear layers, rank {args.rank}, "
        f"T_u {args.update_interval}, F {args.reproject_factor}; one refresh cycle.\n\n"
        f"{table}\n\n## Machine\n\n{machine_markdown(info)}\n"
    )
    print(md)
    for path in write_results(
        "distributed",
        {"machine": info, "args": vars(args) | {"out_dir": str(args.out_dir)}, "results": results},
        md,
        args.out_dir,
    ):
        print("wrote", path)


if __name__ == "__main__":
    main()
