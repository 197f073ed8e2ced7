"""The app's side of resuming and of faults, in this process (one rank) and in subprocesses:

* an interrupted-and-resumed run logs exactly what the uninterrupted one logs, at every step
  (loss windows that straddle the checkpoint, cumulative optimizer counters, the residual);
* a changed setting takes effect (hyperparameters) or stops the run before training with
  the field, the saved and the new value (rank, state format, model shape);
* faults are errors naming the field before training: ``device=cuda`` without CUDA, a run dir
  held by another run, an unwritable checkpoint dir, a misspelt DeepSpeed key;
* a full disk at a save (a real small tmpfs: the space check) and a write failing half-way
  (a real file-size limit, ``ulimit -f``) end with a clear error, no ``.tmp`` left behind and
  the previous checkpoint intact; stale ``.tmp`` directories go at the next save;
* gradient accumulation, activation checkpointing and ``compile=true`` keep the math, and peak
  memory per rank is reported.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from coap_dist.train import checkpoint
from coap_dist.train.app import run
from coap_dist.train.checkpoint import CheckpointError
from coap_dist.train.config import ConfigError
from coap_dist.train.report import RunResult

from .conftest import FAST, REPO, compose_dict


def with_(base: list[str], *extra: str) -> list[str]:
    """``base`` overrides with ``extra`` ones replacing those of the same key."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(extra)


# Six steps, logged every 2, checkpointed every 3: the checkpoint at step 3 holds an open
# loss window (step 3 of the 3-4 window).
SIX = with_(FAST, "steps=6", "checkpoint.every=3", "eval.every=3", "compare=false", "plot=false")
TIMING = ("train/tokens_per_s", "optim/projector_time_s", "memory/")


