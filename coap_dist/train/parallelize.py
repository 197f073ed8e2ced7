"""Apply a parallelism strategy to a plain model: the one place that knows about DDP, FSDP2 and
DeepSpeed. The model code (``coap_dist.models``) stays free of all of it.

Every strategy has the same interface (:class:`Strategy`): ``setup`` wraps the model and builds
the optimizer, ``backward`` and ``optimizer_step`` run one update, ``checkpoint_format`` says how
:mod:`coap_dist.train.checkpoint` saves it. One subclass per mode:

=================  ============================================================================
``single``         one process, the model as is
``ddp``            ``DistributedDataParallel``; optimizer state replicated
``ddp_sharded``    DDP; optimizer state sharded by owner rank (COAP ``sharding="owner"``,
                   ``ZeroRedundancyOptimizer`` for AdamW)
``fsdp2``          ``fully_shard`` on every block, then on the root (1-D mesh)
``hsdp``           ``fully_shard`` on a 2-D ``(replicate, shard)`` mesh
``deepspeed``      a DeepSpeed engine (ZeRO stage 0-3) whose JSON config names the optimizer
=================  ============================================================================
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from coap_dist.train.config import ConfigError, OptimizerConfig, TrainConfig
from coap_dist.train.optim import build_optimizer, deepspeed_optimizer_config


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is global rank 0 (the one that prints, logs and plots)."""
        return self.rank == 0


def _slurm_to_torch_env() -> None:
    """Map Slurm task variables to torch.distributed's when the job step was started by
    ``srun`` (or a submitit launcher) with one task per device instead of by torchrun.

    ``SLURM_STEP_NUM_TASKS`` exists only inside an ``srun`` step, so a plain ``python`` in an
    allocation's shell stays a single process.
    """
    if "RANK" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_STEP_NUM_TASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ["SLURM_JOB_NODELIST"]
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        ).stdout.split()
        os.environ["MASTER_ADDR"] = hosts[0]
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000))


