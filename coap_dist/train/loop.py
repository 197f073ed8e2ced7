"""The training loop: one optimizer, ``cfg.steps`` steps, top to bottom.

Optional resume check -> model (meta) -> strategy (wrap, materialise this rank's shards,
optimizer) -> optional resume -> for each step: learning rate, ``grad_accum`` micro-batches
(forward, backward), optimizer step; every ``log_every`` steps a metrics record (loss over the
window, optimizer metrics, state bytes and peak memory per rank), every ``eval.every`` steps
(and at the end) validation, every ``checkpoint.every`` steps a checkpoint that also holds the
open loss window and the optimizer's counters, so a resumed run logs what an uninterrupted one
would.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from coap_dist.optim.schedule import COUNTERS
from coap_dist.train import checkpoint
from coap_dist.train.config import OptimizerConfig, TrainConfig, resume_settings
from coap_dist.train.data import Batches, check_streams, eval_batches
from coap_dist.train.loggers import build_logger
from coap_dist.train.optim import optimizer_metrics, state_bytes
from coap_dist.train.parallelize import (
    DistEnv,
    Strategy,
    all_gather_ints,
    all_reduce_mean,
    build_strategy,
    peak_memory_bytes,
    reset_peak_memory,
)
from coap_dist.train.report import RunResult

log = logging.getLogger("coap_dist.train")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at ``step`` (1-based).

    Linear warmup ``step / W`` for ``step <= W``, then with progress
    ``p = (step - W) / (S - W)``: cosine ``m + (1 - m) (1 + cos(pi p)) / 2``, linear
    ``1 - (1 - m) p`` or constant 1, where ``m = min_lr_ratio``, ``S = steps``.
    """
    warmup = cfg.warmup_steps
    if step <= warmup:
        return step / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    m = cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - m) * progress


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(strategy: Strategy, val_tokens: np.ndarray, cfg: TrainConfig) -> float:
    """Mean validation loss over the fixed validation windows, averaged over ranks."""
    env = strategy.env
    assert strategy.model is not None
    strategy.train(False)
    total = torch.zeros((), device=env.device)
    batches = eval_batches(
        val_tokens,
        seq_len=cfg.seq_len,
        global_batch=cfg.batch_size,
        n_batches=cfg.eval.batches,
        rank=env.rank,
        world_size=env.world_size,
    )
    for x, y in batches:
        with strategy.autocast():
            logits = strategy.model(x.to(env.device))
        total += loss_fn(logits, y.to(env.device))
    strategy.train(True)
    return float(all_reduce_mean(total / cfg.eval.batches, env))


def _sync(env: DistEnv) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


CUMULATIVE = (*(f"optim/{k}" for k in COUNTERS), "optim/projector_time_s")
"""Optimizer metrics that count since the start of the run (continued across resumes)."""
LAST_VALUE = ("optim/projection_residual",)
"""Optimizer metrics that keep their last value until the next event (carried over a resume
until the resumed optimizer produces its own)."""


class _Carry:
    """What a resumed run adds to the optimizer's own metrics so that they continue the
    saved run's: offsets of the cumulative counters, the last values of the others."""

    def __init__(self, saved: dict[str, float], now: dict[str, float]) -> None:
        self.offsets = {k: saved[k] - now.get(k, 0.0) for k in CUMULATIVE if k in saved}
        self.last = {k: saved[k] for k in LAST_VALUE if k in saved}

    def apply(self, metrics: dict[str, float]) -> dict[str, float]:
        out = dict(metrics)
        for k, v in self.offsets.items():
            out[k] = out.get(k, 0.0) + v
        for k, v in self.last.items():
            if k in out and not math.isfinite(out[k]):
                out[k] = v
            elif k in out:
                self.last = {}  # the optimizer has its own value now
        return out


