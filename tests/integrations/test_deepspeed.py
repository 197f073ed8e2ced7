"""DeepSpeed ``"optimizer": {"type": "COAP"}`` under ZeRO stages 0-3, fp32 and bf16 (CPU, gloo).

ONE spawn of 2 processes builds every engine below in turn, in the same process group, from a
JSON-style config that names the optimizer only by ``"type": "COAP"`` (no
``zero_allow_untested_optimizer``), with ``model_parameters=model.parameters()``:

    stage 0 fp32 | stage 0 bf16 (FP16_UnfusedOptimizer) | stage 0 fp32 with 8-bit state and a
    Tucker conv, "rank": "auto", "refresh": "adaptive", COAPAdafactor, accumulation 2
    | stage 1 fp32 | stage 1 bf16
    stage 1 bf16 + fp32 gradient accumulation (BF16_Optimizer) | stage 2 fp32
    stage 2 bf16 with gradient_accumulation_steps=2 | stage 3 fp32 | stage 3 bf16 under zero.Init
    stage 2 fp32 with "type": "COAPAdafactor" | stage 2 fp32 with "refresh": "adaptive"
    stage 3 fp32 with "rank": "auto"
    stage 2 fp32 with "rank_ratio_cnn" (a Tucker convolution)
    stages 2 and 3 fp32 with "state_bits": 8 and "rank_ratio_cnn"
    stage 3 fp32 with "state_bits": 8 alone (the convolution is an 8-bit AdamW parameter that
    the stage-3 partition cuts inside a quantization block)
    stage 2 fp32 with offload_optimizer cpu | stage 3 fp32 with offload_optimizer and
    offload_param cpu (ZeRO-Offload: COAP steps the host partitions; both resume)

For each: the loss falls (COAPAdamW); every COAP matrix has state on exactly one rank (stages 1-3) or on
every rank (stage 0) with low-rank shapes, ``step`` equal to the number of optimizer steps (not
micro-steps) and the expected number of projector refreshes (catches silent no-ops); per-rank
optimizer-state bytes are below 60% of AdamW's under the same stage (fp32 moments on the fp32
master partition: 8 bytes per element held); the trajectory matches single-process COAPAdamW on
the rank-averaged gradient (fp32: weights to rtol 1e-4 / atol 1e-5 after 8 steps; bf16: losses
to rtol 5e-2). Selected configs also save a checkpoint at step 4 with ``engine.save_checkpoint``,
load it into a fresh engine and check that 4 more steps reproduce the uninterrupted run. Invalid
setups (an explicit ``sharding``, ``round_robin_gradients``, an unknown JSON key) must fail
with an error naming them, a frozen layer in ``model.parameters()`` must train as one process
does at stages 1-3, and every shipped ``configs/deepspeed/*.json`` must initialize and step. The adaptive case also
checks that both ranks took the same refresh decisions (and, through the trajectory, the same
as one process) and resumes from its ZeRO checkpoint (``coap_refresh`` in each rank's file);
the auto-rank case checks that both ranks chose the same ranks, some other than the fixed
ones, the state of each matrix at its chosen rank, and resumes (``coap_ranks`` in each
rank's file) into the same ranks. The Tucker and 8-bit cases train a network with a
Tucker-2 projected convolution and two matrices whose moments are 8-bit under
``state_bits=8``: the weights of one process to the same tolerance, and (8-bit) a resume
that continues the uninterrupted run.

DeepSpeed JIT-compiles a shared-memory collective op on the first CPU ``initialize`` (minutes;
cached in ``TORCH_EXTENSIONS_DIR``). These tests use the cached op when it is there and
otherwise skip building it (gloo carries every collective, which is all this test needs), so a
cold cache costs nothing here. Set ``COAP_TEST_DS_BUILD_SHM=1`` to force the build.
``COAP_TEST_DS_CASES=stage2-fp32,stage3-fp32`` runs a subset (when debugging).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import coap_dist
from coap_dist.distributed.routes import bound_bytes
from coap_dist.distributed.trace import count_steps, merged
from coap_dist.train.optim import innermost
from tests.dist_harness import run_workers
from tests.nets import ConvNet

KW = dict(lr=1e-2, weight_decay=0.1, rank=8, update_interval=2, reproject_factor=2, scale=0.5)
AUTO = dict(rank="auto", rank_ratio=4)
EIGHT_TUCKER = dict(state_bits=8, rank_ratio_cnn=16.0)
STEPS = 8  # refreshes at k = 0, 2, 4 (recalibration), 6
REFRESHES = 4
SAVE_AT = 4
WORLD = 2
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "deepspeed")
MICRO = 4  # rows per micro-batch per rank

# (label, zero stage, bf16, extra config, zero.Init, checkpoint round-trip)
OFFLOAD_2 = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
OFFLOAD_3 = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
"""ZeRO-Offload: the fp32 partitions, their gradients and COAP's state on the host."""
CASES: list[tuple[str, int, bool, dict[str, Any], bool, bool]] = [
    ("stage0-fp32", 0, False, {}, False, False),
    ("stage0-bf16", 0, True, {}, False, True),
    (
        "stage0-fp32-8bit-tucker",
        0,
        False,
        {"optimizer": {"type": "COAP", "params": {**KW, **EIGHT_TUCKER}}},
        False,
        True,
    ),
    (
        "stage0-fp32-auto-rank",
        0,
        False,
        {"optimizer": {"type": "COAP", "params": {**KW, **AUTO}}},
        False,
        False,
    ),
    (
        "stage0-fp32-adaptive",
        0,
        False,
        {"optimizer": {"type": "COAP", "params": {**KW, "refresh": "adaptive"}}},
        False,
        False,
    ),
    (
        "stage0-fp32-adafactor",
        0,
        False,
        {"optimizer": {"type": "COAPAdafactor", "params": KW}},
        False,
        False,
    ),
    ("stage0-fp32-ga2", 0, False, {"gradient_accumulation_steps": 2}, False, False),
    ("stage1-fp32", 1, False, {}, False, False),
    ("stage1-bf16", 1, True, {}, False, False),
    ("stage1-bf16-fp32acc", 1, True, {"data_types": {"grad_accum_dtype": "fp32"}}, False, True),
    ("stage2-fp32", 2, False, {}, False, True),
    ("stage2-fp32-offload", 2, False, {"zero_optimization": OFFLOAD_2}, False, True),
    ("stage3-fp32-offload", 3, False, {"zero_optimization": OFFLOAD_3}, False, True),
    ("stage2-bf16-ga2", 2, True, {"gradient_accumulation_steps": 2}, False, False),
    (
        "stage2-fp32-adafactor",
        2,
        False,
        {"optimizer": {"type": "COAPAdafactor", "params": KW}},
        False,
        False,
    ),
    (
        "stage2-fp32-adaptive",
        2,
        False,
        {"optimizer": {"type": "COAP", "params": {**KW, "refresh": "adaptive"}}},
        False,
        True,
    ),
    ("stage3-fp32", 3, False, {}, False, False),
    (
        "stage3-fp32-auto-rank",
        3,
        False,
        {"optimizer": {"type": "COAP", "params": {**KW, **AUTO}}},
        False,
        True,
    ),
    ("stage3-bf16-zero-init", 3, True, {}, True, True),
    (
        "stage2-fp32-8bit-tucker",
        2,
        False,
        {"optimizer": {"type": "COAP", "params": {**KW, **EIGHT_TUCKER}}},
        False,
        True,
    ),
    (
        "stage2-fp32-tucker",
        2,
        False,
        {"optimizer": {"type": "COAP", "params": {**KW, "rank_ratio_cnn": 16.0}}},
        False,
        False,
    ),
    (
        "stage3-fp32-8bit-dense",
        3,
        False,
        {"optimizer": {"type": "COAP", "params": {**KW, "state_bits": 8}}},
        False,
        True,
    ),
    (
        "stage3-fp32-8bit-tucker",
        3,
        False,
        {"optimizer": {"type": "COAP", "params": {**KW, **EIGHT_TUCKER}}},
        False,
        True,
    ),
]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 64)
        self.fc2 = nn.Linear(64, 48)
        self.norm = nn.LayerNorm(48)
        self.fc3 = nn.Linear(48, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.norm(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))


