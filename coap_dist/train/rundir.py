"""The run directory: one run at a time, and writable before any training time is spent.

* :class:`RunDirLock`: an exclusive ``flock`` on ``<run dir>/.coap_train.lock``, held by rank 0
  for the whole job. A second run pointed at the same directory (two jobs given the same
  ``RUN_DIR``) stops at once with the holder's pid, host and start time, instead of
  interleaving ``metrics.jsonl`` and overwriting the other's checkpoints. The kernel releases
  the lock when the holder exits, however it exits, so no stale lock survives a crash
  (``flock`` on NFS: lock the run dir from one node, which rank 0 does).
* :func:`check_writable`: create, fsync and remove a probe file, so that an unwritable
  ``hydra.run.dir`` or ``checkpoint.dir`` is a config error before the first step.
* :func:`earlier_outputs` / :func:`remove_earlier_outputs`: what an earlier job left in the
  run dir for the runs this one trains (metrics records, checkpoints). A fresh run there
  would interleave its metrics with them and replace its checkpoints step by step: the app
  refuses it unless ``overwrite=true``, which removes them first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from coap_dist.train.config import ConfigError

LOCK_NAME = ".coap_train.lock"


class RunDirLock:
    """Exclusive lock of a run directory (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`ConfigError` naming the run that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"hydra.run.dir={str(self.path.parent)!r} is in use by another run ({holder}); "
                f"give this run its own directory (hydra.run.dir=..., or RUN_DIR=... for the "
                f"launch scripts), or wait for that run to finish"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a new holder)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_writable(directory: Path, field: str) -> None:
    """Create ``directory`` if needed and prove it writable with a probe file; raise
    :class:`ConfigError` naming ``field`` (the config key that chose it) otherwise."""
    probe = directory / f".write_probe.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{field}: {str(directory)!r} is not writable ({err.strerror or err}); choose a "
            f"directory this job can write to"
        ) from None


def _run_of(line: str) -> object:
    """The ``run`` of one metrics line (None for a line that is not a record)."""
    try:
        return json.loads(line).get("run")
    except (ValueError, AttributeError):
        return None


def _records_of(metrics: Path, names: set[str]) -> dict[str, int]:
    """Records per run name in ``names`` in the JSON-lines file ``metrics`` (none if absent)."""
    counts: dict[str, int] = {}
    if not metrics.is_file():
        return counts
    with metrics.open(encoding="utf-8") as f:
        for line in f:
            run = _run_of(line)
            if isinstance(run, str) and run in names:
                counts[run] = counts.get(run, 0) + 1
    return counts


def earlier_outputs(metrics: Path | None, saved: Mapping[str, list[Path]]) -> list[str]:
    """What an earlier job left for the runs named in ``saved``: its records in ``metrics``
    (the metrics file, None without one) and its complete checkpoints (``saved[run]``),
    each as a phrase naming the path (empty: nothing)."""
    found = []
    if metrics is not None:
        for run, n in _records_of(metrics, set(saved)).items():
            found.append(f"{n} metrics record(s) of run {run!r} in {metrics}")
    for steps in saved.values():
        if steps:
            where = steps[0].parent
            found.append(f"checkpoints {steps[0].name} .. {steps[-1].name} in {where}")
    return found


def remove_earlier_outputs(metrics: Path | None, checkpoints: Path, names: list[str]) -> None:
    """Remove what :func:`earlier_outputs` finds: the runs' records (the file's other lines
    stay; rewritten through a temporary file and ``os.replace``) and checkpoint dirs."""
    if metrics is not None and _records_of(metrics, set(names)):
        lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _run_of(line) not in names]
        tmp = metrics.with_name(metrics.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, metrics)
    for run in names:
        if (checkpoints / run).is_dir():
            shutil.rmtree(checkpoints / run)
