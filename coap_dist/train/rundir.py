"""The run directory: one run at a time, and writable before any training time is spent.

* :class:`RunDirLock`: an exclusive ``flock`` on ``<run dir>/.coap_train.lock``, held by rank 0
  for the whole job. A second run pointed at the same directory (two jobs given the same
  ``RUN_DIR``) stops at once with the holder's pid, host and start time, instead of
  interleaving ``metrics.jsonl`` and overwriting the other's checkpoints. The kernel releases
  the lock when the holder exits, however it exits, so no stale lock survives a crash
  (``flock`` on NFS: lock the run dir from one node, which rank 0 does).
* :func:`check_writable`: create, fsync and remove a probe file, so that an unwritable
  ``hydra.run.dir`` or ``checkpoint.dir`` is a config error before the first step.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
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