def _model(conv: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return ConvNet(40) if conv else _Net()


def _uses_conv(extra: dict[str, Any]) -> bool:
    params = extra.get("optimizer", {}).get("params", {})
    return "rank_ratio_cnn" in params or params.get("state_bits") == 8


_TEACHER = torch.randn(24, 40, generator=torch.Generator().manual_seed(123)) / 24**0.5


def _batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch of rank ``rank``: inputs and a learnable (linear teacher) target."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    x = torch.randn(MICRO, 24, generator=g)
    return x, x @ _TEACHER


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return (model(x.to(dtype)).float() - y).square().mean()


def _config(stage: int, bf16: bool, extra: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,  # the single-process reference does not clip
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "COAP", "params": dict(KW)},
        "steps_per_print": 1 << 30,
    }
    cfg.update(extra)
    cfg["train_batch_size"] = MICRO * WORLD * cfg["gradient_accumulation_steps"]
    return cfg


def _coap(engine: Any) -> Any:
    """The COAP optimizer inside the engine's ZeRO / mixed-precision wrappers."""
    return innermost(engine.optimizer)


def _build(stage: int, bf16: bool, extra: dict[str, Any], zero_init: bool) -> Any:
    import deepspeed

    cfg = _config(stage, bf16, extra)
    if zero_init:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = _model(_uses_conv(extra))
    else:
        model = _model(_uses_conv(extra))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=cfg, dist_init_required=False
    )
    return engine


