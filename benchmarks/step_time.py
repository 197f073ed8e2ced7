"""optimizer.step() time: COAP vs its floor, torch AdamW (fused, foreach), GaLore and APOLLO.

Only ``step()`` is timed: the parameters are a stack of LLaMA linear weights (per layer
wq, wk, wv, wo: d x d; w1, w3: f x d; w2: d x f) whose gradients are fixed random tensors set
once, so there is no forward or backward pass. Each run builds a fresh optimizer and takes
``T_u * F + 1`` steps, k = 0 .. T_u*F, which covers:

* k = 0: state creation and the first projector (COAP: randomized SVD; GaLore: full SVD);
* k = 1 .. T_u*F: exactly one refresh cycle: plain steps, F - 1 projector updates
  (k % T_u == 0; GaLore does a full SVD at each) and one recalibration at k = T_u*F.

Reported per optimizer (median over interleaved repeats): the amortised step time (mean over
the cycle k = 1 .. T_u*F), the median plain step, the median update step, the recalibration
step, the first step and the cycle maximum. Runs are interleaved (optimizer order rotates
every repeat) so that load from other processes on the machine hits all of them alike.

Rows: ``floor`` (the projected-Adam floor: two GEMMs and an r-wide Adam on a fixed P,
:class:`ProjectedAdamFloor`), ``adamw_fused``, ``adamw`` (foreach), ``coap``,
``coap_reference``, ``coap_dense`` (COAP's AdamW path on the same tensors; ``coap_dense-unchecked``:
with ``skip_nonfinite=False``), ``adamw_fused+check`` (fused AdamW under ``torch.amp.GradScaler``
at scale 1: torch's own non-finite check and skip, :class:`ScalerChecked`), ``adamw_fused+clip``
/ ``coap_dense+clip`` (``clip_grad_norm_`` then ``step()``, timed together), ``galore``,
``apollo``; ``adamw_fused@vectors`` / ``coap_dense@vectors``: the two AdamW paths on
``--vectors`` 1-D tensors of d entries instead (what norm weights and biases cost, where
per-parameter overhead rather than memory traffic sets the time). The ratios section checks
the targets of :data:`TARGETS` (plain <= 1.05 floor, recalibration <= 2.1 plain, update <= 2.6
plain, cycle mean <= 1.2 floor, dense path <= 1.05 fused AdamW).

Run (about 4 minutes on 2 cores with the defaults)::

    python benchmarks/step_time.py
    python benchmarks/step_time.py --layers 1 --repeats 2 --no-reference   # quicker

Writes ``benchmarks/results/step_time.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS_DIR,
    machine_info,
    machine_markdown,
    markdown_table,
    publish,
    require_positive,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def llama_matrices(dim: int, ffn: int, layers: int) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of the linear weights of ``layers`` LLaMA blocks (Meta layout)."""
    shapes: list[tuple[str, tuple[int, int]]] = []
    for i in range(layers):
        for w in ("wq", "wk", "wv", "wo"):
            shapes.append((f"layers.{i}.attention.{w}.weight", (dim, dim)))
        shapes.append((f"layers.{i}.feed_forward.w1.weight", (ffn, dim)))
        shapes.append((f"layers.{i}.feed_forward.w2.weight", (dim, ffn)))
        shapes.append((f"layers.{i}.feed_forward.w3.weight", (ffn, dim)))
    return shapes


