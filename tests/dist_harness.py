"""Spawning real gloo process groups for tests (file:// rendezvous, no ports)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from coap_dist.train.parallelize import close_distributed


def _entry(
    rank: int, world: int, init_file: str, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    done = False
    try:
        fn(rank, world, *args)
        done = True
    finally:
        close_distributed(wait=done)


def run_workers(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Run fn(rank, world, *args) in `world` processes with a gloo group; re-raise failures."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.start_processes(
            _entry, args=(world, init_file, fn, args), nprocs=world, join=True, start_method="spawn"
        )
