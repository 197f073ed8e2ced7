"""Convergence: validation loss of the tiny LLaMA on Shakespeare bytes, per optimizer variant.

Every run is the library's own training job, ``python -m coap_dist.train`` (Hydra config
``coap_dist/configs/train.yaml``, the app's optimizer factory, training loop, data and
validation), started as a subprocess with the overrides of its variant; this script only
chooses the runs, reads each run's ``metrics.jsonl`` / ``summary.json`` and tabulates.

Variants (:data:`VARIANTS`): ``adamw``, ``galore``, ``apollo``, ``coap_reference`` (the
published behaviour: ``projector_update=reference``, ``moments=keep``), ``coap_scale_free``
(``scale_free`` + ``rotate``), the two half-way COAP variants that say which of them matters
(``coap_sf_keep``, ``coap_ref_rotate``), ``coap_right`` (the library's defaults with every
matrix right-projected: what FSDP2's default row-shard layout runs), ``coap_adaptive``
(``refresh=adaptive``; ``coap_adaptive_b5`` with ``refresh_budget=5``: up to one SVD per T_u
where the residual asks for it), ``coap_f1`` (an SVD every T_u steps, GaLore's frequency) and
``coap_auto_rank`` (``rank=auto`` at the fixed-rank state bytes).
The report marks which variant the library's defaults (:class:`COAPAdamWConfig`) are. Every low-rank method gets the same rank and the
same refresh interval T_u (GaLore's / APOLLO's ``update_proj_gap``).

Protocol, identical for every variant:

1. learning-rate sweep: each lr of ``--lrs`` for ``--sweep-steps`` steps with the first seed;
   the lr with the lowest final validation loss is chosen (a failed or non-finite run counts
   as +inf);
2. the chosen lr for ``--steps`` steps with each seed of ``--seeds`` (model init and data order
   follow the seed; every variant sees the same batches for a seed).

Reported beside the final validation loss (mean and spread max - min over seeds): the refresh
work per matrix per 1,000 steps (SVDs: COAP's seeded and warm-started randomized SVDs,
GaLore's SVDs; correlation updates: COAP's projector steps) and the optimizer-state bytes.

Run::

    python benchmarks/convergence.py --jobs 2     # the full measurement (~2 h on 2 cores)
    python benchmarks/convergence.py --quick      # ~2 minute smoke check (numbers meaningless)

Runs are kept under ``--runs-dir`` and reused when the same run (same effective config, see
:func:`run_key`) is asked for again, so an interrupted measurement continues where it
stopped; after a change to the optimizer's code, delete the runs dir. Writes
``benchmarks/results/convergence.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, machine_markdown, markdown_table, publish

from coap_dist.models.llama import LLAMA_PRESETS
from coap_dist.optim.config import COAPAdamWConfig

REPO = Path(__file__).resolve().parents[1]
MATRICES_PER_BLOCK = 7
"""q, k, v, o, gate, up, down: the block matrices every low-rank method projects."""

VARIANTS: dict[str, tuple[str, ...]] = {
    "adamw": ("optimizer=adamw",),
    "galore": ("optimizer=galore", "optimizer.rank={rank}", "optimizer.update_proj_gap={tu}"),
    "apollo": ("optimizer=apollo", "optimizer.rank={rank}", "optimizer.update_proj_gap={tu}"),
    "coap_reference": (
        "optimizer=coap",
        "optimizer.projector_update=reference",
        "optimizer.moments=keep",
    ),
    "coap_scale_free": (
        "optimizer=coap",
        "optimizer.projector_update=scale_free",
        "optimizer.moments=rotate",
    ),
    "coap_sf_keep": (
        "optimizer=coap",
        "optimizer.projector_update=scale_free",
        "optimizer.moments=keep",
    ),
    "coap_ref_rotate": (
        "optimizer=coap",
        "optimizer.projector_update=reference",
        "optimizer.moments=rotate",
    ),
    "coap_right": ("optimizer=coap", "optimizer.projection_side=right"),
    "coap_adaptive": ("optimizer=coap", "optimizer.refresh=adaptive"),
    "coap_adaptive_b5": (
        "optimizer=coap",
        "optimizer.refresh=adaptive",
        "optimizer.refresh_budget=5",
    ),
    "coap_f1": ("optimizer=coap", "optimizer.reproject_factor=1"),
    "coap_auto_rank": ("optimizer=coap", "optimizer.rank=auto", "optimizer.rank_ratio={ratio}"),
    "coap_fsdp2_2ranks": (
        "optimizer=coap",
        "optimizer.projector_update=scale_free",
        "optimizer.moments=rotate",
        "strategy=fsdp2",
    ),
}
"""Label -> the Hydra overrides of the variant ({rank}, {tu}: the common rank and T_u)."""

PROCESSES = {"coap_fsdp2_2ranks": 2}
"""Variants that are a layout rather than an optimizer variant: the library's default COAP
under FSDP2's default layout, launched with ``torchrun --standalone`` on this many CPU
processes (gloo; the same global batches as one process, see ``coap_dist.train.data``)."""

COAP_COMMON = (
    "optimizer.rank={rank}",
    "optimizer.rank_ratio=null",
    "optimizer.update_interval={tu}",
    "optimizer.reproject_factor={f}",
)
"""Overrides every COAP variant starts from (a variant's own ones come after and win)."""

DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v not in ("coap_ref_rotate", "coap_f1", *PROCESSES))
"""What the published table measures (the other two are kept for follow-up runs)."""