def _train(engine: Any, rank: int, steps: range) -> list[float]:
    losses = []
    ga = engine.gradient_accumulation_steps()
    for step in steps:
        total = 0.0
        for micro in range(ga):
            loss = _loss(engine, *_batch(rank, step, micro))
            engine.backward(loss)
            engine.step()
            total += float(loss.detach()) / ga
        mean = torch.tensor([total])
        dist.all_reduce(mean)
        losses.append(float(mean) / WORLD)
    return losses


def _full_params(engine: Any) -> list[torch.Tensor]:
    """Full fp32 weights of the engine's model, in parameter order, on every rank."""
    import deepspeed

    params = list(engine.module.parameters())
    if hasattr(params[0], "ds_id"):
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def _reference(
    ga: int, cls: type, conv: bool = False, **kw: Any
) -> tuple[list[torch.Tensor], list[float]]:
    """Single-process COAP (``cls``) on the mean gradient over ranks and micro-batches."""
    model = _model(conv)
    opt = cls(model.parameters(), **{**KW, **kw})
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        total = 0.0
        for r in range(WORLD):
            for micro in range(ga):
                loss = _loss(model, *_batch(r, step, micro)) / (WORLD * ga)
                loss.backward()
                total += float(loss.detach())
        losses.append(total)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], losses


