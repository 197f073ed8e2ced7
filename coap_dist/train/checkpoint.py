"""Checkpoints of the training app: model, optimizer, step, RNG states and the metric history,
so that ``resume=<dir>`` continues on the same loss curve.

A checkpoint is a directory ``<run dir>/<checkpoint.dir>/<optimizer name>/step_<N>`` holding
``meta.pt`` (step, run name, strategy, world size, per-rank RNG states, history) and, by the
strategy's ``checkpoint_format``:

* ``torch`` (single, ddp, ddp_sharded): ``state.pt`` with the full model ``state_dict`` and
  the optimizer's ``state_dict`` (COAP's owner-sharded layout is gathered into a
  layout-independent one; ``ZeroRedundancyOptimizer`` is consolidated on rank 0), written by
  rank 0. Any of these three strategies, at any world size, can resume it.
* ``dcp`` (fsdp2, hsdp): ``torch.distributed.checkpoint`` of ``get_model_state_dict`` /
  ``get_optimizer_state_dict``, written by every rank in parallel, loaded with the
  ``set_*`` counterparts (resharding to the new mesh if it changed).
* ``deepspeed``: the engine's own ``save_checkpoint`` / ``load_checkpoint`` (tag ``engine``).

The directory is written as ``step_<N>.tmp`` and renamed when complete, so a crash mid-save
never leaves a directory that looks finished.

The batches are a pure function of ``(seed, step)`` (:mod:`coap_dist.train.data`), so the
step number is the data position.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

from coap_dist.train.config import ConfigError
from coap_dist.train.parallelize import DistEnv, Strategy, barrier, gather_objects

_META = "meta.pt"
_STATE = "state.pt"


def _rng_state(env: DistEnv) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def _set_rng_state(state: dict[str, Any], env: DistEnv) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and env.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], env.device)


def _tuples(obj: Any) -> Any:
    """Lists back to tuples where ``random.setstate`` needs them."""
    if isinstance(obj, list):
        return tuple(_tuples(x) for x in obj)
    return obj


def step_dir(root: Path, run_name: str, step: int) -> Path:
    """Where the checkpoint of ``run_name`` at ``step`` goes."""
    return root / run_name / f"step_{step:07d}"


def save(path: Path, strategy: Strategy, meta: dict[str, Any]) -> None:
    """Write the checkpoint of ``strategy``'s model and optimizer to ``path`` (collective).

    Args:
        path: the final ``step_<N>`` directory.
        strategy: the set-up strategy (holds model and optimizer).
        meta: step, run name, history ... (anything ``torch.load(weights_only=True)`` reads).
    """
    env = strategy.env
    tmp = path.with_name(path.name + ".tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    meta = {
        **meta,
        "format": strategy.checkpoint_format,
        "strategy": strategy.cfg.strategy.name,
        "world_size": env.world_size,
        "rng": gather_objects(_rng_state(env), env),
    }
    fmt = strategy.checkpoint_format
    if fmt == "torch":
        optimizer = strategy.optimizer
        assert optimizer is not None
        if hasattr(optimizer, "consolidate_state_dict"):  # ZeroRedundancyOptimizer
            optimizer.consolidate_state_dict(to=0)
            optim_state = optimizer.state_dict() if env.is_main else None
        else:
            # Called on every rank: a sharded optimizer may gather its state collectively.
            optim_state = optimizer.state_dict()
        if env.is_main:
            state = {"model": strategy.unwrapped.state_dict(), "optimizer": optim_state}
            torch.save(state, tmp / _STATE)
    elif fmt == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.save(_dcp_state(strategy), checkpoint_id=str(tmp))
    elif fmt == "deepspeed":
        assert strategy.model is not None
        strategy.model.save_checkpoint(str(tmp), tag="engine")
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    if env.is_main:
        torch.save(meta, tmp / _META)
    barrier(env)
    if env.is_main:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    barrier(env)


def _dcp_state(strategy: Strategy) -> dict[str, Any]:
    """Model and optimizer state dicts in torch.distributed.checkpoint form (DTensor shards)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model, optimizer = strategy.model, strategy.optimizer
    assert model is not None and optimizer is not None
    return {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }


def read_meta(path: Path) -> dict[str, Any]:
    """The ``meta.pt`` of checkpoint directory ``path``; errors name the ``resume`` key."""
    if not (path / _META).is_file():
        raise ConfigError(f"resume={str(path)!r} is not a checkpoint directory (no {_META})")
    return torch.load(path / _META, weights_only=True)


def load(path: Path, strategy: Strategy, run_name: str) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from ``path`` into the set-up ``strategy``
    (collective); returns the checkpoint's meta (``step``, ``history``, ...).

    Args:
        path: a ``step_<N>`` checkpoint directory.
        strategy: the set-up strategy of this run.
        run_name: this run's optimizer name, which must be the checkpoint's.
    """
    env = strategy.env
    meta = read_meta(path)
    if meta["run"] != run_name:
        raise ConfigError(
            f"resume={str(path)!r} is a checkpoint of optimizer {meta['run']}, but this run "
            f"trains {run_name}; set optimizer={meta['run']}"
        )
    fmt = strategy.checkpoint_format
    if meta["format"] != fmt:
        raise ConfigError(
            f"resume={str(path)!r} was written by strategy {meta['strategy']} (format "
            f"{meta['format']}); strategy.name={strategy.cfg.strategy.name} needs format {fmt}"
        )
    if fmt == "torch":
        state = torch.load(path / _STATE, map_location="cpu", weights_only=True)
        strategy.unwrapped.load_state_dict(state["model"])
        assert strategy.optimizer is not None
        strategy.optimizer.load_state_dict(state["optimizer"])
    elif fmt == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model, optimizer = strategy.model, strategy.optimizer
        state = _dcp_state(strategy)
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    elif fmt == "deepspeed":
        assert strategy.model is not None
        strategy.model.load_checkpoint(str(path), tag="engine")
    rng = meta["rng"]
    if len(rng) == env.world_size:
        mine = rng[env.rank]
        mine["python"] = _tuples(mine["python"])
        _set_rng_state(mine, env)
    barrier(env)
    return meta
