"""Device discipline on a machine without a GPU: every tensor a step hands to a collective
lives on the parameters' device, and a step synchronises with the host at most once.

NCCL accepts device tensors only, so a buffer created on the default (CPU) device crashes
there although gloo takes it. The tests below put the parameters on the ``meta`` device and
run the optimizer over torch's fake process group (world size 4: collectives are accepted and
move nothing), which is device-faithful in both respects that matter:

* an op mixing a CPU tensor with a meta tensor raises, and every c10d operator is recorded
  with the device of its tensors (a flag vector made with ``torch.zeros(n)``, as before this
  layer was written, shows up as ``cpu``);
* a meta tensor has no values: ``.item()`` / ``bool()`` on one is refused here, and the one
  device-to-host copy a step may make (the flag vector) is counted and answered with scripted
  values ("every gradient present, finite, non-zero").

(``FakeTensorMode`` with fake CUDA tensors would be the other choice, but this CPU build of
torch refuses Python indexing of fake CUDA tensors: its device guard needs CUDA.)
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

import coap_dist

WORLD = 4
KW = dict(lr=1e-2, rank=4, update_interval=2, reproject_factor=2, rank_ratio_cnn=2.0)


class HostWatch(TorchDispatchMode):
    """Records the devices of collective tensors, counts device-to-host copies (answering
    the flag vector as all-present, finite, non-zero, or with ``late_disagreements`` a late
    read of summed flags as that many presence disagreements) and refuses scalar reads of
    device tensors."""

    def __init__(self, late_disagreements: float = 0.0) -> None:
        super().__init__()
        self.late_disagreements = late_disagreements  # answered to a late flag read
        self.devices: set[str] = set()
        self.collectives: list[str] = []
        self.syncs = 0
        self.uploads = 0  # host-to-device copies (each a stream synchronisation on CUDA)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("c10d::"):
            self.collectives.append(name.split("::", 1)[1])
            for a in args:
                for t in a if isinstance(a, (list, tuple)) else [a]:
                    if isinstance(t, torch.Tensor):
                        self.devices.add(t.device.type)
            return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type != "cpu":
            raise AssertionError("a host synchronisation (.item() / bool()) on a device tensor")
        if (
            func is torch.ops.aten.copy_.default
            and args[1].device.type == "meta"
            and args[0].device.type == "cpu"
        ):
            self.syncs += 1  # a device-to-host copy into an existing tensor (no values)
            return args[0].zero_()
        to = kwargs.get("device")
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" and to:
            self.uploads += torch.device(to).type == "meta"
        if (
            func is torch.ops.aten.copy_.default
            and args[0].device.type == "meta"
            and args[1].device.type == "cpu"
            and args[1].ndim
        ):
            self.uploads += 1
        if (
            func is torch.ops.aten._to_copy.default
            and args[0].device.type == "meta"
            and kwargs.get("device") == torch.device("cpu")
        ):
            self.syncs += 1
            x = args[0]
            n = (x.numel() - 1) // 5  # the flag vector: 3 per parameter, 2 per parameter + 1
            values = [1.0, 0.0, 1.0] * n + [0.0] * (x.numel() - 3 * n)
            if self.late_disagreements:  # a late read: [keep-old count, disagreements, ...]
                values = [0.0, self.late_disagreements] + [0.0] * (x.numel() - 2)
            return torch.tensor(values[: x.numel()], dtype=x.dtype).view(x.shape)
        return func(*args, **kwargs)


def _params(conv: bool = False) -> list[nn.Parameter]:
    shapes = [(384, 96), (96, 24), (32, 96), (20, 32), (96,), (20,)]
    if conv:
        shapes.append((64, 48, 3, 3))  # Tucker-projected, whole on one rank
    return [nn.Parameter(torch.empty(s, device="meta")) for s in shapes]


def _steps(
    opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = 6
) -> list[HostWatch]:
    """k = 0 (init), 1, 2 (update), 3, 4 (recalibration), 5 with every gradient present."""
    watches = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        with HostWatch() as watch:
            opt.step()
            opt.metrics()
        watches.append(watch)
    return watches


def _check(watches: list[HostWatch], what: str) -> None:
    """Collectives on the device, one host read per step, and no host-to-device copy at
    the plain and update steps (k = 1, 2, 3, 5; the first step and the recalibration copy
    the seeded Gaussian sketch, drawn on the host to be the same on every device)."""
    for k, w in enumerate(watches):
        assert w.devices == {"meta"}, f"{what} step {k}: collective tensors on {w.devices}"
        assert w.syncs == 1, f"{what} step {k}: {w.syncs} host synchronisations"
        assert w.collectives, f"{what} step {k}: no collective (not distributed?)"
        if k not in (0, 4):
            assert w.uploads == 0, f"{what} step {k}: {w.uploads} host-to-device copies"


@pytest.fixture()
def fake_group() -> Any:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_owner_layouts_keep_buffers_on_the_parameters_device(fake_group: Any) -> None:
    """DDP owner layout (matrices whole and split over teams, Tucker convs, 8-bit state,
    power iterations and oversampling in team refreshes) and COAPAdafactor (team sums)."""
    for name, cls, kw, conv in (
        ("COAPAdamW", coap_dist.COAPAdamW, dict(KW, oversample=2, power_iters=1), False),
        ("COAPAdamW 8-bit + conv", coap_dist.COAPAdamW, dict(KW, state_bits=8), True),
        ("COAPAdafactor", coap_dist.COAPAdafactor, dict(KW), False),
    ):
        params = _params(conv)
        opt = cls(params, **kw, sharding="owner")
        with HostWatch():
            lay = opt.layout  # binding compares settings across ranks (one all-gather)
        if not conv:
            split = [
                i
                for i, s in enumerate(opt.specs)
                if s.kind == "matrix" and not lay.placement.whole(i)
            ]
            assert split, f"{name}: no team at {WORLD} ranks"
        _check(_steps(opt, params), name)
        with HostWatch() as watch:
            opt.state_bytes()
        assert not watch.collectives and watch.syncs == 0


def test_fsdp2_layouts_keep_buffers_on_the_parameters_device(fake_group: Any) -> None:
    """FSDP2's default (canonical-row shards: projector shards and left gradient blocks in one
    all-to-all, left directions all-gathered, refresh reduce-scatter / all-gather) and owner layouts; the DTensor state dict is built without a collective."""
    mesh = init_device_mesh("cpu", (WORLD,))
    for sharding in (None, "owner"):
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(24, 96), nn.Tanh(), nn.Linear(96, 32), nn.LayerNorm(32))
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        opt = coap_dist.COAPAdamW(params, **dict(KW, rank_ratio_cnn=None), sharding=sharding)
        with HostWatch():
            assert opt.layout.name == ("fsdp2" if sharding is None else "fsdp2_owner")
        watches = _steps(opt, params)
        _check(watches, f"FSDP2 sharding={sharding}")
        if sharding is None:
            _check_fsdp2_features(mesh)
            # flags; P rows and the left 32 x 96 matrix's gradient blocks; its directions
            assert watches[1].collectives == ["allreduce_", "alltoall_base_", "_allgather_base_"]
            with HostWatch() as watch:
                sd = opt.state_dict()
            assert not watch.collectives and watch.syncs == 0
            assert all(
                v.device.type == "meta"
                for st in sd["state"].values()
                for v in st.values()
                if isinstance(v, torch.Tensor) and v.ndim
            )


def _check_fsdp2_features(mesh: Any) -> None:
    """8-bit state and a Tucker convolution under the FSDP2 default: matrices whose 8-bit
    moment rows are cut on quantization blocks (two right-projected, so their rows move
    between neighbours, one left), 5,000-element 8-bit AdamW vectors whose shards cut a block
    and a Tucker-projected convolution whole on one rank: a plain step is the flag
    all-reduce, one all-to-all (projector rows, moved gradient rows, the convolution's
    shards to its holder), one all-gather of the moved directions, one MAX all-reduce of the
    shared blocks and one all-to-all of the convolution's update rows, as
    ``routes.local_plain_step_traffic`` predicts; the state dict (DTensors, Pieces and the
    holder's plain tensors) is built without a collective."""
    from coap_dist.distributed.pieces import Pieces
    from coap_dist.distributed.routes import local_plain_step_traffic

    with torch.device("meta"):
        model = nn.Sequential(
            nn.Linear(64, 2048), nn.Tanh(), nn.Linear(2048, 5000), nn.LayerNorm(5000),
            nn.Linear(5000, 96), nn.Unflatten(1, (24, 2, 2)), nn.Conv2d(24, 48, 3, padding=1),
        )  # fmt: skip
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    opt = coap_dist.COAPAdamW(params, **dict(KW, state_bits=8))
    with HostWatch():
        lay = opt.layout  # binding compares settings across ranks (one all-gather)
    watches = _steps(opt, params)
    _check(watches, "FSDP2 default, 8-bit + Tucker")
    assert lay.name == "fsdp2", lay.name
    shared = [(3, 0), (4, 0), (5, 0)]  # the 5,000-element bias, LayerNorm weight and bias
    assert (sorted(lay._moved), lay._shared) == ([0, 2, 6], shared), (lay._moved, lay._shared)
    assert [s.kind for s in opt.specs].count("conv") == 1 and len(lay._conv_holder) == 1
    plain = sorted(watches[1].collectives)
    kinds = ["allreduce_", "alltoall_base_", "_allgather_base_", "allreduce_", "alltoall_base_"]
    assert plain == sorted(kinds), plain
    assert len(plain) == local_plain_step_traffic(opt.specs, WORLD, torch.float32)[0].calls
    with HostWatch() as watch:
        sd = opt.state_dict()
    assert not watch.collectives and watch.syncs == 0
    assert any(isinstance(v, Pieces) for st in sd["state"].values() for v in st.values())


class SpectrumWatch(HostWatch):
    """:class:`HostWatch` that answers ``rank="auto"``'s fp64 read of the matrices'
    spectra with a slowly decaying one, so that the first matrix's rank grows."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if (
            func is torch.ops.aten._to_copy.default
            and args[0].device.type == "meta"
            and kwargs.get("device") == torch.device("cpu")
            and args[0].dtype == torch.float64
        ):
            self.syncs += 1
            x = args[0]
            values = [1.0 / (1 + 0.01 * j) for j in range(16)] + [0.0] * x.numel()
            return torch.tensor(values[: x.numel()], dtype=x.dtype).view(x.shape)
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_fsdp2_auto_rank_changes_stay_on_the_device(fake_group: Any) -> None:
    """``rank="auto"`` under FSDP2's default layout: the re-plan of the first step grows one
    matrix's rank and shrinks the others' (P's new rows are drawn on the host, the whole P
    assembled on the device: the grown P is built on the host with the moments, then stored)
    and the steps after it stay on the device."""
    mesh = init_device_mesh("cpu", (WORLD,))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 128), nn.Linear(128, 64))
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    kw = dict(lr=1e-2, rank="auto", rank_ratio=8, update_interval=2, reproject_factor=2)
    opt = coap_dist.COAPAdamW(params, **kw)
    with HostWatch():
        assert opt.layout.name == "fsdp2"
    fixed = [s.rank for s in opt.specs if s.kind == "matrix"]
    for p in params:
        p.grad = torch.ones_like(p)
    with SpectrumWatch():
        opt.step()
    ranks = [s.rank for s in opt.specs if s.kind == "matrix"]
    assert ranks[0] > fixed[0] and ranks[1:] < fixed[1:], (fixed, ranks)
    st = opt.state[params[0]]
    assert st["projector"].device.type == st["exp_avg"].device.type == "meta"
    for k, w in enumerate(_steps(opt, params, 3), start=1):
        assert w.devices == {"meta"} and w.syncs == 1 and w.uploads == 0, (k, w.devices)


def test_host_state_collectives_run_on_the_transport_device(fake_group: Any) -> None:
    """Host state whose process group takes device buffers only (DeepSpeed
    ``offload_optimizer`` on NCCL): every collective of ``Comm`` runs on its transport device
    (meta here) and each result comes back to the host, in place for an all-reduce; a gloo
    (here fake) group keeps the host."""
    from coap_dist.distributed.comm import Comm, Expect, transport_device

    cpu = torch.device("cpu")
    assert transport_device(None, cpu) == cpu
    comm = Comm(None, cpu, transport=torch.device("meta"))
    flags = torch.ones(11)
    with HostWatch() as watch:
        comm.all_reduce(flags)
        gathered = comm.all_gather(torch.ones(3))
        summed = comm.reduce_scatter(torch.ones(8))
        expects = {q: [Expect((2, 3), torch.float32)] for q in range(1, WORLD)}
        got = comm.exchange({1: [torch.ones(5)]}, expects, needed=True)
    assert watch.devices == {"meta"}, watch.devices
    assert watch.collectives == ["allreduce_", "_allgather_base_", "_reduce_scatter_base_",
                                 "alltoall_base_"]  # fmt: skip
    assert watch.syncs == 4, "one copy back per collective"
    assert flags.device == gathered.device == summed.device == cpu
    assert gathered.shape == (3 * WORLD,) and summed.shape == (2,)
    assert all(t.device == cpu and t.shape == (2, 3) for q in expects for t in got[q])


def test_unchecked_steps_make_no_host_sync(fake_group: Any) -> None:
    """``skip_nonfinite=False`` on layouts whose wrapper gives every rank the same gradients
    (DDP owner, FSDP2 default and owner): after the first step, plain steps, updates and
    recalibrations make no host synchronisation (the flag vector is still summed on the
    device, one collective); ``metrics()`` reads it once. Where the ranks' gradients may
    differ (each rank's own gradients, ZeRO-2 semantics) every step still agrees on the host.
    A late read that finds the ranks stepped different parameters raises, naming the fix,
    and the optimizer refuses to step or save on from there."""
    from coap_dist.distributed.owner import OwnerSharding

    mesh = init_device_mesh("cpu", (WORLD,))
    cases: list[tuple[str, Any, int]] = [("ddp_owner", "owner", 0)]
    for sharding in (None, "owner"):
        cases.append((f"fsdp2 {sharding}", sharding, 0))
    cases.append(("own gradients", OwnerSharding(reduce_gradients=True), 1))
    for what, sharding, later in cases:
        if what.startswith("fsdp2"):
            with torch.device("meta"):
                model = nn.Sequential(nn.Linear(24, 96), nn.Tanh(), nn.Linear(96, 32))
            fully_shard(model, mesh=mesh)
            params = list(model.parameters())
        else:
            params = _params()
        opt = coap_dist.COAPAdamW(
            params, **dict(KW, rank_ratio_cnn=None), sharding=sharding, skip_nonfinite=False
        )
        with HostWatch():
            assert opt.layout.uniform_grads == (later == 0), what
        watches = []
        for _ in range(6):  # k = 0 (init), 2 (update), 4 (recalibration) refresh
            for p in params:
                p.grad = torch.ones_like(p)
            with HostWatch() as watch:
                opt.step()
            watches.append(watch)
        assert [w.syncs for w in watches] == [1] + [later] * 5, (what, [w.syncs for w in watches])
        assert all(w.collectives[0] == "allreduce_" for w in watches), what
        with HostWatch() as watch:
            assert opt.metrics()["optim/refreshes"] > 0
        assert watch.syncs == 1 - later, what
        if what == "ddp_owner":
            for p in params:
                p.grad = torch.ones_like(p)
            with HostWatch(late_disagreements=1.0):
                opt.step()
                with pytest.raises(RuntimeError, match="a gradient on some ranks only"):
                    opt.metrics()
            for call in (opt.step, opt.state_dict):  # the ranks' states differ from now on
                with pytest.raises(RuntimeError, match="stepped different parameters in earl"):
                    call()
