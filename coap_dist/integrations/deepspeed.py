"""COAP as a DeepSpeed JSON-config optimizer: ``"optimizer": {"type": "COAP", "params": {...}}``.

DeepSpeed has no optimizer registry: a type it does not know resolves through
``getattr(torch.optim, name)``. :func:`register` (run by ``import coap_dist``) makes
``torch.optim.COAP`` (:class:`~coap_dist.COAPAdamW`) and ``torch.optim.COAPAdafactor``
resolvable, declares them ZeRO-supported (no ``zero_allow_untested_optimizer`` needed) and
installs a layout resolver that recognises what a DeepSpeed engine hands the optimizer. The
JSON ``params`` become constructor keyword arguments, validated by the optimizer's config
dataclass (:class:`~coap_dist.COAPAdamWConfig`): an unknown key fails naming the nearest
valid one. Nothing here imports ``deepspeed``.

The layout is chosen at the first ``step()`` from the tensors the engine handed over (never
from the call stack), as measured with DeepSpeed 0.19.8:

* stage 0 fp32: the model's own parameters, gradients averaged: replicated state, like DDP;
* stage 0 bf16/fp16 (``FP16_UnfusedOptimizer``): same-shape fp32 master copies in the groups,
  plus one step on all-zero gradients at construction (it takes no step: all-zero first
  gradients never do): the copies are adopted;
* stages 1 and 2 (``DeepSpeedZeroOptimizer``, also ``BF16_Optimizer``): one flat fp32
  partition per group; every model parameter's ``_hp_mapping`` names its fragment (a range of
  the flattened parameter, possibly starting mid-row) and ``_dp_group`` the data-parallel
  group -> :class:`DeepSpeedZeroView`;
* stage 3 (``DeepSpeedZeroOptimizer_Stage3``, also under ``deepspeed.zero.Init``): step()
  once per sub-group with its flat fp32 partition swapped in; rank k holds elements
  [k s, (k + 1) s) of every flattened parameter (s = ``partition_numel()``), located through
  ``p._z3_optimizer.grad_position`` -> :class:`DeepSpeedZero3View`.

At stages 1-3 the owner protocol (:mod:`coap_dist.distributed.owner`) starts from the
partitions DeepSpeed has already reduce-scattered: each rank sends only the gradient rows
of its fragments that another rank computes (about gradient bytes / N), AdamW parameters
step on their fragments in place, and updates come back as D and P or as rectangles.

Checkpoints: DeepSpeed's ZeRO checkpoints store ``optimizer.state_dict()`` per rank; under
these views COAP's state dict holds this rank's pieces (with their bounds, ``coap_pieces``)
and loads directly only into the same rank of the same job shape, as DeepSpeed itself
requires. For another data-parallel world size (or to leave DeepSpeed), convert the
checkpoint with :func:`to_universal` (``coap-dist ds-to-universal SRC DST``): it writes a
DeepSpeed *universal* checkpoint (DeepSpeed's ``ds_to_universal`` assumes Adam's
``exp_avg`` / ``exp_avg_sq`` and fails on COAP's state) holding the fp32 master weights
per parameter plus COAP's per-rank state; load it with ``"checkpoint": {"load_universal":
true}`` and :func:`load_checkpoint`, which calls ``engine.load_checkpoint`` and gives COAP
its state, assembled into the single-process form and re-cut for the new placement.

8-bit state (``state_bits: 8``) and Tucker-projected convolutions (``rank_ratio_cnn``) run at
every stage: a convolution lives whole on one rank, an 8-bit matrix is whole or split on its
quantization blocks; an 8-bit AdamW parameter cut by DeepSpeed's partition inside a block
keeps the parameter's block grid, the ranks sharing that block agreeing on its maximum (one
small MAX all-reduce per step), so that its codes are those of one process.

Optimizer offload (``offload_optimizer: {"device": "cpu"}``, with ``offload_param`` at stage 3
too): DeepSpeed keeps the fp32 partitions and their gradients on the host and COAP steps
them there, its state on the host with them; its collectives run on the device the process
group needs (:func:`~coap_dist.distributed.comm.transport_device`: the GPU for NCCL, each
buffer copied over and back).

Refused at the first step with an error saying what to use instead: NVMe optimizer offload,
mixture-of-experts groups, ``round_robin_gradients`` (a fragment map that disagrees with the
partitions: :func:`_check_fragment_map`) and an explicit ``sharding`` argument at stages 1-3
(:func:`check_config` refuses it at every stage). fp16 on CPU is refused by DeepSpeed itself.
Frozen parameters in the optimizer's groups are in no partition: no fragment, never stepped.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from coap_dist import distributed as _distributed
from coap_dist.distributed.comm import Comm
from coap_dist.distributed.owner import OwnerLayout
from coap_dist.distributed.placement import Range
from coap_dist.distributed.views import FragmentView
from coap_dist.optim import COAPAdafactor, COAPAdamW
from coap_dist.optim.checkpoint import PENDING_STATE
from coap_dist.optim.coap import innermost
from coap_dist.optim.layout import Layout, add_construction_hook, set_layout_resolver

OPTIMIZER_TYPES: dict[str, type] = {"COAP": COAPAdamW, "COAPAdafactor": COAPAdafactor}
"""JSON ``"type"`` names and the classes they resolve to (``torch.optim.<name>``)."""

_registered = False


def register() -> None:
    """Make the JSON types resolvable (``torch.optim.COAP``, ``torch.optim.COAPAdafactor``),
    declare them ZeRO-supported whenever one is built, and install the DeepSpeed-aware
    layout resolver. Idempotent; does not import deepspeed."""
    global _registered
    for name, cls in OPTIMIZER_TYPES.items():
        setattr(torch.optim, name, cls)
    if not _registered:
        set_layout_resolver(_resolve)
        add_construction_hook(_declare_zero_supported)
        _registered = True


def _declare_zero_supported() -> None:
    """Add the COAP classes to DeepSpeed's ZeRO-supported optimizers (checked right after the
    engine builds the optimizer), if DeepSpeed is imported."""
    zero_utils = sys.modules.get("deepspeed.runtime.zero.utils")
    supported = getattr(zero_utils, "ZERO_SUPPORTED_OPTIMIZERS", None)
    if supported is None:
        return
    for cls in OPTIMIZER_TYPES.values():
        if cls not in supported:
            supported.append(cls)


def _resolve(
    groups: list[dict[str, Any]],
    built: list[list[Tensor | None]],
    sharding: Any,
    process_group: Any,
) -> Layout:
    """DeepSpeed ZeRO 1-3 layouts when the built parameters carry DeepSpeed's partition
    bookkeeping; otherwise the default resolver (stage 0 looks like DDP to the optimizer)."""
    flat = [p for g in built for p in g if p is not None]
    stage3 = any(hasattr(p, "ds_id") and hasattr(p, "_z3_optimizer") for p in flat)
    stage12 = any(hasattr(p, "_hp_mapping") for p in flat)
    if stage3 or stage12:
        _refuse_moe(groups)
    if not (stage3 or stage12):
        return _distributed.resolve(groups, built, sharding, process_group)
    if sharding not in (None, "none"):
        raise ValueError(
            f"COAP under DeepSpeed: invalid `sharding`={sharding!r}; the layout follows "
            "zero_optimization.stage (state is sharded over the data-parallel group at stages "
            "1-3). Remove `sharding` from the optimizer params"
        )
    return OwnerLayout(DeepSpeedZero3View() if stage3 else DeepSpeedZeroView())


def _model_params(built: list[list[Tensor | None]]) -> list[Tensor]:
    params = [p for g in built for p in g]
    if any(p is None for p in params):
        raise ValueError(
            "COAP under DeepSpeed: a model parameter the optimizer was built with was freed; "
            "pass model.parameters() (or coap_dist.param_groups(model)) of the engine's model"
        )
    return params  # type: ignore[return-value]


def _refuse_moe(groups: list[dict[str, Any]]) -> None:
    if any(g.get("moe") for g in groups):
        raise ValueError(
            "COAP under DeepSpeed: mixture-of-experts parameter groups (expert data-parallel "
            "groups) are not supported yet; use stage 0-3 without MoE layers or a non-COAP "
            "optimizer for the experts"
        )


def _check_fragment_map(params: list[Tensor], current: list[list[Tensor]], rank: int) -> None:
    """Raise unless each parameter's ``_hp_mapping`` places it where its weights are.

    At stages 1-2 every weight is a view of its group's flat 16/32-bit buffer at its offset o
    there (``p.data.storage_offset()``), and rank k's fp32 partition holds [k s, (k + 1) s) of
    that buffer (s = the partition's numel), so the mapping's fragment must satisfy
    k s + hp_start - lp_start = o. ``round_robin_gradients`` breaks this in DeepSpeed 0.19.8:
    the buffer is in round-robin order, the mapping (also DeepSpeed's own
    ``safe_get_full_fp32_param``) in the original one, and every step would land on other
    parameters' elements."""
    for p in params:
        m = getattr(p, "_hp_mapping", None)
        if m is None:
            continue
        size = current[m.param_group_index][0].numel()
        implied = rank * size + m.hp_fragment_address.start - m.lp_fragment_address.start
        if implied != p.data.storage_offset():
            raise ValueError(
                "COAP under DeepSpeed: a parameter's _hp_mapping points at flat element "
                f"{implied}, where its weights are at {p.data.storage_offset()}: DeepSpeed's "
                "fragment map does not match its partitions. zero_optimization."
                "round_robin_gradients=true does this (DeepSpeed 0.19.8 reorders the flat "
                "buffer, not the map): set it to false (it only reorders gradient copies for "
                "CPU offload)"
            )


class DeepSpeedZeroView(FragmentView):
    """ZeRO stages 1-2 (and ``BF16_Optimizer``): fragments from each model parameter's
    ``_hp_mapping`` into the flat fp32 partitions, over its ``_dp_group``."""

    name = "zero"
    rank_local = True

    def __init__(self) -> None:
        self._params: list[Tensor] = []

    def attach(self, current: list[list[Tensor]], built: list[list[Tensor | None]]) -> list[Tensor]:
        params = _model_params(built)
        # Frozen parameters (model.parameters() with requires_grad=False ones) are not in
        # DeepSpeed's partitions: no fragment on any rank, never stepped.
        trainable = [p for p in params if hasattr(p, "_hp_mapping")]
        groups = {id(getattr(p, "_dp_group", None)) for p in trainable}
        if len(groups) != 1:
            raise ValueError(
                "COAP under DeepSpeed: the trainable parameters span several data-parallel "
                "groups (expert or sequence parallelism); use one data-parallel group"
            )
        self.group = trainable[0]._dp_group  # type: ignore[attr-defined]
        _check_fragment_map(trainable, current, dist.get_rank(self.group))
        self._params = params
        self.remember(current, built)
        return params

    def _mapping(self, index: int) -> Any:
        """The parameter's ``_hp_mapping`` (None where this rank holds none of it, or for a
        frozen parameter)."""
        return getattr(self._params[index], "_hp_mapping", None)

    def device(self) -> torch.device:
        for i in range(len(self._params)):
            if (m := self._mapping(i)) is not None:
                return m.hp_fragment.device
        return self._params[0].device

    def global_shape(self, index: int) -> tuple[int, ...]:
        return tuple(self._params[index].shape)

    def dtype(self, index: int) -> torch.dtype:
        return torch.float32

    def fragments(self, comm: Comm) -> list[list[Range] | None]:
        mine = []
        for i in range(len(self._params)):
            m = self._mapping(i)
            if m is None:
                mine.append((0, 0))
            else:
                addr = m.lp_fragment_address
                mine.append((addr.start, addr.start + addr.numel))
        every = comm.all_gather_objects(mine)
        return [[every[r][i] for r in range(comm.world)] for i in range(len(self._params))]  # type: ignore[index]

    def local(self, index: int) -> Tensor | None:
        m = self._mapping(index)
        return None if m is None else m.hp_fragment

    def grad(self, index: int) -> Tensor | None:
        m = self._mapping(index)
        if m is None:
            return None
        hp = m.hp_fragment
        flat = hp._base if hp._base is not None else hp
        if flat.grad is None:
            return None
        return flat.grad.narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel)


