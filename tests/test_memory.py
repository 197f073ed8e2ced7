"""Optimizer-state memory: estimator formulas, paper figures, real optimizers, CLI."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import coap_dist
from coap_dist.cli import main as cli_main
from coap_dist.distributed.placement import (
    REFRESH_BUCKET_BYTES,
    refresh_buckets,
    refresh_partial_bytes,
)
from coap_dist.functional.quant import BLOCK as COAP_QUANT_BLOCK
from coap_dist.memory import (
    BNB_QMAP_BYTES,
    LAYOUTS,
    MIB,
    OPTIMIZERS,
    coap_specs,
    estimate_state_bytes,
    lowrank_names,
    measure_state_bytes,
    named_params_with_modules,
)
from coap_dist.models.llama import LLAMA_PRESETS, Llama


def _tiny_with_grads(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = Llama(LLAMA_PRESETS["tiny"]).to(dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


# ----------------------------------------------------------------------- paper figures


@pytest.mark.parametrize(
    ("model", "optimizer", "rank", "paper_mib"),
    [
        ("1b", "coap", 512, 1988.0),  # LLaMA-1B, bf16 states, rank 512
        ("1b", "adamw", None, 5108.0),  # LLaMA-1B, bf16 AdamW
        ("7b", "coap8bit", 1024, 5380.0),  # LLaMA-7B, 8-bit COAP, rank 1024
    ],
)
def test_paper_figures_within_one_percent(
    model: str, optimizer: str, rank: int | None, paper_mib: float
) -> None:
    est = estimate_state_bytes(model, optimizer, rank=rank, dtype=torch.bfloat16)
    assert est.total / MIB == pytest.approx(paper_mib, rel=0.01)


def test_paper_reductions() -> None:
    coap_1b = estimate_state_bytes("1b", "coap", rank=512).total
    adamw_1b = estimate_state_bytes("1b", "adamw").total
    assert 1 - coap_1b / adamw_1b == pytest.approx(0.61, abs=0.01)
    coap_7b = estimate_state_bytes("7b", "coap8bit", rank=1024).total
    adamw_7b = estimate_state_bytes("7b", "adamw").total
    assert 1 - coap_7b / adamw_7b == pytest.approx(0.79, abs=0.01)


# ------------------------------------------------------------------------------ formulas


def test_single_matrix_formulas() -> None:
    right = nn.Linear(300, 700, bias=False)  # weight 700 x 300: m >= n -> P r x n
    est = estimate_state_bytes(right, "coap", rank=64, dtype=torch.float32, per_param=True)
    assert est.moments == 2 * 64 * 700 * 4
    assert est.projectors == 64 * 300 * 4
    assert est.per_param is not None and est.per_param[0].side == "right"

    left = nn.Linear(700, 300, bias=False)  # weight 300 x 700: m < n -> P m x r
    est = estimate_state_bytes(left, "coap", rank=64, dtype=torch.bfloat16, per_param=True)
    assert est.moments == 2 * 64 * 700 * 2 and est.projectors == 64 * 300 * 2
    assert est.per_param is not None and est.per_param[0].side == "left"

    capped = estimate_state_bytes(left, "galore", rank=10_000, dtype=torch.float32, per_param=True)
    assert capped.per_param is not None and capped.per_param[0].rank == 300
    ratio = estimate_state_bytes(left, "coap", rank_ratio=4, dtype=torch.float32, per_param=True)
    assert ratio.per_param is not None and ratio.per_param[0].rank == 75

    q = estimate_state_bytes(left, "coap8bit", rank=64, dtype=torch.bfloat16)
    k = 64 * 700  # elements per moment tensor
    assert q.moments == 2 * k
    assert q.quant_scales == 2 * 4 * math.ceil(k / COAP_QUANT_BLOCK)
    assert q.projectors == 64 * 300 * 2


def test_adamw_group_and_bnb_rules() -> None:
    model = nn.Sequential(nn.Linear(100, 200), nn.LayerNorm(200))  # weight 200x100 -> low-rank
    est = estimate_state_bytes(model, "coap", rank=8, dtype=torch.float32, per_param=True)
    algorithms = {p.name: p.algorithm for p in est.per_param or ()}
    assert algorithms == {
        "0.weight": "lowrank",
        "0.bias": "adamw",
        "1.weight": "adamw",
        "1.bias": "adamw",
    }
    # bitsandbytes: tensors under 4096 elements keep fp32 moments; others 1 B + absmax/256.
    bnb = estimate_state_bytes(model, "adamw8bit", dtype=torch.bfloat16)
    big = 200 * 100
    small = 200 + 200 + 200
    assert bnb.moments == 2 * big + 8 * small
    assert bnb.quant_scales == 2 * 4 * math.ceil(big / 256) + BNB_QMAP_BYTES
    # A pattern moves a matrix into AdamW.
    moved = estimate_state_bytes(model, "coap", rank=8, dtype=torch.float32, adamw_patterns=["0.*"])
    assert (
        moved.projectors == 0
        and moved.total == estimate_state_bytes(model, "adamw", dtype=torch.float32).total
    )


def test_estimator_takes_presets_configs_and_modules_alike() -> None:
    cfg = LLAMA_PRESETS["tiny"]
    by_name = estimate_state_bytes("tiny", "coap", rank=16)
    by_cfg = estimate_state_bytes(cfg, "coap", rank=16)
    with torch.device("meta"):
        meta_model = Llama(cfg)
    by_meta = estimate_state_bytes(meta_model, "coap", rank=16)
    by_real = estimate_state_bytes(Llama(cfg), "coap", rank=16)
    assert by_name == by_cfg == by_meta == by_real
    # Full-precision AdamW state: 2 moments per parameter.
    adamw = estimate_state_bytes("7b", "adamw", dtype=torch.float32)
    assert adamw.total == 2 * 4 * LLAMA_PRESETS["7b"].num_params()


def test_estimator_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="rank"):
        estimate_state_bytes("tiny", "coap")
    with pytest.raises(ValueError, match="unknown optimizer"):
        estimate_state_bytes("tiny", "sgd")
    with pytest.raises(ValueError, match="preset"):
        estimate_state_bytes("3b", "adamw")
    with pytest.raises(ValueError, match="world_size"):
        estimate_state_bytes("tiny", "adamw", world_size=0)


# ------------------------------------------------------------------------------ sharding


def test_per_rank_state_falls_as_one_over_n_under_every_layout() -> None:
    """LLaMA-7B, rank 1024, bf16 state: under every layout the largest rank holds at most
    1.15 x total / N at N = 8, 64 and 512, by the layouts' own planners; one rank holds all."""
    one = estimate_state_bytes("7b", "coap", rank=1024)
    assert one.per_rank == (one.total,)
    for layout in LAYOUTS:
        for n in (8, 64, 512):
            est = estimate_state_bytes("7b", "coap", rank=1024, world_size=n, layout=layout)
            assert len(est.per_rank) == n and sum(est.per_rank) == est.total
            assert est.max_per_rank <= 1.15 * est.total / n, (
                layout,
                n,
                est.max_per_rank / est.mean_per_rank,
            )
            assert est.total == one.total, "every layout keeps one process's state"
    # Element-wise optimizers are split evenly (ZeRO / FSDP).
    adamw = estimate_state_bytes("7b", "adamw", world_size=64)
    assert max(adamw.per_rank) - min(adamw.per_rank) <= 1
    with pytest.raises(ValueError, match="unknown layout"):
        estimate_state_bytes("tiny", "coap", rank=4, world_size=2, layout="ddp")


