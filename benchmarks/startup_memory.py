"""Peak host memory per rank of the app's fsdp2 start: sharded build vs unsharded build.

The ``1b`` LLaMA preset with COAP on 2 CPU processes (gloo), 2 optimizer steps, through the
app's own strategy code (``coap_dist.train.parallelize``):

* ``sharded`` (the app): ``strategy.build_model()`` builds on the meta device,
  ``strategy.setup`` applies ``fully_shard`` and materialises only this rank's shards;
* ``unsharded`` (the previous release): every rank builds the whole fp32 model
  (``Llama(cfg, seed)``), then the same ``strategy.setup`` shards it.

Each run is its own ``torchrun`` (peak RSS is per process); the modes alternate (``--repeats``)
and each rank reports ``VmHWM`` (peak resident set) after the start (build + shard + optimizer)
and after the 2 steps. On a CPU the steps' gradients, optimizer state and transient buffers are
host memory too; on GPU nodes they live on the device and the start is what host RSS pays.

    python benchmarks/startup_memory.py                  # about 6 minutes on 2 cores
    python benchmarks/startup_memory.py --model 350m     # quicker

Writes ``benchmarks/results/startup_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, machine_markdown, markdown_table, publish

MIB = 2**20
MODES = ("sharded", "unsharded")


def worker(mode: str, model: str, overrides: list[str], out: Path) -> None:
    """One rank of one run (started by torchrun): build, set up, 2 steps; writes its peaks."""
    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from coap_dist.models.llama import Llama
    from coap_dist.train.config import TrainConfig
    from coap_dist.train.data import Batches, load_tokens
    from coap_dist.train.loop import loss_fn
    from coap_dist.train.parallelize import (
        build_strategy,
        close_distributed,
        init_distributed,
        peak_memory_bytes,
    )

    torch.set_num_threads(1)
    with initialize_config_module(config_module="coap_dist.configs", version_base="1.3"):
        composed = compose(
            config_name="train",
            overrides=[f"model={model}", "strategy=fsdp2", "compare=false", *overrides],
        )
    cfg = TrainConfig.from_dict(OmegaConf.to_container(composed, resolve=True))
    env = init_distributed(cfg)
    strategy = build_strategy(cfg, env)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    if mode == "sharded":
        net = strategy.build_model()
    else:
        net = Llama(cfg.model.to_llama(), seed=cfg.seed)
        net.set_activation_checkpointing(cfg.activation_checkpointing)
    strategy.setup(net, cfg.optimizer)
    start_s = time.perf_counter() - t0
    host = torch.device("cpu")  # host RSS (VmHWM), also on GPU nodes
    start_peak = peak_memory_bytes(host)
    # Written before the steps: a run stopped for memory during them still reports its start.
    started = {"mode": mode, "rank": env.rank, "start_peak": start_peak, "start_s": start_s}
    (out.parent / f"start_rank{env.rank}.json").write_text(json.dumps(started))
    train, _ = load_tokens(cfg.data)
    batches = Batches(
        train,
        seq_len=cfg.seq_len,
        global_batch=cfg.batch_size,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
    )
    losses = []
    for step in (1, 2):
        loss, _ = strategy.train_step(batches.get(step), loss_fn)
        losses.append(float(loss))
    record = {
        "mode": mode,
        "rank": env.rank,
        "start_peak": start_peak,
        "run_peak": peak_memory_bytes(host),
        "start_s": start_s,
        "losses": losses,
    }
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, record)
    if env.is_main:
        out.write_text(json.dumps(gathered))
    close_distributed()


def _available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo``."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _watch(proc: subprocess.Popen, min_free: int) -> bool:
    """Wait for ``proc``; kill its process group (``True``) if the machine's available
    memory falls under ``min_free``, before the kernel's OOM killer picks a victim that may
    not be ours."""
    while proc.poll() is None:
        if _available_bytes() < min_free:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.2)
    return False


def run_mode(mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            __file__,
            "--worker",
            mode,
            "--model",
            args.model,
            "--out",
            str(out),
            *args.overrides,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        stopped = _watch(proc, args.min_free_gib * 2**30)
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            killed = stopped or "SIGKILL" in stderr or "exitcode  : -9" in stderr
            why = "stopped: the machine ran out of memory" if stopped else f"rc {proc.returncode}"
            print(f"{mode}: failed ({why})", flush=True)
            print(stderr[-3000:], file=sys.stderr)
            starts = [json.loads(f.read_text()) for f in sorted(out.parent.glob("start_rank*"))]
            return [{**r, "failed": True, "oom_killed": killed} for r in starts] or [
                {"mode": mode, "failed": True, "oom_killed": killed}
            ]
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1b")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--min-free-gib",
        type=float,
        default=1.5,
        help="stop a run when the machine's available memory falls below this (GiB)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        default=["batch_size=2", "seq_len=32", "optimizer.state_bits=16"],
        help="app config overrides (default: batch 2 x 32 tokens, fp32 compute (bf16 matmuls "
        "are two orders of magnitude slower on CPUs without bf16 units), bf16 state)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.model, args.overrides, args.out)
        return 0
    runs: list[dict[str, Any]] = []
    for _ in range(args.repeats):
        for mode in MODES:
            ranks = run_mode(mode, args)
            runs.extend(ranks)
            for r in ranks:
                if "start_peak" in r:
                    run_peak = (
                        f"{r['run_peak'] / MIB:,.0f} MiB" if "run_peak" in r else "out of memory"
                    )
                    print(
                        f"{mode:>9} rank {r['rank']}: start peak {r['start_peak'] / MIB:,.0f} MiB, "
                        f"run peak {run_peak}, start {r['start_s']:.1f} s",
                        flush=True,
                    )
    best: dict[str, dict[str, float]] = {mode: {} for mode in MODES}
    for mode in MODES:
        for key in ("start_peak", "run_peak"):
            got = [r[key] for r in runs if r["mode"] == mode and key in r]
            if got:
                best[mode][key] = max(got)

    def cell(mode: str, key: str) -> str:
        if key in best[mode]:
            return f"{best[mode][key] / MIB:,.0f}"
        oom = any(r.get("oom_killed") for r in runs if r["mode"] == mode)
        return "out of memory" if oom else "failed"

    rows = [[mode, cell(mode, "start_peak"), cell(mode, "run_peak")] for mode in MODES]
    ratios = {
        key: best["sharded"][key] / best["unsharded"][key]
        for key in ("start_peak", "run_peak")
        if key in best["sharded"] and key in best["unsharded"]
    }
    rows.append(
        ["sharded / unsharded"]
        + [f"{ratios[k]:.3f}" if k in ratios else "-" for k in ("start_peak", "run_peak")]
    )
    result = {
        "machine": machine_info(),
        "args": {"model": args.model, "nproc": args.nproc, "overrides": args.overrides},
        "runs": runs,
        "ratios": ratios,
    }
    report = "\n\n".join(
        [
            "# Peak host memory per rank: sharded vs unsharded fsdp2 start",
            f"LLaMA-{args.model}, COAP, fsdp2 on {args.nproc} CPU processes (gloo), 2 optimizer "
            f"steps, overrides {' '.join(args.overrides)}; VmHWM of the most loaded rank, MiB.",
            markdown_table(
                ["build", "after start (build + shard + optimizer)", "after 2 steps"], rows
            ),
            "## Machine",
            machine_markdown(result["machine"]),
        ]
    )
    return publish("startup_memory", result, report, args.out_dir)


if __name__ == "__main__":
    raise SystemExit(main())
