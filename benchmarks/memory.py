"""Optimizer-state memory of LLaMA presets: estimator table and measured bytes.

1. Estimator (``coap_dist.memory.estimate_state_bytes``, shapes only, bf16): presets 60m,
   130m, 350m, 1b, 7b x optimizers adamw, adamw8bit, galore, coap, coap8bit x world sizes
   1, 2, 8, 64 (max bytes per rank; COAP also under each layout of ``LAYOUTS``).
2. Measurement: real fp32 models (60m and 130m by default) with random gradients, one
   ``step()`` of each real optimizer (torch AdamW, bitsandbytes AdamW8bit, GaLore AdamW,
   COAPAdamW, COAPAdamW 8-bit), state bytes from ``measure_state_bytes`` next to the
   estimate for the same configuration.

Ranks are the published ones (GaLore/COAP recipes): 60m 128, 130m 256, 350m 256, 1b 512,
7b 1024. Run (about a minute for the measurement on 2 cores)::

    python benchmarks/memory.py
    python benchmarks/memory.py --measure-models 60m     # quicker
    python benchmarks/memory.py --measure-models ""      # estimator only

Writes ``benchmarks/results/memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, machine_markdown, markdown_table, write_results

from coap_dist.memory import (
    LAYOUTS,
    MIB,
    OPTIMIZERS,
    estimate_state_bytes,
    lowrank_names,
    measure_state_bytes,
    named_params_with_modules,
)
from coap_dist.models.llama import LLAMA_PRESETS, Llama

RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
WORLD_SIZES = (1, 2, 8, 64)
OptimizerFactory = Callable[[nn.Module, int], torch.optim.Optimizer]


def estimator_table(models: list[str], dtype: torch.dtype) -> list[dict[str, Any]]:
    """One record per (model, optimizer, world size) with the estimate in bytes."""
    records = []
    for model in models:
        for optimizer in OPTIMIZERS:
            rank = RANKS[model] if optimizer in ("galore", "coap", "coap8bit") else None
            for ws in WORLD_SIZES:
                est = estimate_state_bytes(model, optimizer, rank=rank, dtype=dtype, world_size=ws)
                # COAP's per-rank figure depends on the layout (the layouts' own planners).
                layouts = {
                    layout: estimate_state_bytes(
                        model, optimizer, rank=rank, dtype=dtype, world_size=ws, layout=layout
                    ).max_per_rank
                    for layout in (LAYOUTS if optimizer in ("coap", "coap8bit") else ())
                }
                records.append(
                    {
                        "model": model,
                        "optimizer": optimizer,
                        "rank": rank,
                        "world_size": ws,
                        **est.to_dict(),
                        "max_per_rank_by_layout": layouts,
                    }
                )
    return records


def _split_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(AdamW parameters, low-rank parameters) as ``coap_dist.param_groups`` splits them."""
    low = lowrank_names(model)
    adamw, lowrank = [], []
    for name, p, _ in named_params_with_modules(model):
        (lowrank if name in low else adamw).append(p)
    return adamw, lowrank


def _galore(model: nn.Module, rank: int) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW

    adamw, lowrank = _split_groups(model)
    groups = [
        {"params": adamw},
        {
            "params": lowrank,
            "rank": rank,
            "update_proj_gap": 200,
            "scale": 0.25,
            "proj_type": "std",
        },
    ]
    return GaLoreAdamW(groups, lr=1e-3, no_deprecation_warning=True)


def _coap(state_bits: int | None) -> OptimizerFactory:
    def build(model: nn.Module, rank: int) -> torch.optim.Optimizer:
        import coap_dist

        return coap_dist.COAPAdamW(
            coap_dist.param_groups(model), lr=1e-3, rank=rank, state_bits=state_bits
        )

    return build


def _bnb(model: nn.Module, rank: int) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)


MEASURED: dict[str, OptimizerFactory] = {
    "adamw": lambda model, rank: torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True),
    "adamw8bit": _bnb,
    "galore": _galore,
    "coap": _coap(None),
    "coap8bit": _coap(8),
}


