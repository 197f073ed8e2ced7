"""Should refreshes be staggered under owner layouts? Step times of a synchronous job, measured.

Two gloo processes (one torch thread each) hold the LLaMA-shaped matrix stack of
``step_time.py`` with fixed gradients (identical on both ranks, as after DDP's all-reduce) and
step ``COAPAdamW(..., sharding="owner")``; every step is timed from a barrier to its end on
each rank, and the job's step time is the slower rank's (``all_reduce(MAX)``). Variants,
interleaved run by run: ``stagger=False`` (every matrix refreshes at k % T_u == 0, each
rank its own share at once) and ``stagger=True`` (the j-th of J matrices refreshes
(j T_u) // J steps early, :func:`coap_dist.optim.spec.with_stagger`, the same offsets as
in one process). Reported per variant (medians over repeats): cycle mean, median step and
worst step of the cycle.

Run (about 3 minutes on 2 cores)::

    python benchmarks/stagger.py [--layers 4] [--repeats 3]

Writes ``benchmarks/results/stagger.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, machine_markdown, markdown_table, publish
from step_time import llama_matrices, make_params

VARIANTS = ("no stagger", "stagger")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from coap_dist import COAPAdamW

    shapes = llama_matrices(args.dim, args.ffn, args.layers)
    steps = args.update_interval * args.reproject_factor + 1
    times: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    for rep in range(args.repeats):
        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            params = make_params(shapes, torch.float32, seed=0)
            opt = COAPAdamW(
                [{"params": params, "algorithm": "coap"}],
                lr=1e-3,
                rank=args.rank,
                update_interval=args.update_interval,
                reproject_factor=args.reproject_factor,
                stagger=variant != "no stagger",
                sharding="owner",
            )
            run = []
            for _ in range(steps):
                dist.barrier()
                t0 = time.perf_counter()
                opt.step()
                took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(took, op=dist.ReduceOp.MAX)
                run.append(float(took))
            times[variant].append(run)
            del opt
    if rank == 0:
        torch.save(times, out)
    dist.barrier()
    dist.destroy_process_group()


def summarize(run: list[float]) -> dict[str, float]:
    """Cycle statistics (k = 1 .. T_u F) of one run, in ms."""
    body = run[1:]
    return {
        "cycle_mean_ms": statistics.fmean(body) * 1e3,
        "median_ms": statistics.median(body) * 1e3,
        "worst_ms": max(body) * 1e3,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Spawn the two ranks; return the JSON-ready result."""
    wall0 = time.perf_counter()
    machine = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.spawn(_worker, args=(2, _free_port(), args, out), nprocs=2, join=True)
        times = torch.load(out)
    runs = {v: [summarize(r) for r in times[v]] for v in VARIANTS}
    summary = {
        v: {k: statistics.median(r[k] for r in runs[v]) for k in runs[v][0]} for v in VARIANTS
    }
    return {
        "benchmark": "stagger",
        "machine": machine,
        "wall_seconds": time.perf_counter() - wall0,
        "config": {
            "world": 2,
            "layout": "owner (DDP, sharding='owner')",
            "dim": args.dim,
            "ffn": args.ffn,
            "layers": args.layers,
            "rank": args.rank,
            "update_interval": args.update_interval,
            "reproject_factor": args.reproject_factor,
            "repeats": args.repeats,
        },
        "summary_ms": summary,
        "ratio_over_none": {
            v: {k: summary[v][k] / summary[VARIANTS[0]][k] for k in summary[v]}
            for v in VARIANTS[1:]
        },
        "raw_step_seconds": times,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """Human-readable report of :func:`run`'s result."""
    cfg, summary = result["config"], result["summary_ms"]
    keys = ("cycle_mean_ms", "median_ms", "worst_ms")
    rows = [[v, *(f"{summary[v][k]:.1f}" for k in keys)] for v in VARIANTS]
    for v, ratio in result["ratio_over_none"].items():
        rows.append([f"ratio {v} / none", *(f"{ratio[k]:.2f}" for k in keys)])
    return "\n\n".join(
        [
            "# Staggered refreshes under the owner layout",
            f"2 gloo ranks, {cfg['layers']} LLaMA blocks of matrices (d={cfg['dim']}, "
            f"f={cfg['ffn']}), rank {cfg['rank']}, T_u={cfg['update_interval']}, "
            f"F={cfg['reproject_factor']}; the job's step time is the slower rank's; "
            f"{cfg['repeats']} interleaved repeats, medians.",
            markdown_table(["variant (ms)", "cycle mean", "median step", "worst step"], rows),
            "## Machine (at start)",
            machine_markdown(result["machine"]),
            f"Benchmark wall time {result['wall_seconds']:.0f} s.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run, print the markdown report, write JSON and markdown files."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--update-interval", type=int, default=8)
    p.add_argument("--reproject-factor", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    result = run(args)
    return publish("stagger", result, to_markdown(result), args.out)


if __name__ == "__main__":
    sys.exit(main())