def _check_state(
    label: str, engine: Any, stage: int, rank: int, fixed: bool = True, refreshes: int = REFRESHES
) -> tuple[int, int]:
    """COAP state of every matrix; returns (COAP state bytes, AdamW state bytes) of this rank.

    Stages 1-3: each matrix's projector is on exactly one rank and its moment rows, summed
    over ranks, are all of its rows (whole on one rank, or split over a team); stage 0: every
    rank holds everything."""
    opt = _coap(engine)
    params = list(engine.module.parameters())
    chosen = {id(q): s.rank for q, s in zip(opt.layout.params, opt.specs, strict=True)}
    if fixed:  # (the adaptive schedule decides its own refreshes)
        projected = sum(1 for s in opt.specs if s.kind in ("matrix", "conv"))
        assert opt.metrics()["optim/refreshes"] == refreshes * projected, label
    for p in params:
        shape = tuple(getattr(p, "ds_shape", None) or p.shape)
        st = opt.state.get(p)
        if len(shape) == 2:
            rows, cols = (shape[0], shape[1]) if shape[0] >= shape[1] else (shape[1], shape[0])
            r = chosen[id(p)]  # KW's rank, or the one rank="auto" chose
            moment = "exp_avg_q" if st and "exp_avg_q" in st else "exp_avg"
            counts = torch.tensor(
                [
                    1 if st and "projector" in st else 0,
                    st[moment].shape[0] if st and moment in st else 0,
                ]
            )
            dist.all_reduce(counts)
            expect = WORLD if stage == 0 else 1
            assert int(counts[0]) == expect, f"{label}: {shape} projector on {int(counts[0])} ranks"
            assert int(counts[1]) == rows * expect, f"{label}: {shape} moment rows {int(counts[1])}"
            if not st:
                continue
            if "projector" in st:
                assert tuple(st["projector"].shape) == (r, cols), (label, shape)
            if moment in st:
                assert st[moment].shape[1] == r, (label, shape)
                quantized = opt.specs[0].fmt.quantized and rows * r >= 4096
                want = torch.uint8 if quantized else torch.float32
                assert st[moment].dtype == want, (label, shape, st[moment].dtype)
            assert float(st["step"]) == STEPS, (label, shape, st["step"])
        else:
            held = torch.tensor([1 if st else 0])
            dist.all_reduce(held)
            assert int(held) >= 1, f"{label}: no rank holds state of a {shape} parameter"
            if st:
                assert float(st["step"]) == STEPS, (label, shape, st["step"])
    numel = sum(int(torch.Size(getattr(p, "ds_shape", None) or p.shape).numel()) for p in params)
    held = numel if stage == 0 else -(-numel // WORLD)
    return opt.state_bytes(), 8 * held


def _worker(rank: int, world: int, ckpt_root: str, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    import deepspeed

    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR", "")
    cached = glob.glob(os.path.join(ext_dir, "**", "deepspeed_shm_comm*.so"), recursive=True)
    if not cached and os.environ.get("COAP_TEST_DS_BUILD_SHM") != "1":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # see the module docstring
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

    only = [c for c in os.environ.get("COAP_TEST_DS_CASES", "").split(",") if c]
    if not only:
        _check_errors(rank)
        _check_frozen(rank)
        _check_shipped_configs(rank)
    refs: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[float]]] = {}
    report = []
    for label, stage, bf16, extra, zero_init, ckpt in CASES:
        if only and label not in only:
            continue
        engine = _build(stage, bf16, extra, zero_init)
        if "offload" in label:  # DeepSpeed's offload path really runs (host partitions)
            zero = engine.optimizer
            assert getattr(zero, "cpu_offload", False) or zero.offload_optimizer, label
        records = count_steps(_coap(engine))
        if label == CASES[0][0]:  # in-backward has no DeepSpeed route: refused by name
            with pytest.raises(ValueError, match=r"DeepSpeed is not supported: engine\.backward"):
                coap_dist.optimizer_in_backward(engine, engine.optimizer)
        ga = engine.gradient_accumulation_steps()
        ckpt_dir = os.path.join(ckpt_root, label)
        if ckpt:
            first = _train(engine, rank, range(SAVE_AT))
            engine.save_checkpoint(ckpt_dir, tag="t")
            losses = first + _train(engine, rank, range(SAVE_AT, STEPS))
        else:
            losses = _train(engine, rank, range(STEPS))
        kind = extra.get("optimizer", {}).get("type", "COAP")
        params = extra.get("optimizer", {}).get("params", KW)
        adafactor = kind == "COAPAdafactor"
        adaptive = params.get("refresh") == "adaptive"
        auto = params.get("rank") == "auto"
        if not (adafactor or adaptive or auto or _uses_conv(extra)):  # (the others descend
            # less in 8 steps here, in 1 process too; the comparison below is the check)
            assert losses[-1] < 0.9 * losses[0], (label, losses)
        _check_traffic(label, _coap(engine), stage, rank, records)
        coap_bytes, adamw_bytes = _check_state(label, engine, stage, rank, not adaptive)
        assert coap_bytes < 0.6 * adamw_bytes, (label, coap_bytes, adamw_bytes)
        own = {k: v for k, v in params.items() if KW.get(k) != v}  # beyond KW
        key = (ga, kind, _uses_conv(extra), tuple(sorted(own.items())))
        if key not in refs:
            cls = coap_dist.COAPAdafactor if adafactor else coap_dist.COAPAdamW
            refs[key] = _reference(ga, cls, _uses_conv(extra), **own)
        ref_params, ref_losses = refs[key]
        if adaptive:  # the same decisions on both ranks, and as one process
            counts = [_coap(engine).metrics()[f"optim/{k}"] for k in ("refreshes", "refresh_skips")]
            every: list[Any] = [None] * WORLD
            dist.all_gather_object(every, counts)
            assert every[0] == every[1], (label, every)
        if auto:  # the same ranks on both ranks, not all the fixed ones
            ranks = [s.rank for s in _coap(engine).specs if s.kind == "matrix"]
            every = [None] * WORLD
            dist.all_gather_object(every, ranks)
            assert every[0] == every[1], (label, every)
            fixed = [
                min(s.shape) // AUTO["rank_ratio"]
                for s in _coap(engine).specs
                if s.kind == "matrix"
            ]
            assert ranks != fixed, (label, ranks, fixed)
        if bf16:
            torch.testing.assert_close(losses, ref_losses, rtol=5e-2, atol=0.0, msg=label)
        else:
            torch.testing.assert_close(
                losses, ref_losses, rtol=1e-4, atol=1e-6, msg=f"{label}: {losses} vs {ref_losses}"
            )
            # An 8-bit moment turns the ~1e-8 differences every DeepSpeed run has from one
            # process (fused-kernel tails, reduction order, a split matrix's correlation step
            # from summed partials where one process contracts G once) into whole code steps
            # of its elements: those weights are compared at that resolution, and the blocks
            # an 8-bit AdamW partition cuts are checked to be one process's
            # (_check_block_grid). Measured: 30 of 12,288 elements of a split 8-bit matrix
            # 1.4e-4 apart after 8 steps (stage 2, Tucker case).
            atol = 2e-3 if "8bit" in label else 1e-5
            for i, (p, q) in enumerate(zip(_full_params(engine), ref_params, strict=True)):
                torch.testing.assert_close(
                    p,
                    q,
                    rtol=1e-4,
                    atol=atol,
                    msg=lambda m, i=i, lab=label: f"{lab} param {i}: {m}",
                )
        if label.endswith("8bit-dense"):
            _check_block_grid(label, _coap(engine), rank)
        if ckpt:
            final = _full_params(engine)
            resumed = _build(stage, bf16, extra, zero_init)
            resumed.load_checkpoint(ckpt_dir, tag="t")
            again = _train(resumed, rank, range(SAVE_AT, STEPS))
            torch.testing.assert_close(again, losses[SAVE_AT:], rtol=1e-6, atol=0.0, msg=label)
            for i, (p, q) in enumerate(zip(_full_params(resumed), final, strict=True)):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"{label} resumed {i}")
            # (this optimizer's own refreshes: k = 4, 6)
            _check_state(label + " resumed", resumed, stage, rank, not adaptive, refreshes=2)
            resumed.destroy()
        all_bytes = [None] * WORLD
        dist.all_gather_object(all_bytes, coap_bytes)
        report.append((label, all_bytes, adamw_bytes))
        engine.destroy()
    if rank == 0:
        for label, per_rank, adamw in report:
            print(f"[coap-ds] {label}: COAP state bytes per rank {per_rank}, AdamW {adamw}")


