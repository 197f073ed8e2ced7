"""bf16 ``optimizer.step()`` time on one GPU, LLaMA-350M shapes: COAPAdamW vs torch AdamW
(fused) vs GaLore, interleaved, CUDA events; finishes in a few minutes.

    python tests/gpu/step_time.py [--steps 40] [--rank 256]

Prints a markdown table (ms per step: plain, refresh, mean over a T_u F cycle) and writes
``$OUT/gpu_step_time.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import coap_dist
from coap_dist.models.llama import LLAMA_PRESETS, Llama


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Llama(LLAMA_PRESETS["350m"]).to("cuda", torch.bfloat16)


def _optimizers(
    args: argparse.Namespace,
) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    out = {}
    m = _model()
    out["adamw_fused"] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True))
    m = _model()
    groups = coap_dist.param_groups(m, rank=args.rank)
    out["coap"] = (
        m,
        coap_dist.COAPAdamW(
            groups, lr=1e-3, rank=args.rank, update_interval=args.tu, reproject_factor=args.f
        ),
    )
    try:
        from galore_torch import GaLoreAdamW

        m = _model()
        low = [
            p
            for g in coap_dist.param_groups(m)
            if g.get("algorithm") != "adamw"
            for p in g["params"]
        ]
        rest = [p for p in m.parameters() if all(p is not q for q in low)]
        galore = GaLoreAdamW(
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
        out["galore"] = (m, galore)
    except ImportError:
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--tu", type=int, default=8)
    parser.add_argument("--f", type=int, default=5)
    args = parser.parse_args()
    opts = _optimizers(args)
    for m, _ in opts.values():
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.steps):
        for name, (_, opt) in opts.items():  # interleaved: drift hits every optimizer alike
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    cycle = args.tu * args.f
    rows = {}
    for name, ts in times.items():
        ts = ts[cycle:] if len(ts) > 2 * cycle else ts[1:]
        plain = statistics.median(ts)
        rows[name] = {"plain_ms": plain, "max_ms": max(ts), "mean_ms": statistics.fmean(ts)}
    print(
        f"| optimizer | plain step ms | slowest step ms | mean ms (cycle T_u {args.tu}, F {args.f}) |"
    )
    print("| :-- | --: | --: | --: |")
    for name, r in rows.items():
        print(f"| {name} | {r['plain_ms']:.2f} | {r['max_ms']:.2f} | {r['mean_ms']:.2f} |")
    base = rows["adamw_fused"]["mean_ms"]
    for name, r in rows.items():
        print(f"{name}: {r['mean_ms'] / base:.2f}x AdamW fused (mean)")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_step_time.json"), "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
