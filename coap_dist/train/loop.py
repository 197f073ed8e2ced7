"""The training loop: one optimizer, ``cfg.steps`` steps, top to bottom.

Model -> strategy (wrap + optimizer) -> optional resume -> for each step: learning rate,
batch, forward, backward, step; every ``log_every`` steps a metrics record, every
``eval.every`` steps (and at the end) validation, every ``checkpoint.every`` steps a
checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from coap_dist.models.llama import Llama
from coap_dist.train import checkpoint
from coap_dist.train.config import OptimizerConfig, TrainConfig
from coap_dist.train.data import Batches, eval_batches
from coap_dist.train.loggers import build_logger
from coap_dist.train.optim import optimizer_metrics, state_bytes
from coap_dist.train.parallelize import (
    DistEnv,
    Strategy,
    all_gather_ints,
    all_reduce_mean,
    build_strategy,
)
from coap_dist.train.report import RunResult


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

    # Same seed, same initial weights on every rank and for every optimizer.
    torch.manual_seed(cfg.seed)
    model = Llama(cfg.model.to_llama())
    strategy = build_strategy(cfg, env)
    model, optimizer = strategy.setup(model, opt_cfg)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    batches = Batches(
        train_tokens,
        seq_len=cfg.seq_len,
        global_batch=cfg.batch_size,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
    )

    start_step, history = 0, []
    if cfg.resume is not None:
        meta = checkpoint.load(Path(cfg.resume), strategy, opt_cfg.name)
        start_step, history = meta["step"], list(meta["history"])
    logger = build_logger(
        cfg.logger, run_name=opt_cfg.name, out_dir=out_dir, config=config_dict, is_main=env.is_main
    )
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc=f"{opt_cfg.name:>12}",
        disable=not (cfg.progress and env.is_main),
        dynamic_ncols=True,
    )

    tokens_per_step = cfg.batch_size * cfg.seq_len
    window_loss = torch.zeros((), device=env.device)
    window_steps, window_time, train_time, train_steps = 0, 0.0, 0.0, 0
    postfix: dict[str, str] = {}
    val_loss = float("nan")
    for step in range(start_step + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        factor = lr_factor(step, cfg)
        for group, peak in zip(optimizer.param_groups, peak_lrs, strict=True):
            group["lr"] = peak * factor

        x, y = batches.get(step)
        with strategy.autocast():
            logits = model(x.to(env.device, non_blocking=True))
        loss = loss_fn(logits, y.to(env.device, non_blocking=True))
        strategy.backward(loss)
        grad_norm = strategy.optimizer_step()

        window_loss += loss.detach()
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
            per_rank = all_gather_ints(state_bytes(optimizer), env)
            record: dict[str, Any] = {
                **optimizer_metrics(optimizer),
                "train/loss": float(all_reduce_mean(window_loss / window_steps, env)),
                "train/lr": peak_lrs[0] * factor,
                "train/grad_norm": float(grad_norm),
                "train/tokens_per_s": tokens_per_step * window_steps / window_time,
                "optim/state_bytes": per_rank[env.rank],
                **{f"optim/state_bytes_rank{r}": b for r, b in enumerate(per_rank)},
            }
            logger.log(record, step)
            history.append({"step": step, **record})
            postfix["loss"] = f"{record['train/loss']:.3f}"
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
            meta = {"step": step, "run": opt_cfg.name, "history": history}
            path = checkpoint.step_dir(out_dir / cfg.checkpoint.dir, opt_cfg.name, step)
            checkpoint.save(path, strategy, meta)
            if env.is_main:
                bar.write(f"checkpoint: {path}")

    bar.close()
    logger.close()
    if start_step >= cfg.steps:  # resumed from the last step: nothing left to train
        val_loss = evaluate(strategy, val_tokens, cfg)
    train_losses = [h["train/loss"] for h in history if "train/loss" in h]
    return RunResult(
        name=opt_cfg.name,
        train_loss=train_losses[-1] if train_losses else float("nan"),
        val_loss=val_loss,
        state_bytes=all_gather_ints(state_bytes(optimizer), env),
        tokens_per_s=tokens_per_step * train_steps / train_time if train_time else float("nan"),
        history=history,
    )
