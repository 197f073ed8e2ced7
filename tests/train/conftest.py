"""Shared helpers of the training-app tests: Hydra composition of the packaged config tree and
the override set that makes a run take seconds on a CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]

# A handful of steps on short sequences; every output path of the loop still runs once
# (log, eval, checkpoint at step 2 and 4).
FAST = [
    "steps=4",
    "batch_size=4",
    "seq_len=32",
    "warmup_steps=1",
    "log_every=2",
    "eval.every=2",
    "eval.batches=1",
    "progress=false",
    "threads=1",
]


def compose_dict(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """``configs/train.yaml`` composed with ``overrides`` and resolved, as the app gets it."""
    with initialize_config_module(config_module="coap_dist.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(container, dict)
    return container


@pytest.fixture
def compose_cfg() -> Any:
    """The :func:`compose_dict` function, as a fixture."""
    return compose_dict


@pytest.fixture(autouse=True)
def _restore_process_state() -> Iterator[None]:
    """In-process app runs set torch's thread count and, for one-process groups, the launcher
    variables (RANK, ...); put both back so other tests see the process as it was."""
    threads = torch.get_num_threads()
    environ = dict(os.environ)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(environ)