def _check_block_grid(label: str, opt: Any, rank: int) -> None:
    """The 8-bit AdamW parameter that the partition cuts inside a quantization block is
    stored on the whole parameter's block grid with the blocks' true maxima: its consolidated
    moments re-quantize to themselves (a block whose pieces had kept their own maxima would
    not: one piece's codes would be relative to another scale)."""
    from coap_dist.functional import quant

    assert opt.layout._shared_blocks, (label, "no partition cuts an 8-bit block: no check")
    opt.consolidate_state_dict(to=0)
    if rank != 0:
        return
    state = opt.state_dict()["state"]
    for i, _ in opt.layout._shared_blocks:
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            q, scale = state[i][f"{name}_q"], state[i][f"{name}_scale"]
            again = quant.quantize(quant.dequantize(q, scale, signed), signed)
            assert torch.equal(again[0], q) and torch.equal(again[1], scale), (label, i, name)


def _check_traffic(label: str, opt: Any, stage: int, rank: int, records: list) -> None:
    """The optimizer's own collectives per optimizer step (DeepSpeed calls ``step()`` once per
    parameter group, or ZeRO-3 sub-group): none at stage 0; at stages 1-3 at most 3 per call
    on plain steps (flags, gather, scatter; Adafactor teams add two all-reduces of their row
    and column statistics), on the parameters' device, and bytes per rank
    under the bound (fp32 gradient bytes / N + fp32 D and P of the matrices whose
    partitions this rank holds + flags)."""
    per = len(records) // STEPS
    assert per >= 1 and len(records) == per * STEPS, (label, len(records))
    steps = merged(records, per)
    plain = steps[1::2]  # k = 1, 3, 5, 7
    if stage == 0:
        assert all(r.total_calls == 0 for r in steps), (label, [r.calls for r in steps])
        return
    lay = opt.layout
    dtypes = [lay.view.dtype(i) for i in range(len(opt.specs))]
    shared = 8 * len(lay._shared_blocks)  # 8-bit AdamW blocks cut by a partition: MAX of both
    bound = bound_bytes(lay._entries, WORLD, rank, dtypes) + 8 * (per - 1) * (5 * len(dtypes) + 1)
    bound += shared
    calls = 3 + (2 if isinstance(opt, coap_dist.COAPAdafactor) else 0) + bool(shared)
    # refresh="adaptive" measures the residual on the step before each candidate (odd k
    # here): one more all-reduce of its sums.
    calls += any(g.get("refresh") == "adaptive" for g in opt.groups)
    for k, rec in zip((1, 3, 5, 7), plain, strict=True):
        assert 1 <= rec.total_calls <= calls * per, (label, k, rec.calls)
        assert rec.devices <= {"cpu"}, (label, rec.devices)
        assert max(rec.sent, rec.received) <= bound, (label, k, rec.sent, rec.received, bound)