def records(run_dir: Path) -> dict[tuple[int, str], dict]:
    """``{(step, kind): record}`` of the JSON-lines file (kind: train or val)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["step"], "train" if "train/loss" in r else "val")] = r
    return out


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(TIMING)}


def ckpt(run_dir: Path, step: int, name: str = "coap") -> Path:
    return checkpoint.step_dir(run_dir / "checkpoints", name, step)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    (result,) = run(compose_dict(SIX), run_dir)
    return run_dir, result


def test_resumed_run_logs_what_the_uninterrupted_run_logs(uninterrupted, tmp_path) -> None:
    run_dir, result = uninterrupted
    (resumed,) = run(compose_dict([*SIX, f"resume={ckpt(run_dir, 3)}"]), tmp_path)
    full, cont = records(run_dir), records(tmp_path)
    assert sorted(cont) == [(4, "train"), (6, "train"), (6, "val")]
    for key, record in cont.items():
        assert comparable(record) == comparable(full[key]), key
    assert cont[(6, "train")]["optim/refreshes"] == full[(6, "train")]["optim/refreshes"] > 0
    assert math.isfinite(cont[(4, "train")]["optim/projection_residual"])
    assert cont[(4, "train")]["memory/peak_bytes"] > 0
    assert resumed.val_loss == result.val_loss
    assert [h for h in resumed.history if h["step"] <= 3] == [
        h for h in result.history if h["step"] <= 3
    ]
    # Resumed into a run dir whose metrics already go past the checkpoint (an earlier
    # attempt's): those records are replaced, each step is in the file once.
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", again / "metrics.jsonl")
    with open(again / "metrics.jsonl", "a") as f:  # a record cut short (a full disk)
        f.write('{"run": "coap", "step": 5, "optim/ref')
    run(compose_dict([*SIX, f"resume={ckpt(run_dir, 3)}"]), again)
    lines = [json.loads(x) for x in (again / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], "train/loss" in r) for r in lines]
    assert len(keys) == len(set(keys)) and records(again).keys() == full.keys(), keys
    for key, record in records(again).items():
        assert comparable(record) == comparable(full[key]), key


def test_resume_latest_continues_a_requeued_job_in_its_run_dir(uninterrupted, tmp_path) -> None:
    """``resume=latest`` (a requeued job's command line, run again as it was): the newest
    checkpoint of the run dir, or a fresh start where an attempt stopped before its first;
    either way the file ends with the uninterrupted run's records, each step once."""
    run_dir, result = uninterrupted
    full = records(run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    upto = {4: [], 2: []}
    for line in lines:
        for k, kept in upto.items():
            if json.loads(line)["step"] <= k:
                kept.append(line)
    # Attempt 1 saved step 3 and logged step 4, then died.
    requeued = tmp_path / "requeued"
    shutil.copytree(ckpt(run_dir, 3), ckpt(requeued, 3))
    (requeued / "metrics.jsonl").write_text("".join(upto[4]))
    (resumed,) = run(compose_dict([*SIX, "resume=latest"]), requeued)
    assert records(requeued).keys() == full.keys() and resumed.val_loss == result.val_loss
    for key, record in records(requeued).items():
        assert comparable(record) == comparable(full[key]), key
    # Attempt 1 died before its first checkpoint: a fresh start replaces its records.
    early = tmp_path / "early"
    early.mkdir()
    (early / "metrics.jsonl").write_text("".join(upto[2]))
    (fresh,) = run(compose_dict([*SIX, "resume=latest"]), early)
    got = [json.loads(x) for x in (early / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "train/loss" in r) for r in got] == [
        (json.loads(x)["step"], "train/loss" in json.loads(x)) for x in lines
    ]
    assert fresh.val_loss == result.val_loss
    with pytest.raises(ConfigError, match=r"resume=latest .* set checkpoint\.every"):
        run(compose_dict(with_(SIX, "resume=latest", "checkpoint.every=0")), early)


def test_changed_settings_take_effect_or_stop_the_run(uninterrupted, tmp_path) -> None:
    run_dir, _ = uninterrupted
    saved = ckpt(run_dir, 3)
    # Hyperparameters take effect: T_u = 2 refreshes at k = 4 (step 5); weight decay moves W.
    changed = [*SIX, f"resume={saved}", "optimizer.update_interval=2", "optimizer.weight_decay=0.5"]
    run(compose_dict(changed), tmp_path / "changed")
    full, cont = records(run_dir), records(tmp_path / "changed")
    assert cont[(6, "train")]["optim/refreshes"] > full[(6, "train")]["optim/refreshes"]
    assert cont[(6, "train")]["train/loss"] != full[(6, "train")]["train/loss"]
    # What the state cannot carry stops the run before any training (no metrics written).
    for override, field, old, new in (
        ("optimizer.rank_ratio=2", "optimizer.rank_ratio", "4", "2"),
        ("optimizer.state_bits=16", "optimizer.state_bits", "None", "16"),
        ("optimizer.projection_side=right", "optimizer.projection_side", "'auto'", "'right'"),
        ("+optimizer.algorithm=adamw", "optimizer.algorithm", "'auto'", "'adamw'"),
        ("model.n_layers=2", "model.n_layers", "4", "2"),
    ):
        out = tmp_path / field
        message = rf"{field} was {old} in the checkpoint, this run sets {new}; .* Resume with"
        with pytest.raises(ConfigError, match=message):
            run(compose_dict([*SIX, f"resume={saved}", override]), out)
        assert not (out / "metrics.jsonl").exists(), override
    # A checkpoint cut short (a save killed part-way, a truncated copy): one line naming it.
    for damage, name in (("truncate", "meta.pt"), ("truncate", "state.pt"), ("remove", "state.pt")):
        broken = tmp_path / f"broken_{damage}_{name}"
        shutil.copytree(saved, broken)
        if damage == "remove":
            (broken / name).unlink()
        else:
            (broken / name).write_bytes((broken / name).read_bytes()[:100])
        with pytest.raises(ConfigError, match=r"cannot be read .*incomplete or corrupt"):
            run(compose_dict([*SIX, f"resume={broken}"]), tmp_path / f"out_{damage}_{name}")


def test_faults_stop_before_training_naming_the_field(uninterrupted, tmp_path) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device=cuda, but no CUDA device is usable"):
            run(compose_dict(with_(SIX, "device=cuda")), tmp_path / "cuda")
    # A run dir held by another (real, running) process.
    held = tmp_path / "held"
    held.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from coap_dist.train.rundir import RunDirLock; "
            "RunDirLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)",
            str(held),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"is in use by another run \(.*{holder.pid}"):
            run(compose_dict(SIX), held)
        assert not (held / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    (result,) = run(
        compose_dict(with_(SIX, "steps=2", "checkpoint.every=0")), held
    )  # free again once the holder died
    assert math.isfinite(result.val_loss)
    # A fresh run into a run dir holding an earlier job's records (or checkpoints) of the
    # same run stops before training; overwrite=true removes them and starts over.
    before = (held / "metrics.jsonl").read_text()
    two = with_(SIX, "steps=2", "checkpoint.every=0")
    with pytest.raises(
        ConfigError,
        match=r"holds an earlier job's outputs of the runs this "
        r"one trains: \d+ metrics record\(s\) of run 'coap' in .*overwrite=true",
    ):
        run(compose_dict(two), held)
    assert (held / "metrics.jsonl").read_text() == before
    run(compose_dict([*two, "optimizer.lr=1e-4", "overwrite=true"]), held)
    old = [json.loads(x) for x in before.splitlines()]
    new = [json.loads(x) for x in (held / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in new] == [r["step"] for r in old]  # the new run's records only
    lrs = [(a["train/lr"], b["train/lr"]) for a, b in zip(old, new, strict=True) if "train/lr" in a]
    assert lrs and all(b < a for a, b in lrs), lrs
    kept = tmp_path / "kept"
    shutil.copytree(uninterrupted[0] / "checkpoints", kept / "checkpoints")
    with pytest.raises(ConfigError, match=r"checkpoints step_0000003 \.\. step_0000006 in"):
        run(compose_dict([*SIX, "logger=none"]), kept)
    with pytest.raises(ConfigError, match=r"overwrite=true starts this job's runs over"):
        run(compose_dict([*SIX, "overwrite=true", f"resume={ckpt(kept, 3)}"]), kept)
    # An unwritable checkpoint dir (below a regular file: unwritable even for root).
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"checkpoint\.dir: .* is not writable"):
        run(compose_dict(with_(SIX, f"checkpoint.dir={blocker / 'ckpt'}")), tmp_path / "ro")
    # A checkpoint of another model.
    with pytest.raises(ConfigError, match=r"model\.dim was 128 in the checkpoint"):
        run(
            compose_dict(with_(SIX, "model.dim=64", f"resume={ckpt(uninterrupted[0], 3)}")),
            tmp_path,
        )


@pytest.mark.deepspeed
def test_misspelt_deepspeed_key_is_a_config_error(tmp_path) -> None:
    pytest.importorskip("deepspeed")
    bad = [*SIX, "strategy=deepspeed_zero2", "+strategy.extra.zero_optimisation.stage=3"]
    with pytest.raises(
        ConfigError, match=r"strategy\.extra\.zero_optimisation .* zero_optimization"
    ):
        run(compose_dict(bad), tmp_path)
    inner = [*SIX, "strategy=deepspeed_zero2", "+strategy.extra.zero_optimization.stagee=3"]
    with pytest.raises(
        ConfigError, match=r"strategy\.extra\.zero_optimization\.stagee: .*did you mean stage"
    ):
        run(compose_dict(inner), tmp_path)
    # Keys the app derives from its own settings: another value is refused naming the
    # setting to use; the app's own value passes.
    for extra, message in [
        (
            "gradient_accumulation_steps=4",
            r"gradient_accumulation_steps=4 .*sets 1\); set grad_accum",
        ),
        ("gradient_clipping=0.01", r"\(the app sets 1\.0\); set max_grad_norm instead"),
        ("bf16.enabled=true", r"strategy\.extra\.bf16\.enabled=True .*; set precision"),
        ("fp16.enabled=true", r"fp16\.enabled=True .*sets False\); set precision \(fp32 or bf16"),
        ("zero_optimization.stage=3", r"stage=3 .*sets 2\); set strategy=deepspeed_zero<stage>"),
        ("optimizer.params.rank=4", r"extra\.optimizer=.*; set optimizer=<option> and its"),
        ("train_micro_batch_size_per_gpu=2", r"set batch_size \(divided by processes"),
        ("train_batch_size=4", r"train_batch_size=4 would override .*; set batch_size instead"),
    ]:
        with pytest.raises(ConfigError, match=message):
            run(
                compose_dict([*SIX, "strategy=deepspeed_zero2", f"+strategy.extra.{extra}"]),
                tmp_path,
            )
    assert not (tmp_path / "metrics.jsonl").exists()
    # The app's own values, and the sub-keys of those sections it does not set, pass.
    fine = [
        "+strategy.extra.gradient_accumulation_steps=1",
        "+strategy.extra.bf16.immediate_grad_update=true",
        "+strategy.extra.zero_optimization.overlap_comm=false",
    ]
    short = with_(SIX, "steps=2", "checkpoint.every=0", "eval.every=0", "logger=none")
    (done,) = run(compose_dict([*short, "strategy=deepspeed_zero2", *fine]), tmp_path / "fine")
    assert len(done.history) > 0


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A real 9 MiB filesystem: one checkpoint of the tiny model fits, two do not."""
    mount = Path(tempfile.mkdtemp(prefix="coap_tmpfs_"))
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()


def test_full_disk_at_a_save_keeps_the_previous_checkpoint(small_tmpfs, tmp_path) -> None:
    ckpts = small_tmpfs / "ckpt"
    stale = ckpts / "coap" / "step_0000001.tmp"
    stale.mkdir(parents=True)  # left by a crashed run: removed by the next save
    (stale / "junk").write_bytes(b"\0" * 1000)
    overrides = with_(SIX, "checkpoint.every=2", f"checkpoint.dir={ckpts}")
    with pytest.raises(CheckpointError, match=r"not enough space .*step_0000002, is intact"):
        run(compose_dict(overrides), tmp_path)
    assert sorted(p.name for p in (ckpts / "coap").iterdir()) == ["step_0000002"]
    meta = checkpoint.read_meta(ckpts / "coap" / "step_0000002")
    assert meta["step"] == 2 and (ckpts / "coap" / "step_0000002" / "state.pt").is_file()
    # The metrics sink on a full disk: a clear error, not a raw OSError.
    from coap_dist.train.loggers import JsonlLogger

    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    logger = JsonlLogger(small_tmpfs / "metrics.jsonl", "coap")
    with pytest.raises(RuntimeError, match=r"logger: writing metrics to .* failed \(No space"):
        for step in range(10_000):
            logger.log({"train/loss": 1.0, "pad": "x" * 4096}, step)
    # ... and a metrics file that cannot be opened (its folder is a file)
    with pytest.raises(RuntimeError, match=r"logger: cannot open .* set logger\.filename"):
        JsonlLogger(filler / "metrics.jsonl", "coap")


def test_write_failing_half_way_leaves_no_tmp_and_the_previous_checkpoint(tmp_path) -> None:
    """A real write error during ``torch.save`` (a 3 MB file-size limit; the tiny model's
    state.pt is larger), after the run's first checkpoint was written without a limit, and
    in FSDP2's DCP save; a
    run directory that cannot be created; an override of a key the config lacks."""
    base = with_(SIX, "steps=4", "checkpoint.every=2", f"hydra.run.dir={tmp_path}", "logger=none")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(
        [sys.executable, "-m", "coap_dist.train", *with_(base, "steps=2")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = [*base, f"resume={ckpt(tmp_path, 2)}"]
    limited = subprocess.run(
        [
            "bash",
            "-c",
            'ulimit -f 3000; exec "$@"',
            "limited",
            sys.executable,
            "-m",
            "coap_dist.train",
            *resumed,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # The run stops with the one-line reason and exit code 1, no traceback.
    assert limited.returncode == 1 and "Traceback" not in limited.stderr, limited.stderr[-3000:]
    assert "coap_dist.train: stopped: checkpoint: writing" in limited.stderr
    assert "checkpoint: writing" in limited.stderr and "step_0000004.tmp failed" in limited.stderr
    assert "step_0000002, is intact" in limited.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "coap").iterdir()) == ["step_0000002"]
    assert checkpoint.read_meta(ckpt(tmp_path, 2))["step"] == 2
    # The same under FSDP2, whose DCP save wraps the error in a CheckpointException (a
    # BaseException): the one-line reason, exit code 1, no .tmp left.
    dcp_dir = tmp_path / "dcp"
    dcp_run = subprocess.run(
        ["bash", "-c", 'ulimit -f 3000; exec "$@"', "limited", sys.executable, "-m",
         "coap_dist.train", *with_(base, "strategy=fsdp2", f"hydra.run.dir={dcp_dir}")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert dcp_run.returncode == 1 and "Traceback" not in dcp_run.stderr, dcp_run.stderr[-3000:]
    assert "step_0000002.tmp failed on rank 0" in dcp_run.stderr, dcp_run.stderr[-3000:]
    assert "no earlier checkpoint of this run exists" in dcp_run.stderr
    assert not list((dcp_dir / "checkpoints" / "coap").iterdir())
    # Command lines refused before Hydra starts the run, each with one line and exit code 2:
    # a run directory that cannot be created (Hydra would make it before the app runs), and
    # an override of a key the config lacks (Hydra's message would suggest appending it).
    unwritable, misspelt = (
        subprocess.run(
            [sys.executable, "-m", "coap_dist.train", override, "steps=3"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for override in ("hydra.run.dir=/proc/coap_run", "optimizer.rnak=2")
    )
    for refused in (unwritable, misspelt):
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.count("\n") == 1, refused.stderr
    assert "hydra.run.dir='/proc/coap_run' cannot be created" in unwritable.stderr
    assert misspelt.stderr.startswith(
        "coap_dist.train: invalid config: the config has no key optimizer.rnak (override "
        "'optimizer.rnak=2'); did you mean optimizer.rank? optimizer has ['"
    ), misspelt.stderr


def test_accumulation_checkpointing_and_compile_keep_the_math(uninterrupted, tmp_path) -> None:
    _, ref = uninterrupted
    short = with_(SIX, "checkpoint.every=0", "eval.every=0")

    def train_losses(result: RunResult, key: str = "train/loss") -> list[float]:
        return [h[key] for h in result.history if "train/loss" in h]

    (accum,) = run(
        compose_dict([*short, "grad_accum=2", "activation_checkpointing=true"]), tmp_path / "a"
    )
    # Same mean loss and the same gradient (its norm: Adam alone would hide a 2x scale);
    # rounding differences of the split batch grow along the trajectory.
    np.testing.assert_allclose(train_losses(accum), train_losses(ref), rtol=2e-4)
    norms = train_losses(accum, "train/grad_norm"), train_losses(ref, "train/grad_norm")
    np.testing.assert_allclose(norms[0][0], norms[1][0], rtol=1e-5)  # step 2
    np.testing.assert_allclose(norms[0], norms[1], rtol=1e-3)
    (compiled,) = run(compose_dict(with_(short, "steps=2", "compile=true")), tmp_path / "c")
    np.testing.assert_allclose(train_losses(compiled), train_losses(ref)[:1], rtol=1e-4)
    for result in (accum, compiled):
        assert result.peak_memory_bytes[0] > 1 << 20