class DeepSpeedZero3View(FragmentView):
    """ZeRO stage 3: rank k holds [k s, (k + 1) s) of each flattened parameter, in the flat
    fp32 partition of its sub-group; step() is called once per sub-group."""

    name = "zero"
    rank_local = True

    def __init__(self) -> None:
        self._params: list[Tensor] = []
        self._z3: Any = None

    def attach(self, current: list[list[Tensor]], built: list[list[Tensor | None]]) -> list[Tensor]:
        params = _model_params(built)
        self._z3 = params[0]._z3_optimizer  # type: ignore[attr-defined]
        if getattr(self._z3, "swap_optimizer", False):
            raise ValueError(
                "COAP under DeepSpeed: zero_optimization.offload_optimizer.device='nvme' is "
                "not supported: DeepSpeed's NVMe swapper pages Adam-shaped state of the flat "
                "fp32 partitions in and out, which COAP's per-matrix state is not. Use "
                "offload_optimizer.device='cpu' (COAP's state, ~r/min(m, n) of AdamW's, then "
                "lives on the host) or no offload"
            )
        self.group = self._z3.dp_process_group
        self._rank = dist.get_rank(self.group)
        self._world = dist.get_world_size(self.group)
        self._params = params
        self.group_of = [gi for gi, g in enumerate(built) for _ in g]
        return params

    def _position(self, index: int) -> tuple[Tensor, int, int] | None:
        """(flat fp32 partition of the sub-group, offset there, elements per rank); None for
        a frozen parameter (requires_grad=False: in no fp32 partition, never stepped)."""
        z3 = self._z3
        where = z3.grad_position.get(z3.get_param_id(self._params[index]))
        if where is None:
            return None
        sub, offset, part = where
        return z3.fp32_partitioned_groups_flat[sub], offset, part

    def begin(self, current: list[list[Tensor]]) -> list[int] | None:
        present = {t.untyped_storage().data_ptr() for g in current for t in g}
        return [
            i
            for i in range(len(self._params))
            if (at := self._position(i)) is not None
            and at[0].untyped_storage().data_ptr() in present
        ]

    def device(self) -> torch.device:
        at = next(a for i in range(len(self._params)) if (a := self._position(i)) is not None)
        return at[0].device

    def global_shape(self, index: int) -> tuple[int, ...]:
        return tuple(self._params[index].ds_shape)  # type: ignore[attr-defined]

    def dtype(self, index: int) -> torch.dtype:
        return torch.float32

    def fragments(self, comm: Comm) -> list[list[Range] | None]:
        out: list[list[Range] | None] = []
        for i, p in enumerate(self._params):
            at = self._position(i)
            if at is None:
                out.append([(0, 0)] * comm.world)
                continue
            part = at[2]
            numel = p.ds_numel  # type: ignore[attr-defined]
            out.append(
                [(min(r * part, numel), min((r + 1) * part, numel)) for r in range(comm.world)]
            )
        return out

    def _held(self, index: int) -> tuple[Tensor, int, int] | None:
        """(flat partition, offset, elements) of this rank's fragment; None if empty."""
        at = self._position(index)
        if at is None:
            return None
        flat, offset, part = at
        numel = self._params[index].ds_numel  # type: ignore[attr-defined]
        n = max(0, min(part, numel - self._rank * part))
        return (flat, offset, n) if n else None

    def local(self, index: int) -> Tensor | None:
        held = self._held(index)
        return None if held is None else held[0].narrow(0, held[1], held[2])

    def grad(self, index: int) -> Tensor | None:
        held = self._held(index)
        if held is None or held[0].grad is None:
            return None
        return held[0].grad.narrow(0, held[1], held[2])