def _refused_first_step(cfg: dict[str, Any], rank: int, match: str) -> None:
    """The engine of ``cfg`` builds, and its first step raises ``match`` before any weight
    changes."""
    engine, *_ = _build_cfg(cfg)
    before = [p.detach().clone() for p in engine.module.parameters()]
    engine.backward(_loss(engine, *_batch(rank, 0, 0)))
    with pytest.raises(ValueError, match=match):
        engine.step()
    for p, q in zip(engine.module.parameters(), before, strict=True):
        assert torch.equal(p.detach(), q), "a refused step changed a weight"
    engine.destroy()


def _check_errors(rank: int) -> None:
    """Invalid setups fail with an error naming the problem: a misspelt key at
    deepspeed.initialize, an explicit `sharding` at the first step (the layout is
    bound from the partitions the engine hands over), before any weight changes."""
    sharded = _config(2, False, {})
    sharded["optimizer"]["params"]["sharding"] = "owner"
    _refused_first_step(sharded, rank, r"invalid `sharding`='owner'; the layout follows")
    # round-robin gradient partitioning: DeepSpeed's _hp_mapping keeps the original order
    robin = _config(2, False, {"zero_optimization": {"stage": 2, "round_robin_gradients": True}})
    _refused_first_step(robin, rank, r"round_robin_gradients=true does this")
    typo = _config(2, False, {})
    typo["optimizer"]["params"]["rnak"] = 4
    with pytest.raises(ValueError, match="unknown key `rnak`; did you mean `rank`"):
        _build_cfg(typo)
    # check_config: the mistakes DeepSpeed reports with a traceback, or not at all, as one
    # line naming the key.
    from coap_dist.integrations.deepspeed import check_config

    check_config(_config(3, True, {}))
    for edit, message in (
        (lambda c: c["optimizer"].update(type="COAPP"), r'optimizer\.type="COAPP" .*"COAP"'),
        (lambda c: c["optimizer"].update(type="coap"), r'"coap" .*case-sensitive.*"COAP"'),
        (lambda c: c.update(gradient_clipping="1.0"), r"gradient_clipping='1\.0' must be a num"),
        (lambda c: c.update(gradient_clipping=-1.0), r"gradient_clipping=-1\.0 must be a num"),
        (lambda c: c["optimizer"]["params"].update(rnak=4), r"optimizer\.params\.rnak"),
        (lambda c: c["zero_optimization"].update(stagee=2), r"zero_optimization\.stagee: .*stage"),
        (lambda c: c.update(zero_optimisation={}), r"zero_optimisation is not a DeepSpeed"),
        (lambda c: c["optimizer"].update(parms={}), r"optimizer\.parms is not .*mean params"),
        (
            lambda c: c["zero_optimization"].update(round_robin_gradients=True),
            r"zero_optimization\.round_robin_gradients=true is not supported with COAP",
        ),
        (lambda c: c["optimizer"].update(type="COAPAdamW"), r'"COAPAdamW" is the class.*"COAP"'),
        (
            lambda c: c["optimizer"]["params"].update(sharding="owner"),
            r"optimizer\.params\.sharding='owner' is invalid under DeepSpeed",
        ),
    ):
        cfg = _config(2, False, {})
        edit(cfg)
        with pytest.raises(ValueError, match=message):
            check_config(cfg)