def test_refresh_rounds_bound_the_partial_sums_held_at_once() -> None:
    """A split refresh of LLaMA-7B (rank 1024) holds at most one round of partial sums: every
    round is under REFRESH_BUCKET_BYTES (unless one matrix alone is larger), rounds keep the
    index order and cover every matrix once, and their number does not depend on N."""
    with torch.device("meta"):
        model = Llama(LLAMA_PRESETS["7b"])
    specs, _ = coap_specs(
        model,
        rank=1024,
        rank_ratio=None,
        rank_ratio_cnn=None,
        dtype=torch.bfloat16,
        state_bits=None,
        projection_side="auto",
        adamw_patterns=None,
        coap_patterns=None,
    )
    specs = [s for s in specs if s.kind == "matrix"]
    items = [s.index for s in specs]
    for kind in ("init", "update"):
        sizes = [refresh_partial_bytes(s, kind, 8) for s in specs]
        rounds = refresh_buckets(items, sizes)
        assert [i for r in rounds for i in r] == items
        by_index = dict(zip(items, sizes, strict=True))
        for r in rounds:
            assert len(r) == 1 or sum(by_index[i] for i in r) <= REFRESH_BUCKET_BYTES
        assert sum(sizes) > 20 * REFRESH_BUCKET_BYTES, "all at once: over 5 GiB"
        assert len(rounds) <= 2 * sum(sizes) / REFRESH_BUCKET_BYTES + 1
    assert refresh_buckets([3, 4, 5], [10, 10, 10], limit=20) == [[3, 4], [5]]
    assert refresh_buckets([3, 4], [30, 1], limit=20) == [[3], [4]]
    assert refresh_buckets([], [], limit=20) == []