MODE_VARIANTS = {
    ("reference", "keep"): "coap_reference",
    ("scale_free", "rotate"): "coap_scale_free",
    ("scale_free", "keep"): "coap_sf_keep",
    ("reference", "rotate"): "coap_ref_rotate",
}
"""(projector_update, moments) -> the variant that runs them with every other default."""


def default_variant() -> str:
    """The variant the library's defaults are (:class:`COAPAdamWConfig`)."""
    d = COAPAdamWConfig()
    return MODE_VARIANTS[(d.projector_update, d.moments)]


QUICK = {
    "steps": 12,
    "sweep_steps": 6,
    "batch": 4,
    "seq_len": 32,
    "eval_every": 6,
    "eval_batches": 2,
    "lrs": [1e-3, 1e-2],
    "seeds": [0, 1],
    "update_interval": 3,
    "reproject_factor": 2,
    "rank": 8,
    "log_every": 3,
}
"""Overrides of ``--quick`` (a smoke check of the whole pipeline)."""


def overrides(
    label: str, args: argparse.Namespace, *, lr: float, seed: int, steps: int
) -> list[str]:
    """The complete Hydra command line of one run."""
    fill = {
        "rank": args.rank,
        "tu": args.update_interval,
        "f": args.reproject_factor,
        "ratio": f"{LLAMA_PRESETS['tiny'].dim / args.rank:g}",  # rank_ratio giving `rank`
    }
    own = [o.format(**fill) for o in VARIANTS[label]]
    coap = [o.format(**fill) for o in COAP_COMMON] if own[0] == "optimizer=coap" else []
    # A variant's own setting of a key replaces the common one.
    coap = [o for o in coap if o.split("=")[0] not in {v.split("=")[0] for v in own}]
    warmup = max(1, round(args.warmup_frac * steps))
    return [
        own[0],
        "compare=false",
        f"steps={steps}",
        f"warmup_steps={warmup}",
        f"batch_size={args.batch}",
        f"seq_len={args.seq_len}",
        f"eval.every={min(args.eval_every, steps)}",
        f"eval.batches={args.eval_batches}",
        f"log_every={min(args.log_every, steps)}",
        f"threads={args.threads}",
        "logger=jsonl",
        "progress=false",
        "plot=false",
        f"seed={seed}",
        f"optimizer.lr={lr:g}",
        f"optimizer.name={label}",
        *coap,
        *own[1:],
    ]


