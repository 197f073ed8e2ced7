"""The job: validate the config, join the process group, train each optimizer of the
comparison in turn on the same data, then (rank 0) print the table and write
``summary.json`` and ``loss_curves.png`` into the run dir."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
from pathlib import Path
from typing import Any

import torch

from coap_dist.train import checkpoint
from coap_dist.train.config import LATEST, ConfigError, TrainConfig
from coap_dist.train.data import load_tokens
from coap_dist.train.loop import train_run
from coap_dist.train.parallelize import (
    DistEnv,
    broadcast_object,
    close_distributed,
    init_distributed,
)
from coap_dist.train.report import RunResult, format_table, plot_losses, write_summary
from coap_dist.train.rundir import (
    RunDirLock,
    check_writable,
    earlier_outputs,
    remove_earlier_outputs,
)

log = logging.getLogger("coap_dist.train")


def run(config: dict[str, Any], output_dir: Path) -> list[RunResult]:
    """Run the whole job described by a resolved Hydra config.

    Args:
        config: ``OmegaConf.to_container(cfg, resolve=True)`` of ``configs/train.yaml``.
        output_dir: this process's Hydra run dir; rank 0's is used by all ranks.

    Returns:
        one :class:`RunResult` per optimizer, in the order trained.
    """
    cfg = TrainConfig.from_dict(config)
    env = init_distributed(cfg)
    lock: RunDirLock | None = None
    completed = False
    try:
        threads = cpu_threads(cfg.threads, env)
        if threads is not None:
            torch.set_num_threads(threads)
        out_dir = Path(broadcast_object(str(output_dir.resolve()), env))
        error, resume = None, cfg.resume
        if env.is_main:
            try:
                lock, resume = claim_run_dir(cfg, out_dir)
            except ConfigError as err:
                error = str(err)
        error, resume = broadcast_object((error, resume), env)
        if error is not None:
            raise ConfigError(error)
        cfg = dataclasses.replace(cfg, resume=resume)
        tokens = load_tokens(cfg.data)
        if env.is_main:
            log.info(
                "model %s (%.2fM parameters), strategy %s on %d process(es), %s (%d threads), "
                "data %s (%d train / %d val tokens), run dir %s",
                cfg.model.name,
                cfg.model.to_llama().num_params() / 1e6,
                cfg.strategy.name,
                env.world_size,
                env.device,
                torch.get_num_threads(),
                cfg.data.name,
                len(tokens[0]),
                len(tokens[1]),
                out_dir,
            )
        results = []
        for opt in cfg.runs:
            # (each run's wandb config names its own optimizer: the baseline's section)
            run_config = {**config, "optimizer": config.get(opt.where, config.get("optimizer"))}
            results.append(train_run(cfg, opt, env, out_dir, tokens, run_config))
            # The finished run's model, wrapper and optimizer sit in reference cycles (DDP's
            # reducer, FSDP hooks): free them now, so the next run starts from the same memory
            # and no gloo work object is left for interpreter shutdown to destroy (SIGABRT).
            gc.collect()
            if cfg.compile:  # the next run compiles its own code (and pays for it) too
                torch._dynamo.reset()
        if env.is_main:
            report(cfg, results, out_dir)
        completed = True
        return results
    finally:
        if lock is not None:
            lock.release()
        close_distributed(wait=completed)


def claim_run_dir(cfg: TrainConfig, out_dir: Path) -> tuple[RunDirLock, str | None]:
    """Rank 0, before training: the run dir and the checkpoint dir are writable, no other
    run holds the run dir (the returned lock is held until :func:`run` ends), and a fresh
    run finds no earlier job's outputs of its runs there (``overwrite=true`` removes them).
    Returns the lock and the checkpoint to resume: ``resume``, or for ``resume=latest`` the
    newest complete ``step_N`` of the run in this run dir (None: none yet, a fresh start
    that replaces the records of an attempt which stopped before its first checkpoint)."""
    check_writable(out_dir, "hydra.run.dir")
    if cfg.checkpoint.every:
        check_writable(out_dir / cfg.checkpoint.dir, "checkpoint.dir")
    lock = RunDirLock(out_dir)
    lock.acquire()
    metrics = None if cfg.logger.name == "none" else out_dir / cfg.logger.filename
    names, root = [r.name for r in cfg.runs], out_dir / cfg.checkpoint.dir
    resume, fresh_over = cfg.resume, cfg.overwrite
    if resume == LATEST:
        found_at = checkpoint.latest(root, names[0])
        resume = None if found_at is None else str(found_at)
        fresh_over = found_at is None
        log.info("resume=latest: %s", resume or "no checkpoint yet in this run dir, a fresh start")
    if resume is None:
        found = earlier_outputs(metrics, {n: checkpoint.complete(root, n) for n in names})
        if found and not fresh_over:
            lock.release()
            raise ConfigError(
                f"hydra.run.dir={str(out_dir)!r} holds an earlier job's outputs of the runs "
                f"this one trains: {'; '.join(found)}. A fresh run there would mix its metrics "
                "with them and replace those checkpoints. Choose another hydra.run.dir, "
                "continue the earlier run with resume=<its step_N checkpoint> (or "
                "resume=latest), or set overwrite=true to remove them and start over"
            )
        if found:
            remove_earlier_outputs(metrics, root, names)
            log.info("a fresh start: removed %s", "; ".join(found))
    return lock, resume


def cpu_threads(setting: int | str | None, env: DistEnv) -> int | None:
    """The intra-op thread count for this process (``None``: leave torch's choice).

    ``auto`` on CPU, unless ``OMP_NUM_THREADS`` decides (torchrun sets it): the cores this
    process may use, shared among the local ranks, less those other processes keep busy
    (1-minute load average at start), at least 1. On a shared machine, more threads than idle
    cores makes every parallel region wait for a descheduled thread, which costs far more than
    the parallelism gains.
    """
    if setting != "auto":
        return setting if isinstance(setting, int) else None
    if env.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, ((cores or 1) - busy) // local_ranks)


def report(cfg: TrainConfig, results: list[RunResult], out_dir: Path) -> None:
    """Print the comparison table and where the outputs are; write summary and plot."""
    print(format_table(results), flush=True)
    summary = out_dir / "summary.json"
    write_summary(results, summary)
    paths = [("summary", summary)]
    if cfg.logger.name != "none":
        paths.insert(0, ("metrics", out_dir / cfg.logger.filename))
    if cfg.plot:
        png = out_dir / "loss_curves.png"
        title = f"{cfg.model.name} on {cfg.data.name}, {cfg.strategy.name}"
        plot_losses(results, png, title)
        paths.append(("loss curves", png))
    for label, path in paths:
        print(f"{label}: {path}", flush=True)
