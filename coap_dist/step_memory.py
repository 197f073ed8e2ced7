"""Peak memory of a training step: a measurement of live tensor bytes, and its estimator.

Measurement (:class:`LiveTensors`): a ``TorchDispatchMode`` that registers the storage of
every tensor an op reads or writes (the local tensors of DTensors), plus every parameter,
gradient, buffer and optimizer-state tensor given to :meth:`LiveTensors.track`, and follows
each storage until it is freed (a weak reference). ``peak`` is the largest sum of live
storage bytes at any op boundary: what a caching-free allocator would need, on any device
(on a CPU, where the process RSS also holds the allocator's caches, it is the figure that
compares runs). Storages created by an op that the mode does not see (inside a collective
library) are missed; so is the allocator's rounding.

Estimator (:func:`estimate_step_peak`), per rank, for the app's LLaMA models::

    peak = params + state + max(activations + backward_extra, grads_step + step_temp)

* ``params``: the parameters this rank holds (FSDP2: its shards; else the whole model);
* ``state``: :func:`coap_dist.memory.estimate_state_bytes` (the layouts' own planners);
* ``activations``: the bytes autograd saves for backward, measured, not modelled: the model's
  forward and loss run on fake CPU tensors under ``saved_tensors_hooks`` (each storage
  once; nothing allocated), so the term follows the model code and the CPU's kernels;
* ``backward_extra``, ``grads_step``, ``step_temp``: the gradients and transients at the
  start of backward and at the step, per layout (:func:`estimate_step_peak`).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

__all__ = ["STEP_LAYOUTS", "LiveTensors", "StepPeak", "activation_bytes", "estimate_step_peak"]

STEP_LAYOUTS = ("replicated", "ddp_owner", "fsdp2")
"""Layouts :func:`estimate_step_peak` models: whole parameters and gradients on every rank
(state replicated, or sharded by owner), or FSDP2 row shards."""


def _leaves(t: torch.Tensor) -> Iterable[torch.Tensor]:
    """The plain tensors holding ``t``'s data (the inner tensors of a wrapper subclass)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for n in names:
            inner = getattr(t, n)
            if isinstance(inner, torch.Tensor):
                yield from _leaves(inner)
    else:
        yield t


class LiveTensors(TorchDispatchMode):
    """Live storage bytes and their peak over the ops run inside the mode (module docstring).

    Attributes:
        live: bytes of the registered storages alive now.
        peak: the largest ``live`` seen at an op boundary since entering (or :meth:`reset`).
    """

    def __init__(self) -> None:
        super().__init__()
        self._alive: dict[int, int] = {}  # id(storage) -> bytes
        self._refs: dict[int, weakref.ref[Any]] = {}
        self.live = 0
        self.peak = 0

    def _add(self, t: object) -> None:
        if not isinstance(t, torch.Tensor):
            return
        for leaf in _leaves(t):
            if leaf.device.type == "meta":
                continue
            st = leaf.untyped_storage()
            key = id(st)
            if key in self._alive:
                continue
            nbytes = st.nbytes()
            self._alive[key] = nbytes
            self._refs[key] = weakref.ref(st, self._freer(key))
            self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _freer(self, key: int) -> Callable[[Any], None]:
        return lambda _: self._free(key)

    def _free(self, key: int) -> None:
        self.live -= self._alive.pop(key, 0)
        self._refs.pop(key, None)

    def track(self, *objects: Any) -> None:
        """Register existing tensors: modules (parameters, their gradients, buffers),
        optimizers (every tensor in their state), tensors."""
        for obj in objects:
            if isinstance(obj, nn.Module):
                for p in obj.parameters():
                    self._add(p)
                    self._add(p.grad)
                for b in obj.buffers():
                    self._add(b)
            elif isinstance(obj, torch.optim.Optimizer):
                for st in obj.state.values():
                    for leaf in tree_flatten(st)[0]:
                        self._add(leaf)
            else:
                self._add(obj)

    def reset(self) -> None:
        """Restart the peak from the live bytes now."""
        self.peak = self.live

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        for a in tree_flatten((args, kwargs or {}))[0]:
            self._add(a)
        out = func(*args, **(kwargs or {}))
        for o in tree_flatten(out)[0]:
            self._add(o)
        return out


