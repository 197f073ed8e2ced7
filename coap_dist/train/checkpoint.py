"""Checkpoints of the training app: model, optimizer, step, RNG states, the run's settings and
the loop's own state, so that ``resume=<dir>`` continues exactly where the run stopped.

A checkpoint is a directory ``<run dir>/<checkpoint.dir>/<optimizer name>/step_<N>`` holding
``meta.pt`` (step, run name, strategy, world size, per-rank RNG states, metric history, the
run's settings, the open loss window and the optimizer's cumulative counters) and, by the
strategy's ``checkpoint_format``:

* ``torch`` (single, ddp, ddp_owner): ``state.pt`` with the full model ``state_dict`` and
  the optimizer's whole state (COAP's owner layout consolidated on rank 0,
  ``ZeroRedundancyOptimizer`` likewise), written by rank 0. Any of these three strategies, at
  any world size, can resume it.
* ``dcp`` (fsdp2, hsdp): ``torch.distributed.checkpoint`` of ``get_model_state_dict`` /
  ``get_optimizer_state_dict``, written by every rank in parallel, loaded with the ``set_*``
  counterparts (resharding to the new mesh if it changed).
* ``deepspeed``: the engine's own ``save_checkpoint`` / ``load_checkpoint`` (tag ``engine``).
  At the same world size (and for COAP at stage 0, at any) the engine loads it as saved; a
  COAP run at ZeRO stage 1-3 resumed at another world size converts it first (rank 0, once, into ``step_<N>.universal`` next
  to it, with :func:`coap_dist.integrations.deepspeed.to_universal`) and builds the engine
  to load that universal checkpoint.

Safety: before writing, the free space is checked against the checkpoint's size (estimated
from the tensors held); files are written into ``step_<N>.tmp``, fsynced, and the directory
renamed into place (then its parent fsynced), so a crash or a full disk never leaves a
directory that looks finished, and never touches the previous checkpoints. A failed save
removes its ``.tmp`` directory and stops the run with the reason; stale ``.tmp`` directories
of crashed runs are removed by the next save.

The batches are a pure function of ``(seed, step)`` (:mod:`coap_dist.train.data`), so the
step number is the data position.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from coap_dist.train.config import ConfigError, RunError, resume_changes
from coap_dist.train.optim import state_bytes
from coap_dist.train.parallelize import (
    DistEnv,
    Strategy,
    all_gather_ints,
    barrier,
    broadcast_object,
    gather_objects,
    strategies_reading,
)

_META = "meta.pt"
_STATE = "state.pt"
_MIB = 1 << 20


class CheckpointError(RunError):
    """A checkpoint could not be written; the message says why and what is left intact."""


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


def complete(root: Path, run_name: str) -> list[Path]:
    """The complete checkpoints of ``run_name`` under ``root``, oldest first (not a save's
    ``.tmp`` dir nor a ``.universal`` conversion)."""
    return sorted(p for p in (root / run_name).glob("step_*") if p.is_dir() and p.suffix == "")


def latest(root: Path, run_name: str) -> Path | None:
    """The newest complete checkpoint of ``run_name`` under ``root`` (None if there is none)."""
    done = complete(root, run_name)
    return done[-1] if done else None


def _local_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers this rank holds (DTensor: its shard; ZeRO-3: its
    partition)."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if isinstance(t, DTensor):
            t = t.to_local()
        part = getattr(t, "ds_tensor", None)
        total += (part if part is not None else t).nbytes
    return total


def estimated_bytes(strategy: Strategy) -> int:
    """Bytes the next checkpoint of ``strategy`` will take on disk, over all ranks (an
    estimate from the tensors held: model, optimizer state, DeepSpeed's fp32 masters)."""
    env, model, optimizer = strategy.env, strategy.unwrapped, strategy.optimizer
    assert optimizer is not None
    fmt = strategy.checkpoint_format
    mine = state_bytes(optimizer)
    if fmt == "torch":
        # rank 0 writes the whole model and the optimizer state of every rank (or its own
        # copy when the state is replicated)
        states = all_gather_ints([mine], env)
        optim = sum(s[0] for s in states) if strategy.shards_optimizer else states[0][0]
        return _local_bytes(model) + optim
    local = _local_bytes(model) + mine
    if fmt == "deepspeed":
        numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
        local += 4 * numel // env.world_size  # fp32 master partition
    return sum(v[0] for v in all_gather_ints([local], env))


def _reason(err: BaseException) -> str:
    """The first line of an error's message; for DCP's ``CheckpointException`` (a
    ``BaseException`` holding each rank's error), that of the first failing rank's, named."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (inner, _) = next(iter(err.failures.items()))
        return f"rank {rank}: {_reason(inner)}"
    return (str(err).splitlines() or [type(err).__name__])[0]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (data first, then the entries)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        _fsync_file(Path(dirpath))


def _save_file(obj: Any, path: Path) -> None:
    """``torch.save`` into ``path`` and fsync it."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _prepare(path: Path, tmp: Path, need: int) -> str | None:
    """Rank 0, before any write: remove stale ``.tmp`` directories of this run, check the
    free space, create ``tmp``. Returns an error message or None."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        free = shutil.disk_usage(path.parent).free
        if free < need * 1.05 + _MIB:
            return (
                f"checkpoint: not enough space for {path} ({need / _MIB:,.1f} MiB needed, "
                f"{free / _MIB:,.1f} MiB free on that filesystem); nothing was written"
            )
        tmp.mkdir()
    except OSError as err:
        return f"checkpoint: cannot create {tmp}: {err}"
    return None


def save(path: Path, strategy: Strategy, meta: dict[str, Any]) -> None:
    """Write the checkpoint of ``strategy``'s model and optimizer to ``path`` (collective).

    Args:
        path: the final ``step_<N>`` directory.
        strategy: the set-up strategy (holds model and optimizer).
        meta: step, run name, history ... (anything ``torch.load(weights_only=True)`` reads).

    Raises:
        CheckpointError: on every rank, when the space is short or a write fails; the
            ``.tmp`` directory is removed and earlier checkpoints are untouched.
    """
    env = strategy.env
    tmp = path.with_name(path.name + ".tmp")
    need = estimated_bytes(strategy)
    error = broadcast_object(_prepare(path, tmp, need) if env.is_main else None, env)
    if error is None:
        error = _write(tmp, strategy, meta)
    if error is not None:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            before = latest(path.parent.parent, path.parent.name)
            kept = f"the last complete checkpoint, {before}, is intact" if before else ""
            error = f"{error}; {kept or 'no earlier checkpoint of this run exists'}"
        raise CheckpointError(broadcast_object(error, env))
    if env.is_main:
        old = path.with_name(path.name + ".old")
        if path.exists():  # the same step saved again (a resumed run): swap, then drop
            path.rename(old)
        tmp.rename(path)
        _fsync_file(path.parent)
        shutil.rmtree(old, ignore_errors=True)
        # A universal form converted from an earlier save of this step is stale.
        shutil.rmtree(_universal_dir(path), ignore_errors=True)
    barrier(env)


def _write(tmp: Path, strategy: Strategy, meta: dict[str, Any]) -> str | None:
    """Every rank writes its part into ``tmp`` and fsyncs it; the first rank's error (as
    a message) or None, the same on every rank."""
    env = strategy.env
    meta = {
        **meta,
        "format": strategy.checkpoint_format,
        "strategy": strategy.cfg.strategy.name,
        "world_size": env.world_size,
        "rng": gather_objects(_rng_state(env), env),
    }
    fmt = strategy.checkpoint_format
    failure: str | None = None
    try:
        if fmt == "torch":
            optimizer = strategy.optimizer
            assert optimizer is not None
            if hasattr(optimizer, "consolidate_state_dict"):
                # every rank takes part (owner-sharded state is gathered to rank 0)
                optimizer.consolidate_state_dict(to=0)
            if env.is_main:
                state = {
                    "model": strategy.unwrapped.state_dict(),
                    "optimizer": optimizer.state_dict(),
                }
                _save_file(state, tmp / _STATE)
        elif fmt == "dcp":
            import torch.distributed.checkpoint as dcp

            dcp.save(_dcp_state(strategy), checkpoint_id=str(tmp))
        elif fmt == "deepspeed":
            engine: Any = strategy.model  # a DeepSpeedEngine (deepspeed is untyped)
            assert engine is not None
            engine.save_checkpoint(str(tmp), tag="engine")
        else:
            raise ValueError(f"unknown checkpoint format {fmt!r}")
        if env.is_main:
            _save_file(meta, tmp / _META)
        _fsync_tree(tmp)
    except (OSError, RuntimeError, CheckpointException) as err:  # ENOSPC: any, by library
        free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else 0
        failure = (
            f"checkpoint: writing {tmp} failed on rank {env.rank}: {_reason(err)} "
            f"({free / _MIB:,.1f} MiB free on that filesystem)"
        )
    errors = [e for e in gather_objects(failure, env) if e is not None]
    return errors[0] if errors else None


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


def _strategies_of(meta: dict[str, Any]) -> list[str]:
    """The strategy options that resume a checkpoint of ``meta``'s format."""
    if meta["format"] == "deepspeed":  # (at the saved stage: a changed stage is refused)
        return [f"deepspeed_zero{meta.get('settings', {}).get('strategy.zero_stage', '<N>')}"]
    return strategies_reading(meta["format"])


