"""DeepSpeed ZeRO-2 / ZeRO-3 checkpoints of COAP resumed at another data-parallel world size.

Three spawns of real DeepSpeed engines (gloo, CPU), 12 rows per global batch at every world
size (6 per rank at 2 ranks, 4 at 3), so that every run trains on the same data:

* 2 ranks: each case trains 8 steps uninterrupted, saving ``engine.save_checkpoint`` at
  step 4; :func:`coap_dist.integrations.deepspeed.to_universal` converts it (offline, in
  this process);
* 3 ranks: each case loads that universal checkpoint (``"checkpoint": {"load_universal":
  true}`` and :func:`~coap_dist.integrations.deepspeed.load_checkpoint`) and trains steps
  4-7: losses and weights continue the uninterrupted 2-rank run to fp tolerance (rtol 1e-4;
  max relative weight distance <= 2e-4), every matrix's state on exactly one rank with the
  saved step and refresh counts; then it trains its own uninterrupted 3-rank run, saving
  at step 4 (converted likewise);
* 2 ranks: each case resumes the 3-rank checkpoint and continues that run the same way
  (converted with the ``coap-dist ds-to-universal`` command);
* one process, no DeepSpeed: the fp32 cases' 2-rank checkpoints continue in a plain
  ``COAPAdamW`` from the universal fp32 masters and ``{"coap_shards": [...]}``.

The uninterrupted 2- and 3-rank runs also agree with each other (the layout changes where
state lives, not the math). Cases: stage 2 fp32 COAP with ``refresh="adaptive"`` (the
resumed run refreshes and skips on the same steps); stage 3 fp32 COAP with 8-bit state, a
Tucker convolution and ``rank="auto"`` (the saved ranks carry over); stage 2 bf16 (losses
to rtol 5e-2 as in the other DeepSpeed tests); stage 3 fp32 with 8-bit state and the
convolution an 8-bit AdamW parameter cut inside a quantization block at both world sizes
(its pieces assemble and re-cut on the parameter's block grid); stage 0 fp32, whose engine checkpoint (the
whole replicated state) loads at another world size as it is. The converter and the loader refuse what they cannot do, by name.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.dist_harness import run_workers
from tests.integrations import test_deepspeed as T

GLOBAL = 12
STEPS = 8
SAVE_AT = 4
KW = dict(lr=1e-2, weight_decay=0.1, rank=8, update_interval=2, reproject_factor=2, scale=0.5)
RICH = dict(state_bits=8, rank_ratio_cnn=16.0, rank="auto", rank_ratio=4)

# (label, stage, bf16, COAP params, conv model)
ALL_CASES: list[tuple[str, int, bool, dict[str, Any], bool]] = [
    ("stage2-fp32-adaptive", 2, False, {**KW, "refresh": "adaptive"}, False),
    ("stage3-fp32-8bit-tucker-auto", 3, False, {**KW, **RICH}, True),
    ("stage2-bf16", 2, True, KW, False),
    ("stage0-fp32", 0, False, KW, False),
    ("stage3-fp32-8bit-dense", 3, False, {**KW, "state_bits": 8}, True),
]
_ONLY = [c for c in os.environ.get("COAP_TEST_DS_CASES", "").split(",") if c]
CASES = [c for c in ALL_CASES if not _ONLY or c[0] in _ONLY]


def _config(world: int, stage: int, bf16: bool, params: dict[str, Any], universal: bool) -> dict:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": GLOBAL // world,
        "gradient_accumulation_steps": 1,
        "train_batch_size": GLOBAL,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "COAP", "params": dict(params)},
        "steps_per_print": 1 << 30,
    }
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def _batch(rank: int, world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the step's global batch (the same rows at every world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL, 24, generator=g)
    y = x @ T._TEACHER
    m = GLOBAL // world
    return x[rank * m : (rank + 1) * m], y[rank * m : (rank + 1) * m]


def _build(world: int, case: tuple, universal: bool = False) -> Any:
    import deepspeed

    _, stage, bf16, params, conv = case
    model = T._model(conv)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=_config(world, stage, bf16, params, universal),
        dist_init_required=False,
    )
    return engine


def _train(engine: Any, rank: int, world: int, steps: range) -> list[float]:
    out = []
    for step in steps:
        loss = T._loss(engine, *_batch(rank, world, step))
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().reshape(1).clone()
        dist.all_reduce(mean)
        out.append(float(mean) / world)
    return out


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((p - q).norm() / q.norm().clamp_min(1e-12)) for p, q in zip(a, b, strict=True))


def _refresh_counts(opt: Any) -> list[float]:
    """Projector refreshes and adaptive skips this process's optimizer has counted."""
    m = opt.metrics()
    return [m["optim/refreshes"], m["optim/refresh_skips"]]