_HYDRA = threading.Lock()
"""Hydra's global state admits one compose at a time (variants run in threads)."""


def run_key(cmd: list[str]) -> str:
    """Hash of the config the app will run (Hydra-composed and resolved, as the app gets
    it), less optimizer keys at their library default: a run is reused only for the same
    effective settings, and a new key added with its default does not invalidate runs."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from coap_dist.train.config import RECIPES

    with _HYDRA, initialize_config_module(config_module="coap_dist.configs", version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="train", overrides=cmd), resolve=True)
    assert isinstance(cfg, dict)
    cfg.pop("hydra", None)
    opt = cfg["optimizer"]
    recipe = RECIPES[opt["kind"]]
    fields = {f.name: f.default for f in dataclasses.fields(recipe)}
    cfg["optimizer"] = {
        k: v
        for k, v in opt.items()
        if not (k in fields and (tuple(v) if isinstance(v, list) else v) == fields[k])
    }
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


def run_one(
    label: str, args: argparse.Namespace, *, lr: float, seed: int, steps: int
) -> dict[str, Any]:
    """Train one run with ``python -m coap_dist.train`` (or reuse a finished identical one)
    and read its outcome: the validation curve, the last optimizer counters, state bytes."""
    cmd = overrides(label, args, lr=lr, seed=seed, steps=steps)
    key = run_key(cmd)
    run_dir = args.runs_dir / f"{label}_lr{lr:g}_s{seed}_n{steps}_{key}"
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    seconds = float("nan")
    error = None
    if not summary_path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        nproc = PROCESSES.get(label, 1)
        launcher = (
            [
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nnodes=1",
                f"--nproc-per-node={nproc}",
            ]
            if nproc > 1
            else []
        )
        proc = subprocess.run(
            [sys.executable, *launcher, "-m", "coap_dist.train", *cmd, f"hydra.run.dir={run_dir}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        seconds = time.perf_counter() - t0
        (run_dir / "seconds").write_text(f"{seconds}\n")
        if proc.returncode != 0:
            error = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            (run_dir / "error.txt").write_text(proc.stdout + proc.stderr)
    elif (run_dir / "seconds").exists():
        seconds = float((run_dir / "seconds").read_text())
    out: dict[str, Any] = {"label": label, "lr": lr, "seed": seed, "steps": steps}
    out["overrides"] = cmd
    out["seconds"] = seconds
    if error is not None or not summary_path.exists():
        print(f"  {label} lr {lr:g} seed {seed}: FAILED {error}", flush=True)
        return {**out, "final_val_loss": math.inf, "error": error, "val": [], "train": []}
    (summary,) = json.loads(summary_path.read_text())
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    tokens_per_step = args.batch * args.seq_len
    val = [
        [r["step"], r["step"] * tokens_per_step, r["val/loss"]] for r in records if "val/loss" in r
    ]
    train = [[r["step"], r["train/loss"]] for r in records if "train/loss" in r]
    last = [r for r in records if "train/loss" in r][-1]
    final = summary["val_loss"]
    out.update(
        final_val_loss=final if math.isfinite(final) else math.inf,
        val=val,
        train=train,
        state_bytes=max(summary["state_bytes"]),
        tokens_per_s=summary["tokens_per_s"],
        counters={k: v for k, v in last.items() if k.startswith("optim/")},
    )
    return out


def refresh_work(label: str, run: dict[str, Any], args: argparse.Namespace) -> tuple[float, float]:
    """(SVDs, correlation updates) per low-rank matrix per 1,000 steps of one run."""
    n_mat = MATRICES_PER_BLOCK * LLAMA_PRESETS["tiny"].n_layers
    per_k = 1000.0 / run["steps"] / n_mat
    if label.startswith("coap"):
        c = run.get("counters", {})
        svds = c.get("optim/refreshes", math.nan) - c.get("optim/projector_updates", math.nan)
        return svds * per_k, c.get("optim/projector_updates", math.nan) * per_k
    if label == "galore":  # an SVD at the first step and every update_proj_gap steps
        return n_mat * math.ceil(run["steps"] / args.update_interval) * per_k, 0.0
    return 0.0, 0.0  # AdamW; APOLLO draws random projections (no SVD)


def variant(label: str, args: argparse.Namespace) -> dict[str, Any]:
    """Sweep, then the seeds at the chosen lr, for one variant (runs in order)."""
    sweep = {}
    for lr in args.lrs:
        r = run_one(label, args, lr=lr, seed=args.seeds[0], steps=args.sweep_steps)
        sweep[f"{lr:g}"] = r["final_val_loss"]
        print(f"sweep {label:>16} lr {lr:g}: {r['final_val_loss']:.4f}", flush=True)
    chosen = float(min(sweep, key=sweep.__getitem__))
    runs = [run_one(label, args, lr=chosen, seed=s, steps=args.steps) for s in args.seeds]
    finals = [r["final_val_loss"] for r in runs]
    for r in runs:
        print(f"full  {label:>16} lr {chosen:g} seed {r['seed']}: {r['final_val_loss']:.4f}")
    work = [refresh_work(label, r, args) for r in runs]
    summary = {
        "lr": chosen,
        "lr_at_grid_edge": len(args.lrs) > 1 and chosen in (min(args.lrs), max(args.lrs)),
        "final_val_per_seed": finals,
        "final_val_mean": statistics.fmean(finals),
        "final_val_spread": max(finals) - min(finals),
        "svds_per_matrix_per_1k_steps": statistics.fmean(w[0] for w in work),
        "updates_per_matrix_per_1k_steps": statistics.fmean(w[1] for w in work),
        "state_bytes": max((r.get("state_bytes", 0) for r in runs), default=0),
        "seconds_per_run": statistics.fmean(r["seconds"] for r in runs),
    }
    return {"sweep": sweep, "runs": runs, "summary": summary}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant (``--jobs`` at a time), then the JSON-ready result."""
    machine_at_start = machine_info()
    wall0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {label: pool.submit(variant, label, args) for label in args.variants}
        done = {label: f.result() for label, f in futures.items()}
    summary = {label: d["summary"] for label, d in done.items()}
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
        "default_variant": default_variant(),
        "config": {
            "model": "tiny",
            "parameters": LLAMA_PRESETS["tiny"].num_params(),
            "data": "shakespeare bytes (coap_dist.train.data, the app's default held-out works)",
            "entry_point": "python -m coap_dist.train (one subprocess per run)",
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
            "schedule": f"linear warm-up {args.warmup_frac:.0%} of steps, cosine to 10% of the lr",
            "rank": args.rank,
            "update_interval": args.update_interval,
            "reproject_factor": args.reproject_factor,
            "threads": args.threads,
            "variants": {label: list(VARIANTS[label]) for label in args.variants},
        },
        "sweep": {label: d["sweep"] for label, d in done.items()},
        "chosen_lr": {label: s["lr"] for label, s in summary.items()},
        "summary": summary,
        "full_runs": {label: d["runs"] for label, d in done.items()},
    }


