"""The app in this process (one rank): outputs of the default comparison, checkpoint and
resume for each checkpoint format, strategies that must match the single-process run, and
users' memmap data. Multi-process runs are in test_launch.py."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coap_dist.train.app import run
from coap_dist.train.report import RunResult

from .conftest import FAST, compose_dict


def losses(result: RunResult, key: str = "train/loss") -> dict[int, float]:
    """``{step: value}`` of one metric in a run's history."""
    return {h["step"]: h[key] for h in result.history if key in h}


def ckpt(run_dir: Path, name: str, step: int) -> Path:
    return run_dir / "checkpoints" / name / f"step_{step:07d}"


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RunResult], str]:
    """The default comparison (COAP, then AdamW), shortened, checkpointing every 2 steps."""
    import io
    from contextlib import redirect_stdout

    threads = torch.get_num_threads()
    run_dir = tmp_path_factory.mktemp("single")
    out = io.StringIO()
    with redirect_stdout(out):
        results = run(compose_dict([*FAST, "checkpoint.every=2"]), run_dir)
    torch.set_num_threads(threads)
    return run_dir, results, out.getvalue()


def test_comparison_prints_table_and_writes_outputs(single) -> None:
    run_dir, results, stdout = single
    coap, adamw = results
    assert (coap.name, adamw.name) == ("coap", "adamw")
    for r in results:
        assert math.isfinite(r.train_loss) and math.isfinite(r.val_loss)
        assert r.train_loss < math.log(256) and r.tokens_per_s > 0
        assert set(losses(r)) == {2, 4} and set(losses(r, "val/loss")) == {2, 4}
    assert 0 < coap.state_bytes[0] < adamw.state_bytes[0]  # the point of COAP

    lines = stdout.splitlines()
    header = lines.index(
        "| optimizer | train loss | val loss | opt state MiB/rank | peak mem MiB/rank | tokens/s |"
    )
    assert lines[header + 2].startswith("| coap ") and lines[header + 3].startswith("| adamw ")
    assert f"{coap.val_loss:.4f}" in lines[header + 2]
    for label, name in (("metrics", "metrics.jsonl"), ("loss curves", "loss_curves.png")):
        assert f"{label}: {run_dir / name}" in lines

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in records} == {"coap", "adamw"}
    coap_train = [r for r in records if r["run"] == "coap" and "train/loss" in r]
    for key in (
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "optim/state_bytes",
        "optim/state_bytes_rank0",
        "optim/refreshes",
        "optim/projector_time_s",
        "optim/projection_residual",
    ):
        assert key in coap_train[-1], key
    assert coap_train[-1]["optim/state_bytes"] == coap.state_bytes[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["name"] for s in summary] == ["coap", "adamw"]
    # Strict JSON: a run without a validation loss (NaN) writes null, not a bare NaN.
    from coap_dist.train.report import write_summary

    write_summary([dataclasses.replace(coap, val_loss=float("nan"))], run_dir / "strict.json")
    strict = json.loads((run_dir / "strict.json").read_text(), parse_constant=_refuse_constant)
    assert strict[0]["val_loss"] is None and strict[0]["name"] == "coap"
    assert (run_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("coap", "adamw"):
        assert (ckpt(run_dir, name, 2) / "state.pt").is_file()
        assert (ckpt(run_dir, name, 4) / "meta.pt").is_file()


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"{name} in a JSON file: not strict JSON")


def test_resume_continues_the_same_loss_curve(single, tmp_path) -> None:
    run_dir, (coap, _), _ = single
    overrides = [*FAST, "compare=false", f"resume={ckpt(run_dir, 'coap', 2)}"]
    (resumed,) = run(compose_dict(overrides), tmp_path)
    assert losses(resumed) == losses(coap)  # steps 1-2 from the checkpoint, 3-4 recomputed
    assert resumed.val_loss == coap.val_loss


def test_ddp_owner_one_process_matches_single_and_resumes_across_strategies(
    single, tmp_path
) -> None:
    """Owner-sharded state on one rank is the single-process optimizer; its checkpoint is
    layout-independent, so strategy=single can continue it."""
    _, (coap, adamw), _ = single
    sharded = run(compose_dict([*FAST, "strategy=ddp_owner", "checkpoint.every=2"]), tmp_path)
    for ref, got in zip((coap, adamw), sharded, strict=True):
        assert got.name == ref.name
        np.testing.assert_allclose(
            list(losses(got).values()), list(losses(ref).values()), rtol=1e-5
        )
    overrides = [*FAST, "compare=false", f"resume={ckpt(tmp_path, 'coap', 2)}"]
    (resumed,) = run(compose_dict(overrides), tmp_path / "resumed")
    np.testing.assert_allclose(losses(resumed)[4], losses(coap)[4], rtol=1e-5)


def test_fsdp2_one_process_dcp_checkpoint_and_resume(single, tmp_path) -> None:
    _, (_, adamw), _ = single
    overrides = [*FAST, "strategy=fsdp2", "checkpoint.every=2"]
    coap_fsdp, adamw_fsdp = run(compose_dict(overrides), tmp_path)
    np.testing.assert_allclose(
        list(losses(adamw_fsdp).values()), list(losses(adamw).values()), rtol=1e-5
    )
    assert (ckpt(tmp_path, "coap", 2) / ".metadata").is_file()  # torch.distributed.checkpoint
    resume = [*overrides, "compare=false", f"resume={ckpt(tmp_path, 'coap', 2)}"]
    (resumed,) = run(compose_dict(resume), tmp_path / "resumed")
    np.testing.assert_allclose(losses(resumed)[4], losses(coap_fsdp)[4], rtol=1e-5)


