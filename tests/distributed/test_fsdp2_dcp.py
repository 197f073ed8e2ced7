"""FSDP2 / HSDP through ``torch.distributed.checkpoint`` (DCP), resharded: the owner layout's
form (:mod:`coap_dist.distributed.pieces`) and the default layout's 8-bit state.

One spawn at 4 ranks saves, one at 3 loads:

* 4 ranks, HSDP on a (2 replicate x 2 shard) mesh, :class:`tests.nets.ConvNet`: each
  configuration of :data:`CONFIGS` (owner layout: 8-bit state with a Tucker convolution and
  adaptive refresh; 8-bit AdamW for the convolution, which FSDP2's row shards cut inside a
  quantization block; COAP-Adafactor; plain fp32. Default layout: 8-bit matrices, rows cut on
  blocks, and the 8-bit convolution; 8-bit matrices and a Tucker convolution, whole on one
  rank, with adaptive refresh) trains :data:`SAVE_AT` steps and saves with
  ``dcp.save(get_optimizer_state_dict(...))``, next to the consolidated single-process state
  (``consolidate_state_dict``), then trains on. ``state_dict()`` enters no collective, its
  tensors are views of the live state (no copy), and the checkpoint's tensors have the
  single-process shapes. Resumed on the same mesh, the 8-bit + Tucker run continues bitwise.
* 3 ranks, FSDP2: every checkpoint loads under its layout (another world size, mesh and
  placement; the 8-bit default state also unsplit, on HSDP 3 x 1, and back) and continues next to one process that loaded the SAME DCP checkpoint and is
  fed the same gradients: weights within 2e-5 at every step (1e-3 for the default layout's
  8-bit state: :data:`TOL_8BIT_DEFAULT`). That one process's loaded state equals the
  consolidated state bitwise, so the DCP form is the single-process state exactly, and the
  resumed losses are printed next to the uninterrupted run's. Across layouts: the 8-bit
  default checkpoint under the owner layout, the plain owner checkpoint under the default
  layout and a default-layout checkpoint under the owner layout, each within 2e-5.
* ``full_state_dict=True``: a one-process full state dict loads into both layouts from rank
  0 (``broadcast_from_rank0=True``) and from every rank (without it); each layout's own full
  save (``torch.save`` on rank 0: fp32 DTensors, owner pieces with 8-bit and Tucker state,
  8-bit rows cut on blocks) resumes bitwise.
* ``flatten_optimizer_state_dict=True`` (torchtitan's): a fixed-schedule checkpoint resumes
  under both layouts as the unflattened route does (bitwise); an adaptive one is refused.
* Refusals: ``rank="auto"`` has no DCP form (its shapes are chosen during training) and
  ``state_dict()`` says so naming ``consolidate_state_dict``; ``torch.save`` of a DCP-form
  state dict raises saying how to save it; pieces of another rank are refused by name.
"""

from __future__ import annotations

import io
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import coap_dist
from coap_dist.distributed.pieces import Pieces
from coap_dist.distributed.trace import NoCollectives
from coap_dist.optim.spec import state_shapes
from tests.dist_harness import run_workers
from tests.nets import ConvNet

KW = dict(lr=1e-2, weight_decay=0.1, rank=8, update_interval=2, reproject_factor=2, scale=0.5)
CONFIGS: dict[str, dict[str, Any]] = {
    "8bit_tucker": dict(state_bits=8, rank_ratio_cnn=16.0, refresh="adaptive"),
    "8bit_dense": dict(state_bits=8),
    "adafactor": {},
    "plain": dict(refresh="adaptive"),
    "8bit_default": dict(state_bits=8),
    "tucker_default": dict(state_bits=8, rank_ratio_cnn=16.0, refresh="adaptive"),
}
"""Saved under the owner layout, except ``*_default``: under the FSDP2 default layout."""
STEPS, SAVE_AT, GLOBAL = 8, 4, 12
TOL = 2e-5
TOL_8BIT_DEFAULT = 1e-3
"""The FSDP2 default's team refresh (Gram sums) puts an 8-bit moment element on the
neighbouring code now and then (see tests/distributed/test_matrix.py)."""
WORST: list[float] = []