def train_run(
    cfg: TrainConfig,
    opt_cfg: OptimizerConfig,
    env: DistEnv,
    out_dir: Path,
    tokens: tuple[np.ndarray, np.ndarray],
    config_dict: dict[str, Any],
) -> RunResult:
    """Train a fresh model (or resume ``cfg.resume``) with ``opt_cfg``; returns its summary.

    Args:
        cfg: the validated run config.
        opt_cfg: the optimizer of this run (``cfg.optimizer`` or ``cfg.baseline``).
        env: rank, world size and device.
        out_dir: the run dir shared by all ranks (metrics, checkpoints).
        tokens: the ``(train, val)`` token streams.
        config_dict: the resolved config, stored with wandb runs.
    """
    train_tokens, val_tokens = tokens
    check_streams(train_tokens, val_tokens, cfg.seq_len)
    settings = resume_settings(cfg, opt_cfg)
    strategy = build_strategy(cfg, env)
    meta: dict[str, Any] | None = None
    changes: list[tuple[str, Any, Any]] = []
    if cfg.resume is not None:  # checked before the model is built
        meta = checkpoint.read_meta(Path(cfg.resume))
        changes = checkpoint.check(Path(cfg.resume), meta, strategy, opt_cfg.name, settings)

    reset_peak_memory(env.device)  # (this run's peak, not an earlier run's of the process)
    # Same seed, same initial weights on every rank, for every optimizer and every strategy.
    torch.manual_seed(cfg.seed)
    _, optimizer = strategy.setup(strategy.build_model(), opt_cfg)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    batches = Batches(
        train_tokens,
        seq_len=cfg.seq_len,
        global_batch=cfg.batch_size,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        micro_batches=cfg.grad_accum,
    )

    start_step, history = 0, []
    window_loss = torch.zeros((), device=env.device)
    window_steps, window_time = 0, 0.0
    carry = _Carry({}, {})
    if meta is not None:
        assert cfg.resume is not None
        checkpoint.load(Path(cfg.resume), meta, strategy)
        start_step, history = meta["step"], list(meta["history"])
        window = meta.get("window", {"loss_sum": 0.0, "steps": 0, "time": 0.0})
        window_loss += window["loss_sum"]
        window_steps, window_time = window["steps"], window["time"]
        carry = _Carry(meta.get("optim_metrics", {}), optimizer_metrics(optimizer))
        if env.is_main:
            for key, old, new in changes:
                log.info(
                    "resume: %s was %r in the checkpoint, now %r (takes effect)", key, old, new
                )
    logger = build_logger(
        cfg.logger,
        run_name=opt_cfg.name,
        out_dir=out_dir,
        config=config_dict,
        is_main=env.is_main,
        resumed_at=start_step if meta is not None else None,
    )
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc=f"{opt_cfg.name:>12}",
        disable=not (cfg.progress and env.is_main),
        dynamic_ncols=True,
    )

    tokens_per_step = cfg.batch_size * cfg.seq_len
    train_time, train_steps = 0.0, 0
    postfix: dict[str, str] = {}
    val_loss = float("nan")
    peaks = [peak_memory_bytes(env.device)]
    for step in range(start_step + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        factor = lr_factor(step, cfg)
        for group, peak in zip(optimizer.param_groups, peak_lrs, strict=True):
            group["lr"] = peak * factor

        loss, grad_norm = strategy.train_step(batches.get(step), loss_fn)
        window_loss += loss
        window_steps += 1
        log_now = step % cfg.log_every == 0 or step == cfg.steps
        if log_now:
            _sync(env)  # so that the timer below measures finished GPU work
        elapsed = time.perf_counter() - t0
        window_time += elapsed
        train_time += elapsed
        train_steps += 1
        bar.update(1)

        if log_now:
            gathered = all_gather_ints([state_bytes(optimizer), peak_memory_bytes(env.device)], env)
            per_rank = [g[0] for g in gathered]
            peaks = [g[1] for g in gathered]
            record: dict[str, Any] = {
                **carry.apply(optimizer_metrics(optimizer)),
                "train/loss": float(all_reduce_mean(window_loss / window_steps, env)),
                "train/lr": peak_lrs[0] * factor,
                "train/grad_norm": float(grad_norm),
                "train/tokens_per_s": tokens_per_step * window_steps / window_time,
                "optim/state_bytes": per_rank[env.rank],
                **{f"optim/state_bytes_rank{r}": b for r, b in enumerate(per_rank)},
                "memory/peak_bytes": max(peaks),
                **{f"memory/peak_bytes_rank{r}": b for r, b in enumerate(peaks)},
            }
            logger.log(record, step)
            history.append({"step": step, **record})
            postfix["loss"] = f"{record['train/loss']:.3f}"
            postfix["mem"] = f"{max(peaks) / 2**30:.2f}GiB"
            bar.set_postfix(postfix)
            window_loss.zero_()
            window_steps, window_time = 0, 0.0

        if step == cfg.steps or (cfg.eval.every and step % cfg.eval.every == 0):
            val_loss = evaluate(strategy, val_tokens, cfg)
            logger.log({"val/loss": val_loss}, step)
            history.append({"step": step, "val/loss": val_loss})
            postfix["val"] = f"{val_loss:.3f}"
            bar.set_postfix(postfix)

        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            meta = {
                "step": step,
                "run": opt_cfg.name,
                "history": history,
                "settings": settings,
                "window": {
                    "loss_sum": float(window_loss),
                    "steps": window_steps,
                    "time": window_time,
                },
                "optim_metrics": carry.apply(optimizer_metrics(optimizer)),
            }
            path = checkpoint.step_dir(out_dir / cfg.checkpoint.dir, opt_cfg.name, step)
            checkpoint.save(path, strategy, meta)
            if env.is_main:
                bar.write(f"checkpoint: {path}")

    bar.close()
    logger.close()
    if start_step >= cfg.steps:  # resumed from the last step: nothing left to train
        val_loss = evaluate(strategy, val_tokens, cfg)
    train_losses = [h["train/loss"] for h in history if "train/loss" in h]
    final = all_gather_ints([state_bytes(optimizer), peak_memory_bytes(env.device)], env)
    return RunResult(
        name=opt_cfg.name,
        train_loss=train_losses[-1] if train_losses else float("nan"),
        val_loss=val_loss,
        state_bytes=[g[0] for g in final],
        tokens_per_s=tokens_per_step * train_steps / train_time if train_time else float("nan"),
        peak_memory_bytes=[g[1] for g in final],
        history=history,
    )
