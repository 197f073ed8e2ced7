"""Full train-step time (forward + backward + ``optimizer.step()``) of a LLaMA model on CPU.

The model is a slice of LLaMA-60M (d 512, f 1376, vocabulary 32000; ``--layers`` blocks, 2 by
default) trained on fixed random token batches of ``--batch`` x ``--seq-len`` tokens. Every
optimizer sees the same model (same seed), the same batches and the same rank, refresh
interval T_u and reproject factor F:

* ``adamw``: ``torch.optim.AdamW(foreach=True)`` on every parameter (the baseline);
* ``coap``: ``COAPAdamW`` defaults (``projector_update="scale_free"``, ``moments="rotate"``);
* ``coap_reference``: ``COAPAdamW(projector_update="reference", moments="keep")``, the
  published behaviour;
* ``galore``: ``galore_torch.GaLoreAdamW`` (``update_proj_gap`` = T_u, full SVD per refresh);
* ``apollo``: ``apollo_torch.APOLLOAdamW`` (random projection, channel-wise scaling,
  ``update_proj_gap`` = T_u);
* ``adamw8bit_bnb``: ``bitsandbytes.optim.AdamW8bit``; ``adamw8bit_torchao``:
  ``torchao.optim.AdamW8bit`` (``torch.compile``-d; its compile time is spent in an untimed
  warm-up and reported separately).

COAP, GaLore and APOLLO project the same matrices (``coap_dist.param_groups``: attention and
MLP weights); embeddings, output head and norms get AdamW inside each of them.

Each run builds a fresh model and optimizer. Optimizers with a projector schedule take
``T_u * F + 1`` steps (k = 0 .. T_u*F: the first step, one full refresh cycle with F - 1
projector updates and the recalibration/refresh at k = T_u*F); the others have no refresh and
take ``--plain-steps + 1`` steps. Reported per optimizer, for the full step and for its
forward+backward and optimizer parts (medians over interleaved repeats): the amortised step
(mean over k >= 1: the whole refresh cycle), the median plain step, the median update step,
the step at k = T_u*F, the first step and the largest step of the cycle (the refresh spike),
plus the amortised step composed at a longer interval (``--compose-interval``, default the
COAP default T_u = 32, F = 5) from the measured plain, update and recalibration medians:
``((T_u F - F) plain + (F - 1) update + recal) / (T_u F)``. Ratios to AdamW come from the
same invocation.

Run (about 5-8 minutes on 2 shared cores with the defaults)::

    python benchmarks/train_step.py
    python benchmarks/train_step.py --layers 1 --repeats 1 --update-interval 2 \\
        --reproject-factor 2 --plain-steps 2 --batch 1 --seq-len 16     # smoke test

Writes ``benchmarks/results/train_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

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

from coap_dist.models.llama import LLAMA_PRESETS, Llama

LABELS = (
    "adamw",
    "coap",
    "coap_reference",
    "coap8bit",
    "galore",
    "apollo",
    "adamw8bit_bnb",
    "adamw8bit_torchao",
)
"""Every optimizer the benchmarks can build (see :func:`build_optimizer`)."""

PROJECTING = frozenset({"coap", "coap_reference", "coap8bit", "galore", "apollo"})
"""Optimizers with a projector schedule (refresh every T_u steps)."""

DEFAULT_LABELS = (
    "adamw",
    "coap",
    "coap_reference",
    "galore",
    "apollo",
    "adamw8bit_bnb",
    "adamw8bit_torchao",
)
PARTS = ("total", "fwd_bwd", "opt")
STAT_KEYS = (
    "amortised_ms",
    "plain_median_ms",
    "update_median_ms",
    "recalibration_ms",
    "first_step_ms",
    "cycle_max_ms",
    "composed_amortised_ms",
)


class Unavailable(RuntimeError):
    """An optimizer that cannot be built or run here (missing package, no CPU support)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankConfig:
    """Settings shared by every projecting optimizer.

    Attributes:
        rank: r, the same for COAP, GaLore and APOLLO.
        update_interval: T_u (GaLore/APOLLO ``update_proj_gap``).
        reproject_factor: F (COAP only: recalibration every T_u F steps).
        scale: alpha on the back-projected update (GaLore ``scale``; APOLLO ``scale``).
    """

    rank: int
    update_interval: int
    reproject_factor: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("rank", "update_interval", "reproject_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LowRankConfig.{name} must be a positive integer, got {value!r}")
        if not self.scale > 0:
            raise ValueError(f"LowRankConfig.scale must be positive, got {self.scale!r}")