@pytest.mark.parametrize("strategy", ["single", "fsdp2"])
def test_in_backward_matches_the_normal_step_and_resumes_without_it(
    single, strategy: str, tmp_path: Path
) -> None:
    """``optimizer.in_backward=true`` (exact clipping by the norm pre-pass): the losses of
    the normal step, for COAP and AdamW; its checkpoint resumes in a normal-step run."""
    _, refs, _ = single
    on = ["optimizer.in_backward=true", "baseline.in_backward=true"]
    got = run(compose_dict([*FAST, f"strategy={strategy}", *on, "checkpoint.every=2"]), tmp_path)
    for ref, res in zip(refs, got, strict=True):
        np.testing.assert_allclose(
            list(losses(res).values()), list(losses(ref).values()), rtol=1e-4
        )
        assert res.history[-2]["train/grad_norm"] > 0
    resume = [*FAST, f"strategy={strategy}", "compare=false", f"resume={ckpt(tmp_path, 'coap', 2)}"]
    (resumed,) = run(compose_dict(resume), tmp_path / "resumed")
    np.testing.assert_allclose(losses(resumed)[4], losses(refs[0])[4], rtol=1e-4)


def test_resume_rejects_a_checkpoint_of_another_format_or_past_the_run(single, tmp_path) -> None:
    from coap_dist.train.config import ConfigError

    run_dir = single[0]
    overrides = [*FAST, "strategy=fsdp2", "compare=false", f"resume={ckpt(run_dir, 'coap', 2)}"]
    with pytest.raises(ConfigError, match="written by strategy single"):
        run(compose_dict(overrides), tmp_path)
    overrides = [*FAST, "optimizer=adamw", "compare=false", f"resume={ckpt(run_dir, 'coap', 2)}"]
    with pytest.raises(ConfigError, match="is a checkpoint of optimizer coap, but this run"):
        run(compose_dict(overrides), tmp_path)
    with pytest.raises(ConfigError, match="is not a checkpoint directory"):
        run(compose_dict([*FAST, "compare=false", f"resume={tmp_path}"]), tmp_path)
    overrides = [*FAST, "compare=false", "steps=2", "warmup_steps=0"]
    with pytest.raises(ConfigError, match=r"is at step 2, and steps=2 .* set steps above 2"):
        run(compose_dict([*overrides, f"resume={ckpt(run_dir, 'coap', 2)}"]), tmp_path)


@pytest.mark.deepspeed
def test_deepspeed_zero2_adamw_checkpoint_and_resume(single, tmp_path) -> None:
    pytest.importorskip("deepspeed")
    _, (_, adamw), _ = single
    overrides = [*FAST, "strategy=deepspeed_zero2", "optimizer=adamw", "checkpoint.every=2"]
    (ds,) = run(compose_dict(overrides), tmp_path)
    np.testing.assert_allclose(list(losses(ds).values()), list(losses(adamw).values()), rtol=1e-4)
    resume = [*overrides, f"resume={ckpt(tmp_path, 'adamw', 2)}"]
    (resumed,) = run(compose_dict(resume), tmp_path / "resumed")
    np.testing.assert_allclose(losses(resumed)[4], losses(ds)[4], rtol=1e-5)


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_coap(single, stage: int, tmp_path) -> None:
    pytest.importorskip("deepspeed")
    _, (coap, _), _ = single
    overrides = [*FAST, f"strategy=deepspeed_zero{stage}", "compare=false", "checkpoint.every=2"]
    (ds,) = run(compose_dict(overrides), tmp_path)
    assert ds.name == "coap" and math.isfinite(ds.val_loss) and ds.state_bytes[0] > 0
    # every stage logs the pre-clip norm (stage 0: the app's own, the engine keeps none)
    np.testing.assert_allclose(
        list(losses(ds, "train/grad_norm").values()),
        list(losses(coap, "train/grad_norm").values()),
        rtol=1e-3,
    )
    resume = [*overrides, f"resume={ckpt(tmp_path, 'coap', 2)}"]
    (resumed,) = run(compose_dict(resume), tmp_path / "resumed")
    np.testing.assert_allclose(losses(resumed)[4], losses(ds)[4], rtol=1e-5)


def test_memmap_data_trains(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", 20_000), ("val.bin", 4_000)):
        ids = np.memmap(tmp_path / name, dtype=np.uint16, mode="w+", shape=(n,))
        ids[:] = rng.integers(0, 200, size=n)
        ids.flush()
    overrides = [
        *FAST,
        "data=memmap",
        f"data.train_path={tmp_path / 'train.bin'}",
        f"data.val_path={tmp_path / 'val.bin'}",
        "data.vocab_size=200",
        "compare=false",
        "optimizer=adamw",
        "logger=none",
        "plot=false",
    ]
    (result,) = run(compose_dict(overrides), tmp_path / "run")
    assert math.isfinite(result.val_loss)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert (tmp_path / "run" / "summary.json").is_file()


def test_app_imports_no_optional_integration() -> None:
    code = (
        "import sys, coap_dist.train.app, coap_dist.train.__main__;"
        "bad = {'wandb', 'deepspeed', 'matplotlib'} & set(sys.modules);"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
