"""bf16 ``optimizer.step()`` on one GPU, LLaMA-350M and 1B shapes: COAPAdamW vs torch AdamW
(fused) vs GaLore, interleaved, CUDA events; plus the peak memory of a whole training step
(normal and in-backward) per optimizer. A few minutes on one H100.

    python benchmarks/gpu_step.py [--models 350m 1b] [--steps 40] [--rank 256]
    python benchmarks/gpu_step.py --device cpu --models tiny --steps 4   # smoke run, no GPU

Prints two markdown tables and writes ``$OUT/gpu_step.json`` when ``OUT`` is set:

* step time (ms per ``step()``, bf16 parameters and gradients, random gradients): median
  plain step, slowest step (a refresh), mean over a T_u F cycle, mean / AdamW fused;
* peak memory of one training step (forward, backward, clip to 1.0, step) of the same model
  on ``--batch`` x ``--seq-len`` tokens, ``torch.cuda.max_memory_allocated`` (CPU smoke run:
  :class:`coap_dist.step_memory.LiveTensors`), normal step vs ``optimizer_in_backward``, next to
  the estimator's figure (``coap-dist memory --step``; fp32 there, so a ratio only on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import training_step  # (also makes coap_dist importable from a checkout)

import coap_dist
from coap_dist.models.llama import LLAMA_PRESETS, Llama


def _model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return Llama(LLAMA_PRESETS[name]).to(device, dtype)


def _build(kind: str, model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    if kind == "adamw_fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if kind == "coap":
        return coap_dist.COAPAdamW(
            coap_dist.param_groups(model, rank=args.rank),
            lr=1e-3,
            update_interval=args.tu,
            reproject_factor=args.f,
        )
    from galore_torch import GaLoreAdamW

    groups = coap_dist.param_groups(model)
    low = [p for g in groups if g.get("algorithm") != "adamw" for p in g["params"]]
    rest = [p for p in model.parameters() if all(p is not q for q in low)]
    return GaLoreAdamW(
        [
            {"params": rest},
            {
                "params": low,
                "rank": args.rank,
                "update_proj_gap": args.tu * args.f,
                "scale": 0.25,
                "proj_type": "std",
            },
        ],
        lr=1e-3,
    )


def _kinds() -> list[str]:
    kinds = ["adamw_fused", "coap"]
    try:
        import galore_torch  # noqa: F401

        kinds.append("galore")
    except ImportError:
        pass
    return kinds


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    def timed(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return timed


def step_times(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Interleaved bf16 step times of every optimizer on model ``name``."""
    runs = {}
    for kind in _kinds():
        model = _model(name, device, torch.bfloat16)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        runs[kind] = _build(kind, model, args)
    timed = _timer(device)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.steps):
        for kind, opt in runs.items():  # interleaved: drift hits every optimizer alike
            times[kind].append(timed(opt.step))
    cycle = args.tu * args.f
    rows = {}
    for kind, ts in times.items():
        ts = ts[cycle:] if len(ts) > 2 * cycle else ts[1:]
        rows[kind] = {
            "plain_ms": statistics.median(ts),
            "max_ms": max(ts),
            "mean_ms": statistics.fmean(ts),
        }
    base = rows["adamw_fused"]["mean_ms"]
    for r in rows.values():
        r["mean_vs_adamw_fused"] = r["mean_ms"] / base
    return rows


def peak_memory(
    name: str, kind: str, in_backward: bool, args: argparse.Namespace, device: torch.device
) -> int:
    """Peak bytes of one training step (the second: state allocated) of ``kind`` on ``name``."""
    from coap_dist.step_memory import LiveTensors

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _model(name, device, dtype)
    opt = _build(kind, model, args)
    handle = coap_dist.optimizer_in_backward(model, opt, max_grad_norm=1.0) if in_backward else None
    vocab = LLAMA_PRESETS[name].vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq_len + 1), device=device)

    step = training_step(model, opt, handle, tokens)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    live = LiveTensors()
    live.track(model, opt)
    with live:
        live.reset()
        step()
    return live.peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["350m", "1b"], choices=sorted(LLAMA_PRESETS)
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--tu", type=int, default=8)
    parser.add_argument("--f", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="peak memory: sequences")
    parser.add_argument("--seq-len", type=int, default=256, help="peak memory: tokens per sequence")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here (use --device cpu for a smoke run)")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    from coap_dist.step_memory import estimate_step_peak

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "args": vars(args),
        "models": {},
    }
    for name in args.models:
        rows = step_times(name, args, device)
        print(f"\n### {name}: bf16 optimizer.step(), T_u {args.tu}, F {args.f}, rank {args.rank}\n")
        print(
            "| optimizer | plain step ms | slowest step ms | cycle mean ms | mean / AdamW fused |"
        )
        print("| :-- | --: | --: | --: | --: |")
        for kind, r in rows.items():
            print(
                f"| {kind} | {r['plain_ms']:.2f} | {r['max_ms']:.2f} | {r['mean_ms']:.2f} | "
                f"{r['mean_vs_adamw_fused']:.2f} |"
            )
        mem = {}
        for kind in ("adamw_fused", "coap"):
            for in_backward in (False, True):
                key = f"{kind}{'_in_backward' if in_backward else ''}"
                est = estimate_step_peak(
                    name,
                    "adamw" if kind == "adamw_fused" else "coap",
                    batch=args.batch,
                    seq_len=args.seq_len,
                    in_backward=in_backward,
                    rank=args.rank if kind == "coap" else None,
                ).total
                mem[key] = {
                    "peak": peak_memory(name, kind, in_backward, args, device),
                    "estimate_fp32": est,
                }
        print(
            f"\n### {name}: peak memory of a training step, {args.batch} x {args.seq_len} tokens\n"
        )
        print("| run | peak MiB | estimate MiB (fp32) |")
        print("| :-- | --: | --: |")
        for key, m in mem.items():
            print(f"| {key} | {m['peak'] / 2**20:,.1f} | {m['estimate_fp32'] / 2**20:,.1f} |")
        result["models"][name] = {"step_time": rows, "peak_memory": mem}
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(os.path.join(out, "gpu_step.json"), "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