def init_distributed(cfg: TrainConfig) -> DistEnv:
    """Pick the device and, for multi-process strategies, join (or create) the process group.

    Under torchrun (``RANK``/``WORLD_SIZE`` set) this joins the job; a plain ``python -m
    coap_dist.train strategy=ddp`` becomes a one-process group, so every strategy also runs
    without a launcher.
    """
    _slurm_to_torch_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not cfg.strategy.distributed:
        if world_size > 1:
            raise ConfigError(
                f"strategy.name=single runs one process, but WORLD_SIZE={world_size}; "
                f"use strategy=ddp, ddp_sharded, fsdp2, hsdp or deepspeed_zero*"
            )
        return DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        timeout = timedelta(minutes=10)
        launched = all(k in os.environ for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"))
        if launched:
            dist.init_process_group(
                backend, timeout=timeout, device_id=device if use_cuda else None
            )
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
            # What a launcher would have set; DeepSpeed reads them.
            for key in ("RANK", "LOCAL_RANK"):
                os.environ.setdefault(key, "0")
            os.environ.setdefault("WORLD_SIZE", "1")
    env = DistEnv(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        device=device,
    )
    if cfg.strategy.name == "hsdp" and env.world_size % cfg.strategy.replicate_degree:
        raise ConfigError(
            f"strategy.replicate_degree ({cfg.strategy.replicate_degree}) must divide the "
            f"number of processes ({env.world_size})"
        )
    return env


def close_distributed() -> None:
    """Leave the process group, if any.

    DeepSpeed caches groups derived from the world group in module globals; they would
    outlive the destroyed group and break a later ``run`` in the same process (a notebook, a
    test), so they are reset too.
    """
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP"):
            setattr(groups, name, None)


class Strategy:
    """Single process: the model as is. Base of the multi-process strategies.

    Args:
        cfg: the whole run config (strategy, precision, clipping).
        env: this process's rank, world size and device.
    """

    checkpoint_format = "torch"
    shards_optimizer = False

    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        """Apply the parallelism to ``model`` (already on ``env.device``)."""
        return model

    def make_optimizer(self, model: nn.Module, opt_cfg: OptimizerConfig) -> torch.optim.Optimizer:
        """The optimizer over the (unwrapped, possibly sharded) ``model``."""
        return build_optimizer(model, opt_cfg, sharding="owner" if self.shards_optimizer else None)

    def setup(
        self, model: nn.Module, opt_cfg: OptimizerConfig
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap ``model`` and build its optimizer; returns ``(module to call, optimizer)``."""
        model = model.to(self.env.device)
        self.model = self.wrap(model)
        self.optimizer = self.make_optimizer(self.unwrapped, opt_cfg)
        return self.model, self.optimizer

    @property
    def unwrapped(self) -> nn.Module:
        """The plain model under any wrapper (same parameters, same names)."""
        assert self.model is not None
        return getattr(self.model, "module", self.model)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision around the forward pass (bf16 autocast when ``precision=bf16``)."""
        return torch.autocast(
            self.env.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"
        )

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` (averaged over ranks where data-parallel)."""
        loss.backward()

    def optimizer_step(self) -> torch.Tensor:
        """Clip to ``max_grad_norm`` (0: no clipping), step, zero the gradients.

        Returns:
            the global gradient 2-norm before clipping, a 0-dim tensor.
        """
        assert self.model is not None and self.optimizer is not None
        max_norm = self.cfg.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def train(self, mode: bool = True) -> None:
        """Switch the model between training and evaluation mode."""
        assert self.model is not None
        self.model.train(mode)


class DDPStrategy(Strategy):
    """``DistributedDataParallel``; the optimizer state is replicated on every rank."""

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)


class ShardedDDPStrategy(DDPStrategy):
    """DDP with the optimizer state sharded by owner rank (ZeRO-1 style)."""

    shards_optimizer = True


class FSDP2Strategy(Strategy):
    """``fully_shard`` each transformer block, then the root, on a 1-D mesh (``fsdp2``) or a
    2-D ``(replicate, shard)`` mesh (``hsdp``); the optimizer sees DTensor parameters."""

    checkpoint_format = "dcp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.cfg.strategy.name == "hsdp":
            replicas = self.cfg.strategy.replicate_degree
            mesh = init_device_mesh(
                self.env.device.type,
                (replicas, self.env.world_size // replicas),
                mesh_dim_names=("replicate", "shard"),
            )
        else:
            mesh = init_device_mesh(
                self.env.device.type, (self.env.world_size,), mesh_dim_names=("shard",)
            )
        mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if self.cfg.precision == "bf16" else None,
            reduce_dtype=torch.float32,
        )
        reshard = self.cfg.strategy.reshard_after_forward
        for block in model.layers:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        return model

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """FSDP2 casts parameters itself (``MixedPrecisionPolicy``)."""
        return contextlib.nullcontext()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, recursively for nested mappings."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _coap_for_deepspeed(opt_cfg: OptimizerConfig) -> Any:
    """Import ``coap_dist`` (and its DeepSpeed integration, where present), which makes the
    JSON optimizer types ``COAP``/``COAPAdafactor`` resolvable; returns the package."""
    coap_dist = importlib.import_module("coap_dist")
    if importlib.util.find_spec("coap_dist.integrations.deepspeed") is not None:
        importlib.import_module("coap_dist.integrations.deepspeed")
    type_name = deepspeed_optimizer_config(opt_cfg, cpu=False)["type"]
    if not hasattr(torch.optim, type_name):
        raise ImportError(
            f"DeepSpeed optimizer type {type_name!r} is not registered; coap_dist's DeepSpeed "
            f"integration (coap_dist.integrations.deepspeed) should provide torch.optim.{type_name}"
        )
    return coap_dist


class DeepSpeedStrategy(Strategy):
    """A DeepSpeed engine at ZeRO stage ``strategy.zero_stage``.

    The optimizer is named in the engine's JSON config (``{"type": "COAP", ...}``, registered
    by ``coap_dist.integrations.deepspeed``); ``coap_dist.param_groups`` still decides which
    parameters are projected. Clipping is the engine's ``gradient_clipping``. ``deepspeed`` is
    imported only here, when this strategy is used.
    """

    checkpoint_format = "deepspeed"

    def ds_config(self, opt_cfg: OptimizerConfig) -> dict[str, Any]:
        """The engine's JSON config: batch, clipping, ZeRO stage, precision, optimizer, then
        ``strategy.extra`` merged on top."""
        config = {
            "train_micro_batch_size_per_gpu": self.cfg.batch_size // self.env.world_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.cfg.max_grad_norm,
            "zero_optimization": {"stage": self.cfg.strategy.zero_stage},
            "bf16": {"enabled": self.cfg.precision == "bf16"},
            "optimizer": deepspeed_optimizer_config(opt_cfg, cpu=self.env.device.type == "cpu"),
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        return _merge(config, dict(self.cfg.strategy.extra))

    def setup(
        self, model: nn.Module, opt_cfg: OptimizerConfig
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Build the engine; returns ``(engine, engine.optimizer)``."""
        import deepspeed

        if opt_cfg.kind == "adamw":
            params: Any = [p for p in model.parameters() if p.requires_grad]
        else:
            params = _coap_for_deepspeed(opt_cfg).param_groups(model)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model.to(self.env.device),
            model_parameters=params,
            config=self.ds_config(opt_cfg),
            dist_init_required=False,
        )
        self.model, self.optimizer = engine, optimizer
        return engine, optimizer

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The engine holds bf16 weights itself when ``precision=bf16``."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """``engine.backward`` (loss scaling, gradient partitioning)."""
        assert self.model is not None
        self.model.backward(loss)

    def optimizer_step(self) -> torch.Tensor:
        """``engine.step`` (clips, steps, zeroes); returns the engine's global grad norm."""
        assert self.model is not None
        self.model.step()
        norm = self.model.get_global_grad_norm()
        if norm is None:
            return torch.tensor(float("nan"))
        return torch.as_tensor(norm, dtype=torch.float32).detach().cpu()

    @property
    def unwrapped(self) -> nn.Module:
        """The model inside the engine."""
        assert self.model is not None
        return self.model.module


_STRATEGIES: dict[str, type[Strategy]] = {
    "single": Strategy,
    "ddp": DDPStrategy,
    "ddp_sharded": ShardedDDPStrategy,
    "fsdp2": FSDP2Strategy,
    "hsdp": FSDP2Strategy,
    "deepspeed": DeepSpeedStrategy,
}


def build_strategy(cfg: TrainConfig, env: DistEnv) -> Strategy:
    """The :class:`Strategy` subclass for ``cfg.strategy.name``."""
    return _STRATEGIES[cfg.strategy.name](cfg, env)


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over all ranks (identity in a single process)."""
    if env.world_size == 1 or not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / env.world_size


def all_gather_ints(value: int, env: DistEnv) -> list[int]:
    """``[value on rank 0, value on rank 1, ...]``."""
    if env.world_size == 1 or not dist.is_initialized():
        return [value]
    local = torch.tensor([value], dtype=torch.int64, device=env.device)
    out = [torch.zeros_like(local) for _ in range(env.world_size)]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if env.world_size == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """``[obj on rank 0, obj on rank 1, ...]`` on every rank."""
    if env.world_size == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    """Wait for all ranks (no-op in a single process)."""
    if env.world_size > 1 and dist.is_initialized():
        dist.barrier()