def _check_frozen(rank: int) -> None:
    """A frozen layer (fine-tuning) with ``model_parameters=model.parameters()``: DeepSpeed
    partitions only the trainable parameters; at stages 1-3 COAP steps those as one process
    does (weights to 1e-5 after 4 steps), the frozen ones keep their values and no state."""

    def frozen_model() -> nn.Module:
        model = _model()
        model.fc1.requires_grad_(False)
        return model

    ref = frozen_model()
    ref_opt = coap_dist.COAPAdamW(ref.parameters(), **KW)
    for step in range(4):
        for r in range(WORLD):
            (_loss(ref, *_batch(r, step, 0)) / WORLD).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    import deepspeed

    for stage in (1, 2, 3):
        model = frozen_model()
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=_config(stage, False, {}),
            dist_init_required=False,
        )
        _train(engine, rank, range(4))
        for i, (p, q) in enumerate(zip(_full_params(engine), ref.parameters(), strict=True)):
            torch.testing.assert_close(p, q.detach(), rtol=1e-4, atol=1e-5, msg=f"{stage} {i}")
        opt = _coap(engine)
        assert not any(opt.state.get(p) for p in engine.module.fc1.parameters()), stage
        assert opt.metrics()["optim/refreshes"] == 2 * 2, stage  # 2 matrices, k = 0, 2
        engine.destroy()


def _check_shipped_configs(rank: int) -> None:
    """Every configs/deepspeed/*.json initializes as shipped (batch size adapted), steps, and
    creates COAP state."""
    paths = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.json")))
    assert len(paths) == 8, paths
    for path in paths:
        with open(path) as f:
            cfg = json.load(f)
        cfg["train_micro_batch_size_per_gpu"] = MICRO
        cfg["gradient_accumulation_steps"] = 1
        engine, *_ = _build_cfg(cfg)
        _train(engine, rank, range(2))
        opt = _coap(engine)
        m = opt.metrics()
        assert m["optim/refreshes"] == 3, (path, m)  # 3 matrices, k = 0 (same on every rank)
        assert m["optim/nonfinite_skips"] == 0, (path, m)
        engine.destroy()


def _build_cfg(cfg: dict[str, Any]) -> Any:
    import deepspeed

    model = _model()
    return deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=cfg, dist_init_required=False
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.deepspeed
@pytest.mark.distributed
def test_deepspeed_coap_all_stages(tmp_path: os.PathLike[str]) -> None:
    pytest.importorskip("deepspeed")
    run_workers(_worker, WORLD, str(tmp_path), _free_port())
