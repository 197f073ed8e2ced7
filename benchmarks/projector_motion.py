"""Projector motion: how far each COAP projector step moves the subspace, against how far the
gradients' subspace drifts between recalibrations (the "why" behind the convergence table).

For each mode (``--modes``: reference+keep, scale_free+rotate, ...), the tiny LLaMA is trained
on Shakespeare bytes with the app's own config, model, data, schedule and optimizer factory
(``coap_dist.train``); after every step the projectors P (r x b) of the 28 block matrices are
read from the optimizer state. With d(P, Q) = 1 - ||orth(P) orth(Q)^T||_F^2 / r (0: the same
subspace, 1: orthogonal; the mean squared sine of the principal angles), reported as means
over matrices and over the second half of the run:

* ``update move``: d(P before, P after) of a correlation-aware update;
* ``recal jump``: d(P before, P after) of a recalibration (how far the SVD of the current
  gradient is from where the updates left P);
* ``SVD drift``: d between consecutive recalibrations' results, per T_u steps (the subspace's
  natural drift rate, 1 - (1 - d)^(1/F) of the T_u F-step drift);
* ``residual``: the in-sample projection residual at refresh (``optim/projection_residual``);
* the singular values of P at the end (1 for orthonormal rows): their mean and spread, i.e.
  how much a step rescales the projected gradient R = G P^T and the update D P.

Run::

    python benchmarks/projector_motion.py               # ~6 minutes on one core
    python benchmarks/projector_motion.py --steps 40    # smoke check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, markdown_table, publish

MODES = {
    "reference+keep": ("reference", "keep"),
    "scale_free+rotate": ("scale_free", "rotate"),
    "scale_free+keep": ("scale_free", "keep"),
    "reference+rotate": ("reference", "rotate"),
}


def distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """1 - ||orth(P) orth(Q)^T||_F^2 / r for row bases P, Q (r x b)."""
    a = torch.linalg.qr(p.double().t())[0]
    b = torch.linalg.qr(q.double().t())[0]
    return float(1.0 - (a.t() @ b).square().sum() / p.shape[0])


def measure(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one mode, recording every projector change."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from coap_dist.models.llama import Llama
    from coap_dist.train.config import TrainConfig
    from coap_dist.train.data import Batches, load_tokens
    from coap_dist.train.loop import loss_fn, lr_factor
    from coap_dist.train.optim import build_optimizer, optimizer_metrics

    update, moments = MODES[mode]
    overrides = [
        "compare=false",
        f"steps={args.steps}",
        f"warmup_steps={max(1, args.steps // 10)}",
        f"batch_size={args.batch}",
        f"seq_len={args.seq_len}",
        f"optimizer.lr={args.lr}",
        f"optimizer.rank={args.rank}",
        "optimizer.rank_ratio=null",
        f"optimizer.update_interval={args.update_interval}",
        f"optimizer.reproject_factor={args.reproject_factor}",
        f"optimizer.projector_update={update}",
        f"optimizer.moments={moments}",
        f"optimizer.projector_lr={args.projector_lr}",
    ]
    with initialize_config_module(config_module="coap_dist.configs", version_base="1.3"):
        raw = OmegaConf.to_container(
            compose(config_name="train", overrides=overrides), resolve=True
        )
    assert isinstance(raw, dict)
    cfg = TrainConfig.from_dict(raw)
    torch.manual_seed(cfg.seed)
    model = Llama(cfg.model.to_llama())
    opt = build_optimizer(model, cfg.optimizer)
    train, _ = load_tokens(cfg.data)
    batches = Batches(train, seq_len=cfg.seq_len, global_batch=cfg.batch_size, seed=cfg.seed)
    peak = [g["lr"] for g in opt.param_groups]
    tu, f = args.update_interval, args.reproject_factor
    moves: list[tuple[int, float]] = []
    jumps: list[tuple[int, float]] = []
    drifts: list[tuple[int, float]] = []
    residuals: list[tuple[int, float]] = []
    before: dict[int, torch.Tensor] = {}
    last_svd: dict[int, torch.Tensor] = {}
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        for g, lr in zip(opt.param_groups, peak, strict=True):
            g["lr"] = lr * lr_factor(step, cfg)
        ((x, y),) = batches.get(step)
        loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        k = step - 1  # the refresh taken before update k + 1
        kinds = []
        for i, p in enumerate(opt.params):
            st = opt.state.get(p)
            if not st or "projector" not in st:
                continue
            now = st["projector"].detach().clone()
            if k and i in before and k % tu == 0:
                d = distance(before[i], now)
                if k % (tu * f) == 0:
                    jumps.append((step, d))
                    if i in last_svd:
                        drifts.append((step, d_per_tu(distance(last_svd[i], now), f)))
                    last_svd[i] = now
                else:
                    moves.append((step, d))
                kinds.append(k)
            elif k == 0:
                last_svd[i] = now
            before[i] = now
        if kinds:
            residuals.append((step, optimizer_metrics(opt)["optim/projection_residual"]))
    half = cfg.steps // 2
    svals = [
        torch.linalg.svdvals(opt.state[p]["projector"].double())
        for p in opt.params
        if opt.state.get(p) and "projector" in opt.state[p]
    ]
    scale = statistics.fmean(float(s.mean()) for s in svals)
    spread = statistics.fmean(float(s.max() / s.min().clamp_min(1e-30)) for s in svals)

    def late(xs: list[tuple[int, float]]) -> float:
        vals = [v for s, v in xs if s > half]
        return statistics.fmean(vals) if vals else float("nan")

    return {
        "mode": mode,
        "update_move": late(moves),
        "recal_jump": late(jumps),
        "svd_drift_per_tu": late(drifts),
        "residual_at_refresh": late(residuals),
        "projector_scale": scale,
        "projector_condition": spread,
        "seconds": time.perf_counter() - t0,
    }


def d_per_tu(d: float, f: int) -> float:
    """Per-T_u drift from a T_u F-step one, as if the subspace turned steadily."""
    return 1.0 - max(0.0, 1.0 - d) ** (1.0 / f)


def main(argv: list[str] | None = None) -> int:
    """Measure every mode, print and write ``projector_motion.{json,md}``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {list(MODES)}"
    )
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--update-interval", type=int, default=32)
    p.add_argument("--reproject-factor", type=int, default=5)
    p.add_argument("--projector-lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(m, args) for m in args.modes.split(",")]
    table = markdown_table(
        [
            "mode",
            "update move",
            "recal jump",
            "SVD drift per T_u",
            "residual at refresh",
            "mean sigma(P) at end",
            "sigma_max / sigma_min",
            "s",
        ],
        [
            [
                r["mode"],
                f"{r['update_move']:.2e}",
                f"{r['recal_jump']:.4f}",
                f"{r['svd_drift_per_tu']:.4f}",
                f"{r['residual_at_refresh']:.4f}",
                f"{r['projector_scale']:.4f}",
                f"{r['projector_condition']:.3f}",
                f"{r['seconds']:.0f}",
            ]
            for r in rows
        ],
    )
    report = "\n\n".join(
        [
            "# Projector motion (tiny LLaMA, Shakespeare bytes)",
            f"{args.steps} steps x {args.batch} x {args.seq_len} tokens, lr {args.lr:g}, "
            f"projector_lr {args.projector_lr:g}, rank "
            f"{args.rank}, T_u {args.update_interval}, F {args.reproject_factor}; d = 1 - "
            "||orth(P) orth(Q)^T||_F^2 / r, means over the 28 block matrices and the second "
            "half of the run.",
            table,
        ]
    )
    result = {
        "benchmark": "projector_motion",
        "machine": machine_info(),
        "args": vars(args) | {"out": str(args.out)},
        "rows": rows,
    }
    json.dumps(result)
    return publish("projector_motion", result, report, args.out)


if __name__ == "__main__":
    sys.exit(main())
