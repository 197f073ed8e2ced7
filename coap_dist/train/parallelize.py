"""Apply a parallelism strategy to a plain model: the one place that knows about DDP, FSDP2 and
DeepSpeed. The model code (``coap_dist.models``) stays free of all of it.

Every strategy has the same interface (:class:`Strategy`): ``build_model`` creates the model
without allocating it (meta device; DeepSpeed ZeRO-3: ``deepspeed.zero.Init``), ``setup`` wraps
it, materialises only what this rank holds and builds the optimizer, ``train_step`` runs one
optimizer step over ``grad_accum`` micro-batches, ``checkpoint_format`` says how
:mod:`coap_dist.train.checkpoint` saves it. One subclass per mode:

=================  ============================================================================
``single``         one process, the model as is
``ddp``            ``DistributedDataParallel``; optimizer state replicated
``ddp_owner``      DDP; optimizer state sharded by owner rank (COAP ``sharding="owner"``,
                   ``ZeroRedundancyOptimizer`` for AdamW)
``fsdp2``          ``fully_shard`` on every block, then on the root (1-D mesh)
``hsdp``           ``fully_shard`` on a 2-D ``(replicate, shard)`` mesh
``deepspeed``      a DeepSpeed engine (ZeRO stage 0-3) whose JSON config names the optimizer
=================  ============================================================================

Initial weights are ``Llama.init_values(seed)`` whatever the strategy: each rank draws every
parameter's full value in turn (one at a time, on the CPU) and keeps its own shard, so a model
sharded over N ranks starts from the weights of a one-process build of the same seed, and no
rank ever holds the whole model (peak: its shards plus the largest single parameter).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, cast

import torch
import torch.distributed as dist
from torch import nn

import coap_dist
from coap_dist import InBackward
from coap_dist.models.llama import Llama
from coap_dist.train.config import ConfigError, OptimizerConfig, TrainConfig
from coap_dist.train.optim import build_optimizer, deepspeed_optimizer_config

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Any  # (logits (B, T, V), targets (B, T)) -> 0-dim loss


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
    device = pick_device(cfg.device, local_rank)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    if not cfg.strategy.distributed:
        if world_size > 1:
            raise ConfigError(
                f"strategy.name=single runs one process, but WORLD_SIZE={world_size}; "
                f"use strategy=ddp, ddp_owner, fsdp2, hsdp or deepspeed_zero*"
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


def pick_device(setting: str, local_rank: int) -> torch.device:
    """The device of this process for ``device=<setting>``; ``cuda`` without a usable GPU is
    a config error naming what was found, before any process group or model exists."""
    available = torch.cuda.is_available()
    if setting == "cpu" or (setting == "auto" and not available):
        return torch.device("cpu")
    if not available:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"device=cuda, but no CUDA device is usable here (torch {torch.__version__} is "
            f"{build}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
            f"use device=cpu or device=auto"
        )
    return torch.device("cuda", local_device(setting, local_rank, torch.cuda.device_count()))


def local_device(setting: str, local_rank: int, count: int) -> int:
    """This process's CUDA device index among the ``count`` it sees: ``LOCAL_RANK``, or 0
    where ``srun`` started one process per task and bound GPUs to each task
    (``--gpus-per-task``: each task sees its own, from index 0; not under torchrun, whose
    processes share their task's GPUs). More processes per node than visible GPUs is a
    config error."""
    per_task = os.environ.get("SLURM_GPUS_PER_TASK") and "SLURM_LOCALID" in os.environ
    if per_task and "TORCHELASTIC_RUN_ID" not in os.environ:
        return 0
    if local_rank >= count:
        raise ConfigError(
            f"device={setting}: LOCAL_RANK={local_rank} but only {count} GPU(s) are visible on "
            f"this node; start at most {count} processes per node (NPROC / NPROC_PER_NODE)"
        )
    return local_rank


def reset_peak_memory(device: torch.device) -> None:
    """Restart :func:`peak_memory_bytes` from the memory in use now (each run of a compare or
    sweep reports its own peak): CUDA's peak statistics, or on Linux the resident-set high
    water mark (``5`` written to ``/proc/self/clear_refs``). Elsewhere the peak stays the
    process's lifetime one."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process since the last :func:`reset_peak_memory`: CUDA max
    allocated on a GPU, else the peak resident set size (``VmHWM`` of
    ``/proc/self/status``; ``ru_maxrss`` elsewhere, the process's lifetime peak)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _local_chunk(value: torch.Tensor, param: Any) -> torch.Tensor:
    """The part of the full ``value`` that DTensor ``param`` holds on this rank (its
    ``Shard(d)`` placements chunk like ``torch.chunk``; ``Replicate`` keeps everything)."""
    mesh = param.device_mesh
    coordinate = mesh.get_coordinate()
    local = value
    for mesh_dim, placement in enumerate(param.placements):
        if not placement.is_shard():
            continue
        size = local.shape[placement.dim]
        pieces = mesh.size(mesh_dim)
        step = -(-size // pieces)
        start = min(coordinate[mesh_dim] * step, size)
        local = local.narrow(placement.dim, start, min(step, size - start))
    return local


@torch.no_grad()
def materialize(model: Llama, device: torch.device, seed: int) -> None:
    """Allocate ``model`` (built on the meta device, possibly sharded) on ``device`` and
    write its initial weights: each parameter's full ``init_values`` value in turn, of which
    this rank keeps its shard (DTensor parameters) or everything (plain ones)."""
    from torch.distributed.tensor import DTensor

    model.to_empty(device=device)
    model.reset_buffers()
    for (name, value), param in zip(model.init_values(seed), model.parameters(), strict=True):
        if isinstance(param, DTensor):
            target = param.to_local()
            value = _local_chunk(value, param)
        else:
            target = param
        if tuple(value.shape) != tuple(target.shape):
            raise RuntimeError(f"materialize: {name} shard {tuple(value.shape)} vs {target.shape}")
        target.copy_(value)


def close_distributed(*, wait: bool = False) -> None:
    """Leave the process group, if any; ``wait``: first wait at a barrier until every rank
    is done (the job succeeded), so no rank tears its group down while another still
    communicates. After a failure there is no barrier: the other ranks may never arrive.

    DeepSpeed caches groups derived from the world group in module globals; they would
    outlive the destroyed group and break a later ``run`` in the same process (a notebook, a
    test), so they are reset too.
    """
    if not dist.is_initialized():
        return
    if wait:
        dist.barrier()
    gc.collect()  # wrappers in reference cycles still hold the group's pending work
    dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP"):
            setattr(groups, name, None)


class Strategy:
    """Single process: the model as is. Base of the multi-process strategies.

    Args:
        cfg: the whole run config (strategy, precision, clipping, accumulation).
        env: this process's rank, world size and device.
    """

    checkpoint_format = "torch"
    shards_optimizer = False

    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.in_backward: InBackward | None = None
        self._step_in_backward = False  # set by setup() from the optimizer recipe

    def build_model(self) -> Llama:
        """The model of ``cfg.model`` on the meta device (nothing allocated), with activation
        checkpointing and per-block ``torch.compile`` applied as configured."""
        with torch.device("meta"):
            model = Llama(self.cfg.model.to_llama(), seed=self.cfg.seed)
        self._prepare(model)
        return model

    def _prepare(self, model: Llama) -> None:
        model.set_activation_checkpointing(self.cfg.activation_checkpointing)
        if self.cfg.compile:
            for layer in model.layers:
                layer.compile()  # in place: parameter names unchanged

    def wrap(self, model: nn.Module) -> nn.Module:
        """Apply the parallelism to ``model`` (already on ``env.device``)."""
        return model

    def make_optimizer(self, model: nn.Module, opt_cfg: OptimizerConfig) -> torch.optim.Optimizer:
        """The optimizer over the (unwrapped, possibly sharded) ``model``."""
        return build_optimizer(model, opt_cfg, sharding="owner" if self.shards_optimizer else None)

    def setup(
        self, model: nn.Module, opt_cfg: OptimizerConfig
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Materialise ``model`` if it is on the meta device, wrap it and build its
        optimizer; returns ``(module to call, optimizer)``. A model that is already
        allocated is moved to the device as it is."""
        self._step_in_backward = opt_cfg.in_backward
        if _on_meta(model):
            assert isinstance(model, Llama)
            materialize(model, self.env.device, self.cfg.seed)
        self.model = self.wrap(model.to(self.env.device))
        self.optimizer = self.make_optimizer(self.unwrapped, opt_cfg)
        self._hook_in_backward()
        return self.model, self.optimizer

    def _hook_in_backward(self) -> None:
        """``optimizer.in_backward``: step inside the backward (clipping exact, by a norm
        pre-pass; the gradients of plain parameters averaged by the handler, not DDP)."""
        if self._step_in_backward:
            assert self.model is not None and self.optimizer is not None
            self.in_backward = coap_dist.optimizer_in_backward(
                self.unwrapped, self.optimizer, max_grad_norm=self.cfg.max_grad_norm or None
            )

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

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around the backward of a micro-batch: skip the gradient all-reduce unless it is
        the ``last`` of the step (DDP); a no-op elsewhere."""
        return contextlib.nullcontext()

    def train_step(
        self, batches: list[Batch], loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the micro-batches ``batches`` (``grad_accum`` of them):
        forward and backward of each with loss / len(batches), then clip and step.

        Returns:
            (mean loss over the micro-batches, global gradient 2-norm before clipping), both
            0-dim tensors on the device (no host synchronisation).
        """
        assert self.model is not None
        if self.in_backward is not None:
            return self._train_step_in_backward(batches, loss_fn)
        total = torch.zeros((), device=self.env.device)
        n = len(batches)
        for i, batch in enumerate(batches):
            with self.no_sync(i == n - 1):
                loss = self._loss(batch, loss_fn)
                (loss / n).backward()
            total += loss.detach()
        return total / n, self.optimizer_step()

    def _loss(self, batch: Batch, loss_fn: LossFn) -> torch.Tensor:
        """Forward (under :meth:`autocast`) and loss of one micro-batch."""
        assert self.model is not None
        x, y = batch
        with self.autocast():
            logits = self.model(x.to(self.env.device, non_blocking=True))
        return loss_fn(logits, y.to(self.env.device, non_blocking=True))

    def _train_step_in_backward(
        self, batches: list[Batch], loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`train_step` with the optimizer stepping inside the backward (one
        micro-batch: the config refuses ``grad_accum`` > 1)."""
        assert self.in_backward is not None
        (batch,) = batches

        def closure() -> torch.Tensor:
            loss = self._loss(batch, loss_fn)
            loss.backward()
            return loss

        loss = self.in_backward.step(closure)
        return loss, self.in_backward.grad_norm.detach()

    def optimizer_step(self) -> torch.Tensor:
        """Clip to ``max_grad_norm`` (0: no clipping), step, zero the gradients.

        Returns:
            the global gradient 2-norm before clipping, a 0-dim tensor.
        """
        assert self.model is not None and self.optimizer is not None
        max_norm = self.cfg.max_grad_norm or float("inf")
        clip = getattr(self.optimizer, "clip_grad_norm_", None)
        if clip is not None:  # COAP: its step reuses the clip's norms as its non-finite check
            norm = clip(max_norm)
        else:
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


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


class DDPStrategy(Strategy):
    """``DistributedDataParallel``; the optimizer state is replicated on every rank."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP, or the model itself with ``in_backward`` (whose handler averages)."""
        from torch.nn.parallel import DistributedDataParallel

        if self._step_in_backward:
            return model

        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP's ``no_sync`` on all but the last micro-batch: one all-reduce per step."""
        assert self.model is not None
        if last or self.in_backward is not None:
            return contextlib.nullcontext()
        return self.model.no_sync()  # type: ignore[operator]


class OwnerDDPStrategy(DDPStrategy):
    """DDP with the optimizer state sharded by owner rank (ZeRO-1 style)."""

    shards_optimizer = True


class FSDP2Strategy(Strategy):
    """``fully_shard`` each transformer block, then the root, on a 1-D mesh (``fsdp2``) or a
    2-D ``(replicate, shard)`` mesh (``hsdp``); the optimizer sees DTensor parameters."""

    checkpoint_format = "dcp"

    def setup(
        self, model: nn.Module, opt_cfg: OptimizerConfig
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Shard ``model`` (on the meta device: nothing allocated yet), then allocate and
        initialise only this rank's shards; an allocated model is sharded as it is."""
        self._step_in_backward = opt_cfg.in_backward
        meta = _on_meta(model)
        self.model = self.wrap(model if meta else model.to(self.env.device))
        if meta:
            assert isinstance(model, Llama)
            materialize(model, self.env.device, self.cfg.seed)
        self.optimizer = self.make_optimizer(self.unwrapped, opt_cfg)
        self._hook_in_backward()
        return self.model, self.optimizer

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
        for block in cast(nn.ModuleList, model.layers):  # Llama.layers
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        return model

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """FSDP2 casts parameters itself (``MixedPrecisionPolicy``)."""
        return contextlib.nullcontext()

    # Gradient accumulation keeps FSDP2's reduce-scatter on every micro-batch: gradients
    # stay sharded (1/N memory) at the price of one reduce-scatter per micro-batch.


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, recursively for nested mappings."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _lookup(config: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    """``(present, value)`` of dotted ``path`` in nested mappings."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


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
    parameters are projected. Clipping is the engine's ``gradient_clipping``, accumulation its
    ``gradient_accumulation_steps`` (= ``grad_accum``). At stage 3 the model is built under
    ``deepspeed.zero.Init`` (each parameter partitioned as it is created) and its initial
    weights written one gathered parameter at a time. ``deepspeed`` is imported only here.
    """

    checkpoint_format = "deepspeed"

    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        super().__init__(cfg, env)
        self._partitioned = False  # built under zero.Init, weights not written yet
        self.load_universal = False
        """Build the engine to load a universal checkpoint (set by a resume at another
        world size: ``"checkpoint": {"load_universal": true}``)."""

    APP_KEYS: ClassVar[dict[str, str]] = {
        "train_batch_size": "batch_size",
        "train_micro_batch_size_per_gpu": "batch_size (divided by processes and grad_accum)",
        "gradient_accumulation_steps": "grad_accum",
        "gradient_clipping": "max_grad_norm",
        "zero_optimization.stage": "strategy=deepspeed_zero<stage>",
        "bf16.enabled": "precision",
        "fp16.enabled": "precision (fp32 or bf16)",
        "optimizer": "optimizer=<option> and its optimizer.<hyperparameter> keys",
        "checkpoint.load_universal": "resume= (the app converts COAP checkpoints itself)",
    }
    """JSON keys the app derives from its own settings (the one to set instead): a different
    value under ``strategy.extra`` is a config error (the run, its learning-rate schedule,
    its checkpoints and their resume checks follow the app's settings)."""

    def ds_config(self, opt_cfg: OptimizerConfig | None) -> dict[str, Any]:
        """The engine's JSON config: :meth:`app_config`, with ``strategy.extra`` merged on
        top."""
        return _merge(self.app_config(opt_cfg), dict(self.cfg.strategy.extra))

    def app_config(self, opt_cfg: OptimizerConfig | None) -> dict[str, Any]:
        """The JSON config from the app's settings: batch, accumulation, clipping, ZeRO
        stage, precision, optimizer (when given), universal load (a resized resume)."""
        micro = self.cfg.batch_size // (self.env.world_size * self.cfg.grad_accum)
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": self.cfg.grad_accum,
            "gradient_clipping": self.cfg.max_grad_norm,
            "zero_optimization": {"stage": self.cfg.strategy.zero_stage},
            "bf16": {"enabled": self.cfg.precision == "bf16"},
            "fp16": {"enabled": False},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if opt_cfg is not None:
            config["optimizer"] = deepspeed_optimizer_config(
                opt_cfg, cpu=self.env.device.type == "cpu"
            )
        if self.load_universal:
            config["checkpoint"] = {"load_universal": True}
        return config

    def check_extra(self) -> None:
        """``strategy.extra`` keys that DeepSpeed would ignore silently or reject with a
        traceback (:func:`coap_dist.integrations.deepspeed.check_config`), and those that
        set one of :data:`APP_KEYS` to another value than the app's, are a config error
        naming the key."""
        from coap_dist.integrations.deepspeed import check_config

        app, extra = self.app_config(None), dict(self.cfg.strategy.extra)
        for path, instead in self.APP_KEYS.items():
            given, value = _lookup(extra, path)
            has, own = _lookup(app, path)
            if given and not (has and value == own):
                derived = f" (the app sets {own!r})" if has else ""
                raise ConfigError(
                    f"strategy.extra.{path}={value!r} would override a key the app derives "
                    f"from its settings{derived}; set {instead} instead"
                )
        try:
            check_config(self.ds_config(None), "strategy.extra.")
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def build_model(self) -> Llama:
        """Stages 0-2: on the meta device; stage 3: under ``deepspeed.zero.Init``."""
        if self.cfg.strategy.zero_stage != 3:
            return super().build_model()
        import deepspeed

        self.check_extra()
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config(None)):
            model = Llama(self.cfg.model.to_llama(), init=False)
        self._prepare(model)
        self._partitioned = True
        return model

    @torch.no_grad()
    def _write_partitioned(self, model: Llama) -> None:
        """Initial weights of a zero.Init model, one gathered parameter at a time (rank 0
        writes, DeepSpeed re-partitions)."""
        import deepspeed

        with torch.device("meta"):
            twin = Llama(model.cfg, init=False)  # shapes only
        values = twin.init_values(self.cfg.seed) if self.env.is_main else None
        for param in model.parameters():
            value = next(values)[1] if values is not None else None
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if value is not None:
                    param.data.copy_(value)

    def setup(
        self, model: nn.Module, opt_cfg: OptimizerConfig
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Materialise (meta) or fill (zero.Init) the model, build the engine; returns
        ``(engine, engine.optimizer)``."""
        import deepspeed

        self.check_extra()
        if self._partitioned:
            assert isinstance(model, Llama)
            self._write_partitioned(model)
            self._partitioned = False
        elif _on_meta(model):
            assert isinstance(model, Llama)
            materialize(model, self.env.device, self.cfg.seed)
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

    def train_step(
        self, batches: list[Batch], loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``engine.backward`` and ``engine.step`` per micro-batch: the engine scales the loss
        by 1 / ``gradient_accumulation_steps`` and steps the optimizer (clipping first) at
        the accumulation boundary. Returns (mean loss, the global grad norm before clipping).

        The norm is the engine's (``get_global_grad_norm``) where it keeps one: its ZeRO and
        bf16 optimizers. A stage-0 fp32 engine clips without keeping the norm, so there the
        app takes ||g||_2 of the module's gradients at the boundary, before ``engine.step``:
        the engine has averaged them over the ranks in its last ``backward`` (one fused
        norm per gradient; no communication)."""
        engine: Any = self.model  # a DeepSpeedEngine (deepspeed is untyped)
        assert engine is not None
        total = torch.zeros((), device=self.env.device)
        own: torch.Tensor | None = None
        for j, (x, y) in enumerate(batches):
            loss = loss_fn(engine(x.to(self.env.device)), y.to(self.env.device))
            engine.backward(loss)
            if j == len(batches) - 1 and engine.zero_optimization_stage() == 0:
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                own = torch.nn.utils.get_total_norm(grads) if grads else None
            engine.step()
            total += loss.detach()
        norm = engine.get_global_grad_norm()
        if norm is None:
            norm = own if own is not None else float("nan")
        return total / len(batches), torch.as_tensor(norm, dtype=torch.float32).detach()

    @property
    def unwrapped(self) -> nn.Module:
        """The model inside the engine."""
        assert self.model is not None
        return cast(nn.Module, self.model.module)  # DeepSpeedEngine.module


_STRATEGIES: dict[str, type[Strategy]] = {
    "single": Strategy,
    "ddp": DDPStrategy,
    "ddp_owner": OwnerDDPStrategy,
    "fsdp2": FSDP2Strategy,
    "hsdp": FSDP2Strategy,
    "deepspeed": DeepSpeedStrategy,
}


def strategies_reading(fmt: str) -> list[str]:
    """The ``strategy.name`` values whose checkpoints have format ``fmt``."""
    return [name for name, cls in _STRATEGIES.items() if cls.checkpoint_format == fmt]


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


def all_gather_ints(values: list[int], env: DistEnv) -> list[list[int]]:
    """``[values on rank 0, values on rank 1, ...]`` (one all-gather for the whole list)."""
    if env.world_size == 1 or not dist.is_initialized():
        return [list(values)]
    local = torch.tensor(values, dtype=torch.int64, device=env.device)
    out = [torch.zeros_like(local) for _ in range(env.world_size)]
    dist.all_gather(out, local)
    return [[int(v) for v in t.tolist()] for t in out]


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