COAP_SHARDS = "coap_shards.pt"
"""File, next to the per-parameter folders of a universal checkpoint's ``zero/``, holding
``{"world": N, "stage": s, "shards": [COAP state dict of rank q for q < N]}``."""


def _inner_state(optim: dict[str, Any]) -> dict[str, Any] | None:
    """COAP's state dict inside a ZeRO optimizer file's ``optimizer_state_dict``: the base
    optimizer's (stages 1-2, ``BF16_Optimizer``) or the inner one (stage 3)."""
    inner = optim.get("base_optimizer_state", optim.get("optimizer_state_dict"))
    return inner if isinstance(inner, dict) else None


def _rank_files(folder: Path) -> list[Path]:
    """The per-rank ZeRO optimizer files of a checkpoint folder, in data-parallel order;
    refuses tensor / pipeline parallel checkpoints (more than one ``mp_rank``)."""
    files = sorted(folder.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt"))
    mp = {re.search(r"mp_rank_(\d+)", f.name).group(1) for f in files}  # type: ignore[union-attr]
    if len(mp) > 1:
        raise ValueError(
            f"coap-dist ds-to-universal: {folder} is a tensor/pipeline-parallel checkpoint "
            f"(mp ranks {sorted(mp)}); only data-parallel ZeRO checkpoints are converted"
        )
    return sorted(files, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)", f.name).group(1)))  # type: ignore[union-attr]


def to_universal(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], tag: str | None = None
) -> Path:
    """Convert a ZeRO 1-3 checkpoint of a COAP run (``engine.save_checkpoint(src, tag)`` at
    any data-parallel world size N) into a DeepSpeed universal checkpoint in ``dst`` that
    resumes at any world size M (offline: no process group, CPU only).

    Written under ``dst/<tag>/``: the model-state files (``global_steps``, lr scheduler,
    module buffers), ``zero/optimizer_state.pt`` (rank 0's global ZeRO state and the param
    groups, as ``ds_to_universal`` writes it), ``zero/<param name>/fp32.pt`` (``{"param":
    full fp32 master}``, reconstructed by DeepSpeed's ``zero_to_fp32``) and
    :data:`COAP_SHARDS` (the groups carry :data:`~coap_dist.optim.checkpoint.PENDING_STATE`:
    a stage 1-2 engine that loads them without :func:`load_checkpoint` refuses to step);
    at stage 3 also the ZeRO files themselves (hard links where the
    filesystem allows), which DeepSpeed's universal loader reads when it is not to load
    Adam's moments; then ``dst/latest_universal`` (and ``dst/latest`` at stage 3). The tag
    folder is written as ``<tag>.tmp`` and renamed when complete. Returns ``dst/<tag>``.

    Raises ``ValueError`` naming the file when ``src`` is not a ZeRO 1-3 checkpoint of COAP
    (use DeepSpeed's own ``ds_to_universal`` for Adam) or a rank's file is missing.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ValueError(f"coap-dist ds-to-universal: the checkpoint folder {src} does not exist")
    tags = sorted(p.name for p in src.iterdir() if p.is_dir() and _rank_files(p))
    if tag is None:
        latest = src / "latest"
        if not latest.is_file():
            raise ValueError(
                f"coap-dist ds-to-universal: no tag given and no {latest}; pass --tag, one of "
                f"{tags}"
            )
        tag = latest.read_text().strip()
    folder = src / tag
    files = _rank_files(folder)
    if not files:
        raise ValueError(
            f"coap-dist ds-to-universal: no ZeRO optimizer files in {folder}; the tags of "
            f"{src} with them: {tags}"
        )
    shards, first = [], None
    for f in files:
        optim = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        inner = _inner_state(optim)
        if inner is None or "coap_pieces" not in inner:
            raise ValueError(
                f"coap-dist ds-to-universal: {f} holds no COAP state of ZeRO stages 1-3 (no "
                "`coap_pieces`); convert checkpoints of other optimizers with DeepSpeed's "
                "ds_to_universal, and stage 0 checkpoints need no conversion"
            )
        shards.append(inner)
        first = first or optim
    assert first is not None
    world = int(shards[0]["coap_layout"]["world"])
    if len(shards) != world:
        raise ValueError(
            f"coap-dist ds-to-universal: {folder} has {len(shards)} rank files of a "
            f"{world}-rank run; every rank's *_optim_states.pt is needed"
        )
    stage = int(first["zero_stage"])
    out = dst / f"{tag}.tmp"
    shutil.rmtree(out, ignore_errors=True)
    (out / "zero").mkdir(parents=True)
    for f in folder.glob("*model_states.pt"):
        shutil.copy2(f, out / f.name)
    if stage == 3:
        # DeepSpeed's stage-3 universal load without Adam's moment files (what COAP needs)
        # rebuilds the module from the ZeRO files of `latest`: link them in (copy across
        # filesystems).
        for f in files:
            try:
                os.link(f, out / f.name)
            except OSError:
                shutil.copy2(f, out / f.name)
    flat = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    sharded = {flat, "base_optimizer_state", "param_slice_mappings"}
    glob_state = {k: v for k, v in first.items() if k not in sharded}
    # DeepSpeed's stage 1-2 universal loader copies these groups' keys into COAP's: the
    # marker makes a step() without load_checkpoint (COAP's state never loaded) refuse.
    glob_state["param_groups"] = [
        {**g, PENDING_STATE: COAP_SHARDS} for g in shards[0]["param_groups"]
    ]
    torch.save(glob_state, out / "zero" / "optimizer_state.pt")
    weights = get_fp32_state_dict_from_zero_checkpoint(str(src), tag=tag)
    for name, value in weights.items():
        (out / "zero" / name).mkdir()
        torch.save({"param": value.detach().float().clone()}, out / "zero" / name / "fp32.pt")
    torch.save({"world": world, "stage": stage, "shards": shards}, out / "zero" / COAP_SHARDS)
    final = dst / tag
    shutil.rmtree(final, ignore_errors=True)
    out.rename(final)
    (dst / "latest_universal").write_text(tag)
    if stage == 3:
        (dst / "latest").write_text(tag)
    return final


def _coap_of(engine: Any) -> COAPAdamW | COAPAdafactor:
    """The COAP optimizer inside a DeepSpeed engine's ZeRO / mixed-precision wrappers."""
    opt = innermost(engine.optimizer)
    if not isinstance(opt, COAPAdamW | COAPAdafactor):
        raise ValueError(
            'coap_dist load_checkpoint: the engine\'s optimizer is not COAP ("type": "COAP"); '
            "call engine.load_checkpoint directly"
        )
    return opt