def make_params(
    shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, seed: int = 0
) -> list[nn.Parameter]:
    """Parameters N(0, 0.02) with fixed gradients N(0, 1e-3) (the same for every run)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params


class ProjectedAdamFloor(torch.optim.Optimizer):
    """The floor of a projected-Adam step: a fixed orthonormal P per matrix (r x b in the
    canonical orientation of :mod:`coap_dist.functional.projection`), R = G P^T, Adam on R
    (r-wide, torch._foreach), W <- W - lr_t D P. Two GEMMs and the r-wide Adam, nothing
    else: what any low-rank-moment optimizer must pay at a plain step."""

    def __init__(self, params: list[nn.Parameter], rank: int, lr: float = 1e-3) -> None:
        from coap_dist.functional import projection as fproj

        super().__init__(params, {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-6})
        gen = torch.Generator().manual_seed(0)
        self.t = 0
        self.items = []
        for p in self.param_groups[0]["params"]:
            side = fproj.choose_side(tuple(p.shape))
            a, b = p.shape if side == "right" else p.shape[::-1]
            r = min(rank, a, b)
            q = torch.linalg.qr(torch.randn(b, r, generator=gen)).Q.t().contiguous()
            zeros = torch.zeros(a, r, dtype=p.dtype)
            self.items.append((p, side, q.to(p.dtype), zeros, zeros.clone()))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """One plain projected-Adam step of every matrix."""
        from coap_dist.functional import adam as fadam
        from coap_dist.functional import projection as fproj

        self.t += 1
        group = self.param_groups[0]
        b1, b2 = group["betas"]
        rs = [fproj.project(fproj.canonical(p.grad, s), q) for p, s, q, _, _ in self.items]
        ms = [m for *_, m, _ in self.items]
        vs = [v for *_, v in self.items]
        ds = fadam.adam_directions(ms, vs, rs, b1, b2, group["eps"])
        alpha = fadam.adam_step_size(group["lr"], b1, b2, self.t)
        for (p, side, q, _, _), d in zip(self.items, ds, strict=True):
            fproj.canonical(p, side).addmm_(d, q, alpha=-alpha)


class ClipThenStep:
    """``clip_grad_norm_`` then ``step()``, timed together (the loop users run): torch's
    clip for a torch optimizer, the optimizer's own for COAP (whose step then reuses the
    clip's norms as its non-finite check). ``max_norm`` is large: the gradients (fixed
    across steps) are scaled by 1, as every clipped step scales them once."""

    def __init__(self, opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        self.opt, self.params = opt, params

    def step(self) -> None:
        clip = getattr(self.opt, "clip_grad_norm_", None)
        if clip is not None:
            clip(1e9)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, 1e9)
        self.opt.step()


class ScalerChecked:
    """torch's own protection against a non-finite gradient: ``torch.amp.GradScaler`` at a
    fixed scale of 1 around a fused AdamW. Each step, ``GradScaler.step`` runs its check of
    every gradient (``torch._amp_foreach_non_finite_check_and_unscale_``, one pass) and hands
    the found-inf flag to the fused kernel, which skips the step on a non-finite gradient;
    ``update()`` keeps the scale (finite gradients, growth interval 2^30). The same protection
    as COAP's default ``skip_nonfinite=True``, at the whole-step grain."""

    def __init__(self, opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        self.opt = opt
        device = params[0].device.type
        self.scaler = torch.amp.GradScaler(device, init_scale=1.0, growth_interval=2**30)
        self.scaler.scale(torch.ones((), device=params[0].device))  # creates its scale

    def step(self) -> None:
        self.scaler.step(self.opt)
        self.scaler.update()


def factories(args: argparse.Namespace) -> dict[str, OptimizerFactory]:
    """Optimizer constructors by label, all with the same lr, rank and refresh interval.

    ``floor``: :class:`ProjectedAdamFloor`. ``adamw_fused`` / ``adamw``: torch AdamW with
    its fused kernel / foreach. ``coap``: COAPAdamW defaults; ``coap_dense``: COAPAdamW's
    AdamW path (``algorithm="adamw"``) on the same tensors, to compare with ``adamw_fused``.
    """
    out: dict[str, OptimizerFactory] = {
        "floor": lambda ps: ProjectedAdamFloor(ps, args.rank),
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    }
    if not args.no_coap:
        from coap_dist import COAPAdamW

        def coap(mode: str) -> OptimizerFactory:
            return lambda ps: COAPAdamW(
                [{"params": ps, "algorithm": "coap"}],
                lr=1e-3,
                rank=args.rank,
                update_interval=args.update_interval,
                reproject_factor=args.reproject_factor,
                projector_update=mode,
                stagger=args.stagger,
            )

        out["coap"] = coap("scale_free")
        if not args.no_reference:
            out["coap_reference"] = coap("reference")
        out["coap_dense"] = lambda ps: COAPAdamW([{"params": ps, "algorithm": "adamw"}], lr=1e-3)
        out["coap_dense-unchecked"] = lambda ps: COAPAdamW(
            [{"params": ps, "algorithm": "adamw"}], lr=1e-3, skip_nonfinite=False
        )
        out["adamw_fused+check"] = lambda ps: ScalerChecked(
            torch.optim.AdamW(ps, lr=1e-3, fused=True), ps
        )
        out["adamw_fused@vectors"] = out["adamw_fused"]
        out["coap_dense@vectors"] = out["coap_dense"]
        out["adamw_fused+clip"] = lambda ps: ClipThenStep(
            torch.optim.AdamW(ps, lr=1e-3, fused=True), ps
        )
        out["coap_dense+clip"] = lambda ps: ClipThenStep(
            COAPAdamW([{"params": ps, "algorithm": "adamw"}], lr=1e-3), ps
        )

    def lowrank_group(ps: list[nn.Parameter], **extra: Any) -> dict[str, Any]:
        """GaLore's / APOLLO's group: the same rank and refresh interval as COAP."""
        return {
            "params": ps,
            "rank": args.rank,
            "update_proj_gap": args.update_interval,
            "scale": 1.0,
            "proj_type": "std",
            **extra,
        }

    if not args.no_galore:
        try:
            from galore_torch import GaLoreAdamW
        except ImportError as err:
            raise SystemExit(
                f"galore_torch is not importable ({err}); install it with "
                "`pip install -c .ci/constraints.txt galore-torch` or use --no-galore"
            ) from err

        def galore(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
            return GaLoreAdamW([lowrank_group(ps)], lr=1e-3, no_deprecation_warning=True)

        out["galore"] = galore
    if not args.no_apollo:
        try:
            from apollo_torch import APOLLOAdamW
        except ImportError as err:
            raise SystemExit(f"apollo_torch is not importable ({err}); use --no-apollo") from err

        def apollo(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
            group = lowrank_group(ps, proj="random", scale_type="channel")
            return APOLLOAdamW([group], lr=1e-3)

        out["apollo"] = apollo
    return out


def time_run(factory: OptimizerFactory, params: list[nn.Parameter], steps: int) -> list[float]:
    """Seconds taken by each of ``steps`` calls of ``step()`` on a fresh optimizer."""
    opt = factory(params)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float], update_interval: int, reproject_factor: int) -> dict[str, float]:
    """Step-time statistics of one run (k = 0 .. T_u*F), in milliseconds."""
    cycle = update_interval * reproject_factor
    body = times[1 : cycle + 1]
    plain = [t for k, t in enumerate(times) if k > 0 and k % update_interval]
    update = [times[k] for k in range(update_interval, cycle, update_interval)]
    ms = 1e3
    return {
        "amortised_ms": statistics.fmean(body) * ms,
        "plain_median_ms": statistics.median(plain) * ms,
        "update_median_ms": (statistics.median(update) * ms) if update else float("nan"),
        "recalibration_ms": times[cycle] * ms,
        "first_step_ms": times[0] * ms,
        "cycle_max_ms": max(body) * ms,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved repeats of every optimizer; returns the JSON-ready result."""
    torch.set_num_threads(args.threads)
    machine_at_start = machine_info()
    wall0 = time.perf_counter()
    dtype = DTYPES[args.dtype]
    shapes = llama_matrices(args.dim, args.ffn, args.layers)
    vectors = [(f"vector.{j}", (args.dim,)) for j in range(args.vectors)]
    builders = factories(args)
    labels = list(builders)
    steps = args.update_interval * args.reproject_factor + 1
    raw: dict[str, list[list[float]]] = {label: [] for label in labels}
    warnings.filterwarnings("ignore", category=FutureWarning)
    for rep in range(args.repeats):
        order = labels[rep % len(labels) :] + labels[: rep % len(labels)]
        for label in order:
            params = make_params(vectors if "@" in label else shapes, dtype, seed=args.seed)
            t0 = time.perf_counter()
            raw[label].append(time_run(builders[label], params, steps))
            print(
                f"repeat {rep + 1}/{args.repeats} {label:>15}: {time.perf_counter() - t0:6.1f} s",
                flush=True,
            )
    runs = {
        label: [summarize(t, args.update_interval, args.reproject_factor) for t in raw[label]]
        for label in labels
    }
    summary = {
        label: {key: statistics.median(r[key] for r in runs[label]) for key in runs[label][0]}
        for label in labels
    }
    ratios: dict[str, dict[str, float]] = {}
    pairs = [
        (label, base)
        for label in labels
        if "@" not in label
        for base in ("adamw_fused", "adamw", "floor")
    ]
    pairs += [("coap_dense@vectors", "adamw_fused@vectors"), ("coap_dense", "adamw_fused+check")]
    pairs += [
        (label, "galore") for label in labels if label.startswith("coap") and "@" not in label
    ]
    for label, base in pairs:
        if label in summary and base in summary and label != base and label != "floor":
            ratios[f"{label}/{base}"] = {
                key: summary[label][key] / summary[base][key]
                for key in ("amortised_ms", "plain_median_ms", "cycle_max_ms")
            }
    n_params = sum(m * n for _, (m, n) in shapes)
    return {
        "benchmark": "step_time",
        "machine": machine_at_start,
        "load_average_1m_at_end": machine_info()["load_average_1m"],
        "wall_seconds": time.perf_counter() - wall0,
        "config": {
            "dim": args.dim,
            "ffn": args.ffn,
            "layers": args.layers,
            "matrices": len(shapes),
            "vectors": args.vectors,
            "parameters": n_params,
            "dtype": args.dtype,
            "rank": args.rank,
            "update_interval": args.update_interval,
            "reproject_factor": args.reproject_factor,
            "steps_per_run": steps,
            "repeats": args.repeats,
            "threads": args.threads,
            "galore_update_proj_gap": args.update_interval,
            "galore_proj_type": "std",
            "coap_options": f"defaults (moments='rotate') except the mode; stagger={args.stagger}",
        },
        "summary_ms": summary,
        "targets": targets(summary),
        "ratios": ratios,
        "runs_ms": runs,
        "raw_step_seconds": raw,
    }


TARGETS = {
    "coap plain / floor plain": ("coap", "plain_median_ms", "floor", "plain_median_ms", 1.05),
    "coap recalibration / coap plain": (
        "coap",
        "recalibration_ms",
        "coap",
        "plain_median_ms",
        2.1,
    ),
    "coap update / coap plain": ("coap", "update_median_ms", "coap", "plain_median_ms", 2.6),
    "coap cycle mean / floor plain": ("coap", "amortised_ms", "floor", "plain_median_ms", 1.2),
    "coap_dense / adamw_fused (mean)": (
        "coap_dense",
        "amortised_ms",
        "adamw_fused",
        "amortised_ms",
        1.05,
    ),
    "coap_dense@vectors / adamw_fused@vectors (mean)": (
        "coap_dense@vectors",
        "amortised_ms",
        "adamw_fused@vectors",
        "amortised_ms",
        1.05,
    ),
    "coap_dense+clip / adamw_fused+clip (mean)": (
        "coap_dense+clip",
        "amortised_ms",
        "adamw_fused+clip",
        "amortised_ms",
        1.05,
    ),
}
"""Ratio name -> (label, statistic, base label, base statistic, target: ratio <= target)."""


def targets(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Every :data:`TARGETS` ratio whose two rows ran, with its target and verdict."""
    out = {}
    for name, (label, key, base, base_key, target) in TARGETS.items():
        if label in summary and base in summary:
            ratio = summary[label][key] / summary[base][base_key]
            out[name] = {"ratio": ratio, "target": target, "met": float(ratio <= target)}
    return out


def to_markdown(result: dict[str, Any]) -> str:
    """Human-readable report of :func:`run`'s result."""
    cfg, summary = result["config"], result["summary_ms"]
    keys = [
        "amortised_ms",
        "plain_median_ms",
        "update_median_ms",
        "recalibration_ms",
        "first_step_ms",
        "cycle_max_ms",
    ]
    rows = [[label, *(f"{s[k]:.2f}" for k in keys)] for label, s in summary.items()]
    target_rows = [
        [name, f"{v['ratio']:.2f}", f"<= {v['target']}", "met" if v["met"] else "NOT met"]
        for name, v in result["targets"].items()
    ]
    ratio_rows = [
        [name, *(f"{v[k]:.2f}" for k in ("amortised_ms", "plain_median_ms", "cycle_max_ms"))]
        for name, v in result["ratios"].items()
    ]
    return "\n\n".join(
        [
            "# optimizer.step() time",
            f"{cfg['layers']} LLaMA blocks of linear weights (d={cfg['dim']}, f={cfg['ffn']}; "
            f"{cfg['matrices']} matrices, {cfg['parameters']:,} parameters, {cfg['dtype']}), "
            f"rank {cfg['rank']}, update interval T_u={cfg['update_interval']} (GaLore "
            f"update_proj_gap too), reproject factor F={cfg['reproject_factor']}; "
            f"{cfg['steps_per_run']} steps per run (k = 0 .. T_u*F), {cfg['repeats']} interleaved "
            f"repeats, medians; {cfg['threads']} torch thread(s). Fixed random gradients, no "
            "forward/backward. `amortised` = mean step over one full refresh cycle k = 1 .. T_u*F. "
            f"Rows `@vectors`: {cfg['vectors']} 1-D tensors of {cfg['dim']} entries instead.",
            markdown_table(
                [
                    "optimizer (ms)",
                    "amortised",
                    "plain (median)",
                    "update step",
                    "recalibration",
                    "first step",
                    "cycle max",
                ],
                rows,
            ),
            "## Targets (ratios of the same run)",
            markdown_table(["ratio", "measured", "target", "verdict"], target_rows),
            "## Ratios (same run)",
            markdown_table(["ratio", "amortised", "plain", "cycle max"], ratio_rows),
            "## Machine (at start)",
            machine_markdown(result["machine"]),
            f"Load average at the end: {result['load_average_1m_at_end']:.2f}; "
            f"benchmark wall time {result['wall_seconds']:.0f} s.",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (defaults: four LLaMA-60M blocks, 28 matrices, 12.6 M
    parameters, rank 128, T_u 8, F 5)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=512, help="hidden size d (LLaMA-60M: 512)")
    p.add_argument("--ffn", type=int, default=1376, help="MLP width f (LLaMA-60M: 1376)")
    p.add_argument("--layers", type=int, default=4, help="number of blocks")
    p.add_argument("--rank", type=int, default=128, help="rank for COAP and GaLore")
    p.add_argument("--vectors", type=int, default=200, help="1-D tensors of the @vectors rows")
    p.add_argument("--update-interval", type=int, default=8, help="T_u (GaLore proj gap)")
    p.add_argument("--reproject-factor", type=int, default=5, help="F")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-coap", action="store_true", help="skip COAP")
    p.add_argument("--no-reference", action="store_true", help="skip COAP reference mode")
    p.add_argument("--no-galore", action="store_true", help="skip GaLore")
    p.add_argument("--no-apollo", action="store_true", help="skip APOLLO")
    p.add_argument("--stagger", action="store_true", help="COAP with stagger=True")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the markdown report, write JSON and markdown files."""
    parser = build_parser()
    args = parser.parse_args(argv)
    require_positive(
        parser,
        args,
        (
            "dim",
            "ffn",
            "layers",
            "vectors",
            "rank",
            "update_interval",
            "reproject_factor",
            "repeats",
            "threads",
        ),
    )
    result = run(args)
    return publish("step_time", result, to_markdown(result), args.out)


if __name__ == "__main__":
    sys.exit(main())
