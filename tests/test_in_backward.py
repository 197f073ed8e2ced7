"""coap_dist.optimizer_in_backward in one process (the layouts: tests/distributed/test_matrix.py,
the app: tests/train): the normal step's weights, clipping exact by the pre-pass or from the
previous norm (deviation measured), checkpoints shared with the normal step, refusals."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import coap_dist
from coap_dist.models import LLAMA_PRESETS, Llama
from coap_dist.step_memory import LiveTensors, estimate_step_peak

KW = dict(lr=3e-3, weight_decay=0.1, update_interval=2, reproject_factor=2, scale=0.25)
CLIP = 0.5  # below the tiny model's gradient norm (~3): every step clips


def _tokens(step: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(step))


def _loss(model: nn.Module, step: int, shape: tuple[int, int] = (4, 33)) -> torch.Tensor:
    tok = _tokens(step, shape)
    logits = model(tok[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten())


def _closure(
    model: nn.Module, step: int, shape: tuple[int, int] = (4, 33)
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        loss = _loss(model, step, shape)
        loss.backward()
        return loss

    return closure


def _normal_step(
    model: nn.Module, opt: torch.optim.Optimizer, step: int, shape: tuple[int, int] = (4, 33)
) -> torch.Tensor:
    _loss(model, step, shape).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad()
    return norm


@torch.no_grad()
def _distance(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((p - q).norm() / q.norm())
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def _coap(model: nn.Module) -> coap_dist.COAPAdamW:
    return coap_dist.COAPAdamW(coap_dist.param_groups(model, rank=8), **KW)


@pytest.mark.parametrize("kind", ["coap", "coap_8bit", "coap_auto", "adamw_fused"])
def test_in_backward_takes_the_normal_steps_and_checkpoints(kind: str) -> None:
    """Six steps with refreshes at 0, 2 (recalibration at 4): the weights of the normal step
    (clip exact), the gradients freed; the state saved after 3 in-backward steps continues
    in a normal-step optimizer exactly as the normal run does. ``rank="auto"``: the ranks
    chosen at each SVD are the normal step's although the matrices come in many buckets."""
    torch.manual_seed(0)
    ref_model = Llama(LLAMA_PRESETS["tiny"])
    model = copy.deepcopy(ref_model)

    def build(m: nn.Module) -> torch.optim.Optimizer:
        if kind == "adamw_fused":
            return torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, fused=True)
        if kind == "coap_8bit":
            return coap_dist.COAPAdamW(coap_dist.param_groups(m, rank=8), **KW, state_bits=8)
        if kind == "coap_auto":  # an SVD at every refresh (0, 2, 4): the ranks move at each
            groups = coap_dist.param_groups(m, rank="auto", rank_ratio=2)
            return coap_dist.COAPAdamW(groups, **{**KW, "reproject_factor": 1})
        return _coap(m)

    # 8-bit: a ~1e-7 difference (the clip factor's rounding) can move a moment element to
    # the next code, ~1e-4 on a weight (as in tests/distributed/test_matrix.py's TOL).
    tol = 1e-3 if kind == "coap_8bit" else 1e-6
    ref, opt = build(ref_model), build(model)
    handle = coap_dist.optimizer_in_backward(model, opt, max_grad_norm=CLIP, bucket_mb=0.05)
    for step in range(3):
        norm = _normal_step(ref_model, ref, step)
        loss = handle.step(_closure(model, step))
        assert not loss.requires_grad
        assert torch.allclose(handle.grad_norm, norm, rtol=1e-5)
        assert all(p.grad is None for p in model.parameters())
        assert _distance(model, ref_model) < tol, step
    if kind != "adamw_fused":
        assert opt.metrics()["optim/refreshes"] == ref.metrics()["optim/refreshes"] > 0
    if kind == "coap_auto":  # chosen over the whole group, as the normal step's
        assert [s.rank for s in opt.specs] == [s.rank for s in ref.specs]
    saved = copy.deepcopy(opt.state_dict())
    handle.remove()
    resumed_model = copy.deepcopy(model)
    resumed = build(resumed_model)
    resumed.load_state_dict(saved)
    for step in range(3, 6):
        _normal_step(ref_model, ref, step)
        _normal_step(resumed_model, resumed, step)
    assert _distance(resumed_model, ref_model) < 2 * tol


