"""Collectives, bytes and optimizer state per rank of every COAP layout.

1. Analytic, LLaMA-7B shapes (rank 1024, bf16 parameters and state; DeepSpeed with fp32
   master copies), N = 8, 64, 512: calls and bytes per rank of a plain (non-refresh) step
   and the largest rank's state, from the layouts' own plans (``routes.plain_step_traffic``,
   ``routes.local_plain_step_traffic``, ``placement``), next to AdamW under ZeRO-1 / ZeRO-2
   and FSDP2. Bytes per rank = max(sent, received); the bound is the issue's: fp32 gradient
   bytes / N + fp32 D and P of the matrices whose weights the rank holds + AdamW pieces
   received under DDP + the flag vector.
2. Measured on this machine (gloo, 2 and 3 CPU processes), the tiny LLaMA preset: the c10d
   calls and bytes of every ``opt.step()`` counted from the dispatcher
   (``coap_dist.distributed.trace``), per plain step, and the state per rank, for DDP owner,
   FSDP2 default, FSDP2 owner, FSDP1 and DeepSpeed ZeRO-2.

Run (about 3 minutes on 2 cores)::

    python benchmarks/distributed.py [--skip-measured] [--worlds 8 64 512]

Writes ``benchmarks/results/distributed.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, machine_markdown, markdown_table, write_results

from coap_dist.distributed.comm import collective_bytes
from coap_dist.distributed.placement import local_state_bytes, owner_placement
from coap_dist.distributed.routes import (
    bound_bytes,
    geometries,
    local_plain_step_traffic,
    plain_step_traffic,
)
from coap_dist.memory import _fragments, coap_specs
from coap_dist.models.llama import LLAMA_PRESETS, Llama

MIB = 2**20
LAYOUTS = {
    "ddp_owner": "DDP, sharding='owner'",
    "fsdp2": "FSDP2 default",
    "fsdp2_owner": "FSDP2, sharding='owner'",
    "zero": "DeepSpeed ZeRO 1-3",
}


def analytic(model: str, rank: int, worlds: list[int]) -> list[dict[str, Any]]:
    """Plain-step traffic and state per rank of every layout for ``model``'s shapes."""
    with torch.device("meta"):
        module = Llama(LLAMA_PRESETS[model])
    numel = sum(p.numel() for p in module.parameters())
    out = []
    for world in worlds:
        for layout in LAYOUTS:
            specs, _ = coap_specs(
                module,
                rank=rank,
                rank_ratio=None,
                rank_ratio_cnn=None,
                dtype=torch.bfloat16,
                state_bits=None,
                projection_side="auto",
                adamw_patterns=None,
                coap_patterns=None,
            )
            wdt = torch.float32 if layout == "zero" else torch.bfloat16
            if layout == "fsdp2":
                per_rank = local_plain_step_traffic(specs, world, torch.bfloat16)
                state = local_state_bytes(specs, world)
                frags = _fragments(specs, world, "fsdp2_owner", [s.group for s in specs])
                geos = geometries(specs, owner_placement(specs, world, frags), frags)
            else:
                frags = _fragments(specs, world, layout, [s.group for s in specs])
                placement = owner_placement(specs, world, frags)
                geos = geometries(specs, placement, frags)
                per_rank = plain_step_traffic(
                    geos, world, [wdt] * len(specs), reduced=True, solo=False
                )
                state = placement.state_bytes(specs)
            bounds = [
                bound_bytes(geos, world, r, [torch.float32] * len(specs)) for r in range(world)
            ]
            moved = [t.bytes for t in per_rank]
            out.append(
                {
                    "world": world,
                    "layout": layout,
                    "calls": max(t.calls for t in per_rank),
                    "bytes_max_mib": max(moved) / MIB,
                    "bytes_median_mib": statistics.median(moved) / MIB,
                    "bound_max_mib": max(bounds) / MIB,
                    "ranks_over_bound": sum(m > b for m, b in zip(moved, bounds, strict=True)),
                    "state_max_mib": max(state) / MIB,
                    "state_vs_even": max(state) / (sum(state) / world),
                }
            )
            print(out[-1], flush=True)
        # AdamW baselines (bf16 parameters, bf16 moments, 2 per parameter)
        params_b = 2 * numel
        out.append(
            {
                "world": world,
                "layout": "adamw_zero1",
                "calls": 1,
                "bytes_max_mib": collective_bytes("all_gather", world, params_b // world) / MIB,
                "state_max_mib": 2 * params_b / world / MIB,
                "note": "updated parameters all-gathered (DDP's gradient all-reduce not counted)",
            }
        )
        out.append(
            {
                "world": world,
                "layout": "adamw_zero2",
                "calls": 2,
                "bytes_max_mib": (
                    collective_bytes("reduce_scatter", world, 2 * numel // world)
                    + collective_bytes("all_gather", world, params_b // world)
                )
                / MIB,
                "state_max_mib": 2 * params_b / world / MIB,
                "note": "gradients reduce-scattered + parameters all-gathered",
            }
        )
        out.append(
            {
                "world": world,
                "layout": "adamw_fsdp2",
                "calls": 0,
                "bytes_max_mib": 0.0,
                "state_max_mib": 2 * params_b / world / MIB,
                "note": "element-wise on FSDP2's shards (FSDP2's own traffic not counted)",
            }
        )
    return out


# ------------------------------------------------------------------------------ measured
KW = dict(lr=1e-3, rank=16, update_interval=2, reproject_factor=2)
STEPS = 5  # k = 0 (init), 1, 2 (update), 3, 4 (recalibration): plain steps 1 and 3


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return Llama(LLAMA_PRESETS["tiny"])


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (2, 33), generator=torch.Generator().manual_seed(100 * step + rank)
    )


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _worker(rank: int, world: int, init: str, layout: str, port: int, out: str) -> None:
    import coap_dist
    from coap_dist.distributed import Fsdp1Sharding
    from coap_dist.distributed.trace import count_steps, merged
    from coap_dist.train.optim import innermost
    from coap_dist.train.parallelize import close_distributed

    torch.set_num_threads(1)
    model = _tiny()
    if layout == "deepspeed_zero2":
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DS_ACCELERATOR="cpu",
        )
        import deepspeed

        # DeepSpeed JIT-builds a CPU shared-memory op here (minutes, racing between the
        # processes on a cold cache); gloo carries every collective, which is what is counted.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        cfg = {
            "train_micro_batch_size_per_gpu": 2,
            "train_batch_size": 2 * world,
            "zero_optimization": {"stage": 2},
            "optimizer": {"type": "COAP", "params": KW},
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
        for step in range(STEPS):
            engine.backward(_loss(engine, _batch(rank, step)))
            engine.step()
        records = merged(records, len(opt.param_groups))  # ZeRO-2 steps one group per call
    else:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        if layout in ("fsdp2", "fsdp2_owner"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for block in model.layers:
                fully_shard(block, mesh=mesh)
            net = fully_shard(model, mesh=mesh)
            opt = coap_dist.COAPAdamW(
                coap_dist.param_groups(model),
                **KW,
                sharding="owner" if layout == "fsdp2_owner" else None,
            )
        elif layout == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            net = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
            opt = coap_dist.COAPAdamW(
                coap_dist.param_groups(net), **KW, sharding=Fsdp1Sharding(net)
            )
        else:
            net = torch.nn.parallel.DistributedDataParallel(model)
            opt = coap_dist.COAPAdamW(coap_dist.param_groups(model), **KW, sharding="owner")
        records = count_steps(opt)
        for step in range(STEPS):
            _loss(net, _batch(rank, step)).backward()
            opt.step()
            opt.zero_grad()
    plain = [records[1], records[3]]
    row = torch.tensor(
        [
            float(plain[0].total_calls),
            float(max(max(r.sent, r.received) for r in plain)),
            float(opt.state_bytes()),
            float(records[4].total_calls),
        ],
        dtype=torch.float64,
    )
    rows = [torch.zeros_like(row) for _ in range(world)]
    dist.all_gather(rows, row)
    if rank == 0:
        torch.save(torch.stack(rows), out)
    close_distributed(wait=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measured(worlds: list[int]) -> list[dict[str, Any]]:
    out = []
    numel = sum(p.numel() for p in _tiny().parameters())
    for layout in ("ddp_owner", "fsdp2", "fsdp2_owner", "fsdp1", "deepspeed_zero2"):
        for world in worlds:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "rows.pt")
                mp.start_processes(
                    _worker,
                    args=(world, os.path.join(tmp, "init"), layout, _free_port(), path),
                    nprocs=world,
                    join=True,
                    start_method="spawn",
                )
                rows = torch.load(path)
            state = rows[:, 2]
            out.append(
                {
                    "layout": layout,
                    "world": world,
                    "params": numel,
                    "plain_calls": int(rows[:, 0].max()),
                    "refresh_calls": int(rows[:, 3].max()),
                    "plain_kib_max": float(rows[:, 1].max()) / 1024,
                    "state_kib_max": float(state.max()) / 1024,
                    "state_vs_even": float(state.max() / (state.sum() / world)),
                }
            )
            print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="7b", choices=sorted(LLAMA_PRESETS))
    parser.add_argument("--rank", type=int, default=1024)
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--measured-worlds", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--skip-measured", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    ana = analytic(args.model, args.rank, args.worlds)
    meas = [] if args.skip_measured else measured(args.measured_worlds)
    rows = []
    for r in ana:
        if r["layout"] in LAYOUTS:
            rows.append(
                [
                    f"COAP, {LAYOUTS[r['layout']]}",
                    r["world"],
                    r["calls"],
                    f"{r['bytes_max_mib']:,.1f}",
                    f"{r['bytes_median_mib']:,.1f}",
                    f"{r['bound_max_mib']:,.1f}",
                    r["ranks_over_bound"],
                    f"{r['state_max_mib']:,.1f}",
                    f"{r['state_vs_even']:.3f}",
                ]
            )
        else:
            rows.append(
                [
                    r["layout"]
                    .replace("adamw_", "AdamW, ")
                    .replace("zero", "ZeRO-")
                    .replace("fsdp2", "FSDP2"),
                    r["world"],
                    r["calls"],
                    f"{r['bytes_max_mib']:,.1f}",
                    "",
                    "",
                    "",
                    f"{r['state_max_mib']:,.1f}",
                    "1.000",
                ]
            )
    table = markdown_table(
        [
            "optimizer, layout",
            "N",
            "calls / plain step",
            "MiB / rank (max)",
            "MiB / rank (median)",
            "bound MiB (max)",
            "ranks over bound",
            "state MiB / rank (max)",
            "max / even",
        ],
        rows,
    )
    md = (
        f"# COAP layouts: collectives, bytes and state per rank\n\n"
        f"## Analytic: LLaMA-{args.model.upper()} shapes, rank {args.rank}, bf16 (DeepSpeed: "
        "fp32 masters), a plain step\n\n"
        f"{table}\n"
    )
    if meas:
        mtable = markdown_table(
            [
                "layout",
                "ranks",
                "calls / plain step",
                "calls / refresh step",
                "KiB / rank / plain step (max)",
                "state KiB / rank (max)",
                "max / even",
            ],
            [
                [
                    m["layout"],
                    m["world"],
                    m["plain_calls"],
                    m["refresh_calls"],
                    f"{m['plain_kib_max']:,.1f}",
                    f"{m['state_kib_max']:,.1f}",
                    f"{m['state_vs_even']:.3f}",
                ]
                for m in meas
            ],
        )
        md += (
            f"\n## Measured: tiny LLaMA ({meas[0]['params']:,} parameters), rank {KW['rank']}, "
            "gloo, c10d calls counted from the dispatcher\n\n"
            f"{mtable}\n"
        )
    info = machine_info()
    md += f"\n## Machine\n\n{machine_markdown(info)}\n"
    print(md)
    for path in write_results(
        "distributed",
        {
            "machine": info,
            "args": vars(args) | {"out_dir": str(args.out_dir)},
            "analytic": ana,
            "measured": meas,
        },
        md,
        args.out_dir,
    ):
        print("wrote", path)


if __name__ == "__main__":
    main()