def read_meta(path: Path) -> dict[str, Any]:
    """The ``meta.pt`` of checkpoint directory ``path``; errors name the ``resume`` key."""
    if not (path / _META).is_file():
        raise ConfigError(f"resume={str(path)!r} is not a checkpoint directory (no {_META})")
    return _read(path, _META)


def _read(path: Path, name: str) -> Any:
    """``torch.load`` of file ``name`` of checkpoint ``path``; an unreadable or cut-short
    file is a ConfigError naming it."""
    try:
        return torch.load(path / name, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ConfigError(
            f"resume={str(path)!r}: {name} cannot be read ({_reason(err)}); the checkpoint "
            "is incomplete or corrupt (a save that was cut off?): resume from another step"
        ) from err


def check(
    path: Path, meta: dict[str, Any], strategy: Strategy, run_name: str, settings: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
    """Refuse a checkpoint this run cannot continue exactly, before anything is loaded:
    one at or past the run's ``steps``, another optimizer, another checkpoint format, a DeepSpeed checkpoint at another world
    size that is not COAP's (COAP's at stages 1-3: the strategy is set to load its universal
    form), or a changed setting the saved state cannot carry (``config.RESUME_REFUSED``).
    Returns the settings that changed and take effect, as ``(field, saved, new)``."""
    where = str(path)
    if meta["run"] != run_name:
        raise ConfigError(
            f"resume={where!r} is a checkpoint of optimizer {meta['run']}, but this run "
            f"trains {run_name}; set optimizer={meta['run']}"
        )
    if meta["step"] >= settings["steps"]:
        raise ConfigError(
            f"resume={where!r} is at step {meta['step']}, and steps={settings['steps']} (the "
            "run's total, counted from step 0) leaves nothing to train; set steps above "
            f"{meta['step']}"
        )
    fmt = strategy.checkpoint_format
    if meta["format"] != fmt:
        raise ConfigError(
            f"resume={where!r} was written by strategy {meta['strategy']} (format "
            f"{meta['format']}), and strategy {strategy.cfg.strategy.name} reads format {fmt}; "
            f"resume it under strategy={' or '.join(_strategies_of(meta))} (the formats do "
            "not convert into each other)"
        )
    if fmt == "deepspeed" and meta["world_size"] != strategy.env.world_size:
        saved_kind = meta.get("settings", {}).get("optimizer.kind")
        if not str(saved_kind).startswith("coap"):
            raise ConfigError(
                f"resume={where!r}: a DeepSpeed checkpoint of {saved_kind} resumes at the "
                f"world size it was saved at ({meta['world_size']} processes), this run has "
                f"{strategy.env.world_size}. COAP checkpoints are converted automatically; "
                f"for others start {meta['world_size']} processes"
            )
        # Stage 0 keeps the whole (replicated) state in the model-state file: it loads as
        # saved. Stages 1-3 go through the universal form.
        strategy.load_universal = bool(strategy.cfg.strategy.zero_stage)  # type: ignore[attr-defined]
    return resume_changes(
        meta.get("settings", {}), settings, deepspeed=fmt == "deepspeed", where=where
    )


def _universal_dir(path: Path) -> Path:
    """Where the universal form of DeepSpeed checkpoint ``path`` is converted to."""
    return path.with_name(path.name + ".universal")


def _source_stamp(path: Path) -> str:
    """Identifies the save a universal form was converted from: a digest of its
    ``meta.pt`` (step, RNG states, loss history: a later save of the step differs)."""
    return hashlib.sha256((path / _META).read_bytes()).hexdigest()


def _load_universal(path: Path, engine: Any, env: DistEnv) -> None:
    """Resume DeepSpeed checkpoint ``path`` at another world size: rank 0 converts it to a
    universal checkpoint ``step_<N>.universal`` beside it (unless an earlier resume
    converted this very save: the form records the source's :func:`_source_stamp`, and a
    form of another save of the step is converted again), then every rank loads that
    (collective)."""
    from coap_dist.integrations.deepspeed import load_checkpoint, to_universal

    target = _universal_dir(path)
    stamp_file = target / "source.sha256"
    failure: str | None = None
    if env.is_main:
        try:
            stamp = _source_stamp(path)
            done = (target / "latest_universal").is_file() and stamp_file.is_file()
            if not (done and stamp_file.read_text() == stamp):
                shutil.rmtree(target, ignore_errors=True)
                to_universal(path, target, tag="engine")
                stamp_file.write_text(stamp)
        except (OSError, ValueError) as err:
            failure = f"converting it to {target} failed: {_reason(err)}"
    failure = broadcast_object(failure, env)
    if failure is not None:
        raise ValueError(failure)
    load_checkpoint(engine, target, tag="engine")


def _hyperparameters(optimizer: Any) -> list[list[dict[str, Any]]]:
    """The hyperparameters of every param group at each level of the optimizer's wrappers."""
    out = []
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        groups = getattr(optimizer, "param_groups", None)
        if groups is not None:
            out.append([{k: v for k, v in g.items() if k != "params"} for g in groups])
        optimizer = getattr(optimizer, "optim", None) or getattr(optimizer, "optimizer", None)
    return out


def _restore_hyperparameters(optimizer: Any, saved: list[list[dict[str, Any]]]) -> None:
    levels = iter(saved)
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        groups = getattr(optimizer, "param_groups", None)
        if groups is not None:
            for group, values in zip(groups, next(levels), strict=True):
                group.update(values)
        optimizer = getattr(optimizer, "optim", None) or getattr(optimizer, "optimizer", None)


def load(path: Path, meta: dict[str, Any], strategy: Strategy) -> None:
    """Restore model, optimizer and RNG states from checkpoint ``path`` (checked with
    :func:`check`) into the set-up ``strategy`` (collective). The hyperparameters of this
    run's optimizer replace the saved ones (the state itself is the checkpoint's)."""
    env = strategy.env
    optimizer = strategy.optimizer
    assert optimizer is not None
    fresh = _hyperparameters(optimizer)
    fmt = strategy.checkpoint_format
    state = _read(path, _STATE) if fmt == "torch" else None
    try:
        if fmt == "torch":
            assert state is not None
            strategy.unwrapped.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        elif fmt == "dcp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            model = strategy.model
            state = _dcp_state(strategy)  # asserts the model is built
            assert model is not None
            dcp.load(state, checkpoint_id=str(path))
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
        elif fmt == "deepspeed":
            engine: Any = strategy.model  # a DeepSpeedEngine (deepspeed is untyped)
            assert engine is not None
            if getattr(strategy, "load_universal", False):
                _load_universal(path, engine, env)
            else:
                engine.load_checkpoint(str(path), tag="engine")
    except OSError as err:  # (a file of the checkpoint is missing or unreadable)
        raise ConfigError(
            f"resume={str(path)!r} cannot be read ({_reason(err)}); the checkpoint is "
            "incomplete or corrupt: resume from another step"
        ) from err
    except (RuntimeError, ValueError, KeyError, CheckpointException) as err:
        raise ConfigError(
            f"resume={str(path)!r} does not fit this run's model or optimizer: {_reason(err)}"
        ) from err
    _restore_hyperparameters(optimizer, fresh)
    rng = meta["rng"]
    if len(rng) == env.world_size:
        mine = rng[env.rank]
        mine["python"] = _tuples(mine["python"])
        _set_rng_state(mine, env)
    barrier(env)
