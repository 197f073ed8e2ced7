"""The GPU suite: skipped without CUDA (CI has none). ``COAP_GPU_SUITE_ON_CPU=1`` runs the same
code on CPU processes with gloo (2 ranks), to check the suite itself on a machine without a GPU.

On a GPU machine: ``bash tests/gpu/run.sh`` (layouts on NCCL at 1, 2, 4, 8 GPUs as present,
the app's strategies, the bf16 step-time table), figures written to ``$OUT`` if set.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_CPU = os.environ.get("COAP_GPU_SUITE_ON_CPU") == "1"


def devices() -> int:
    """GPUs to use (2 CPU processes in the CPU dry run)."""
    return 2 if ON_CPU else torch.cuda.device_count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available() or ON_CPU:
        return
    skip = pytest.mark.skip(reason="GPU suite: needs CUDA (COAP_GPU_SUITE_ON_CPU=1 runs it on CPU)")
    for item in items:
        if "tests/gpu" in str(item.fspath):
            item.add_marker(skip)