def test_previous_norm_clipping_deviation_and_bare_backward() -> None:
    """clip="previous": a pre-pass at the first step only, then the previous step's norm;
    its deviation from exact clipping is measured here (a named variant, not the default).
    Without clipping a bare ``loss.backward()`` steps; with exact clipping it is refused
    before anything steps."""
    torch.manual_seed(0)
    ref_model = Llama(LLAMA_PRESETS["tiny"])
    model, bare_model = copy.deepcopy(ref_model), copy.deepcopy(ref_model)
    ref, opt, bare = _coap(ref_model), _coap(model), _coap(bare_model)
    handle = coap_dist.optimizer_in_backward(model, opt, max_grad_norm=CLIP, clip="previous")
    passes = []
    model.register_forward_pre_hook(lambda *_: passes.append(1))
    dev = []
    for step in range(6):
        _normal_step(ref_model, ref, step)
        handle.step(_closure(model, step))
        dev.append(_distance(model, ref_model))
    assert len(passes) == 7  # two passes at the first step, one after
    assert dev[0] < 1e-6 < max(dev) < 5e-3, dev  # measured: ~1e-3 relative after 6 steps
    print(f"\n[in-backward] clip='previous' vs exact, relative weight distance: {dev}")
    # Its handle state (the previous norm) resumes: no pre-pass, the same next step.
    twin_model = copy.deepcopy(model)
    twin = _coap(twin_model)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin_handle = coap_dist.optimizer_in_backward(
        twin_model, twin, max_grad_norm=CLIP, clip="previous"
    )
    twin_handle.load_state_dict(handle.state_dict())
    before = len(passes)
    handle.step(_closure(model, 6))
    twin_handle.step(_closure(twin_model, 6))
    assert len(passes) == before + 2  # one pass each (the copy shares the counting hook)
    assert _distance(twin_model, model) < 1e-6

    no_clip = coap_dist.optimizer_in_backward(bare_model, bare)
    weights = [p.detach().clone() for p in bare_model.parameters()]
    _loss(bare_model, 0).backward()  # steps inside, no handle.step needed
    assert all(p.grad is None for p in bare_model.parameters())
    assert any(not torch.equal(p, w) for p, w in zip(bare_model.parameters(), weights, strict=True))
    no_clip.remove()
    exact = coap_dist.optimizer_in_backward(bare_model, bare, max_grad_norm=CLIP)
    before = [p.detach().clone() for p in bare_model.parameters()]
    with pytest.raises(RuntimeError, match=r"needs a norm pre-pass.*handle.step\(closure\)"):
        _loss(bare_model, 1).backward()
    assert all(torch.equal(p, w) for p, w in zip(bare_model.parameters(), before, strict=True))
    exact.remove()


