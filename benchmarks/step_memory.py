"""Peak memory per rank of a training step: normal step vs optimizer-in-backward.

For AdamW (torch, fused in one process, foreach on DTensors) and COAP (``rank_ratio=4``),
each run measures one training step (forward, cross-entropy, backward with clipping to 1.0,
step) of a LLaMA preset with fp32 parameters, after a first step has allocated the state,
with :class:`coap_dist.step_memory.LiveTensors` (live tensor bytes, peak over the step), and
prints the estimator's figure (:func:`coap_dist.step_memory.estimate_step_peak`, what
``coap-dist memory --step`` prints) beside it. Layouts:

* ``single``: one process;
* ``ddp`` (2 gloo ranks): normal = ``DistributedDataParallel`` (COAP ``sharding="owner"``,
  AdamW replicated); in-backward = the unwrapped model, the handler averaging each bucket;
* ``fsdp2`` (2 gloo ranks): ``fully_shard`` per block and the root, COAP's FSDP2 default.

In-backward runs use ``optimizer_in_backward(..., max_grad_norm=1.0)`` (exact clipping: the
norm pre-pass is part of the measured step). Each rank's batch is ``--batch`` sequences.

    python benchmarks/step_memory.py                 # about 3 minutes on 2 cores
    python benchmarks/step_memory.py --model tiny --batch 8 --seq-len 128

Writes ``benchmarks/results/step_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS_DIR,
    machine_info,
    machine_markdown,
    markdown_table,
    publish,
    training_step,
)

MIB = 2**20
OPTIMIZERS = ("adamw", "coap")
MODES = ("normal", "in_backward")
CLIP = 1.0


def _build(
    layout: str, model_name: str, optimizer: str, mode: str, world: int
) -> tuple[Any, Any, Any]:
    """(module to call, optimizer, in-backward handle or None) of one run."""
    import coap_dist
    from coap_dist.models.llama import LLAMA_PRESETS, Llama

    torch.manual_seed(0)
    model = Llama(LLAMA_PRESETS[model_name])
    net: Any = model
    if layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
    if optimizer == "coap":
        sharding = "owner" if layout == "ddp" else None
        opt = coap_dist.COAPAdamW(
            coap_dist.param_groups(model, rank_ratio=4), lr=1e-3, sharding=sharding
        )
    else:
        fused = layout != "fsdp2"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused, foreach=not fused)
    handle = None
    if mode == "in_backward":
        handle = coap_dist.optimizer_in_backward(model, opt, max_grad_norm=CLIP)
    elif layout == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    return net, opt, handle


def _one(
    layout: str, args: argparse.Namespace, optimizer: str, mode: str, rank: int, world: int
) -> dict[str, Any]:
    """(live bytes before, peak) of one measured training step of one run."""
    from coap_dist.step_memory import LiveTensors

    net, opt, handle = _build(layout, args.model, optimizer, mode, world)
    vocab = net.module.cfg.vocab_size if hasattr(net, "module") else net.cfg.vocab_size
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=g)

    step = training_step(net, opt, handle, tokens)

    step()  # allocates the optimizer state
    live = LiveTensors()
    live.track(net, opt)
    with live:
        before = live.live
        live.reset()
        step()
    return {
        "layout": layout,
        "world": world,
        "optimizer": optimizer,
        "mode": mode,
        "rank": rank,
        "before": before,
        "peak": live.peak,
    }


def _measure(layout: str, args: argparse.Namespace, rank: int, world: int) -> list[dict[str, Any]]:
    return [
        _one(layout, args, optimizer, mode, rank, world)
        for optimizer in OPTIMIZERS
        for mode in MODES
    ]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = []
        for layout in ("ddp", "fsdp2"):
            rows += _measure(layout, args, rank, world)
        torch.save(rows, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from coap_dist.step_memory import estimate_step_peak

    torch.set_num_threads(1)
    rows = _measure("single", args, 0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows")
        mp.start_processes(
            _worker, args=(2, _free_port(), args, out), nprocs=2, join=True, start_method="spawn"
        )
        for r in range(2):
            rows += torch.load(f"{out}.{r}", weights_only=True)
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["layout"], row["optimizer"], row["mode"])
        cell = cells.setdefault(key, {**row, "peak": 0, "before": 0})
        cell["peak"] = max(cell["peak"], row["peak"])  # the most loaded rank
        cell["before"] = max(cell["before"], row["before"])
    for (layout, optimizer, mode), cell in cells.items():
        est_layout = {"single": "replicated", "ddp": "ddp_owner", "fsdp2": "fsdp2"}[layout]
        if layout == "ddp" and optimizer == "adamw":
            est_layout = "replicated"
        cell["estimate"] = estimate_step_peak(
            args.model,
            optimizer,
            batch=args.batch,
            seq_len=args.seq_len,
            world_size=cell["world"],
            layout=est_layout,
            in_backward=mode == "in_backward",
            rank_ratio=4 if optimizer == "coap" else None,
        ).to_dict()
    shapes = []
    for model in ("1b", "7b"):
        for world, layout in ((1, "replicated"), (8, "fsdp2")):
            for optimizer in OPTIMIZERS:
                est = {
                    mode: estimate_step_peak(
                        model,
                        optimizer,
                        batch=1,
                        seq_len=args.shape_seq_len,
                        world_size=world,
                        layout=layout,
                        in_backward=mode == "in_backward",
                        rank_ratio=4 if optimizer == "coap" else None,
                    ).to_dict()
                    for mode in MODES
                }
                shapes.append(
                    {
                        "model": model,
                        "world": world,
                        "layout": layout,
                        "optimizer": optimizer,
                        **est,
                    }
                )
    return {
        "machine": machine_info(),
        "estimated_shapes": shapes,
        "shape_seq_len": args.shape_seq_len,
        "model": args.model,
        "batch_per_rank": args.batch,
        "seq_len": args.seq_len,
        "cells": [
            {
                "layout": k[0],
                "optimizer": k[1],
                "mode": k[2],
                **{x: v[x] for x in ("world", "before", "peak", "estimate")},
            }
            for k, v in cells.items()
        ],
    }


def to_markdown(result: dict[str, Any]) -> str:
    cells = {(c["layout"], c["optimizer"], c["mode"]): c for c in result["cells"]}
    rows = []
    for layout, world in (("single", 1), ("ddp", 2), ("fsdp2", 2)):
        for optimizer in OPTIMIZERS:
            n, b = cells[(layout, optimizer, "normal")], cells[(layout, optimizer, "in_backward")]
            rows.append(
                [
                    f"{layout} ({world})",
                    optimizer,
                    f"{n['before'] / MIB:,.1f}",
                    f"{n['peak'] / MIB:,.1f}",
                    f"{b['peak'] / MIB:,.1f}",
                    f"{b['peak'] / n['peak']:.2f}",
                    f"{n['estimate']['total'] / MIB:,.1f} ({n['estimate']['total'] / n['peak']:.2f})",
                    f"{b['estimate']['total'] / MIB:,.1f} ({b['estimate']['total'] / b['peak']:.2f})",
                ]
            )
    header = [
        "layout (ranks)",
        "optimizer",
        "params+state MiB",
        "peak normal MiB",
        "peak in-backward MiB",
        "in-backward / normal",
        "estimate normal (/ measured)",
        "estimate in-backward (/ measured)",
    ]
    est_rows = [
        [
            f"{e['model']} ({e['layout']}, {e['world']})",
            e["optimizer"],
            f"{e['normal']['params'] / MIB:,.0f}",
            f"{e['normal']['state'] / MIB:,.0f}",
            f"{e['normal']['activations'] / MIB:,.0f}",
            f"{e['normal']['total'] / MIB:,.0f}",
            f"{e['in_backward']['total'] / MIB:,.0f}",
            f"{e['in_backward']['total'] / e['normal']['total']:.2f}",
        ]
        for e in result["estimated_shapes"]
    ]
    est_header = [
        "model (layout, ranks)",
        "optimizer",
        "params MiB",
        "state MiB",
        "activations MiB",
        "peak normal MiB",
        "peak in-backward MiB",
        "in-backward / normal",
    ]
    return "\n\n".join(
        [
            "# Peak memory per rank of a training step: normal vs optimizer-in-backward",
            f"LLaMA `{result['model']}`, fp32, {result['batch_per_rank']} x {result['seq_len']} "
            "tokens per rank, clipping to 1.0 (in-backward: exact, norm pre-pass). Peak = "
            "live tensor bytes (`coap_dist.step_memory.LiveTensors`), most loaded rank; "
            "estimate = `coap-dist memory --step` (`estimate_step_peak`).",
            markdown_table(header, rows),
            "## Estimated on 1B / 7B shapes",
            f"`estimate_step_peak` (meta / fake tensors: nothing allocated), fp32, 1 x "
            f"{result['shape_seq_len']} tokens per rank, COAP rank_ratio 4.",
            markdown_table(est_header, est_rows),
            "## Machine",
            machine_markdown(result["machine"]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="60m")
    p.add_argument("--batch", type=int, default=1, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--shape-seq-len", type=int, default=256, help="tokens per sequence, 1B/7B")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    result = run(args)
    return publish("step_memory", result, to_markdown(result), args.out)


if __name__ == "__main__":
    sys.exit(main())