def load_checkpoint(
    engine: Any, load_dir: str | os.PathLike[str], tag: str | None = None, **kwargs: Any
) -> tuple[Any, Any]:
    """``engine.load_checkpoint(load_dir, tag, **kwargs)`` that also restores COAP's state
    from a universal checkpoint written by :func:`to_universal` (the engine built with
    ``"checkpoint": {"load_universal": true}``, at any data-parallel world size).

    DeepSpeed loads the fp32 masters, counters and lr scheduler; COAP gets every rank's saved
    pieces, assembles the single-process state at its first step and keeps the part its new
    placement assigns this rank (projectors, moments, step counts, refresh schedules, ranks
    chosen by ``rank="auto"``). At stage 3 the engine is told ``load_optimizer_states=False``
    (its universal loader otherwise expects Adam's moment files); global ZeRO state such as
    an fp16 loss scale then restarts. Without ``load_universal`` this is
    ``engine.load_checkpoint`` (same world size only, DeepSpeed's rule). Returns what
    ``engine.load_checkpoint`` returns."""
    coap = _coap_of(engine)
    if not engine.load_universal_checkpoint():
        folder = Path(load_dir)
        marker = (
            folder / "latest_universal" if tag is None else folder / str(tag) / "zero" / COAP_SHARDS
        )
        if marker.is_file():
            raise ValueError(
                f"coap_dist load_checkpoint: {load_dir} holds a universal checkpoint (written "
                "by `coap-dist ds-to-universal`), which DeepSpeed reads only with "
                '"checkpoint": {"load_universal": true} in the engine\'s config: build the '
                "engine with it, then call load_checkpoint again (nothing was loaded)"
            )
        return engine.load_checkpoint(str(load_dir), tag, **kwargs)
    load_dir = Path(load_dir)
    if tag is None:
        latest = load_dir / "latest_universal"
        if not latest.is_file():
            raise ValueError(f"coap_dist load_checkpoint: no tag given and no {latest}")
        tag = latest.read_text().strip()
    path = load_dir / str(tag) / "zero" / COAP_SHARDS
    if not path.is_file():
        raise ValueError(
            f"coap_dist load_checkpoint: {path} is missing: {load_dir / str(tag)} is not a "
            "universal checkpoint written by `coap-dist ds-to-universal` (DeepSpeed's "
            "ds_to_universal drops COAP's state); convert the ZeRO checkpoint with it"
        )
    if engine.zero_optimization_stage() == 3:
        if kwargs.get("load_optimizer_states", False):
            raise ValueError(
                "coap_dist load_checkpoint: load_optimizer_states=True is not possible at "
                "stage 3 (DeepSpeed's universal loader reads Adam's exp_avg files); COAP's "
                "state is loaded by this function. Leave load_optimizer_states unset"
            )
        kwargs["load_optimizer_states"] = False
    out = engine.load_checkpoint(str(load_dir), tag, **kwargs)
    if out[0] is not None:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        coap.load_state_dict({"coap_shards": saved["shards"]})
        for g in coap.param_groups:
            g.pop(PENDING_STATE, None)
    return out