def test_refusals_name_what_to_use() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(clip="sometimes"), "invalid clip='sometimes'"),
        (dict(max_grad_norm=-1.0), "invalid max_grad_norm=-1.0"),
        (dict(bucket_mb=0), "invalid bucket_mb=0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            coap_dist.optimizer_in_backward(model, opt, **kwargs)
    partial = torch.optim.AdamW(model[0].parameters())
    with pytest.raises(ValueError, match=r"'1\.weight' .* is not in the optimizer"):
        coap_dist.optimizer_in_backward(model, partial)
    temperature = nn.Parameter(torch.ones(()))  # trainable, but not the model's
    extra = torch.optim.AdamW([*model.parameters(), temperature])
    with pytest.raises(ValueError, match=r"shape \(\) .* not a parameter of the model"):
        coap_dist.optimizer_in_backward(model, extra)


def _measured_peak(in_backward: bool) -> int:
    """Peak live bytes of the second training step of AdamW on the tiny model, 1 x 8 tokens."""
    torch.manual_seed(0)
    model = Llama(LLAMA_PRESETS["tiny"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    handle = None
    if in_backward:
        handle = coap_dist.optimizer_in_backward(model, opt, max_grad_norm=CLIP, bucket_mb=0.5)
    live = LiveTensors()
    for step in range(2):
        if step == 1:
            live.track(model, opt)
            live.__enter__()
            live.reset()
        if handle is not None:
            handle.step(_closure(model, step, (1, 9)))
        else:
            _normal_step(model, opt, step, (1, 9))
    live.__exit__(None, None, None)
    return live.peak


def test_step_memory_estimate_and_measurement_agree() -> None:
    """LiveTensors measures a step's peak; in-backward lowers it where gradients dominate;
    the estimator (fitted in benchmarks/step_memory.py) is within 10% here."""
    peaks = {}
    for in_backward in (False, True):
        peaks[in_backward] = peak = _measured_peak(in_backward)
        est = estimate_step_peak(
            "tiny", "adamw", batch=1, seq_len=8, in_backward=in_backward, bucket_mb=0.5
        )
        print(f"\n[in-backward] tiny, 1 x 8 tokens: peak {peak:,} B, estimate {est.total:,} B")
        assert 0.9 < est.total / peak < 1.1, (in_backward, est, peak)
    assert peaks[True] < 0.85 * peaks[False]  # 8 tokens: the gradients set the peak


def test_gpu_step_benchmark_smoke_run_on_cpu(tmp_path: Any) -> None:
    """benchmarks/gpu_step.py (the GPU suite's step-time and peak-memory entry) runs end to
    end; on CPU its peaks come from LiveTensors."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"
    args = ["--device", "cpu", "--models", "tiny", "--steps", "3", "--tu", "1", "--f", "2"]
    args += ["--rank", "8", "--seq-len", "16"]
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| coap |" in proc.stdout and "| coap_in_backward |" in proc.stdout
    result = json.loads((tmp_path / "gpu_step.json").read_text())
    mem = result["models"]["tiny"]["peak_memory"]
    assert all(m["peak"] > 0 for m in mem.values())


def test_a_failed_backward_leaves_the_handler_usable() -> None:
    """A backward that raises midway (a tensor hook) drops the pending bucket's gradients;
    the next step runs normally."""
    torch.manual_seed(0)
    model = Llama(LLAMA_PRESETS["tiny"])
    opt = _coap(model)
    handle = coap_dist.optimizer_in_backward(model, opt, max_grad_norm=CLIP, bucket_mb=0.05)
    boom = model.layers[0].attention_norm.weight.register_hook(_raise)
    with pytest.raises(RuntimeError, match="boom"):
        handle.step(_closure(model, 0))
    boom.remove()
    assert all(p.grad is None for p in model.parameters())
    handle.step(_closure(model, 1))
    assert all(p.grad is None for p in model.parameters())
    assert torch.isfinite(handle.grad_norm)


def _raise(_: torch.Tensor) -> None:
    raise RuntimeError("boom")


def test_a_failure_never_leaves_gradients_nor_a_silent_handler() -> None:
    """A bare backward that raises does not disable the handler (the model's next forward
    drops what it left), and a bucket whose step raises (a state dict refused at the
    binding step) frees its gradients: the retry equals a run that never failed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handle = coap_dist.optimizer_in_backward(model, opt)
    x = torch.randn(8, 16)
    boom = model[0].weight.register_hook(_raise)
    with pytest.raises(RuntimeError, match="boom"):
        model(x).square().sum().backward()
    boom.remove()
    for _ in range(2):  # both bare backwards step (and free)
        model(x).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert int(opt.state[model[2].weight]["step"]) == 2
    handle.remove()
    # A pending state dict refused inside the first bucket's step.
    runs = []
    for fail in (True, False):
        net = copy.deepcopy(ref)
        coap = coap_dist.COAPAdamW(coap_dist.param_groups(net, rank=4), **KW)
        h = coap_dist.optimizer_in_backward(net, coap, max_grad_norm=CLIP, bucket_mb=1e-3)
        if fail:
            other = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))
            wrong = coap_dist.COAPAdamW(coap_dist.param_groups(other, rank=4), **KW)
            other(x).square().sum().backward()
            wrong.step()
            coap.load_state_dict(wrong.state_dict())  # another model's shapes: refused
            with pytest.raises(ValueError, match="refused there before any update"):
                h.step(lambda net=net: net(x).square().sum().backward())
            assert all(p.grad is None for p in net.parameters())
            fresh = coap_dist.COAPAdamW(coap_dist.param_groups(copy.deepcopy(ref), rank=4), **KW)
            coap.load_state_dict(fresh.state_dict())  # replaces the refused one
        for _ in range(3):
            h.step(lambda net=net: net(x).square().sum().backward())
        runs.append(net)
    assert _distance(*runs) == 0.0


def test_reentrant_checkpointing_buffers_accumulation_and_unfrozen_parameters() -> None:
    """Exact clipping stays exact under reentrant activation checkpointing (one backward
    per segment: the norm is summed until the model's next forward) and leaves BatchNorm
    statistics as the normal step does (the pre-pass's forward is undone); a second
    gradient before the next forward (accumulation) and a parameter unfrozen after the
    handler was built are refused by name, before any step."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, reentrant: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
            self.norm = nn.BatchNorm1d(16)
            self.reentrant = reentrant

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.norm(x)
            for b in self.blocks:  # every block checkpointed, as gradient_checkpointing does
                x = checkpoint(lambda t, b=b: torch.tanh(b(t)), x, use_reentrant=self.reentrant)
            return x

    x = torch.randn(8, 16, requires_grad=True)  # (reentrant checkpointing needs one)
    ref, net = Net(False), Net(True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    handle = coap_dist.optimizer_in_backward(net, opt, max_grad_norm=0.1)
    for _ in range(2):
        ref(x).square().sum().backward()
        true = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
        ref_opt.zero_grad()
        handle.step(lambda: net(x).square().sum().backward())
        assert float(handle.grad_norm) == pytest.approx(float(true), rel=1e-6)
    assert _distance(net, ref) < 1e-6
    assert int(net.norm.num_batches_tracked) == 2
    assert torch.allclose(net.norm.running_mean, ref.norm.running_mean)
    before = copy.deepcopy(net.state_dict())

    def accumulate() -> None:
        for half in x.chunk(2):
            net(half).square().sum().backward()

    with pytest.raises(RuntimeError, match="got a second gradient since the model's last"):
        handle.step(accumulate)
    net.load_state_dict(before)  # (the refused pre-pass ran forwards, as any forward does)
    handle.remove()
    net.blocks[0].weight.requires_grad_(False)
    handle = coap_dist.optimizer_in_backward(net, opt)
    net.blocks[0].weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"shape \(16, 16\) requires a gradient but has no hook"):
        net(x).square().sum().backward()
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    # A clipped handler's state loads into an unclipped one (its coefficient unused).
    handle.remove()
    clipped = coap_dist.optimizer_in_backward(net, opt, max_grad_norm=0.1, clip="previous")
    clipped.step(lambda: net(x).square().sum().backward())
    clipped.remove()
    coap_dist.optimizer_in_backward(net, opt).load_state_dict(clipped.state_dict())


def test_bucket_steps_reuse_the_handlers_norms_as_their_check() -> None:
    """The norms the handler takes of each bucket (for the global norm) are the bucket
    step's non-finite check: after the first step no gradient is summed again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class GradSums(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten.sum.default and args[0].numel() > 1000:
                self.calls += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = Llama(LLAMA_PRESETS["tiny"])
    opt = coap_dist.COAPAdamW(coap_dist.param_groups(model, rank=8), lr=1e-3, update_interval=100)
    handle = coap_dist.optimizer_in_backward(model, opt, max_grad_norm=CLIP, bucket_mb=0.1)
    for step in range(3):
        watch = GradSums()
        with watch:
            handle.step(_closure(model, step))
        assert watch.calls == 0, (step, watch.calls)
    assert opt.metrics()["optim/nonfinite_skips"] == 0