def lowrank_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, projected) parameters exactly as ``coap_dist.param_groups`` splits them."""
    import coap_dist

    dense: list[nn.Parameter] = []
    projected: list[nn.Parameter] = []
    for group in coap_dist.param_groups(model):
        (dense if group["algorithm"] == "adamw" else projected).extend(group["params"])
    return dense, projected


def build_optimizer(
    label: str,
    model: nn.Module,
    *,
    lr: float,
    lowrank: LowRankConfig,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The optimizer ``label`` (one of :data:`LABELS`) over ``model``'s parameters.

    All get the same lr, betas (0.9, 0.999), eps and weight decay; the projecting ones the same
    rank, interval and scale on the same matrices. Raises :class:`Unavailable` with the reason
    when the package is missing.
    """
    common: dict[str, Any] = {"lr": lr, "eps": eps, "weight_decay": weight_decay}
    if label == "adamw":
        return torch.optim.AdamW(model.parameters(), foreach=True, **common)
    if label in ("coap", "coap_reference", "coap8bit"):
        import coap_dist

        mode: dict[str, Any] = {
            "coap": {},
            "coap_reference": {"projector_update": "reference", "moments": "keep"},
            "coap8bit": {"state_bits": 8},
        }[label]
        groups = coap_dist.param_groups(
            model,
            rank=lowrank.rank,
            update_interval=lowrank.update_interval,
            reproject_factor=lowrank.reproject_factor,
            scale=lowrank.scale,
        )
        return coap_dist.COAPAdamW(groups, **common, **mode)
    if label in ("galore", "apollo"):
        dense, projected = lowrank_split(model)
        group: dict[str, Any] = {
            "params": projected,
            "rank": lowrank.rank,
            "update_proj_gap": lowrank.update_interval,
            "scale": lowrank.scale,
            "proj_type": "std",
        }
        if label == "galore":
            try:
                from galore_torch import GaLoreAdamW
            except ImportError as err:
                raise Unavailable(f"galore_torch is not importable: {err}") from err
            return GaLoreAdamW([{"params": dense}, group], no_deprecation_warning=True, **common)
        try:
            from apollo_torch import APOLLOAdamW
        except ImportError as err:
            raise Unavailable(f"apollo_torch is not importable: {err}") from err
        # APOLLO (not APOLLO-Mini): random projection, channel-wise scaling factors.
        group |= {"proj": "random", "scale_type": "channel"}
        return APOLLOAdamW([{"params": dense}, group], **common)
    if label == "adamw8bit_bnb":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise Unavailable(f"bitsandbytes is not importable: {err}") from err
        return bnb.optim.AdamW8bit(model.parameters(), **common)
    if label == "adamw8bit_torchao":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as err:
            raise Unavailable(f"torchao.optim is not importable: {err}") from err
        return AdamW8bit(model.parameters(), **common)
    raise ValueError(f"unknown optimizer {label!r}; choose from {LABELS}")


def make_model(preset: str, layers: int, seq_len: int, seed: int) -> Llama:
    """The LLaMA ``preset`` cut to ``layers`` blocks, initialised from ``seed``."""
    cfg = dataclasses.replace(LLAMA_PRESETS[preset], n_layers=layers, max_seq_len=seq_len)
    torch.manual_seed(seed)
    return Llama(cfg)


