"""Metric sinks of the training app, chosen by the ``logger`` config group: ``none``,
``jsonl`` (one JSON object per record in the run dir) or ``wandb`` (JSON lines plus a wandb
run, imported lazily from :mod:`coap_dist.integrations.wandb`). Only rank 0 logs; the other
ranks get :class:`NullLogger`.

A record is a flat mapping such as ``{"step": 10, "train/loss": 3.2, "train/lr": 0.003,
"optim/state_bytes": 123456, "optim/refreshes": 1.0}``; the JSON lines also carry
``"run": <optimizer name>`` so the runs of a comparison share one file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from coap_dist.train.config import LoggerConfig, RunError


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth of dicts and lists, replaced by
    None: strict JSON (``NaN`` is not JSON; jq and pandas read ``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


class MetricsLogger(Protocol):
    """Where records go."""

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Record the metrics of ``step``."""

    def close(self) -> None:
        """Flush and release."""


class NullLogger:
    """Drops everything (``logger=none`` and ranks other than 0)."""

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


class JsonlLogger:
    """Appends ``{"run": run, "step": step, **record}`` as one JSON line per call to ``path``.
    A run resumed at step k (``resumed_at``) into a file that already has this run's
    records after k (an earlier attempt's, which went past the checkpoint) first removes
    those, so that each step is in the file once."""

    def __init__(self, path: Path, run: str, resumed_at: int | None = None) -> None:
        self.path = path
        self.run = run
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                self._drop_after(resumed_at)
            self._file = path.open("a", encoding="utf-8")
        except OSError as err:
            raise RunError(
                f"logger: cannot open {path} for the metrics ({err.strerror or err}); set "
                "logger.filename or hydra.run.dir to a writable place"
            ) from err

    def _drop_after(self, step: int | None) -> None:
        """Remove this run's records after ``step`` (with a step) and a last line cut short
        (a write that failed part-way: a full disk), which the next record would join."""
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = [line for line in lines if step is None or not self._later(line, step)]
        if keep and not keep[-1].endswith("\n"):
            keep.pop()
        if len(keep) != len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(keep), encoding="utf-8")
            os.replace(tmp, self.path)

    def _later(self, line: str, step: int) -> bool:
        """Whether ``line`` is a record of this run after ``step`` (other lines are kept)."""
        try:
            record = json.loads(line)
        except ValueError:
            return False
        return (
            isinstance(record, dict)
            and record.get("run") == self.run
            and (isinstance(record.get("step"), int) and record["step"] > step)
        )

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Write one line and flush, so a crashed run keeps its numbers. Non-finite floats
        become ``null`` (strict JSON, readable by jq and pandas alike)."""
        line = {"run": self.run, "step": step, **record}
        try:
            self._file.write(json.dumps(strict_json(line), allow_nan=False) + "\n")
            self._file.flush()
        except OSError as err:
            raise RunError(
                f"logger: writing metrics to {self.path} failed ({err.strerror or err}); the "
                f"run stops here (its checkpoints so far are intact). Free space there or set "
                f"logger.filename / hydra.run.dir elsewhere"
            ) from err

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class TeeLogger:
    """Sends every record to each of ``loggers``."""

    def __init__(self, *loggers: MetricsLogger) -> None:
        self.loggers = loggers

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Log to all."""
        for logger in self.loggers:
            logger.log(record, step)

    def close(self) -> None:
        """Close all."""
        for logger in self.loggers:
            logger.close()


def build_logger(
    cfg: LoggerConfig,
    *,
    run_name: str,
    out_dir: Path,
    config: Mapping[str, Any],
    is_main: bool,
    resumed_at: int | None = None,
) -> MetricsLogger:
    """The logger of one optimizer run.

    Args:
        cfg: the ``logger`` section.
        run_name: the optimizer's name (the wandb run name, the ``run`` field of JSON lines).
        out_dir: the run dir (JSON lines file, wandb's files).
        config: the resolved config, stored with the wandb run.
        is_main: whether this is global rank 0.
        resumed_at: the checkpoint's step of a resumed run (:class:`JsonlLogger`).
    """
    if not is_main or cfg.name == "none":
        return NullLogger()
    jsonl = JsonlLogger(out_dir / cfg.filename, run_name, resumed_at)
    if cfg.name == "jsonl":
        return jsonl
    from coap_dist.integrations.wandb import WandbLogger

    try:
        wandb_logger = WandbLogger(
            project=cfg.project,
            entity=cfg.entity,
            name=run_name,
            group=cfg.group,
            tags=cfg.tags,
            mode=cfg.mode,
            config=config,
            dir=str(out_dir),
            rank=0,
        )
    except Exception as err:
        if not type(err).__module__.startswith("wandb"):
            raise
        jsonl.close()
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise RunError(
            f"logger=wandb: wandb.init failed (logger.mode={cfg.mode}): {first}. Log in "
            "(wandb login), or log without network or account with logger.mode=offline "
            "(or WANDB_MODE=offline), or use logger=jsonl"
        ) from err
    return TeeLogger(jsonl, wandb_logger)