def check_config(config: Mapping[str, Any], where: str = "") -> None:
    """Raise ValueError with one line naming the key for the DeepSpeed config mistakes that
    otherwise end in DeepSpeed's pydantic or assertion tracebacks, or in a silently ignored
    key: a top-level key DeepSpeed does not read (``zero_optimisation``), a key its
    section's schema rejects (``zero_optimization.stagee``, with the nearest valid ones),
    an optimizer ``"type"`` one typo or only the letter case from a COAP type (``COAPP``,
    ``coap``), an unknown COAP ``params`` key and a ``gradient_clipping`` that is not a
    number (``"1.0"``). ``where``: the prefix naming the config in messages (the app's
    ``strategy.extra.``). Needs an initialized process group, as ``DeepSpeedConfig``."""
    import difflib

    from pydantic import ValidationError

    config = dict(config)
    opt = config.get("optimizer")
    kind = str(opt.get("type", "")) if isinstance(opt, Mapping) else ""
    if isinstance(opt, Mapping):
        for key in opt:  # DeepSpeed reads these three and ignores any other key silently
            if key not in ("type", "params", "legacy_fusion"):
                near = difflib.get_close_matches(str(key), ["type", "params"], n=1, cutoff=0.5)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise ValueError(
                    f"{where}optimizer.{key} is not a key of DeepSpeed's optimizer section"
                    f"{hint}; DeepSpeed would ignore it silently (its keys: type, params)"
                )
        by_class = {cls.__name__: name for name, cls in OPTIMIZER_TYPES.items()}
        if kind in by_class and kind not in OPTIMIZER_TYPES:
            raise ValueError(
                f'{where}optimizer.type="{kind}" is the class name; DeepSpeed\'s JSON type is '
                f'"{by_class[kind]}" (COAP\'s types: {", ".join(OPTIMIZER_TYPES)})'
            )
        same_letters = {name.lower(): name for name in OPTIMIZER_TYPES}.get(kind.lower())
        near = difflib.get_close_matches(kind, list(OPTIMIZER_TYPES), n=1, cutoff=0.75)
        if kind not in OPTIMIZER_TYPES and (same_letters or near):
            case = " (COAP's types are case-sensitive)" if same_letters else ""
            raise ValueError(
                f'{where}optimizer.type="{kind}" is not an optimizer type{case}; did you mean '
                f'"{same_letters or near[0]}"? (COAP\'s types: {", ".join(OPTIMIZER_TYPES)})'
            )
        if kind in OPTIMIZER_TYPES:
            params = dict(opt.get("params", {}))
            sharding = params.pop("sharding", None)
            if sharding not in (None, "none"):
                raise ValueError(
                    f"{where}optimizer.params.sharding={sharding!r} is invalid under DeepSpeed: "
                    "the layout follows zero_optimization.stage (COAP's state is sharded over "
                    "the data-parallel group at stages 1-3, replicated at stage 0). Remove it, "
                    "or use stage 1-3 to shard the state"
                )
            recipe = OPTIMIZER_TYPES[kind].config_class  # type: ignore[attr-defined]
            recipe.from_mapping(params, f"{where}optimizer.params.")
    zero = config.get("zero_optimization")
    if isinstance(zero, Mapping) and zero.get("round_robin_gradients") and kind in OPTIMIZER_TYPES:
        raise ValueError(
            f"{where}zero_optimization.round_robin_gradients=true is not supported with "
            "COAP: DeepSpeed 0.19.8 reorders the flat buffer but not each parameter's "
            "fragment map, so steps would land on other parameters' elements; set it false"
        )
    clip = config.get("gradient_clipping")
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, int | float) or not clip >= 0
    ):
        raise ValueError(
            f"{where}gradient_clipping={clip!r} must be a number >= 0 (the max gradient norm; "
            "0: no clipping)"
        )
    unknown = unknown_config_keys(config)
    if unknown:
        key, near_keys = next(iter(unknown.items()))
        hint = f" (did you mean {' or '.join(near_keys)}?)" if near_keys else ""
        raise ValueError(
            f"{where}{key} is not a DeepSpeed config key{hint}; DeepSpeed would ignore it silently"
        )
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(config)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        section = next(
            (k for k, v in config.items() if isinstance(v, Mapping) and first["loc"][0] in v),
            None,
        )
        path = f"{section}.{loc}" if section else loc
        fields = _schema_fields(err.title)
        near = difflib.get_close_matches(str(first["loc"][-1]), fields, n=2)
        hint = f" (did you mean {' or '.join(near)}?)" if near else ""
        raise ValueError(f"{where}{path}: {first['msg']}{hint}") from None
    except (AssertionError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where or 'DeepSpeed config'}: {err}") from None