# ------------------------------------------------------------------------------ measured


def test_measure_counts_each_storage_once_and_skips_scalars() -> None:
    p, q = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(10))
    opt = torch.optim.SGD([p, q], lr=0.1)
    shared = torch.zeros(256)
    opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(10), "qmap": shared}
    opt.state[q] = {
        "exp_avg": torch.zeros(10, dtype=torch.bfloat16),
        "qmap": shared,
        "projector": [torch.zeros(2, 10)],
    }
    got = measure_state_bytes(opt)
    assert got.moments == 40 + 20
    assert got.quant_scales == 256 * 4
    assert got.projectors == 2 * 10 * 4
    assert got.other == 0


def test_torch_adamw_measured_equals_estimate() -> None:
    model = _tiny_with_grads()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    measured = measure_state_bytes(opt)
    assert measured.total == estimate_state_bytes(model, "adamw", dtype=torch.float32).total
    assert measured.moments == measured.total


def test_bitsandbytes_adamw8bit_measured_equals_estimate() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = _tiny_with_grads()
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    opt.step()
    assert (
        measure_state_bytes(opt).total
        == estimate_state_bytes(model, "adamw8bit", dtype=torch.float32).total
    )


def test_galore_measured_equals_estimate() -> None:
    galore_torch = pytest.importorskip("galore_torch")
    model = _tiny_with_grads()
    low = lowrank_names(model)
    adamw, lowrank = [], []
    for name, p, _ in named_params_with_modules(model):
        (lowrank if name in low else adamw).append(p)
    groups = [
        {"params": adamw},
        {"params": lowrank, "rank": 16, "update_proj_gap": 10, "scale": 1.0, "proj_type": "std"},
    ]
    opt = galore_torch.GaLoreAdamW(groups, lr=1e-3, no_deprecation_warning=True)
    opt.step()
    measured = measure_state_bytes(opt)
    est = estimate_state_bytes(model, "galore", rank=16, dtype=torch.float32)
    assert (measured.moments, measured.projectors, measured.total) == (
        est.moments,
        est.projectors,
        est.total,
    )


@pytest.mark.parametrize(("state_bits", "name"), [(None, "coap"), (8, "coap8bit")])
def test_coap_measured_equals_estimate(state_bits: int | None, name: str) -> None:
    model = _tiny_with_grads()
    opt = coap_dist.COAPAdamW(
        coap_dist.param_groups(model), lr=1e-3, rank=16, state_bits=state_bits
    )
    opt.step()
    measured = measure_state_bytes(opt)
    est = estimate_state_bytes(model, name, rank=16, dtype=torch.float32)
    assert measured.total == est.total
    assert (measured.moments, measured.projectors, measured.quant_scales) == (
        est.moments,
        est.projectors,
        est.quant_scales,
    )
    assert opt.state_bytes() == measured.total


@pytest.mark.parametrize(
    ("state_bits", "name", "state_dtype"),
    [
        (None, "coap", None),
        (16, "coap", torch.bfloat16),
        (32, "coap", torch.float32),
        (8, "coap8bit", None),
    ],
)
def test_coap_bf16_measured_equals_estimate(
    state_bits: int | None, name: str, state_dtype: torch.dtype | None
) -> None:
    # bf16 parameters: the projector of 8-bit COAP stays in the parameter dtype (bf16), as in
    # the paper's 7B figure; state_bits=16/32 map to state_dtype bf16/fp32.
    model = _tiny_with_grads(torch.bfloat16)
    opt = coap_dist.COAPAdamW(
        coap_dist.param_groups(model), lr=1e-3, rank=16, state_bits=state_bits
    )
    opt.step()
    measured = measure_state_bytes(opt)
    est = estimate_state_bytes(model, name, rank=16, dtype=torch.bfloat16, state_dtype=state_dtype)
    assert (measured.moments, measured.projectors, measured.quant_scales) == (
        est.moments,
        est.projectors,
        est.quant_scales,
    )
    assert opt.state_bytes() == measured.total == est.total