def _cls(name: str) -> type:
    return coap_dist.COAPAdafactor if name == "adafactor" else coap_dist.COAPAdamW


def _batch(step: int) -> torch.Tensor:
    return torch.randn(GLOBAL, 24, generator=torch.Generator().manual_seed(step))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).mean()


def _build(name: str, mesh: Any, owner: bool = True) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = ConvNet(20)
    fully_shard(model.conv, mesh=mesh)
    fully_shard(model, mesh=mesh)
    kw = {**KW, **CONFIGS[name]}
    return model, _cls(name)(model.parameters(), **kw, sharding="owner" if owner else None)


def _one_process(name: str) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = ConvNet(20)
    return model, _cls(name)(model.parameters(), **KW, **CONFIGS[name])


def _part(x: torch.Tensor, mesh: Any) -> torch.Tensor:
    """This rank's rows of the global batch (every rank of the mesh a different part)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    per = GLOBAL // world
    return x[rank * per : (rank + 1) * per]


def _train(
    model: nn.Module, opt: Any, steps: range, mesh: Any, ref: Any = None, tol: float = TOL
) -> list[float]:
    """Train; with ``ref`` (a one-process model and optimizer) feed it the full averaged
    gradients and check the weights after every step (the largest relative distance is
    appended to ``WORST``). Returns the global losses."""
    losses, worst = [], 0.0
    for step in steps:
        x = _batch(step)
        loss = _loss(model, _part(x, mesh))
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / dist.get_world_size())
        if ref is not None:
            for p, q in zip(model.parameters(), ref[0].parameters(), strict=True):
                q.grad = p.grad.full_tensor()
        opt.step()
        opt.zero_grad()
        if ref is not None:
            ref[1].step()
            ref[1].zero_grad()
            for (n, p), q in zip(model.named_parameters(), ref[0].parameters(), strict=True):
                full = p.full_tensor()
                dist_ = ((full - q).norm() / q.norm()).item()
                assert dist_ <= tol, f"step {step}: {n} is {dist_:.2e} from one process"
                worst = max(worst, dist_)
    if ref is not None:
        WORST.append(worst)
    return losses


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor() for n, p in model.named_parameters()}


def _save(model: nn.Module, opt: Any, path: str, options: Any = None) -> None:
    optim = get_optimizer_state_dict(model, opt, options=options)
    dcp.save({"model": get_model_state_dict(model), "optim": optim}, checkpoint_id=path)


def _load(model: nn.Module, opt: Any, path: str, options: Any = None) -> None:
    optim = get_optimizer_state_dict(model, opt, options=options)
    sd = {"model": get_model_state_dict(model), "optim": optim}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"], options=options)


def _load_one_process(name: str, path: str) -> tuple[nn.Module, Any]:
    """A one-process model and optimizer loaded from the DCP checkpoint (on every rank)."""
    model, opt = _one_process(name)
    sd = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    model.load_state_dict(sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    return model, opt


def _check_form(opt: Any, ref: Any, sharded: bool = True) -> None:
    """The DCP form: no collective, views of the live state, single-process shapes (pieces
    where the state is ``sharded``)."""
    with NoCollectives():
        sd = opt.state_dict()
    pieces = 0
    for i, st in sd["state"].items():
        want = state_shapes(ref.specs[i])
        for k, v in st.items():
            if k.startswith("refresh_"):
                continue
            assert tuple(v.shape) == tuple(want[k][0]), (i, k, v.shape, want[k])
            if isinstance(v, Pieces):
                pieces += 1
                live = opt.state[opt.layout.params[i]][k]
                assert v.unwrap().data_ptr() == live.data_ptr(), "a piece must be a view"
    assert bool(pieces) == sharded, f"{pieces} pieces (sharded: {sharded})"
    if sharded:  # (pieces are not tensors torch.save can write)
        with pytest.raises(RuntimeError, match=r"torch\.distributed\.checkpoint"):
            torch.save(sd, io.BytesIO())


def _phase_save(rank: int, world: int, tmp: str) -> None:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for name in CONFIGS:
        owner = not name.endswith("_default")
        model, opt = _build(name, mesh, owner)
        losses = _train(model, opt, range(SAVE_AT), mesh)
        assert opt.layout.name == ("fsdp2_owner" if owner else "fsdp2") and opt.layout.world == 2
        _save(model, opt, os.path.join(tmp, name))
        if name == "8bit_tucker":
            _check_form(opt, _bind(_one_process(name)))
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            torch.save(opt.state_dict(), os.path.join(tmp, f"{name}.consolidated.pt"))
        losses += _train(model, opt, range(SAVE_AT, STEPS), mesh)
        final = _full(model)
        if rank == 0:
            torch.save({"weights": final, "losses": losses}, os.path.join(tmp, f"{name}.final.pt"))
        if name == "8bit_tucker":  # same mesh: bitwise
            model2, opt2 = _build(name, mesh)
            _load(model2, opt2, os.path.join(tmp, name))
            _train(model2, opt2, range(SAVE_AT, STEPS), mesh)
            for n, p in _full(model2).items():
                assert torch.equal(p, final[n]), f"same-mesh DCP resume differs at {n}"
    # rank="auto": no DCP form, refused by name before anything is written.
    model, _ = _build("plain", mesh)
    kw = {**KW, "rank": "auto", "rank_ratio": 4}
    opt = coap_dist.COAPAdamW(model.parameters(), **kw, sharding="owner")
    _train(model, opt, range(1), mesh)
    with NoCollectives(), pytest.raises(RuntimeError, match=r"rank='auto'.*consolidate_state_dict"):
        opt.state_dict()


def _bind(ref: tuple[nn.Module, Any]) -> Any:
    """The one-process optimizer after one zero-gradient step at lr 0 (its plan bound)."""
    get_optimizer_state_dict(ref[0], ref[1])
    return ref[1]


def _phase_load(rank: int, world: int, tmp: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    for name in CONFIGS:
        path = os.path.join(tmp, name)
        saved = torch.load(os.path.join(tmp, f"{name}.final.pt"), weights_only=True)
        default = name.endswith("_default")
        model, opt = _build(name, mesh, owner=not default)
        _load(model, opt, path)
        ref = _load_one_process(name, path)
        consolidated = torch.load(os.path.join(tmp, f"{name}.consolidated.pt"), weights_only=True)
        _check_equal(ref[1].state_dict(), consolidated, name)
        tol = TOL_8BIT_DEFAULT if default else TOL
        losses = _train(model, opt, range(SAVE_AT, STEPS), mesh, ref, tol)
        uninterrupted = saved["losses"][SAVE_AT:]
        if rank == 0:
            print(
                f"\n{name}: HSDP 4 -> FSDP2 3 ranks: distance from one process "
                f"{WORST[-1]:.1e}; losses {losses} vs uninterrupted {uninterrupted}"
            )
        gap = max(abs(a / b - 1) for a, b in zip(losses, uninterrupted, strict=True))
        assert gap < (1e-3 if default else 1e-5), (name, losses, uninterrupted)
    # Across layouts: 8-bit default -> owner; owner -> default; default -> owner.
    path = os.path.join(tmp, "8bit_default")
    model, opt = _build("8bit_default", mesh)
    _load(model, opt, path)
    _train(model, opt, range(SAVE_AT, STEPS), mesh, _load_one_process("8bit_default", path))
    if rank == 0:
        print(f"8-bit default (HSDP 4) -> owner (3): {WORST[-1]:.1e}")
    model, opt = _build("plain", mesh, owner=False)
    _load(model, opt, os.path.join(tmp, "plain"))
    assert opt.layout.name == "fsdp2"
    ref = _load_one_process("plain", os.path.join(tmp, "plain"))
    _train(model, opt, range(SAVE_AT, STEPS), mesh, ref)
    path = os.path.join(tmp, "default")
    _save(model, opt, path)
    model, opt = _build("plain", mesh)
    _load(model, opt, path)
    _train(model, opt, range(STEPS, STEPS + 4), mesh, _load_one_process("plain", path))
    if rank == 0:
        print(f"owner -> default: {WORST[-2]:.1e}; default -> owner: {WORST[-1]:.1e}")
    _check_foreign(opt)
    _check_flattened(mesh, tmp)
    _check_full(mesh, tmp)
    # The default layout's 8-bit state unsplit (HSDP, 3 replicas of 1 shard: every scale
    # whole) has the same DCP form: the HSDP-4 checkpoint loads into it, its own save loads
    # back into 3 shards.
    replicas = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    model, opt = _build("8bit_default", replicas, owner=False)
    path = os.path.join(tmp, "8bit_default")
    _load(model, opt, path)
    assert opt.layout.name == "fsdp2" and opt.layout.world == 1
    ref = _load_one_process("8bit_default", path)
    _train(model, opt, range(SAVE_AT, STEPS), replicas, ref, TOL_8BIT_DEFAULT)
    _check_form(opt, ref[1], sharded=False)
    path = os.path.join(tmp, "8bit_unsplit")
    _save(model, opt, path)
    model, opt = _build("8bit_default", mesh, owner=False)
    _load(model, opt, path)
    ref = _load_one_process("8bit_default", path)
    _train(model, opt, range(STEPS, STEPS + 4), mesh, ref, TOL_8BIT_DEFAULT)
    if rank == 0:
        print(f"8-bit default: HSDP 4 -> 3 x 1 -> FSDP2 3: {WORST[-2]:.1e}, {WORST[-1]:.1e}")


def _check_flattened(mesh: Any, tmp: str) -> None:
    """DCP's ``StateDictOptions(flatten_optimizer_state_dict=True)`` (torchtitan's setting):
    it drops the state dict's top-level records on save and rebuilds each parameter's entry
    from the loading optimizer's live keys, so an owner-layout rank gets no entry (no step
    count) for a parameter it holds no piece of. A fixed-schedule checkpoint resumes under
    both layouts bitwise equal to the unflattened route; an adaptive one (refresh records
    lost) is refused by name, leaving the optimizer loadable."""
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    path = os.path.join(tmp, "8bit_dense")
    finals = []
    for owner in (True, False):
        for options in (None, flat):
            model, opt = _build("8bit_dense", mesh, owner)
            _load(model, opt, path)  # (the checkpoint saved at 4 ranks, unflattened)
            _train(model, opt, range(SAVE_AT, SAVE_AT + 2), mesh)
            again = os.path.join(tmp, f"flat_{options is not None}_{owner}")
            _save(model, opt, again, options)
            model, opt = _build("8bit_dense", mesh, owner)
            _load(model, opt, again, options)
            _train(model, opt, range(SAVE_AT + 2, STEPS), mesh)
            finals.append(_full(model))
    for plain, flattened in (finals[0:2], finals[2:4]):  # owner, default layout
        for n, p in flattened.items():
            assert torch.equal(p, plain[n]), f"flattened DCP resume differs at {n}"
    model, opt = _build("plain", mesh)  # refresh="adaptive"
    _load(model, opt, os.path.join(tmp, "plain"))
    _save(model, opt, os.path.join(tmp, "flat_adaptive"), flat)
    model, opt = _build("plain", mesh)
    with pytest.raises(ValueError, match=r"refresh='adaptive'.*flatten_optimizer_state_dict"):
        _load(model, opt, os.path.join(tmp, "flat_adaptive"), flat)
    _load(model, opt, os.path.join(tmp, "plain"))  # the refusal changed nothing
    _train(model, opt, range(SAVE_AT, SAVE_AT + 1), mesh)


def _check_full(mesh: Any, tmp: str) -> None:
    """``StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)`` (accelerate's
    FULL_STATE_DICT load, torchtune's): a one-process optimizer's full state dict, held by
    rank 0 only, loads into both FSDP2 layouts and trains on next to that process; so does
    the same dict held by every rank, without the broadcast."""
    path = os.path.join(tmp, "plain")
    full = StateDictOptions(full_state_dict=True)
    bcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for owner, options in ((True, bcast), (False, bcast), (True, full), (False, full)):
        # full: every rank holds the whole dict (torch hands each rank every 0-d entry,
        # so each rank's own state dict must name every one of them)
        ref = _load_one_process("plain", path)
        sd = get_optimizer_state_dict(ref[0], ref[1], options=full)
        model, opt = _build("plain", mesh, owner)
        _load(model, opt, path)  # (the weights; the optimizer's state is replaced next)
        given = sd if dist.get_rank() == 0 or options is full else {}
        set_optimizer_state_dict(model, opt, given, options=options)
        _train(model, opt, range(SAVE_AT, SAVE_AT + 2), mesh, ref)
    # A full save (accelerate's and the HF Trainer's FULL_STATE_DICT: torch gathers DTensors
    # only, COAP gathers its own state when torch's gather calls state_dict()), torch.save on
    # rank 0, loads back by broadcast and continues bitwise: the default layout's fp32
    # DTensors; the owner layout's pieces (8-bit, a Tucker convolution, adaptive records); the
    # default layout's 8-bit rows cut on blocks with a Tucker convolution whole on one rank,
    # without cpu_offload (then every rank gets the whole dict, as torch's gather gives).
    n_params = len(list(model.parameters()))
    for name, owner, cpu in (
        ("plain", False, True),
        ("8bit_tucker", True, True),
        ("tucker_default", False, False),
    ):
        if name != "plain":
            model, opt = _build(name, mesh, owner)
            _load(model, opt, os.path.join(tmp, name))
            _train(model, opt, range(SAVE_AT, SAVE_AT + 2), mesh)
        options = StateDictOptions(full_state_dict=True, cpu_offload=cpu)
        saved = (
            get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, opt, options=options),
        )
        holds = dist.get_rank() == 0 or not cpu  # (with cpu_offload the others' are empty)
        assert len(saved[1].get("state", {})) == (n_params if holds else 0), name
        buf = io.BytesIO()
        torch.save(saved, buf)
        loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        model2, opt2 = _build(name, mesh, owner)
        set_model_state_dict(model2, loaded[0], options=bcast)
        set_optimizer_state_dict(model2, opt2, loaded[1], options=bcast)
        for m, o in ((model, opt), (model2, opt2)):
            _train(m, o, range(SAVE_AT + 2, SAVE_AT + 4), mesh)
        uninterrupted = _full(model)
        for n, p in _full(model2).items():
            assert torch.equal(p, uninterrupted[n]), f"{name}: full-state resume differs at {n}"


def _check_foreign(opt: Any) -> None:
    """Pieces at other offsets than this rank's (another rank's): refused naming them,
    before any state changes."""
    sd = opt.state_dict()
    for st in sd["state"].values():
        for k, v in st.items():
            if isinstance(v, Pieces):
                moved = (torch.Size([1] * v.ndim), v.unwrap())
                st[k] = Pieces(v.shape, v.unwrap(), [moved])
                with pytest.raises(ValueError, match="are not this rank's"):
                    opt.load_state_dict(sd)
                return
    raise AssertionError("no piece on this rank")


def _check_equal(a: dict[str, Any], b: dict[str, Any], name: str) -> None:
    assert a["state"].keys() == b["state"].keys(), name
    for i, st in a["state"].items():
        for k, v in st.items():
            if k.startswith("refresh_") and k not in b["state"][i]:
                continue
            w = b["state"][i][k]
            assert torch.equal(v, w), f"{name}: DCP-loaded `{k}` of parameter {i} differs"


@pytest.mark.distributed
def test_fsdp2_owner_dcp_save_on_hsdp_4_resume_on_3(tmp_path: os.PathLike[str]) -> None:
    tmp = str(tmp_path)
    run_workers(_phase_save, 4, tmp)
    run_workers(_phase_load, 3, tmp)