def token_batches(steps: int, batch: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """Random token ids of shape (steps, batch, seq_len + 1), the same for every run."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (steps, batch, seq_len + 1), generator=gen)


def time_run(
    label: str, args: argparse.Namespace, lowrank: LowRankConfig, steps: int
) -> dict[str, list[float]]:
    """Seconds per step of one fresh run: ``{"total", "fwd_bwd", "opt"}`` lists of ``steps``.

    ``fwd_bwd``: forward, cross-entropy and backward; ``opt``: ``step()`` plus
    ``zero_grad(set_to_none=True)``.
    """
    model = make_model(args.preset, args.layers, args.seq_len, args.seed)
    opt = build_optimizer(label, model, lr=args.lr, lowrank=lowrank)
    data = token_batches(steps, args.batch, args.seq_len, model.cfg.vocab_size, args.seed)
    out: dict[str, list[float]] = {part: [] for part in PARTS}
    for k in range(steps):
        x, y = data[k, :, :-1], data[k, :, 1:]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{label}: non-finite loss at step {k}")
        out["fwd_bwd"].append(t1 - t0)
        out["opt"].append(t2 - t1)
        out["total"].append(t2 - t0)
    return out


def summarize(
    times: list[float],
    *,
    projecting: bool,
    update_interval: int,
    reproject_factor: int,
    compose: tuple[int, int],
) -> dict[str, float]:
    """Statistics of one run's step times (k = 0 .. n-1), in milliseconds.

    Without a projector schedule every step k >= 1 is plain: update, recalibration and cycle
    statistics are then the plain median (there is no refresh to measure).
    """
    ms = 1e3
    body = times[1:]
    cycle = update_interval * reproject_factor
    plain_steps = [
        t for k, t in enumerate(times) if k > 0 and (not projecting or k % update_interval)
    ]
    plain = statistics.median(plain_steps)
    if projecting:
        updates = [times[k] for k in range(update_interval, cycle, update_interval)]
        update = statistics.median(updates) if updates else float("nan")
        recal = times[cycle]
    else:
        update = recal = plain
    c_interval, c_factor = compose
    c_cycle = c_interval * c_factor
    n_update = c_factor - 1 if projecting else 0
    n_recal = 1 if projecting else 0
    composed = (
        (c_cycle - n_update - n_recal) * plain
        + n_update * (update if n_update else 0.0)
        + n_recal * recal
    ) / c_cycle
    return {
        "amortised_ms": statistics.fmean(body) * ms,
        "plain_median_ms": plain * ms,
        "update_median_ms": update * ms,
        "recalibration_ms": recal * ms,
        "first_step_ms": times[0] * ms,
        "cycle_max_ms": max(body) * ms,
        "composed_amortised_ms": composed * ms,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, then interleaved repeats of every available optimizer; JSON-ready result."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    machine_at_start = machine_info()
    wall0 = time.perf_counter()
    lowrank = LowRankConfig(
        rank=args.rank,
        update_interval=args.update_interval,
        reproject_factor=args.reproject_factor,
        scale=args.scale,
    )
    cycle = args.update_interval * args.reproject_factor
    # Untimed two-step run of each optimizer: first-use costs (allocator, lazy imports,
    # torchao's torch.compile per shape), and the check that it runs here at all.
    labels: list[str] = []
    unavailable: dict[str, str] = {}
    warmup_s: dict[str, float] = {}
    for label in args.optimizers:
        t0 = time.perf_counter()
        try:
            time_run(label, args, lowrank, 2)
        except Unavailable as err:
            unavailable[label] = str(err)
        except Exception as err:  # imports, but cannot run on this machine
            unavailable[label] = f"fails here: {type(err).__name__}: {err}"[:400]
        else:
            labels.append(label)
            warmup_s[label] = time.perf_counter() - t0
            print(f"warm-up {label:>18}: {warmup_s[label]:6.1f} s", flush=True)
            continue
        print(f"{label}: skipped ({unavailable[label]})", flush=True)
    steps = {
        label: cycle + 1 if label in PROJECTING else min(cycle, args.plain_steps) + 1
        for label in labels
    }
    raw: dict[str, list[dict[str, list[float]]]] = {label: [] for label in labels}
    for rep in range(args.repeats):
        order = labels[rep % len(labels) :] + labels[: rep % len(labels)]
        for label in order:
            t0 = time.perf_counter()
            raw[label].append(time_run(label, args, lowrank, steps[label]))
            print(
                f"repeat {rep + 1}/{args.repeats} {label:>18}: {time.perf_counter() - t0:6.1f} s",
                flush=True,
            )
    compose = (args.compose_interval, args.compose_factor)
    runs = {
        label: [
            {
                part: summarize(
                    r[part],
                    projecting=label in PROJECTING,
                    update_interval=args.update_interval,
                    reproject_factor=args.reproject_factor,
                    compose=compose,
                )
                for part in PARTS
            }
            for r in raw[label]
        ]
        for label in labels
    }
    summary = {
        label: {
            part: {key: statistics.median(r[part][key] for r in runs[label]) for key in STAT_KEYS}
            for part in PARTS
        }
        for label in labels
    }
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    if "adamw" in summary:
        for label in labels:
            if label == "adamw":
                continue
            ratios[f"{label}/adamw"] = {
                part: {
                    key: summary[label][part][key] / summary["adamw"][part][key]
                    for key in (
                        "amortised_ms",
                        "plain_median_ms",
                        "cycle_max_ms",
                        "composed_amortised_ms",
                    )
                }
                for part in ("total", "opt")
            }
    model = make_model(args.preset, args.layers, args.seq_len, args.seed)
    dense, projected = lowrank_split(model)
    return {
        "benchmark": "train_step",
        "machine": machine_at_start,
        "load_average_1m_at_end": machine_info()["load_average_1m"],
        "wall_seconds": time.perf_counter() - wall0,
        "config": {
            "model": f"llama-{args.preset} slice",
            "packages": {
                name: _version(name) for name in ("apollo-torch", "torchao", "bitsandbytes")
            },
            "dim": model.cfg.dim,
            "ffn": model.cfg.intermediate_size,
            "vocab_size": model.cfg.vocab_size,
            "layers": args.layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "projected_parameters": sum(p.numel() for p in projected),
            "dense_parameters": sum(p.numel() for p in dense),
            "batch": args.batch,
            "seq_len": args.seq_len,
            "dtype": "fp32",
            "lr": args.lr,
            "rank": args.rank,
            "update_interval": args.update_interval,
            "reproject_factor": args.reproject_factor,
            "scale": args.scale,
            "steps_per_run": steps,
            "compose_interval": args.compose_interval,
            "compose_factor": args.compose_factor,
            "repeats": args.repeats,
            "threads": args.threads,
            "seed": args.seed,
        },
        "unavailable": unavailable,
        "warmup_seconds": warmup_s,
        "summary_ms": summary,
        "ratios": ratios,
        "runs_ms": runs,
        "raw_step_seconds": raw,
    }


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN -> "-"


def to_markdown(result: dict[str, Any]) -> str:
    """Human-readable report of :func:`run`'s result."""
    cfg, summary = result["config"], result["summary_ms"]
    rows = []
    for label, parts in summary.items():
        s, fb, op = parts["total"], parts["fwd_bwd"], parts["opt"]
        projecting = label in PROJECTING
        rows.append(
            [
                label,
                _fmt(s["amortised_ms"]),
                _fmt(s["composed_amortised_ms"]),
                _fmt(s["plain_median_ms"]),
                _fmt(s["update_median_ms"]) if projecting else "-",
                _fmt(s["recalibration_ms"]) if projecting else "-",
                _fmt(s["cycle_max_ms"]),
                _fmt(s["first_step_ms"]),
                _fmt(fb["plain_median_ms"]),
                _fmt(op["amortised_ms"]),
                _fmt(op["composed_amortised_ms"]),
            ]
        )
    ratio_rows = [
        [
            name,
            *(
                f"{v[part][key]:.3f}"
                for part in ("total", "opt")
                for key in (
                    "amortised_ms",
                    "composed_amortised_ms",
                    "plain_median_ms",
                    "cycle_max_ms",
                )
            ),
        ]
        for name, v in result["ratios"].items()
    ]
    c_cycle = cfg["compose_interval"] * cfg["compose_factor"]
    parts = [
        "# Full train-step time (forward + backward + optimizer.step)",
        f"LLaMA-{cfg['model'].split('-')[1]}: {cfg['layers']} blocks, d={cfg['dim']}, f={cfg['ffn']}, vocabulary "
        f"{cfg['vocab_size']} ({cfg['parameters']:,} parameters, {cfg['projected_parameters']:,} "
        f"in projected matrices), fp32, batch {cfg['batch']} x {cfg['seq_len']} tokens of random "
        f"ids; rank {cfg['rank']}, T_u={cfg['update_interval']}, F={cfg['reproject_factor']}, "
        f"scale {cfg['scale']}; {cfg['repeats']} interleaved repeats, medians; "
        f"{cfg['threads']} torch thread(s). `amortised` = mean full step over k >= 1 of a run "
        f"(for COAP/GaLore/APOLLO exactly one refresh cycle k = 1 .. T_u*F); `composed` = the "
        f"amortised step at T_u={cfg['compose_interval']}, F={cfg['compose_factor']} "
        f"({c_cycle}-step cycle) composed from the measured plain, update and recalibration "
        "medians. Milliseconds.",
        markdown_table(
            [
                "optimizer",
                "amortised",
                f"composed @{cfg['compose_interval']}x{cfg['compose_factor']}",
                "plain",
                "update step",
                "k = T_u*F",
                "cycle max (spike)",
                "first step",
                "fwd+bwd (plain)",
                "opt amortised",
                "opt composed",
            ],
            rows,
        ),
        "## Ratios to AdamW (same invocation)",
        markdown_table(
            [
                "ratio",
                "step amortised",
                "step composed",
                "step plain",
                "step spike",
                "opt amortised",
                "opt composed",
                "opt plain",
                "opt spike",
            ],
            ratio_rows,
        ),
    ]
    if result["unavailable"]:
        parts += [
            "## Not measured",
            "\n".join(f"- `{k}`: {v}" for k, v in result["unavailable"].items()),
        ]
    parts += [
        "## Warm-up (untimed, 2 steps; includes torch.compile for torchao)",
        "\n".join(f"- {k}: {v:.1f} s" for k, v in result["warmup_seconds"].items()),
        "## Machine (at start)",
        machine_markdown(result["machine"]),
        f"Load average at the end: {result['load_average_1m_at_end']:.2f}; "
        f"benchmark wall time {result['wall_seconds']:.0f} s.",
    ]
    return "\n\n".join(parts)


def _labels(text: str) -> list[str]:
    labels = [s for s in text.split(",") if s]
    bad = [s for s in labels if s not in LABELS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown optimizer(s) {bad}; choose from {LABELS}")
    return labels


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (defaults: 2 LLaMA-60M blocks, 4 x 64 tokens, rank 128, T_u 4)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset", choices=sorted(LLAMA_PRESETS), default="60m", help="LLaMA shape to slice"
    )
    p.add_argument("--layers", type=int, default=2, help="blocks in the slice")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--rank", type=int, default=128, help="rank for COAP, GaLore, APOLLO")
    p.add_argument("--update-interval", type=int, default=4, help="T_u (update_proj_gap)")
    p.add_argument("--reproject-factor", type=int, default=5, help="F")
    p.add_argument("--scale", type=float, default=1.0, help="alpha (COAP, GaLore, APOLLO)")
    p.add_argument(
        "--plain-steps", type=int, default=8, help="timed steps of optimizers without refresh"
    )
    p.add_argument("--compose-interval", type=int, default=32, help="T_u of the composed figure")
    p.add_argument("--compose-factor", type=int, default=5, help="F of the composed figure")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--optimizers",
        type=_labels,
        default=list(DEFAULT_LABELS),
        help=f"comma-separated subset of {','.join(LABELS)}",
    )
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
            "layers",
            "batch",
            "seq_len",
            "rank",
            "update_interval",
            "reproject_factor",
            "plain_steps",
            "compose_interval",
            "compose_factor",
            "repeats",
            "threads",
        ),
    )
    result = run(args)
    return publish("train_step", result, to_markdown(result), args.out)


if __name__ == "__main__":
    sys.exit(main())