@pytest.mark.parametrize(("state_bits", "name"), [(None, "coap"), (8, "coap8bit")])
def test_coap_convolutions_measured_equals_estimate(state_bits: int | None, name: str) -> None:
    # 3x3 conv <= 9216 elements (AdamW), 3x3 conv > 9216 (Tucker-2), 1x1 conv (output mode).
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3),
        nn.Conv2d(32, 64, 3),
        nn.Conv2d(64, 160, 1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = coap_dist.COAPAdamW(
        coap_dist.param_groups(model), lr=1e-3, rank=4, rank_ratio_cnn=4, state_bits=state_bits
    )
    opt.step()
    est = estimate_state_bytes(
        model, name, rank=4, rank_ratio_cnn=4, dtype=torch.float32, per_param=True
    )
    assert [p.algorithm for p in est.per_param or ()] == [
        "adamw",
        "adamw",
        "tucker",
        "adamw",
        "tucker",
        "adamw",
        "lowrank",
        "adamw",
    ]
    measured = measure_state_bytes(opt)
    assert (measured.moments, measured.projectors, measured.quant_scales) == (
        est.moments,
        est.projectors,
        est.quant_scales,
    )
    assert opt.state_bytes() == est.total


# ----------------------------------------------------------------------------------- CLI


def test_cli_single_and_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli_main(
            ["memory", "--model", "1b", "--optimizer", "coap", "--rank", "512", "--dtype", "bf16"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "1,988.3" in out and "coap" in out
    assert cli_main(["memory", "--model", "1b", "--rank", "512", "--all", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    for name in OPTIMIZERS:
        assert name in out
    assert "ratio to bf16 AdamW" in out and "max per rank" in out and "0.389" in out
    # rank auto: the budget of --rank-ratio's fixed ranks, which is its estimate
    for rank in (["--rank", "auto"], []):
        argv = ["memory", "--model", "tiny", "--optimizer", "coap", *rank, "--rank-ratio", "4"]
        assert cli_main(argv) == 0
    auto, fixed = capsys.readouterr().out.split("model tiny")[1:]
    assert "rank auto" in auto and auto.splitlines()[1:] == fixed.splitlines()[1:]


def test_cli_step_peak(capsys: pytest.CaptureFixture[str]) -> None:
    """``--step`` prints the terms of estimate_step_peak; in-backward holds one bucket."""
    from coap_dist.step_memory import estimate_step_peak

    base = ["memory", "--model", "60m", "--optimizer", "coap", "--rank-ratio", "4", "--step"]
    assert cli_main([*base, "--seq-len", "256", "--world-size", "2", "--layout", "fsdp2"]) == 0
    out = capsys.readouterr().out
    est = estimate_step_peak(
        "60m", "coap", batch=1, seq_len=256, world_size=2, layout="fsdp2", rank_ratio=4
    )
    assert f"{est.total / 2**20:,.1f}" in out and "activations" in out and "(fsdp2)" in out
    assert cli_main([*base, "--in-backward"]) == 0
    out = capsys.readouterr().out
    assert "in-backward step" in out and "grads_step       25.0" in out  # one 25 MiB bucket


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["memory", "--model", "1b", "--optimizer", "coap"], "--rank"),
        (["memory", "--model", "1b", "--optimizer", "galore", "--rank", "8", "--step"], "--step"),
        (
            [
                "memory",
                "--model",
                "1b",
                "--optimizer",
                "coap",
                "--rank",
                "8",
                "--step",
                "--world-size",
                "2",
                "--layout",
                "zero",
            ],
            "--layout",
        ),
        (["memory", "--model", "1b", "--optimizer", "coap", "--rank", "0"], "--rank"),
        (["memory", "--model", "1b", "--optimizer", "coap", "--rank", "auto"], "--rank"),
        (["memory", "--model", "1b", "--all", "--rank", "auto", "--rank-ratio", "4"], "--rank"),
        (["memory", "--model", "2b", "--optimizer", "adamw"], "--model"),
        (["memory", "--model", "1b", "--optimizer", "adam"], "--optimizer"),
        (["memory", "--model", "1b", "--optimizer", "adamw", "--world-size", "x"], "--world-size"),
        (["memory", "--model", "1b", "--optimizer", "adamw", "--dtype", "int8"], "--dtype"),
        (["memory", "--model", "1b"], "--optimizer"),
        (["memory", "--model", "1b", "--optimizer", "coap", "--rank-ratio", "0.5"], "--rank-ratio"),
        (["memory", "--model", "1b", "--optimizer", "adamw", "--layout", "fsdp2"], "--layout"),
        (["memory", "--model", "1b", "--optimizer", "adamw", "--in-backward"], "--in-backward"),
        (["memory", "--model", "1b", "--optimizer", "adamw", "--batch", "4"], "--batch"),
        (["memory", "--model", "1b", "--optimizer", "adamw", "--seq-len", "64"], "--seq-len"),
        (
            ["memory", "--model", "tiny", "--optimizer", "adamw", "--step", "--seq-len", "9999"],
            "--seq-len",
        ),
    ],
)
def test_cli_errors_name_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