PEERS = ("adamw", "galore", "apollo")


def comparisons(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Paired comparisons (same seed = same initial weights and batches): for the best COAP
    variant at no more state than the default against each peer and the published
    behaviour, and for each COAP variant against the default, the per-seed differences of
    final validation loss (negative: the first is better) and whether the gap of the means
    exceeds the larger seed spread."""
    summary = result["summary"]
    default = result["default_variant"]
    cap = summary.get(default, {}).get("state_bytes", 0)
    coaps = [k for k, v in summary.items() if k.startswith("coap") and v["state_bytes"] <= cap]
    pairs: list[tuple[str, str]] = []
    if coaps:
        best = min(coaps, key=lambda k: summary[k]["final_val_mean"])
        pairs += [(best, p) for p in (*PEERS, "coap_reference") if p in summary and p != best]
    pairs += [
        (k, default)
        for k in summary
        if k.startswith("coap") and k != default and default in summary
    ]
    out = []
    for a, b in dict.fromkeys(pairs):
        sa, sb = summary[a], summary[b]
        diffs = [
            x - y for x, y in zip(sa["final_val_per_seed"], sb["final_val_per_seed"], strict=True)
        ]
        gap = sa["final_val_mean"] - sb["final_val_mean"]
        spread = max(sa["final_val_spread"], sb["final_val_spread"])
        out.append(
            {
                "a": a,
                "b": b,
                "per_seed": diffs,
                "gap": gap,
                "spread": spread,
                "beyond": abs(gap) > spread,
            }
        )
    return out


def to_markdown(result: dict[str, Any], name: str = "convergence") -> str:
    """Human-readable report of :func:`run`'s result (``name``: the stem of its files)."""
    cfg, summary = result["config"], result["summary"]
    lrs = [f"{lr:g}" for lr in cfg["lrs"]]
    rows = []
    for label, s in summary.items():
        rows.append(
            [
                label + (" (default)" if label == result["default_variant"] else ""),
                f"{s['lr']:g}" + (" (edge)" if s["lr_at_grid_edge"] else ""),
                *(f"{result['sweep'][label][lr]:.4f}" for lr in lrs),
                " / ".join(f"{v:.4f}" for v in s["final_val_per_seed"]),
                f"{s['final_val_mean']:.4f} ± {s['final_val_spread'] / 2:.4f}",
                f"{s['vs_adamw']:.4f}" if "vs_adamw" in s else "-",
                f"{s['svds_per_matrix_per_1k_steps']:.1f}",
                f"{s['updates_per_matrix_per_1k_steps']:.1f}",
                f"{s['state_bytes'] / 2**20:.3f}",
                f"{s['seconds_per_run']:.0f}",
            ]
        )
    header = [
        "variant",
        "lr",
        *(f"sweep {lr}" for lr in lrs),
        "final val per seed",
        "mean ± half spread",
        "/ AdamW",
        "SVDs / matrix / 1k steps",
        "updates / matrix / 1k steps",
        "state MiB",
        "s / run",
    ]
    parts = [
        "# Convergence: tiny LLaMA on Shakespeare bytes",
        "**Quick mode: smoke check only, numbers are not meaningful.**" if result["quick"] else "",
        f"LLaMA `tiny` ({cfg['parameters']:,} parameters, byte vocabulary), each run "
        f"`{cfg['entry_point']}`: {cfg['steps']} steps x {cfg['batch']} x {cfg['seq_len']} "
        f"tokens = {cfg['tokens_per_run']:,} training tokens; validation on "
        f"{cfg['eval_tokens']:,} held-out tokens. Rank {cfg['rank']}, T_u={cfg['update_interval']}"
        f" (GaLore / APOLLO update_proj_gap), F={cfg['reproject_factor']}; {cfg['schedule']}; "
        f"the app's defaults otherwise (gradient clipping 1.0, no weight decay). lr chosen per "
        f"variant by the same sweep ({', '.join(lrs)}; {cfg['sweep_steps']} steps, seed "
        f"{cfg['seeds'][0]}), then seeds {cfg['seeds']} at the chosen lr. Loss in nats per "
        f"byte; {cfg['threads']} torch thread(s) per run.",
        markdown_table(header, rows),
        "Paired by seed (negative: the first variant is better; beyond: |gap of means| > the "
        "larger seed spread):",
        markdown_table(
            ["first", "second", "per-seed difference", "gap of means", "spread", "beyond spread"],
            [
                [
                    c["a"],
                    c["b"],
                    " / ".join(f"{d:+.4f}" for d in c["per_seed"]),
                    f"{c['gap']:+.4f}",
                    f"{c['spread']:.4f}",
                    "yes" if c["beyond"] else "no",
                ]
                for c in comparisons(result)
            ],
        ),
        "Overrides per variant: "
        + "; ".join(f"`{k}`: {' '.join(v)}" for k, v in cfg["variants"].items()),
        f"![curves]({name}.png)",
        "## Machine (at start)",
        machine_markdown(result["machine"]),
        f"Load average at the end: {result['load_average_1m_at_end']:.2f}; "
        f"benchmark wall time {result['wall_seconds']:.0f} s.",
    ]
    return "\n\n".join(p for p in parts if p)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Validation loss vs tokens (mean over seeds) and its tail, one colour per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_all, ax_tail) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (label, runs) in enumerate(result["full_runs"].items()):
        curves = [r["val"] for r in runs if r["val"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [curves[0][k][1] for k in range(n)]
        mean = [statistics.fmean(c[k][2] for c in curves) for k in range(n)]
        lo = [min(c[k][2] for c in curves) for k in range(n)]
        hi = [max(c[k][2] for c in curves) for k in range(n)]
        for ax, start in ((ax_all, 0), (ax_tail, n // 2)):
            ax.plot(
                xs[start:],
                mean[start:],
                color=f"C{i % 10}",
                lw=1.3,
                label=label,
                ls="-" if i < 10 else "--",
            )
            ax.fill_between(xs[start:], lo[start:], hi[start:], color=f"C{i % 10}", alpha=0.15)
    for ax, title in ((ax_all, "validation loss"), (ax_tail, "second half (band: seed range)")):
        ax.set_xlabel("tokens")
        ax.set_ylabel("cross-entropy (nats / byte)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_tail.legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(
        f"tiny LLaMA, Shakespeare bytes, rank {cfg['rank']}, T_u {cfg['update_interval']}, "
        f"F {cfg['reproject_factor']}, seeds {cfg['seeds']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s]


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def _variants(text: str) -> list[str]:
    labels = [s for s in text.split(",") if s]
    bad = [s for s in labels if s not in VARIANTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    return labels


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (defaults: the full measurement)."""
    defaults = COAPAdamWConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="steps of each full run")
    p.add_argument("--sweep-steps", type=int, default=400, help="steps of each sweep run")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--warmup-frac", type=float, default=0.1, help="warm-up fraction of steps")
    p.add_argument("--eval-every", type=int, default=250, help="steps between evaluations")
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches")
    p.add_argument("--log-every", type=int, default=50, help="steps between metric records")
    p.add_argument(
        "--lrs", type=_floats, default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1], help="lr sweep grid"
    )
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="seeds of the full runs")
    p.add_argument("--rank", type=int, default=32, help="rank of every low-rank method")
    p.add_argument(
        "--update-interval", type=int, default=defaults.update_interval, help="T_u (GaLore gap)"
    )
    p.add_argument(
        "--reproject-factor", type=int, default=defaults.reproject_factor, help="COAP's F"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at the same time")
    p.add_argument(
        "--variants",
        type=_variants,
        default=list(DEFAULT_VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    p.add_argument("--quick", action="store_true", help="tiny budget: smoke check")
    p.add_argument("--runs-dir", type=Path, default=REPO / "outputs" / "convergence")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    p.add_argument(
        "--name", default="convergence", help="stem of the result files ({name}.json/.md/.png)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the markdown report, write JSON, markdown and PNG files."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.runs_dir = args.runs_dir / "quick"
    for flag in ("steps", "sweep_steps", "batch", "seq_len", "eval_every", "rank", "jobs"):
        if getattr(args, flag) < 1:
            parser.error(f"argument --{flag.replace('_', '-')}: must be a positive integer")
    if not args.lrs or not args.seeds:
        parser.error("--lrs and --seeds must each name at least one value")
    result = run(args)
    result["comparisons"] = comparisons(result)
    publish(args.name, result, to_markdown(result, args.name), args.out)
    png = plot(result, args.out / f"{args.name}.png")
    print(f"wrote {png}" if png else f"matplotlib is not installed: no {args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
