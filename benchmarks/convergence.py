"""Convergence: validation loss of a tiny LLaMA on Shakespeare bytes, per optimizer.

The model is ``LLAMA_PRESETS["tiny"]`` (4 blocks, d 128, f 344, byte vocabulary 256); the data
is the corpus embedded in the package (``coap_dist.train.data``: byte tokens, the default
held-out works as the validation stream, training batches a pure function of (seed, step)).
Optimizers (built by :func:`train_step.build_optimizer`, so with the same rank, refresh
interval, scale, eps and parameter split as the speed benchmark):

* ``adamw`` (torch), ``coap`` (default: scale-free projector update, rotated moments),
  ``coap_reference`` (``projector_update="reference"``, ``moments="keep"``: the published
  behaviour), ``coap8bit`` (``state_bits=8``), ``galore`` (GaLoreAdamW), ``apollo``
  (APOLLOAdamW, if installed).

Protocol, identical for every optimizer:

1. learning-rate sweep: each lr of ``--lrs`` for ``--sweep-steps`` steps with seed 0; the lr
   with the lowest final validation loss is chosen (a non-finite loss counts as +inf);
2. the chosen lr for ``--steps`` steps with each seed of ``--seeds`` (model init and data
   order follow the seed; all optimizers see the same batches for a seed).

Every run: the same token budget (steps x batch x seq_len), linear warm-up over the first 10%
of its steps then cosine decay to 10% of the lr, gradient norm clipped to 1, no weight decay.
Validation loss (mean cross-entropy, nats per byte) on a fixed set of windows spread evenly over
the held-out works, every ``--eval-every`` steps and at the end.

Run::

    python benchmarks/convergence.py            # ~15-20 minutes on 2 shared cores
    python benchmarks/convergence.py --quick    # ~1 minute smoke check (numbers meaningless)

Writes ``benchmarks/results/convergence.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS_DIR,
    _version,
    machine_info,
    machine_markdown,
    markdown_table,
    publish,
    require_positive,
)
from train_step import LABELS, LowRankConfig, Unavailable, build_optimizer

from coap_dist.models.llama import LLAMA_PRESETS, Llama
from coap_dist.train.config import DataConfig
from coap_dist.train.data import Batches, eval_batches, load_shakespeare

DEFAULT_OPTIMIZERS = ("adamw", "coap", "coap_reference", "coap8bit", "galore", "apollo")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One training run.

    Attributes:
        steps: optimizer steps (the token budget is steps x batch x seq_len).
        batch, seq_len: sequences per step and tokens per sequence.
        eval_every: steps between validation evaluations (and one at the end).
        eval_batches: validation batches of ``batch`` windows each.
        warmup_frac: fraction of the steps with a linear lr warm-up.
        final_lr_frac: lr at the end of the cosine decay, as a fraction of the peak.
        clip: gradient-norm clipping threshold.
    """

    steps: int
    batch: int
    seq_len: int
    eval_every: int
    eval_batches: int
    warmup_frac: float = 0.1
    final_lr_frac: float = 0.1
    clip: float = 1.0

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak lr at ``step``: linear warm-up, then cosine to final_lr_frac."""
        warmup = max(1, round(self.warmup_frac * self.steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.final_lr_frac + (1.0 - self.final_lr_frac) * cosine


@torch.no_grad()
def validation_loss(model: nn.Module, val: np.ndarray, cfg: RunConfig) -> float:
    """Mean cross-entropy (nats per token) over the fixed validation windows."""
    losses = []
    for x, y in eval_batches(
        val, seq_len=cfg.seq_len, global_batch=cfg.batch, n_batches=cfg.eval_batches
    ):
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    return statistics.fmean(losses)


def train(
    label: str,
    *,
    lr: float,
    seed: int,
    cfg: RunConfig,
    lowrank: LowRankConfig,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
) -> dict[str, Any]:
    """Train the tiny LLaMA from scratch with optimizer ``label``; the loss curves.

    Returns ``{"label", "lr", "seed", "steps", "tokens", "train_loss": [per step],
    "val": [[step, tokens, loss], ...], "final_val_loss", "diverged", "seconds"}``; a run whose
    training loss turns non-finite stops there with ``final_val_loss = inf``.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = Llama(dataclasses.replace(LLAMA_PRESETS["tiny"], max_seq_len=cfg.seq_len))
    opt = build_optimizer(label, model, lr=lr, lowrank=lowrank)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
    batches = Batches(train_tokens, seq_len=cfg.seq_len, global_batch=cfg.batch, seed=seed)
    tokens_per_step = cfg.batch * cfg.seq_len
    train_loss: list[float] = []
    val: list[list[float]] = []
    diverged = False
    for step in range(cfg.steps):
        x, y = batches.get(step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        train_loss.append(loss.item())
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val.append([done, done * tokens_per_step, validation_loss(model, val_tokens, cfg)])
    final = float("inf") if diverged or not val else val[-1][2]
    if not math.isfinite(final):
        diverged = True
        final = float("inf")
    return {
        "label": label,
        "lr": lr,
        "seed": seed,
        "steps": cfg.steps,
        "tokens": cfg.steps * tokens_per_step,
        "train_loss": train_loss,
        "val": val,
        "final_val_loss": final,
        "diverged": diverged,
        "seconds": time.perf_counter() - t0,
    }


def _ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average: a_k = EMA_k / (1 - beta^k)."""
    out, avg = [], 0.0
    for k, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**k))
    return out


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Validation and smoothed training loss vs tokens, one colour per optimizer (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5))
    tokens_per_step = result["config"]["batch"] * result["config"]["seq_len"]
    for i, (label, runs) in enumerate(result["full_runs"].items()):
        color = f"C{i}"
        lr = result["chosen_lr"][label]
        for j, r in enumerate(runs):
            name = f"{label} (lr {lr:g})" if j == 0 else None
            if r["val"]:
                xs, ys = [v[1] for v in r["val"]], [v[2] for v in r["val"]]
                ax_val.plot(xs, ys, color=color, lw=1.2, ls="-" if j == 0 else "--", label=name)
            xs_t = [(k + 1) * tokens_per_step for k in range(len(r["train_loss"]))]
            ax_train.plot(
                xs_t,
                _ema(r["train_loss"]),
                color=color,
                lw=0.8,
                alpha=0.8,
                ls="-" if j == 0 else "--",
                label=name,
            )
    cfg = result["config"]
    for ax, title in ((ax_val, "validation loss"), (ax_train, "training loss (EMA 0.9)")):
        ax.set_xlabel("tokens")
        ax.set_ylabel("cross-entropy (nats / byte)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=8)
    finals = [
        s["final_val_mean"]
        for s in result["summary"].values()
        if math.isfinite(s["final_val_mean"])
    ]
    firsts = [
        r["val"][0][2]
        for runs in result["full_runs"].values()
        for r in runs
        if r["val"] and math.isfinite(r["val"][0][2])
    ]
    if finals and firsts:
        # Zoom on the part where the curves separate: from the first evaluation down.
        top, bottom = max(firsts) + 0.05, min(finals) - 0.15
        ax_val.set_ylim(bottom, top)
        ax_train.set_ylim(bottom - 0.1, top)
    fig.suptitle(
        f"tiny LLaMA on Shakespeare bytes: rank {cfg['rank']}, T_u {cfg['update_interval']}, "
        f"F {cfg['reproject_factor']}, seeds {cfg['seeds']} (solid: first, dashed: second)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Sweep, full runs and summary; the JSON-ready result."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    machine_at_start = machine_info()
    wall0 = time.perf_counter()
    val_docs = DataConfig(name="shakespeare").val_docs
    train_tokens, val_tokens = load_shakespeare(val_docs)
    lowrank = LowRankConfig(
        rank=args.rank,
        update_interval=args.update_interval,
        reproject_factor=args.reproject_factor,
        scale=args.scale,
    )
    common = {"batch": args.batch, "seq_len": args.seq_len, "eval_batches": args.eval_batches}
    sweep_cfg = RunConfig(steps=args.sweep_steps, eval_every=args.sweep_steps, **common)
    full_cfg = RunConfig(steps=args.steps, eval_every=args.eval_every, **common)
    data = {"lowrank": lowrank, "train_tokens": train_tokens, "val_tokens": val_tokens}

    unavailable: dict[str, str] = {}
    sweep: dict[str, dict[str, float]] = {}
    sweep_seconds: dict[str, float] = {}
    for label in args.optimizers:
        t0 = time.perf_counter()
        losses: dict[str, float] = {}
        try:
            for lr in args.lrs:
                r = train(label, lr=lr, seed=args.seeds[0], cfg=sweep_cfg, **data)
                losses[f"{lr:g}"] = r["final_val_loss"]
        except Unavailable as err:
            unavailable[label] = str(err)
            print(f"{label}: skipped ({err})", flush=True)
            continue
        sweep[label] = losses
        sweep_seconds[label] = time.perf_counter() - t0
        shown = ", ".join(f"lr {k}: {v:.4f}" for k, v in losses.items())
        print(f"sweep {label:>15}: {shown} ({sweep_seconds[label]:.0f} s)", flush=True)
    chosen = {label: float(min(losses, key=losses.__getitem__)) for label, losses in sweep.items()}
    edge = {
        label: chosen[label] in (min(args.lrs), max(args.lrs)) and len(args.lrs) > 1
        for label in chosen
    }

    full_runs: dict[str, list[dict[str, Any]]] = {label: [] for label in chosen}
    for seed in args.seeds:
        for label in chosen:
            r = train(label, lr=chosen[label], seed=seed, cfg=full_cfg, **data)
            full_runs[label].append(r)
            print(
                f"full {label:>15} lr {chosen[label]:g} seed {seed}: final val "
                f"{r['final_val_loss']:.4f} ({r['seconds']:.0f} s, "
                f"{time.perf_counter() - wall0:.0f} s elapsed)",
                flush=True,
            )

    summary: dict[str, dict[str, Any]] = {}
    for label, runs in full_runs.items():
        finals = [r["final_val_loss"] for r in runs]
        summary[label] = {
            "lr": chosen[label],
            "lr_at_grid_edge": edge[label],
            "final_val_per_seed": finals,
            "final_val_mean": statistics.fmean(finals),
            "final_val_spread": max(finals) - min(finals),
            "seconds_per_run": statistics.fmean(r["seconds"] for r in runs),
        }
    if "adamw" in summary:
        base = summary["adamw"]["final_val_mean"]
        for s in summary.values():
            s["vs_adamw"] = s["final_val_mean"] / base
    return {
        "benchmark": "convergence",
        "machine": machine_at_start,
        "load_average_1m_at_end": machine_info()["load_average_1m"],
        "wall_seconds": time.perf_counter() - wall0,
        "quick": args.quick,
        "config": {
            "model": "tiny",
            "parameters": LLAMA_PRESETS["tiny"].num_params(),
            "data": "shakespeare bytes (coap_dist.train.data)",
            "val_docs": list(val_docs),
            "train_tokens_available": len(train_tokens),
            "val_tokens_available": len(val_tokens),
            "batch": args.batch,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "tokens_per_run": args.steps * args.batch * args.seq_len,
            "sweep_steps": args.sweep_steps,
            "lrs": list(args.lrs),
            "seeds": list(args.seeds),
            "eval_every": args.eval_every,
            "eval_batches": args.eval_batches,
            "eval_tokens": args.eval_batches * args.batch * args.seq_len,
            "schedule": "linear warm-up 10% of steps, cosine to 10% of the lr",
            "grad_clip": full_cfg.clip,
            "weight_decay": 0.0,
            "eps": 1e-6,
            "rank": args.rank,
            "update_interval": args.update_interval,
            "reproject_factor": args.reproject_factor,
            "scale": args.scale,
            "threads": args.threads,
            "packages": {name: _version(name) for name in ("apollo-torch", "galore-torch")},
        },
        "unavailable": unavailable,
        "sweep": sweep,
        "sweep_seconds": sweep_seconds,
        "chosen_lr": chosen,
        "summary": summary,
        "full_runs": full_runs,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """Human-readable report of :func:`run`'s result."""
    cfg, summary = result["config"], result["summary"]
    lrs = [f"{lr:g}" for lr in cfg["lrs"]]
    rows = []
    for label, s in summary.items():
        rows.append(
            [
                label,
                f"{s['lr']:g}" + (" (grid edge)" if s["lr_at_grid_edge"] else ""),
                *(f"{result['sweep'][label][lr]:.4f}" for lr in lrs),
                *(f"{v:.4f}" for v in s["final_val_per_seed"]),
                f"{s['final_val_mean']:.4f}",
                f"{s['vs_adamw']:.4f}" if "vs_adamw" in s else "-",
                f"{s['seconds_per_run']:.0f}",
            ]
        )
    header = [
        "optimizer",
        "chosen lr",
        *(f"sweep lr {lr}" for lr in lrs),
        *(f"final val seed {seed}" for seed in cfg["seeds"]),
        "mean",
        "/ AdamW",
        "s / run",
    ]
    parts = [
        "# Convergence: tiny LLaMA on Shakespeare bytes",
        (
            "**Quick mode: smoke check only, numbers are not meaningful.**"
            if result["quick"]
            else ""
        ),
        f"LLaMA `tiny` ({cfg['parameters']:,} parameters, byte vocabulary), "
        f"{cfg['steps']} steps x {cfg['batch']} x {cfg['seq_len']} tokens = "
        f"{cfg['tokens_per_run']:,} training tokens per run for every optimizer; validation on "
        f"{cfg['eval_tokens']:,} tokens of {', '.join(cfg['val_docs'])} (held out). "
        f"Rank {cfg['rank']}, T_u={cfg['update_interval']}, F={cfg['reproject_factor']}, "
        f"scale {cfg['scale']}; {cfg['schedule']}; gradient clipping {cfg['grad_clip']}; "
        f"no weight decay; eps {cfg['eps']}. lr chosen per optimizer by the same sweep "
        f"({', '.join(lrs)}; {cfg['sweep_steps']} steps, seed {cfg['seeds'][0]}, lowest final "
        f"validation loss), then {len(cfg['seeds'])} seeds at the chosen lr. Loss in nats per "
        f"byte; {cfg['threads']} torch threads.",
        markdown_table(header, rows),
        "![curves](convergence.png)",
    ]
    if result["unavailable"]:
        parts += [
            "## Not run",
            "\n".join(f"- `{k}`: {v}" for k, v in result["unavailable"].items()),
        ]
    parts += [
        "## Machine (at start)",
        machine_markdown(result["machine"]),
        f"Load average at the end: {result['load_average_1m_at_end']:.2f}; "
        f"benchmark wall time {result['wall_seconds']:.0f} s.",
    ]
    return "\n\n".join(p for p in parts if p)


def _labels(text: str) -> list[str]:
    labels = [s for s in text.split(",") if s]
    bad = [s for s in labels if s not in LABELS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown optimizer(s) {bad}; choose from {LABELS}")
    return labels


def _floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s]


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


QUICK = {
    "steps": 12,
    "sweep_steps": 6,
    "batch": 4,
    "seq_len": 32,
    "eval_every": 4,
    "eval_batches": 2,
    "lrs": [1e-3, 1e-2],
    "update_interval": 3,
    "reproject_factor": 2,
    "rank": 16,
}
"""Overrides of ``--quick`` (a smoke check of the whole pipeline in about a minute)."""


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (defaults: the full measurement, ~20 minutes on 2 cores)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="steps of each full run")
    p.add_argument("--sweep-steps", type=int, default=50, help="steps of each sweep run")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--eval-every", type=int, default=25, help="steps between evaluations")
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches")
    p.add_argument("--lrs", type=_floats, default=[1e-3, 3e-3, 1e-2, 3e-2], help="lr sweep grid")
    p.add_argument("--seeds", type=_ints, default=[0, 1], help="seeds of the full runs")
    p.add_argument("--rank", type=int, default=32, help="rank for COAP, GaLore, APOLLO")
    p.add_argument("--update-interval", type=int, default=20, help="T_u (update_proj_gap)")
    p.add_argument("--reproject-factor", type=int, default=5, help="F")
    p.add_argument("--scale", type=float, default=1.0, help="alpha (COAP, GaLore, APOLLO)")
    # One thread: on 2 cores shared with other jobs, 2 OpenMP threads ran 3-20x slower per step.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--optimizers",
        type=_labels,
        default=list(DEFAULT_OPTIMIZERS),
        help=f"comma-separated subset of {','.join(LABELS)}",
    )
    p.add_argument("--quick", action="store_true", help="tiny budget: smoke check (~1 min)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the markdown report, write JSON, markdown and PNG files."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    require_positive(
        parser,
        args,
        (
            "steps",
            "sweep_steps",
            "batch",
            "seq_len",
            "eval_every",
            "eval_batches",
            "rank",
            "update_interval",
            "reproject_factor",
            "threads",
        ),
    )
    if not args.lrs or not args.seeds:
        parser.error("--lrs and --seeds must each name at least one value")
    if args.seq_len > LLAMA_PRESETS["tiny"].max_seq_len:
        parser.error(f"--seq-len must be at most {LLAMA_PRESETS['tiny'].max_seq_len}")
    result = run(args)
    publish("convergence", result, to_markdown(result), args.out)
    png = plot(result, args.out / "convergence.png")
    print(f"wrote {png}" if png else "matplotlib is not installed: no convergence.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
