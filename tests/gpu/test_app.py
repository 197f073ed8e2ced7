"""The training app's cluster strategies on all GPUs present (fsdp2, ddp_owner,
deepspeed_zero2), a few steps each through launch/torchrun_local.sh, bf16 where the strategy
takes it: every run exits 0 with a finite, falling loss and COAP state on every rank."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu.conftest import ON_CPU, devices

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp_owner", "deepspeed_zero2"])
def test_app_strategy(strategy: str, tmp_path: Path) -> None:
    nproc = max(devices(), 1)
    if strategy != "fsdp2" and nproc < 2:
        pytest.skip("needs 2 GPUs")
    overrides = [
        f"strategy={strategy}",
        "compare=false",
        "model=tiny",
        "steps=12",
        "batch_size=16",
        "seq_len=64",
        "warmup_steps=2",
        "log_every=4",
        "eval.every=0",
        "eval.batches=1",
        "progress=false",
        f"device={'cpu' if ON_CPU else 'cuda'}",
        f"precision={'fp32' if ON_CPU else 'bf16'}",
    ]
    env = {**os.environ, "NPROC": str(nproc), "RUN_DIR": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun_local.sh"), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_app.jsonl"), "a") as f:
            f.write(json.dumps({"strategy": strategy, "nproc": nproc, "losses": losses}) + "\n")