def measure(models: list[str], optimizers: list[str]) -> list[dict[str, Any]]:
    """Measured vs estimated state bytes of real fp32 models after one step."""
    records = []
    for name in models:
        torch.manual_seed(0)
        model = Llama(LLAMA_PRESETS[name])
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        for optimizer in optimizers:
            rank = RANKS[name]
            t0 = time.perf_counter()
            try:
                opt = MEASURED[optimizer](model, rank)
            except ImportError as err:
                print(f"{name} {optimizer}: skipped ({err})", flush=True)
                continue
            opt.step()
            measured = measure_state_bytes(opt)
            del opt
            gc.collect()
            est_rank = rank if optimizer in ("galore", "coap", "coap8bit") else None
            est = estimate_state_bytes(model, optimizer, rank=est_rank, dtype=torch.float32)
            records.append(
                {
                    "model": name,
                    "optimizer": optimizer,
                    "dtype": "fp32",
                    "rank": est_rank,
                    "measured": measured.to_dict(),
                    "estimated": est.to_dict(),
                    "relative_difference": (measured.total - est.total) / est.total,
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(
                f"{name} {optimizer:>9}: measured {measured.total / MIB:9.2f} MiB, estimated "
                f"{est.total / MIB:9.2f} MiB ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
        del model
        gc.collect()
    return records


def to_markdown(result: dict[str, Any]) -> str:
    """Human-readable report of the estimator table and the measurements."""
    est = result["estimates"]
    by_key = {(r["model"], r["optimizer"], r["world_size"]): r for r in est}
    models = list(dict.fromkeys(r["model"] for r in est))
    rows = []
    for model in models:
        base = by_key[(model, "adamw", 1)]["total"]
        for optimizer in OPTIMIZERS:
            one = by_key[(model, optimizer, 1)]
            rows.append(
                [
                    model,
                    optimizer,
                    one["rank"] if one["rank"] is not None else "-",
                    f"{one['total'] / MIB:,.1f}",
                    f"{one['total'] / base:.3f}",
                    *(
                        f"{by_key[(model, optimizer, ws)]['max_per_rank'] / MIB:,.1f}"
                        for ws in WORLD_SIZES[1:]
                    ),
                ]
            )
    layout_rows = [
        [
            model,
            optimizer,
            layout,
            *(
                f"{by_key[(model, optimizer, ws)]['max_per_rank_by_layout'][layout] / MIB:,.1f}"
                for ws in WORLD_SIZES[1:]
            ),
        ]
        for model in models
        for optimizer in ("coap", "coap8bit")
        for layout in LAYOUTS
    ]
    parts = [
        "# Optimizer-state memory",
        "Moment + projector tensors (and 8-bit quantization scales); step counters not counted. "
        "MiB = 2^20 bytes. Estimates are bf16 (parameter and state dtype; 8-bit variants keep "
        "projectors in bf16). Per-rank columns: bytes on the most loaded rank; COAP under "
        'the default owner placement (DDP `sharding="owner"`), other optimizers split evenly.',
        "## Estimator (bf16)",
        markdown_table(
            [
                "model",
                "optimizer",
                "rank",
                "total MiB",
                "/ bf16 AdamW",
                *(f"max/rank @{ws}" for ws in WORLD_SIZES[1:]),
            ],
            rows,
        ),
    ]
    parts += [
        "## COAP per layout (bf16, max MiB per rank)",
        "From the layouts' own planners (`coap-dist memory --layout ...`): `ddp_owner` is DDP "
        "with `sharding=\"owner\"`, `fsdp2` FSDP2's default (one process's side rule, "
        'moments by canonical rows, projectors by their rows), `fsdp2_owner` FSDP2 with `sharding="owner"`, '
        "`zero` DeepSpeed ZeRO 1-3.",
        markdown_table(
            ["model", "optimizer", "layout", *(f"max/rank @{ws}" for ws in WORLD_SIZES[1:])],
            layout_rows,
        ),
    ]
    if result["measured"]:
        mrows = [
            [
                r["model"],
                r["optimizer"],
                r["rank"] if r["rank"] is not None else "-",
                f"{r['measured']['total']:,}",
                f"{r['estimated']['total']:,}",
                f"{100 * r['relative_difference']:+.4f}%",
            ]
            for r in result["measured"]
        ]
        parts += [
            "## Measured (real fp32 models, one step, random gradients)",
            markdown_table(
                ["model", "optimizer", "rank", "measured bytes", "estimated bytes", "difference"],
                mrows,
            ),
        ]
    parts += ["## Machine", machine_markdown(result["machine"])]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Build both tables, print the markdown, write JSON and markdown files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default="60m,130m,350m,1b,7b",
        help="comma-separated presets for the estimator table",
    )
    parser.add_argument(
        "--measure-models",
        default="60m,130m",
        help="comma-separated presets to build and measure (fp32)",
    )
    parser.add_argument(
        "--measure-optimizers",
        default=",".join(MEASURED),
        help="comma-separated optimizers to measure",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    measure_models = [m for m in args.measure_models.split(",") if m]
    measure_opts = [o for o in args.measure_optimizers.split(",") if o]
    for flag, values in (("--models", models), ("--measure-models", measure_models)):
        bad = [m for m in values if m not in RANKS]
        if bad:
            parser.error(f"argument {flag}: unknown preset(s) {bad}; choose from {list(RANKS)}")
    bad = [o for o in measure_opts if o not in MEASURED]
    if bad:
        parser.error(f"argument --measure-optimizers: unknown {bad}; choose from {list(MEASURED)}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    result = {
        "benchmark": "memory",
        "machine": machine_info(),
        "ranks": RANKS,
        "world_sizes": list(WORLD_SIZES),
        "estimates": estimator_table(models, torch.bfloat16),
        "measured": measure(measure_models, measure_opts),
    }
    report = to_markdown(result)
    print(report)
    for path in write_results("memory", result, report, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
