"""Static checks, run by the README's test command: ruff (lint and format) and mypy on the
package, as configured in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; `bash launch/setup.sh` installs it (extra dev)")
    return found


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"


def test_ruff_lint_and_format() -> None:
    ruff = _tool("ruff")
    _run(ruff, "check", ".")
    _run(ruff, "format", "--check", ".")


def test_mypy() -> None:
    _run(_tool("mypy"))