def _schema_fields(title: str) -> list[str]:
    """Field names (and aliases) of DeepSpeed's config model class named ``title``."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo, seen = [DeepSpeedConfigModel], []
    while todo:
        cls = todo.pop()
        if cls.__name__ == title:
            names = list(cls.model_fields)
            names += [f.alias for f in cls.model_fields.values() if f.alias]
            return sorted(set(names))
        todo.extend(cls.__subclasses__())
        seen.append(cls)
    return []


def unknown_config_keys(config: dict[str, Any]) -> dict[str, list[str]]:
    """Top-level keys of a DeepSpeed JSON config that DeepSpeed would silently ignore, each
    with the nearest known keys (``{"zero_optimisation": ["zero_optimization"]}``).

    DeepSpeed reads top-level keys one by one and never complains about the others, so a
    misspelt ``zero_optimization`` runs ZeRO stage 0. The known keys are the ones
    ``DeepSpeedConfig`` actually looks up when it parses ``config`` (recorded by a dict
    that notes every lookup), plus every key named in DeepSpeed's ``constants`` modules (read
    by components built later). Returns ``{}`` if DeepSpeed rejects ``config`` itself (its
    own error is raised at ``initialize``).
    """
    import difflib
    import importlib
    from pathlib import Path

    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    looked_up: set[str] = set()

    class _Keys:
        def __init__(self, data: dict[str, Any]) -> None:
            self.data = data

        def __contains__(self, key: object) -> bool:
            looked_up.add(str(key))
            return dict.__contains__(self.data, key)

        def __iter__(self) -> Any:
            return iter(dict.keys(self.data))

        def __len__(self) -> int:
            return dict.__len__(self.data)

    class _Recording(dict):
        def __getitem__(self, key: Any) -> Any:
            looked_up.add(str(key))
            return super().__getitem__(key)

        def get(self, key: Any, default: Any = None) -> Any:
            looked_up.add(str(key))
            return super().get(key, default)

        def __contains__(self, key: object) -> bool:
            looked_up.add(str(key))
            return super().__contains__(key)

        def keys(self) -> Any:
            return _Keys(self)

    try:
        DeepSpeedConfig(_Recording(config))
    except Exception:
        return {}
    known = set(looked_up)
    root = Path(deepspeed.__file__).parent
    for path in sorted(root.rglob("constants.py")):
        name = ".".join(("deepspeed", *path.relative_to(root).with_suffix("").parts))
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        known |= {
            v
            for k, v in vars(module).items()
            if k.isupper() and isinstance(v, str) and v.isidentifier()
        }
    return {
        key: difflib.get_close_matches(key, sorted(known), n=2)
        for key in config
        if key not in known
    }
