"""wandb logging: imported lazily, rank 0 only, works offline with no network."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coap_dist.train.app import run

from .conftest import FAST, compose_dict


def test_other_ranks_never_import_wandb() -> None:
    code = (
        "import sys\n"
        "from coap_dist.integrations.wandb import WandbLogger\n"
        "logger = WandbLogger(project='p', name='n', mode='offline', rank=1)\n"
        "logger.log({'train/loss': 1.0}, step=1)\n"
        "logger.close()\n"
        "assert not logger.active and 'wandb' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_offline_run_logs_the_optimizer_metrics(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    from coap_dist.integrations.wandb import WandbLogger

    seen: list[tuple[str, str]] = []  # (run name, its config's optimizer name)
    real_init = WandbLogger.__init__

    def spy(self: WandbLogger, **kw: object) -> None:
        seen.append((str(kw["name"]), kw["config"]["optimizer"]["name"]))  # type: ignore[index]
        real_init(self, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(WandbLogger, "__init__", spy)
    overrides = [*FAST, "logger=wandb", "logger.mode=offline", "plot=false"]
    result, baseline = run(compose_dict(overrides), tmp_path)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert all(list(r.glob("run-*.wandb")) for r in runs)  # the offline logs `wandb sync` uploads
    # each run's config names its own optimizer (the baseline's section for the baseline)
    assert seen == [(result.name, result.name), (baseline.name, baseline.name)], seen
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r and r["run"] == result.name]
    assert [r["step"] for r in train] == [2, 4]
    for key in (
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "optim/state_bytes_rank0",
        "optim/refreshes",
        "optim/projector_time_s",
        "optim/projection_residual",
    ):
        assert key in train[-1], key
    assert result.name == "coap"


def test_online_without_an_account_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    """wandb.init's own failure (online mode, no API key) stops the run with the app's line
    naming what to do, before any training."""
    pytest.importorskip("wandb")
    from coap_dist.train.config import RunError

    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # (no ~/.netrc credentials)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [*FAST, "compare=false", "logger=wandb", "logger.mode=online", "plot=false"]
    with pytest.raises(RunError, match=r"logger=wandb: wandb\.init failed .*logger\.mode=offline"):
        run(compose_dict(overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
