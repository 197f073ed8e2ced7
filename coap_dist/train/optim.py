"""Build the configured optimizer and read its state size and metrics.

``coap``/``coap_adafactor`` use ``coap_dist.param_groups(model)``: block matrices get COAP,
embeddings, output head and norms get AdamW (``{"algorithm": "adamw"}``). ``galore``/``apollo``
put the same matrices in their low-rank groups. ``adamw`` is ``torch.optim.AdamW`` on every
parameter (``ZeroRedundancyOptimizer`` when the state is sharded).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from coap_dist.optim.coap import innermost
from coap_dist.train.config import OptimizerConfig


def _import(module: str, kind: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"optimizer kind {kind} needs the package {package} "
            f"(pip install {package}, or the extra coap_dist[bench]): {err}"
        ) from err


def _coap_groups(model: nn.Module) -> list[dict[str, Any]]:
    coap_dist = importlib.import_module("coap_dist")
    return coap_dist.param_groups(model)


def _low_rank_groups(model: nn.Module, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """GaLore/APOLLO groups: the matrices COAP would project get ``extra`` (rank, ...)."""
    groups = []
    for group in _coap_groups(model):
        plain = {k: v for k, v in group.items() if k != "algorithm"}
        groups.append(plain if group.get("algorithm") == "adamw" else {**plain, **extra})
    return groups


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, *, sharding: str | None = None
) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over ``model``'s parameters.

    Args:
        model: the unwrapped model (FSDP2-sharded modules are fine: their parameters are
            DTensors); parameter names drive the COAP/AdamW grouping.
        cfg: the optimizer section.
        sharding: ``"owner"`` shards the optimizer state across the ranks of the default
            process group (strategy ``ddp_owner``); ``None`` keeps it whole or as laid out
            by FSDP2.
    """
    kw = cfg.kwargs()
    if cfg.kind == "adamw":
        if sharding == "owner":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            return ZeroRedundancyOptimizer(
                model.parameters(), optimizer_class=torch.optim.AdamW, **kw
            )
        return torch.optim.AdamW(model.parameters(), **kw)
    if cfg.kind in ("coap", "coap_adafactor"):
        coap_dist = importlib.import_module("coap_dist")
        cls = coap_dist.COAPAdamW if cfg.kind == "coap" else coap_dist.COAPAdafactor
        if sharding is not None:
            kw["sharding"] = sharding
        return cls(_coap_groups(model), **kw)
    if cfg.kind == "galore":
        galore = _import("galore_torch", cfg.kind, "galore-torch")
        extra = {k: kw.pop(k) for k in ("rank", "update_proj_gap", "scale", "proj_type")}
        return galore.GaLoreAdamW(_low_rank_groups(model, extra), **kw)
    if cfg.kind == "apollo":
        apollo = _import("apollo_torch", cfg.kind, "apollo-torch")
        keys = ("rank", "update_proj_gap", "scale", "proj", "scale_type", "proj_type")
        extra = {k: kw.pop(k) for k in keys}
        return apollo.APOLLOAdamW(_low_rank_groups(model, extra), **kw)
    raise ValueError(f"{cfg.where}.kind: unknown optimizer kind {cfg.kind!r}")


def deepspeed_optimizer_config(cfg: OptimizerConfig, *, cpu: bool) -> dict[str, Any]:
    """The ``"optimizer"`` entry of a DeepSpeed JSON config for ``cfg``.

    COAP goes in as ``{"type": "COAP"}`` / ``{"type": "COAPAdafactor"}``, names registered by
    ``coap_dist.integrations.deepspeed``; AdamW as DeepSpeed's own (``torch_adam`` on CPU,
    where the fused kernel does not exist).
    """
    params = cfg.kwargs()
    if "betas" in params:
        params["betas"] = list(params["betas"])
    if cfg.kind == "adamw":
        if cpu:
            params["torch_adam"] = True
        return {"type": "AdamW", "params": params}
    if cfg.kind == "coap":
        return {"type": "COAP", "params": params}
    if cfg.kind == "coap_adafactor":
        return {"type": "COAPAdafactor", "params": params}
    raise ValueError(f"{cfg.where}.kind={cfg.kind} cannot run under DeepSpeed")


def state_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state held by this rank.

    ``opt.state_bytes()`` where the optimizer has it (COAP); otherwise the sum of the local
    shards of every tensor in ``opt.state`` (DTensor state counts its local shard only).
    """
    inner = innermost(optimizer)
    if hasattr(inner, "state_bytes"):
        return int(inner.state_bytes())
    total = 0
    for per_param in getattr(inner, "state", {}).values():
        values = per_param.values() if isinstance(per_param, dict) else [per_param]
        for value in values:
            if isinstance(value, DTensor):
                value = value.to_local()
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def optimizer_metrics(optimizer: Any) -> dict[str, float]:
    """``opt.metrics()`` (``optim/refreshes``, ``optim/projector_time_s``, ...) or ``{}``."""
    inner = innermost(optimizer)
    if not hasattr(inner, "metrics"):
        return {}
    return {str(k): float(v) for k, v in inner.metrics().items()}