def activation_bytes(
    build: Callable[[], nn.Module], batch: int, seq_len: int, device: str = "cpu"
) -> int:
    """Bytes autograd saves for backward in one forward and cross-entropy loss of the model
    ``build()`` returns, on ``batch`` x ``seq_len`` tokens: each saved storage once,
    parameters excluded. Runs on fake tensors of ``device`` (nothing is allocated; the
    device's own kernels are chosen, e.g. flash attention saves no T x T matrix)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []
    with FakeTensorMode(allow_non_fake_inputs=False), torch.device(device):
        model = build()
        params = {id(p.untyped_storage()) for p in model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if id(st) not in params and id(st) not in seen:
                seen[id(st)] = st.nbytes()
                keep.append(t)
            return t

        tokens = torch.zeros(batch, seq_len, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(tokens)
            nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
    keep.clear()
    return sum(seen.values())


@dataclasses.dataclass(frozen=True)
class StepPeak:
    """The estimator's terms, bytes per rank (see the module docstring)."""

    params: int
    state: int
    activations: int
    backward_extra: int
    grads_step: int
    step_temp: int

    @property
    def total(self) -> int:
        """params + state + max(activations + backward_extra, grads_step + step_temp)."""
        return (
            self.params
            + self.state
            + max(self.activations + self.backward_extra, self.grads_step + self.step_temp)
        )

    def to_dict(self) -> dict[str, int]:
        """The terms and the total."""
        return {**dataclasses.asdict(self), "total": self.total}


def estimate_step_peak(
    model: str,
    optimizer: str,
    *,
    batch: int,
    seq_len: int,
    world_size: int = 1,
    layout: str = "replicated",
    in_backward: bool = False,
    rank: int | str | None = None,
    rank_ratio: float | None = None,
    bucket_mb: float = 25.0,
) -> StepPeak:
    """Per-rank peak of one training step of LLaMA preset ``model`` (fp32 parameters and
    gradients, the app's wrapping: ``fully_shard`` per block and the root) with
    ``optimizer`` ("adamw": torch's fused AdamW, or "coap"), ``batch`` sequences of
    ``seq_len`` tokens on this rank, under ``layout`` at ``world_size`` ranks. Terms, with
    G / P this rank's gradient / parameter bytes, L = 4 B T V (one logits-sized fp32 tensor),
    R the root module's parameters (embeddings, head), D the largest AdamW parameter:

    * backward_extra = 3 L (log-softmax output's and logits' gradients, the loss's
      softmax) [+ FSDP2: 3 R + 2 block (the root's unsharded parameters, gradients and
      reduce-scatter input, one block's) + G / 2 in the normal step (shards so far)]
      [+ DDP in-backward: one bucket's averaging copy];
    * grads_step = G (x 2 under DDP: its reducer's bucket copy; FSDP2: G sharded, at the
      end of backward); with ``in_backward`` one bucket, min(``bucket_mb``, G) (FSDP2: 0);
    * step_temp = max(L, optimizer transients): fused AdamW none; COAP D plus three
      gradients of the largest matrix (its projected gradient, update and back-projection),
      under ``ddp_owner`` plus every AdamW parameter (their owners' pieces gathered).

    Calibrated against ``benchmarks/step_memory.py`` (its table prints estimate / measured
    per cell)."""
    from coap_dist.memory import estimate_state_bytes, lowrank_names
    from coap_dist.models.llama import LLAMA_PRESETS, Llama

    if layout not in STEP_LAYOUTS:
        raise ValueError(
            f"estimate_step_peak: invalid layout={layout!r}; use one of {STEP_LAYOUTS}"
        )
    cfg = LLAMA_PRESETS[model]
    with torch.device("meta"):
        net = Llama(cfg)
    named = {n: p.numel() * 4 for n, p in net.named_parameters()}
    total = sum(named.values())
    sharded = layout == "fsdp2" and world_size > 1
    replicated = layout == "replicated" or world_size == 1
    params = -(-total // world_size) if sharded else total
    state = estimate_state_bytes(
        net,
        optimizer,
        rank=rank,
        rank_ratio=rank_ratio,
        world_size=1 if replicated else world_size,
        layout="ddp_owner" if replicated else layout,
        dtype=torch.float32,
    ).max_per_rank
    blocks = [sum(p.numel() for p in blk.parameters()) * 4 for blk in net.layers]
    root = total - sum(blocks)
    logits = 4 * batch * seq_len * cfg.vocab_size
    ddp = world_size > 1 and not sharded
    extra = 3 * logits
    if sharded:
        extra += 3 * root + 2 * max(blocks) + (0 if in_backward else params // 2)
    elif ddp and in_backward:
        extra += min(int(bucket_mb * 2**20), total)
    if in_backward:  # the last bucket (FSDP2: one module's shards, in backward_extra)
        grads = 0 if sharded else min(int(bucket_mb * 2**20), total)
    else:
        grads = params * (2 if ddp else 1)
    temp = 0
    if optimizer == "coap":
        low = lowrank_names(net)
        dense = [b for n, b in named.items() if n not in low]
        matrix = max((b for n, b in named.items() if n in low), default=0)
        temp = max(dense, default=0) + 3 * matrix
        if layout == "ddp_owner" and world_size > 1:
            temp += sum(dense)
        if sharded:
            temp = -(-temp // world_size)
    return StepPeak(
        params=params,
        state=state,
        activations=activation_bytes(lambda: Llama(cfg), batch, seq_len),
        backward_extra=extra,
        grads_step=grads,
        step_temp=max(logits, temp),
    )