def _check_state(label: str, engine: Any, copies: int) -> None:
    """Every COAP matrix's projector on ``copies`` ranks (1 at stages 1-3), its moment rows
    tiling it that many times, step counts those of 8 steps."""
    opt = T._coap(engine)
    for p, spec in zip(opt.layout.params, opt.specs, strict=True):
        st = opt.state.get(p)
        if spec.kind != "matrix":
            continue
        moment = "exp_avg_q" if st and "exp_avg_q" in st else "exp_avg"
        counts = torch.tensor(
            [
                1 if st and "projector" in st else 0,
                st[moment].shape[0] if st and moment in st else 0,
            ]
        )
        dist.all_reduce(counts)
        want = [copies, copies * spec.rows]
        assert counts.tolist() == want, (label, spec.shape, counts.tolist())
        if st:
            assert float(st["step"]) == STEPS, (label, spec.shape, st["step"])


def _save_run(rank: int, world: int, root: Path, case: tuple) -> None:
    """An uninterrupted run of ``world`` ranks, checkpointed at SAVE_AT; its losses, final
    weights and refresh metrics go to ``root/<label>/w<world>.pt``."""
    label = case[0]
    engine = _build(world, case)
    losses = _train(engine, rank, world, range(SAVE_AT))
    engine.save_checkpoint(str(root / label / f"w{world}"), tag="t")
    opt = T._coap(engine)
    before = _refresh_counts(opt)
    losses += _train(engine, rank, world, range(SAVE_AT, STEPS))
    ranks = [s.rank for s in opt.specs if s.kind == "matrix"]
    metrics = [a - b for a, b in zip(_refresh_counts(opt), before, strict=True)]
    weights = T._full_params(engine)
    if rank == 0:
        torch.save(
            {"losses": losses, "weights": weights, "ranks": ranks, "metrics": metrics},
            root / label / f"w{world}.pt",
        )
    engine.destroy()


def _resume(rank: int, world: int, root: Path, case: tuple, saved_at: int) -> list[str]:
    """Resume the universal form of the ``saved_at``-rank checkpoint at ``world`` ranks and
    compare with that run; returns report lines."""
    from coap_dist.integrations.deepspeed import load_checkpoint

    label, _, bf16, _, _ = case
    ref = torch.load(root / label / f"w{saved_at}.pt", weights_only=True)
    stage = case[1]
    if stage in (1, 2) and not bf16:
        _check_plain_load_refuses(rank, world, root, case, saved_at)
    engine = _build(world, case, universal=stage > 0)
    if stage:
        path, _ = load_checkpoint(engine, root / label / f"w{saved_at}u")
    else:  # stage 0: the whole state in the model-state file, loaded as DeepSpeed saved it
        path, _ = engine.load_checkpoint(str(root / label / f"w{saved_at}"), tag="t")
    assert path is not None, label
    assert engine.global_steps == SAVE_AT, (label, engine.global_steps)
    losses = _train(engine, rank, world, range(SAVE_AT, STEPS))
    weights = T._full_params(engine)
    dist_w = _distance(weights, ref["weights"])
    opt = T._coap(engine)
    ranks = [s.rank for s in opt.specs if s.kind == "matrix"]
    assert ranks == ref["ranks"], (label, ranks, ref["ranks"])
    metrics = _refresh_counts(opt)
    assert metrics == ref["metrics"], (label, metrics, ref["metrics"])
    _check_state(f"{label} {saved_at}->{world}", engine, 1 if stage else world)
    if bf16:
        torch.testing.assert_close(losses, ref["losses"][SAVE_AT:], rtol=5e-2, atol=0.0)
    else:
        torch.testing.assert_close(losses, ref["losses"][SAVE_AT:], rtol=1e-4, atol=1e-6)
        assert dist_w <= 2e-4, (label, dist_w)
    engine.destroy()
    return [
        f"[coap-ds-resize] {label} saved at {saved_at} resumed at {world}: losses "
        f"{[round(v, 6) for v in losses]} vs uninterrupted "
        f"{[round(v, 6) for v in ref['losses'][SAVE_AT:]]}; max rel weight distance "
        f"{dist_w:.2e}; (refreshes, skips) in steps 4-7 {metrics}, uninterrupted {ref['metrics']}"
    ]


