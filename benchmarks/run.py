"""One entry point for the benchmarks: run some or all, then regenerate ``SUMMARY.md``.

::

    python benchmarks/run.py all            # every benchmark, full settings (~3 h: convergence ~2)
    python benchmarks/run.py memory         # memory.py
    python benchmarks/run.py speed          # step_time.py, then train_step.py
    python benchmarks/run.py convergence    # convergence.py (12 variants x 3 seeds x 2,000 steps)
    python benchmarks/run.py startup        # startup_memory.py (LLaMA-1B, ~10 min)
    python benchmarks/run.py distributed    # distributed.py
    python benchmarks/run.py summary        # only regenerate SUMMARY.md from the JSON files
    python benchmarks/run.py all --quick    # smoke check of everything in a few minutes

Each benchmark is its script's ``main(argv)``. Full runs write to ``benchmarks/results/``;
``--quick`` runs write to ``outputs/benchmarks-quick/`` (ignored by git) unless ``--out`` says
otherwise, so smoke checks never overwrite measured results. ``SUMMARY.md`` in the output
folder is rebuilt from the JSON files found there (never from numbers typed in by hand): the
headline table marks each target met / not met with its figure and what limits it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, RESULTS_DIR, markdown_table

QUICK_DIR = REPO_ROOT / "outputs" / "benchmarks-quick"

# (module, name of its output-folder option, full argv, quick argv)
FSDP2_CONVERGENCE = (
    "--variants coap_scale_free,coap_fsdp2_2ranks --lrs 0.003 --name convergence_fsdp2"
)
"""The FSDP2 default layout (2 gloo processes) against one process, same run, lr 0.003 (the
default variant's choice in the full sweep): ``convergence_fsdp2.json``."""

SCRIPTS: dict[str, list[tuple[str, str, list[str], list[str]]]] = {
    "memory": [("memory", "--out", [], ["--measure-models="])],
    "speed": [
        (
            "step_time",
            "--out",
            [],
            shlex.split("--layers 1 --repeats 1 --update-interval 4 --reproject-factor 2"),
        ),
        (
            "train_step",
            "--out",
            [],
            shlex.split(
                "--preset tiny --layers 1 --batch 1 --seq-len 16 --rank 8 --update-interval 2 "
                "--reproject-factor 2 --plain-steps 2 --repeats 1 "
                "--optimizers adamw,coap,coap_reference,galore,apollo,adamw8bit_bnb"
            ),
        ),
    ],
    "convergence": [
        ("convergence", "--out", ["--jobs", "2"], ["--quick"]),
        (
            "convergence",
            "--out",
            shlex.split(f"--jobs 2 {FSDP2_CONVERGENCE}"),
            shlex.split(f"--quick {FSDP2_CONVERGENCE}"),
        ),
    ],
    "startup": [("startup_memory", "--out-dir", [], ["--model", "tiny"])],
    "distributed": [
        (
            "distributed",
            "--out-dir",
            [],
            shlex.split("--model 60m --rank 128 --worlds 8 --measured-worlds 2"),
        )
    ],
}
ORDER = ("memory", "speed", "convergence", "startup", "distributed")

# Targets (the acceptance figures).
MEMORY_TARGET = 0.40  # COAP state / bf16 AdamW state, LLaMA-1B shapes
TRAIN_STEP_TARGET = 1.10  # full train step, COAP / AdamW
STEP_VS_GALORE_TARGET = 0.50  # optimizer.step amortised, COAP / GaLore
CONVERGENCE_TARGET = 1.02  # final validation loss, COAP / AdamW
STARTUP_TARGET = 0.60  # peak host RSS per rank after the start, sharded / unsharded build
MIB = 2**20


def run_script(module: str, argv: list[str]) -> float:
    """Import ``benchmarks/<module>.py`` and call its ``main(argv)``; wall seconds.

    Raises ``RuntimeError`` when ``main`` returns a non-zero status.
    """
    t0 = time.perf_counter()
    status = importlib.import_module(module).main(argv)
    if status not in (None, 0):
        raise RuntimeError(f"{module}.main returned {status}")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------- summary
def _load(out_dir: Path, name: str) -> dict[str, Any] | None:
    path = out_dir / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _status(ok: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[ok]


Row = list[str]


def memory_target(memory: dict[str, Any] | None) -> Row:
    """COAP optimizer state <= 0.40 x bf16 AdamW on LLaMA-1B shapes (estimator, 1 rank)."""
    name = f"COAP optimizer state <= {MEMORY_TARGET:.2f} x bf16 AdamW, LLaMA-1B shapes"
    if memory is None:
        return [name, "-", _status(None), "memory.json missing: `run.py memory`"]
    est = {
        r["optimizer"]: r["total"]
        for r in memory["estimates"]
        if r["model"] == "1b" and r["world_size"] == 1
    }
    if "coap" not in est or "adamw" not in est:
        return [name, "-", _status(None), "memory.json has no 1b estimate"]
    ratio = est["coap"] / est["adamw"]
    rank = memory.get("ranks", {}).get("1b", "?")
    figure = f"{est['coap'] / MIB:,.0f} vs {est['adamw'] / MIB:,.0f} MiB = {ratio:.3f}"
    note = f"estimator (shapes only, bf16, rank {rank}, one rank, no sharding)"
    measured = {(r["model"], r["optimizer"]): r["measured"]["total"] for r in memory["measured"]}
    if ("60m", "coap") in measured and ("60m", "adamw") in measured:
        m = measured[("60m", "coap")] / measured[("60m", "adamw")]
        note += f"; measured on a real 60m model: {m:.3f} (embeddings dominate at that size)"
    return [name, figure, _status(ratio <= MEMORY_TARGET), note]


def _same_matrices(train_step: dict[str, Any], step_time: dict[str, Any] | None) -> bool:
    """Whether step_time.json timed exactly the projected matrices of train_step.json."""
    if step_time is None:
        return False
    a, b = train_step["config"], step_time["config"]
    keys = ("dim", "ffn", "layers", "rank", "dtype", "threads")
    return all(a.get(k) == b.get(k) for k in keys) and "coap" in step_time["summary_ms"]


def train_step_target(
    train_step: dict[str, Any] | None, step_time: dict[str, Any] | None = None
) -> Row:
    """Full train step (forward + backward + step) with COAP <= 1.10 x AdamW.

    When ``step_time`` timed the same projected matrices, the note splits COAP's extra
    optimizer time (plain step, vs AdamW) into the projected matrices (step_time.json) and the
    rest: embeddings, head and norms on COAP's AdamW path.
    """
    name = f"Full train step with COAP <= {TRAIN_STEP_TARGET:.2f} x AdamW"
    if train_step is None or "coap/adamw" not in train_step.get("ratios", {}):
        return [name, "-", _status(None), "train_step.json missing: `run.py speed`"]
    cfg = train_step["config"]
    r = train_step["ratios"]["coap/adamw"]["total"]
    composed, measured, plain = r["composed_amortised_ms"], r["amortised_ms"], r["plain_median_ms"]
    figure = (
        f"{composed:.3f} amortised at T_u={cfg['compose_interval']}, F={cfg['compose_factor']} "
        f"(measured cycle at T_u={cfg['update_interval']}, F={cfg['reproject_factor']}: "
        f"{measured:.3f}; plain step {plain:.3f}; spike {r['cycle_max_ms']:.2f})"
    )
    opt = train_step["summary_ms"]["coap"]["opt"]["composed_amortised_ms"]
    total = train_step["summary_ms"]["coap"]["total"]["composed_amortised_ms"]
    note = (
        f"judged on the composed figure (COAP's default interval; the measured cycle refreshes "
        f"{cfg['compose_interval'] / cfg['update_interval']:g}x more often to fit the time "
        f"budget). CPU, {cfg['threads']} thread, {cfg['batch']} x {cfg['seq_len']} tokens per "
        f"step: the optimizer is {100 * opt / total:.0f}% of COAP's step here, far more than at "
        "GPU batch sizes, so this over-states the overhead"
    )
    if plain > TRAIN_STEP_TARGET:
        note += (
            f"; COAP's plain step alone is {plain:.2f}x AdamW's, so no refresh interval "
            "reaches the target on this machine"
        )
    if _same_matrices(train_step, step_time):
        assert step_time is not None
        ts_opt = train_step["summary_ms"]
        extra = ts_opt["coap"]["opt"]["plain_median_ms"] - ts_opt["adamw"]["opt"]["plain_median_ms"]
        st = step_time["summary_ms"]
        projected = st["coap"]["plain_median_ms"] - st["adamw"]["plain_median_ms"]
        note += (
            f". Of COAP's extra {extra:.0f} ms per plain optimizer step, the projected matrices "
            f"account for {projected:.0f} ms (step_time.json, same matrices); the other "
            f"{extra - projected:.0f} ms are COAP's AdamW path on the "
            f"{cfg['dense_parameters'] / 1e6:.1f} M embedding, head and norm parameters, "
            "slower than torch's foreach AdamW"
        )
    return [name, figure, _status(composed <= TRAIN_STEP_TARGET), note]


def step_vs_galore_target(step_time: dict[str, Any] | None) -> Row:
    """COAP optimizer.step amortised <= 0.5 x GaLore's at equal rank and interval."""
    name = f"COAP optimizer.step amortised <= {STEP_VS_GALORE_TARGET:.2f} x GaLore's"
    if step_time is None or "coap/galore" not in step_time.get("ratios", {}):
        return [name, "-", _status(None), "step_time.json missing: `run.py speed`"]
    cfg = step_time["config"]
    r = step_time["ratios"]["coap/galore"]
    figure = (
        f"{r['amortised_ms']:.3f} (plain step {r['plain_median_ms']:.3f}, spike "
        f"{r['cycle_max_ms']:.3f}; rank {cfg['rank']}, T_u={cfg['update_interval']}, "
        f"F={cfg['reproject_factor']})"
    )
    plain = r["plain_median_ms"]
    ok = r["amortised_ms"] <= STEP_VS_GALORE_TARGET
    if ok:
        limit = (
            f"COAP's plain step is {plain:.2f}x GaLore's; GaLore's full SVD every "
            f"T_u={cfg['update_interval']} steps decides the ratio"
        )
    elif plain > STEP_VS_GALORE_TARGET:
        limit = (
            f"COAP's plain (non-refresh) step alone is {plain:.2f}x GaLore's, and plain steps "
            f"are {cfg['update_interval'] - 1} of every {cfg['update_interval']}: the target "
            "needs a cheaper plain step (projection, low-rank Adam, back-projection), not a "
            "cheaper refresh"
        )
    else:
        limit = (
            f"the plain step ({plain:.2f}x) is under the target; COAP's refresh steps "
            "push the amortised ratio over it"
        )
    note = (
        f"{limit}. CPU, {cfg['threads']} thread, fixed random gradients, "
        f"{cfg['layers']} LLaMA-60M blocks ({cfg['dtype']}); GaLore's SVD and COAP's matmuls "
        "scale differently on a GPU"
    )
    return [name, figure, _status(ok), note]


def _conv(conv: dict[str, Any], label: str) -> tuple[float, float] | None:
    s = conv["summary"].get(label)
    return None if s is None else (s["final_val_mean"], s["final_val_spread"])


PEERS = ("adamw", "galore", "apollo")
"""The methods COAP is measured against in convergence.json."""


def convergence_targets(conv: dict[str, Any] | None) -> list[Row]:
    """The best COAP variant beats every peer beyond the seed spread at no more state than
    fixed-rank COAP; the default is no worse than the published behaviour and within 2% of
    AdamW."""
    names = [
        "best COAP variant beats every peer beyond the seed spread, at <= fixed-rank state",
        "COAP default no worse than the published behaviour (reference mode)",
        f"COAP default within {100 * (CONVERGENCE_TARGET - 1):.0f}% of AdamW",
    ]
    if conv is None:
        return [[n, "-", _status(None), "convergence.json missing"] for n in names]
    summary = conv["summary"]
    budget = _budget(conv)
    default = conv.get("default_variant")
    fixed_state = summary.get(default, {}).get("state_bytes", 0)
    coaps = [
        k for k, v in summary.items() if k.startswith("coap") and v["state_bytes"] <= fixed_state
    ]
    peers = [p for p in PEERS if p in summary]
    rows: list[Row] = []
    if coaps and peers and default in summary:
        best = min(coaps, key=lambda k: summary[k]["final_val_mean"])
        b = summary[best]
        margins = []
        for p in peers:
            s = summary[p]
            noise = max(b["final_val_spread"], s["final_val_spread"])
            margins.append((p, s["final_val_mean"] - b["final_val_mean"], noise))
        ok = all(gap > noise for _, gap, noise in margins)
        figure = f"{best} {b['final_val_mean']:.4f}; " + ", ".join(
            f"{p} {summary[p]['final_val_mean']:.4f} (gap {gap:+.4f}, spread {noise:.4f})"
            for p, gap, noise in margins
        )
        rows.append([names[0], figure, _status(ok), budget])
    else:
        rows.append([names[0], "-", _status(None), "COAP variants or peers missing"])
    # (first, second, ratio limit, whether a gap within the seed spread passes)
    pairs = [
        (default, "coap_reference", 1.0, False),
        (default, "adamw", CONVERGENCE_TARGET, False),
    ]
    for name, (a, b_, limit, noisy) in zip(names[1:], pairs, strict=True):
        rows.append(_pair_row(conv, name, a, b_, limit, noisy, budget))
    return rows


def _budget(conv: dict[str, Any]) -> str:
    cfg = conv["config"]
    budget = (
        f"tiny LLaMA, {cfg['tokens_per_run']:,} tokens, {len(cfg['seeds'])} seeds, "
        f"rank {cfg['rank']}, T_u={cfg['update_interval']}"
    )
    return ("QUICK MODE (smoke check, meaningless): " + budget) if conv.get("quick") else budget


def _pair_row(
    conv: dict[str, Any], name: str, a: str | None, b: str, limit: float, noisy: bool, budget: str
) -> Row:
    """final(a) / final(b) <= limit, or (``noisy``) a gap within the larger seed spread."""
    fa, fb = (None, None) if a is None else (_conv(conv, a), _conv(conv, b))
    if fa is None or fb is None:
        return [name, "-", _status(None), f"`{a}` or `{b}` not in the convergence results"]
    ratio = fa[0] / fb[0]
    gap = abs(fa[0] - fb[0])
    within = gap <= max(fa[1], fb[1])
    ok = math.isfinite(ratio) and (ratio <= limit or (noisy and within))
    noise = "within" if within else "outside"
    figure = f"{a} {fa[0]:.4f} vs {b} {fb[0]:.4f} = {ratio:.4f} (spread {fa[1]:.4f} / {fb[1]:.4f})"
    return [name, figure, _status(ok), f"{budget}; the gap is {noise} the seed spread"]


def fsdp2_convergence_target(conv: dict[str, Any] | None) -> Row:
    """FSDP2's default layout (2 ranks) no worse than one process beyond the seed spread,
    both from one run of ``convergence_fsdp2.json``."""
    name = "FSDP2 default (2 ranks) no worse than one process beyond the seed spread"
    if conv is None:
        return [name, "-", _status(None), "convergence_fsdp2.json missing: `run.py convergence`"]
    return _pair_row(
        conv, name, "coap_fsdp2_2ranks", conv["default_variant"], 1.0, True, _budget(conv)
    )


def _convergence_section(conv: dict[str, Any]) -> list[str]:
    cfg = conv["config"]
    rows = [
        [
            label + (" (default)" if label == conv.get("default_variant") else ""),
            f"{s['lr']:g}" + (" (edge)" if s["lr_at_grid_edge"] else ""),
            " / ".join(f"{v:.4f}" for v in s["final_val_per_seed"]),
            f"{s['final_val_mean']:.4f} ± {s['final_val_spread'] / 2:.4f}",
            f"{s.get('vs_adamw', float('nan')):.4f}",
            f"{s['svds_per_matrix_per_1k_steps']:.1f} / {s['updates_per_matrix_per_1k_steps']:.1f}",
            f"{s['state_bytes'] / 2**20:.3f}",
        ]
        for label, s in conv["summary"].items()
    ]
    return [
        "## Convergence (convergence.json)",
        f"Tiny LLaMA on Shakespeare bytes, {cfg['tokens_per_run']:,} tokens per run, lr from the "
        f"same sweep ({', '.join(f'{x:g}' for x in cfg['lrs'])}) for each variant, seeds "
        f"{cfg['seeds']}. ![curves](convergence.png)",
        markdown_table(
            [
                "variant",
                "lr",
                "final val (per seed)",
                "mean ± half spread",
                "/ AdamW",
                "SVDs / updates per matrix per 1k steps",
                "state MiB",
            ],
            rows,
        ),
    ]


def startup_target(startup: dict[str, Any] | None) -> Row:
    """The app's sharded fsdp2 start <= 0.6 x the unsharded build's peak RSS per rank."""
    name = f"sharded start peak RSS per rank <= {STARTUP_TARGET:.1f} x unsharded (fsdp2, 2 ranks)"
    if startup is None:
        return [name, "-", _status(None), "startup_memory.json missing: `run.py startup`"]
    ratio = startup["ratios"].get("start_peak")
    if ratio is None:
        return [name, "-", _status(None), "a build failed: see startup_memory.md"]
    args = startup["args"]
    after = startup["ratios"].get("run_peak")
    note = f"LLaMA-{args['model']}, {args['nproc']} CPU processes"
    if after is not None:
        note += f"; after 2 steps {after:.3f} (on a CPU the training state is host memory too)"
    return [name, f"{ratio:.3f}", _status(ratio <= STARTUP_TARGET), note]


def _speed_section(train_step: dict[str, Any]) -> list[str]:
    cfg = train_step["config"]
    rows = []
    for label, parts in train_step["summary_ms"].items():
        r = train_step["ratios"].get(f"{label}/adamw")
        rows.append(
            [
                label,
                f"{parts['total']['composed_amortised_ms']:.0f}",
                f"{r['total']['composed_amortised_ms']:.3f}" if r else "1",
                f"{r['total']['amortised_ms']:.3f}" if r else "1",
                f"{r['total']['cycle_max_ms']:.2f}" if r else "1",
                f"{r['opt']['composed_amortised_ms']:.2f}" if r else "1",
            ]
        )
    lines = [
        "## Full train step (train_step.json)",
        f"LLaMA-{cfg['model'].split('-', 1)[1]}, {cfg['layers']} blocks, batch {cfg['batch']} x "
        f"{cfg['seq_len']}, rank {cfg['rank']}; {cfg['threads']} CPU thread(s), load average "
        f"{train_step['machine']['load_average_1m']:.1f} at start. Ratios to AdamW from the same "
        "run.",
        markdown_table(
            [
                "optimizer",
                f"step ms @{cfg['compose_interval']}x{cfg['compose_factor']}",
                "step / AdamW (composed)",
                f"step / AdamW (measured, T_u={cfg['update_interval']})",
                "spike / AdamW",
                "optimizer part / AdamW",
            ],
            rows,
        ),
    ]
    if train_step.get("unavailable"):
        lines.append(
            "Not measured: "
            + "; ".join(f"`{k}`: {v}" for k, v in train_step["unavailable"].items())
        )
    return lines


def _sources(results: dict[str, dict[str, Any] | None]) -> list[str]:
    rows = []
    for name, data in results.items():
        if data is None:
            rows.append([f"{name}.json", "missing", "-", "-"])
            continue
        machine = data.get("machine", {})
        wall = data.get("wall_seconds")
        rows.append(
            [
                f"[{name}.json]({name}.json)",
                machine.get("date_utc", "?"),
                f"{machine.get('load_average_1m', float('nan')):.1f}",
                f"{wall:.0f}" if isinstance(wall, int | float) else "-",
            ]
        )
    return [
        "## Sources",
        markdown_table(["file", "date (UTC)", "load avg at start", "wall s"], rows),
    ]


def write_summary(out_dir: Path) -> Path:
    """Rebuild ``{out_dir}/SUMMARY.md`` from the JSON results in ``out_dir``; its path."""
    results = {
        name: _load(out_dir, name)
        for name in (
            "memory",
            "step_time",
            "train_step",
            "convergence",
            "convergence_fsdp2",
            "startup_memory",
            "distributed",
        )
    }
    rows = [
        memory_target(results["memory"]),
        train_step_target(results["train_step"], results["step_time"]),
        step_vs_galore_target(results["step_time"]),
        *convergence_targets(results["convergence"]),
        fsdp2_convergence_target(results["convergence_fsdp2"]),
        startup_target(results["startup_memory"]),
    ]
    gpu = any((data or {}).get("machine", {}).get("cuda_available") for data in results.values())
    parts = [
        "# Benchmark summary",
        "Generated by `python benchmarks/run.py` from the JSON files in this folder; do not "
        "edit by hand.",
        markdown_table(["target", "figure", "status", "basis / what limits it"], rows),
        "GPU figures: "
        + (
            "see the per-benchmark reports (a CUDA device was visible)."
            if gpu
            else "none — no GPU machine was lent to this session; every figure above is "
            "from CPU runs."
        ),
    ]
    if results["train_step"] is not None:
        parts += _speed_section(results["train_step"])
    if results["convergence"] is not None:
        parts += _convergence_section(results["convergence"])
    parts += _sources(results)
    path = out_dir / "SUMMARY.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts).rstrip() + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks (each failure is reported, the rest still run), then
    regenerate SUMMARY.md; exit status 1 if any benchmark failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=[*ORDER, "all", "summary"])
    parser.add_argument("--quick", action="store_true", help="smoke-check settings")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default {RESULTS_DIR}, or {QUICK_DIR} with --quick)",
    )
    args = parser.parse_args(argv)
    out_dir: Path = args.out or (QUICK_DIR if args.quick else RESULTS_DIR)
    groups = ORDER if args.what == "all" else () if args.what == "summary" else (args.what,)
    failed: list[str] = []
    timings: list[tuple[str, float]] = []
    for group in groups:
        for module, out_flag, full, quick in SCRIPTS[group]:
            script_argv = [*(quick if args.quick else full), out_flag, str(out_dir)]
            print(f"=== {module}.py {' '.join(script_argv)}", flush=True)
            try:
                timings.append((module, run_script(module, script_argv)))
            except (Exception, SystemExit) as err:  # report and go on with the others
                traceback.print_exception(err)
                failed.append(module)
    for module, seconds in timings:
        print(f"{module}: {seconds:.0f} s")
    path = write_summary(out_dir)
    print(path.read_text(encoding="utf-8"))
    print(f"wrote {path}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