def _check_plain_load_refuses(
    rank: int, world: int, root: Path, case: tuple, saved_at: int
) -> None:
    """engine.load_checkpoint of the universal form alone (COAP's state never loaded): the
    first step refuses, naming the loader, and changes no weight. load_checkpoint of the
    universal form into an engine built without ``load_universal`` (DeepSpeed would load
    nothing, with a warning) refuses, naming the setting."""
    from coap_dist.integrations.deepspeed import load_checkpoint

    plain = _build(world, case, universal=False)
    for tag in (None, "t"):
        with pytest.raises(ValueError, match=r'universal checkpoint.*"load_universal": true'):
            load_checkpoint(plain, root / case[0] / f"w{saved_at}u", tag)
    plain.destroy()
    engine = _build(world, case, universal=True)
    with pytest.raises(ValueError, match=r"coap_shards.pt is missing.*coap-dist ds-to-universal"):
        load_checkpoint(engine, root / "no_coap_u")  # refused before the engine loads
    engine.load_checkpoint(str(root / case[0] / f"w{saved_at}u"))
    before = T._full_params(engine)
    engine.backward(T._loss(engine, *_batch(rank, world, SAVE_AT)))
    with pytest.raises(RuntimeError, match=r"coap_dist.integrations.deepspeed.load_checkpoint"):
        engine.step()
    for p, q in zip(T._full_params(engine), before, strict=True):
        assert torch.equal(p, q), case[0]
    engine.destroy()


def _worker(rank: int, world: int, root: str, phase: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # gloo carries all
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    base = Path(root)
    report: list[str] = []
    for case in CASES:
        if phase in ("resume", "resume+save"):
            report += _resume(rank, world, base, case, saved_at=5 - world)
        if phase in ("save", "resume+save"):
            _save_run(rank, world, base, case)
    if rank == 0 and report:
        with open(base / f"report_{world}.txt", "w") as f:
            f.write("\n".join(report) + "\n")


def _convert(root: Path, world: int, capsys: pytest.CaptureFixture[str]) -> None:
    """Convert every case's ``world``-rank checkpoint: with the library function at 2 ranks,
    with the ``coap-dist ds-to-universal`` command at 3."""
    from coap_dist.cli import main
    from coap_dist.integrations.deepspeed import to_universal

    for label, stage, *_ in CASES:
        if stage == 0:
            continue
        src, dst = root / label / f"w{world}", root / label / f"w{world}u"
        if world == 2:
            assert to_universal(src, dst) == dst / "t"
        else:
            assert main(["ds-to-universal", str(src), str(dst)]) == 0
            assert f"wrote {dst / 't'}" in capsys.readouterr().out
        assert (dst / "latest_universal").read_text() == "t"


def _one_process(root: Path) -> list[str]:
    """DeepSpeed -> one process: every rank's COAP state dict of the 2-rank checkpoint
    (``coap_shards``) and the universal fp32 masters continue the run in a plain
    single-process COAPAdamW (the full global batch, the engine's clipping)."""
    import coap_dist

    lines = []
    for label, stage, bf16, params, conv in CASES:
        if bf16 or stage == 0:
            continue
        ref = torch.load(root / label / "w2.pt", weights_only=True)
        model = T._model(conv)
        zero = root / label / "w2u" / "t" / "zero"
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.load(zero / name / "fp32.pt", weights_only=True)["param"])
        opt = coap_dist.COAPAdamW(model.parameters(), **params)
        shards = torch.load(zero / "coap_shards.pt", weights_only=True)["shards"]
        opt.load_state_dict({"coap_shards": shards})
        losses = []
        for step in range(SAVE_AT, STEPS):
            opt.zero_grad()
            loss = T._loss(model, *_batch(0, 1, step))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        torch.testing.assert_close(losses, ref["losses"][SAVE_AT:], rtol=1e-4, atol=1e-6)
        dist_w = _distance([p.detach() for p in model.parameters()], ref["weights"])
        assert dist_w <= 2e-4, (label, dist_w)
        assert all(int(opt.state[p]["step"]) == STEPS for p in model.parameters()), label
        lines.append(
            f"[coap-ds-resize] {label} saved at 2 resumed in one process (plain COAPAdamW): "
            f"max rel weight distance {dist_w:.2e}"
        )
    return lines


def _check_refusals(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The converter refuses a checkpoint with a rank file missing and one without COAP
    state (the command: exit status 1 and the message, nothing written)."""
    from coap_dist.integrations.deepspeed import to_universal

    label = CASES[0][0]
    broken = root / "broken"
    shutil.copytree(root / label / "w2", broken)
    files = sorted((broken / "t").glob("*optim_states.pt"))
    files[-1].unlink()
    with pytest.raises(ValueError, match=r"has 1 rank files of a 2-rank run"):
        to_universal(broken, root / "broken_u")
    sd = torch.load(files[0], weights_only=False)
    sd["optimizer_state_dict"]["base_optimizer_state"].pop("coap_pieces")
    torch.save(sd, files[0])
    with pytest.raises(ValueError, match=r"holds no COAP state"):
        to_universal(broken, root / "broken_u")
    with pytest.raises(ValueError, match=r"folder .*nowhere does not exist"):
        to_universal(root / "nowhere", root / "broken_u")
    with pytest.raises(ValueError, match=r"no ZeRO optimizer files in .*/nope; the tags .*\['t'\]"):
        to_universal(broken, root / "broken_u", tag="nope")
    from coap_dist.cli import main

    capsys.readouterr()
    assert main(["ds-to-universal", str(broken), str(root / "broken_u")]) == 1
    assert "error: coap-dist ds-to-universal:" in capsys.readouterr().err
    assert not (root / "broken_u" / "t").exists()  # nothing half-written


@pytest.mark.deepspeed
@pytest.mark.distributed
def test_deepspeed_resume_at_another_world_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    run_workers(_worker, 2, str(tmp_path), "save")
    _convert(tmp_path, 2, capsys)
    _check_refusals(tmp_path, capsys)
    converted = next((c[0] for c in CASES if c[1] > 0), None)
    if converted is not None:  # a universal folder without COAP's state
        shutil.copytree(tmp_path / converted / "w2u", tmp_path / "no_coap_u")
        (tmp_path / "no_coap_u" / "t" / "zero" / "coap_shards.pt").unlink()
    single = _one_process(tmp_path)
    run_workers(_worker, 3, str(tmp_path), "resume+save")
    _convert(tmp_path, 3, capsys)
    run_workers(_worker, 2, str(tmp_path), "resume")
    for label, _, bf16, _, _ in CASES:  # the uninterrupted runs agree across world sizes
        two = torch.load(tmp_path / label / "w2.pt", weights_only=True)
        three = torch.load(tmp_path / label / "w3.pt", weights_only=True)
        assert two["ranks"] == three["ranks"], label
        if not bf16:
            torch.testing.assert_close(two["losses"], three["losses"], rtol=1e-4, atol=1e-6)
            # 8-bit AdamW moments turn the two runs' ~1e-8 differences (reduction order) into
            # whole code steps of some elements: compared at that resolution.
            bar = 2e-3 if label.endswith("8bit-dense") else 2e-4
            assert _distance(two["weights"], three["weights"]) <= bar, label
    with capsys.disabled():
        for world in (3, 2):
            print((tmp_path / f"report_{world}.txt").read_text(), end="")
        print("\n".join(single))
