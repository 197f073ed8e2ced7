"""Optimizer-in-backward: step each bucket of parameters as soon as its gradients are ready,
then free those gradients, so that a training step never holds the whole model's gradients.

:func:`optimizer_in_backward` registers a post-accumulate-grad hook on every trainable
parameter of ``model``. During a backward pass the parameters whose gradients are complete
collect in a bucket; a full bucket is stepped with ``optimizer.step()`` (which steps exactly
the parameters holding a gradient: the bucket's) and its gradients are set to ``None``. The
rest is stepped at the end of the backward pass. Each parameter takes the step the normal
loop would give it: its own step count, its own refresh schedule, the same non-finite rule,
the same state, so checkpoints and resume are those of the normal step. Parameters that the
optimizer says must step with the rest of their group (COAP's ``steps_with_group``: the
matrices of a ``rank="auto"`` group at its SVD steps, whose ranks are chosen over the group)
keep their gradient out of their bucket's step and step together at the backward's end.

Where the gradient comes from, per layout:

* one process: the autograd gradient;
* DDP (``replicated`` / ``ddp_owner`` layouts): the model is NOT wrapped in
  ``DistributedDataParallel`` (whose reducer averages only after the whole backward); the
  handler averages each bucket's gradients itself, in one flat all-reduce, before its step,
  and broadcasts rank 0's parameters and buffers once at construction (as DDP does);
* FSDP2 / HSDP (``fsdp2`` / ``fsdp2_owner``): FSDP2 runs the hook on each sharded parameter
  after its reduce-scatter (and HSDP's all-reduce over replicas); a bucket is one
  ``fully_shard`` module's parameters, whose gradients share one reduce-scatter buffer.

Buckets are the same on every rank (hook order is the graph's; sizes use global shapes),
so the collectives of each bucket's step line up.

Global-norm clipping (``max_grad_norm``), with c = min(1, max_norm / (||g|| + 1e-6)) and
||g|| the 2-norm over every gradient of the step (as ``torch.nn.utils.clip_grad_norm_``):

* ``clip="exact"`` (default): a norm pre-pass. :meth:`InBackward.step` runs the closure twice
  under the same RNG state: the first backward only sums squared norms (each gradient freed
  as it is ready, after the bucket's averaging under DDP), the second steps with g <- c g.
  Exactly the normal step's update, for one extra forward and backward (and, under DDP, one
  extra gradient all-reduce) per step.
* ``clip="previous"``: c from the norm of the previous step's gradients (measured during its
  backward); one pre-pass at the first step only. A named variant that changes the result:
  see the README's in-backward section for its measured deviation.

Not supported (refused by name): DeepSpeed engines (their ``backward``/``step`` own the
gradient partitions), FSDP1 (flat parameters), a ``DistributedDataParallel`` wrapper (pass
the module itself), gradient accumulation (each backward is one optimizer step: a second
gradient of a parameter before the model's next forward raises), optimizer tensors that are
not the model's parameters, and parameters unfrozen after the handler was built.

The global norm is the sum over every backward pass between two forwards of the model (the
model's forward pre-hook restarts it), so reentrant activation checkpointing, which runs one
backward per segment, clips exactly; a recomputation inside a backward is not a new forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from coap_dist.distributed.comm import Comm

__all__ = ["CLIP_MODES", "InBackward", "optimizer_in_backward"]

CLIP_MODES = ("exact", "previous")
DEFAULT_BUCKET_MB = 25.0
"""Bucket size outside FSDP2 (DDP's ``bucket_cap_mb`` default): the gradient bytes held
beyond one parameter's at any time."""


def optimizer_in_backward(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float | None = None,
    clip: str = "exact",
    bucket_mb: float = DEFAULT_BUCKET_MB,
    process_group: dist.ProcessGroup | None = None,
) -> InBackward:
    """Step ``optimizer`` inside ``model``'s backward passes (see the module docstring).

    Args:
        model: the module whose trainable parameters are all in ``optimizer`` (plain, or
            sharded by ``fully_shard``; not wrapped in DDP, FSDP1 or DeepSpeed).
        optimizer: a COAP optimizer, or any torch optimizer that steps only the parameters
            holding a gradient (``torch.optim.AdamW``, fused or not).
        max_grad_norm: global-norm clipping threshold (None or inf: no clipping).
        clip: "exact" (norm pre-pass) or "previous" (previous step's norm).
        bucket_mb: bucket size in MiB of gradients outside FSDP2.
        process_group: the data-parallel group whose gradients are averaged for plain
            (non-DTensor) parameters; default: the world when torch.distributed is
            initialised with more than one rank, else none. Ignored under FSDP2.

    Returns:
        the handle: call ``handle.step(closure)`` once per training step, where
        ``closure()`` runs forward and backward and returns the loss.
    """
    return InBackward(
        model,
        optimizer,
        max_grad_norm=max_grad_norm,
        clip=clip,
        bucket_mb=bucket_mb,
        process_group=process_group,
    )


class InBackward:
    """The handle of :func:`optimizer_in_backward` (one per model and optimizer).

    Attributes:
        grad_norm: 0-dim tensor, the global gradient 2-norm (before clipping) of the last
            backward, on the parameters' device (no host sync); NaN before the first.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float | None,
        clip: str,
        bucket_mb: float,
        process_group: dist.ProcessGroup | None,
    ) -> None:
        _refuse_wrappers(model, optimizer)
        if clip not in CLIP_MODES:
            raise ValueError(
                f"optimizer_in_backward: invalid clip={clip!r}; use one of {CLIP_MODES}"
            )
        if max_grad_norm is not None and not (max_grad_norm > 0):
            raise ValueError(
                f"optimizer_in_backward: invalid max_grad_norm={max_grad_norm!r}; give a "
                "positive threshold, or None for no clipping"
            )
        if not (bucket_mb > 0):
            raise ValueError(f"optimizer_in_backward: invalid bucket_mb={bucket_mb!r}; must be > 0")
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = (
            None if max_grad_norm is None or math.isinf(max_grad_norm) else float(max_grad_norm)
        )
        self.clip = clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("optimizer_in_backward: the model has no trainable parameter")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f"optimizer_in_backward: trainable parameter {missing[0]!r} (and "
                f"{len(missing) - 1} more) is not in the optimizer, so its gradient would "
                "never step nor be freed. Build the optimizer over the model's parameters "
                "as they are now (after fully_shard), or set requires_grad=False on it"
            )
        in_model = {id(p) for p in model.parameters()}
        foreign = [
            tuple(p.shape)
            for g in optimizer.param_groups
            for p in g["params"]
            if id(p) not in in_model and p.requires_grad
        ]
        if foreign:
            raise ValueError(
                f"optimizer_in_backward: the optimizer holds a trainable tensor of shape "
                f"{foreign[0]} (and {len(foreign) - 1} more) that is not a parameter of the "
                "model: no hook would step it once per backward (every bucket's step would). "
                "Register it on the model (an nn.Parameter attribute), or give it its own "
                "optimizer"
            )
        hooked = {id(p) for p in self.params}
        # frozen now: one unfrozen later is refused at the next backward, before any step
        self._unhooked = [
            p for g in optimizer.param_groups for p in g["params"] if id(p) not in hooked
        ]
        self.sharded = any(isinstance(p, DTensor) for p in self.params)
        if self.sharded and not all(isinstance(p, DTensor) for p in self.params):
            raise ValueError(
                "optimizer_in_backward: the model mixes FSDP2 (DTensor) and plain trainable "
                "parameters; apply fully_shard to the root module too"
            )
        self.device = _local(self.params[0]).device
        self.comm: Comm | None = None  # the data-parallel group that averages plain grads
        if not self.sharded and dist.is_available() and dist.is_initialized():
            group = process_group if process_group is not None else dist.group.WORLD
            if group is not None and dist.get_world_size(group) > 1:
                self.comm = Comm(group, self.device)
                _broadcast_from_first(model, group)
        self._bucket_of = self._fsdp2_buckets() if self.sharded else {}
        self._bucket_need: dict[int, int] = {}
        for b in self._bucket_of.values():
            self._bucket_need[b] = self._bucket_need.get(b, 0) + 1
        self._bucket_bytes = bucket_mb * 2**20
        self._ready: list[Tensor] = []
        self._ready_bytes = 0.0
        # (parameter, its averaged and clipped gradient, its norm) stepped at the backward's
        # end with the rest of its group (the optimizer's ``steps_with_group``)
        self._held: list[tuple[Tensor, Tensor, Tensor]] = []
        self._ready_count: dict[int, int] = {}
        # the local norms of every gradient since the model's last forward (all the
        # backward passes over its graph: reentrant checkpointing runs one per segment)
        self._norms: list[tuple[tuple[int, ...], Tensor]] = []
        self._seen: set[int] = set()  # parameters whose gradient arrived since then
        self._queued = False
        self._mode = "step"  # "norm": pre-pass (sum squared norms, free); "step": step
        self._armed = False  # inside step(): the mode is the handler's, not a bare backward
        self._coef: Tensor | None = None  # c for the next step (from the last norm)
        self._step_coef: Tensor | None = None  # c of this step, fixed at its forward
        self.grad_norm = torch.full((), math.nan, device=self.device)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        self._handles.append(model.register_forward_pre_hook(self._forward))

    # ---------------------------------------------------------------------------- public
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One training step: ``closure()`` runs forward and backward and returns the loss;
        the optimizer steps inside the backward. With clipping it runs twice (``"exact"``;
        ``"previous"``: at the first step only), the first time under a forked RNG so that
        both passes draw the same dropout. Returns the loss (of the stepping pass, detached)."""
        if self.max_grad_norm is not None and (self.clip == "exact" or self._coef is None):
            buffers = _save_buffers(self.model)  # the pre-pass's forward must leave none
            with _same_rng(self.device):
                self._run(closure, "norm")
            _restore_buffers(self.model, buffers)
        return self._run(closure, "step")

    def remove(self) -> None:
        """Remove the hooks: the optimizer is stepped by the caller again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        """The handler's own state: the last gradient norm (``clip="previous"`` uses it)."""
        return {
            "grad_norm": self.grad_norm.detach().clone().cpu(),
            "has_coef": self._coef is not None,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resumed ``clip="previous"`` run clips as it would have)."""
        self.grad_norm = sd["grad_norm"].to(self.device)
        clipping = sd.get("has_coef") and self.max_grad_norm is not None
        self._coef = self._coefficient(self.grad_norm) if clipping else None

    # -------------------------------------------------------------------------- internals
    def _run(self, closure: Callable[[], Tensor], mode: str) -> Tensor:
        self._drop_pending()
        self._norms, self._seen, self._step_coef = [], set(), self._coef
        self._mode, self._armed = mode, True
        try:
            loss = closure()
        except BaseException:
            self._drop_pending()
            raise
        finally:
            self._mode, self._armed = "step", False
        return loss.detach() if isinstance(loss, Tensor) else loss

    def _drop_pending(self) -> None:
        """Forget a backward that raised before its end (it never ran _finish): its pending
        bucket's gradients are freed, not stepped, so that the next pass starts clean. The
        buckets stepped before the error stay stepped: in-backward applies a step
        piecewise."""
        for p in self._ready:
            p.grad = None
        self._ready, self._ready_bytes, self._queued = [], 0.0, False
        self._held = []
        self._ready_count.clear()

    def _forward(self, module: nn.Module, args: Any) -> None:
        """The model's forward (a new step's gradients follow; not a recomputation inside a
        backward): drop what a failed bare ``backward()`` left, restart the norm sums and
        fix this step's clip coefficient (``clip="previous"``)."""
        if torch._C._current_graph_task_id() != -1 or self._armed:
            return  # a checkpoint's recomputation, or inside handle.step (done by _run)
        self._drop_pending()
        self._norms, self._seen, self._step_coef = [], set(), self._coef

    def _fsdp2_buckets(self) -> dict[int, int]:
        """Parameter id -> bucket: the ``fully_shard`` module whose reduce-scatter gives it
        its gradient (one shared buffer per module)."""
        out: dict[int, int] = {}
        for b, module in enumerate(self.model.modules()):
            state = getattr(module, "_get_fsdp_state", None)
            group = getattr(state(), "_fsdp_param_group", None) if state is not None else None
            if group is None:
                continue
            for fp in group.fsdp_params:
                if fp.sharded_param.requires_grad:
                    out[id(fp.sharded_param)] = b
        return out

    def _hook(self, p: Tensor) -> None:
        if not self._armed and (
            self.max_grad_norm is not None and (self.clip == "exact" or self._coef is None)
        ):
            raise RuntimeError(
                "optimizer_in_backward: clipping to max_grad_norm needs a norm pre-pass "
                f"(clip={self.clip!r}): run the step as handle.step(closure), where closure() "
                "runs forward and backward, not loss.backward() alone"
            )
        if id(p) in self._seen:
            raise RuntimeError(
                "optimizer_in_backward: a parameter of shape "
                f"{tuple(p.shape)} got a second gradient since the model's last forward "
                "(gradient accumulation, or several backward passes over one graph). Each "
                "backward is one optimizer step here: run one forward and one backward per "
                "step, or use the normal loop to accumulate"
            )
        self._seen.add(id(p))
        if not self._queued:  # the first gradient of a backward pass, before any step
            unfrozen = next((q for q in self._unhooked if q.requires_grad), None)
            if unfrozen is not None:
                raise RuntimeError(
                    f"optimizer_in_backward: an optimizer parameter of shape "
                    f"{tuple(unfrozen.shape)} requires a gradient but has no hook: it was "
                    "frozen when the handler was built. After unfreezing, build it again "
                    "(handle.remove(); optimizer_in_backward(model, optimizer, ...))"
                )
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        self._ready.append(p)
        b = self._bucket_of.get(id(p))
        if b is not None:
            self._ready_count[b] = self._ready_count.get(b, 0) + 1
            if self._ready_count[b] == self._bucket_need[b]:
                del self._ready_count[b]
                self._flush()
        else:
            self._ready_bytes += p.numel() * p.element_size()
            if not self.sharded and self._ready_bytes >= self._bucket_bytes:
                self._flush()

    def _flush(self) -> None:
        """Average (DDP), measure and step (or, in the pre-pass, only measure) the ready
        parameters, then free their gradients."""
        params, self._ready, self._ready_bytes = self._ready, [], 0.0
        if not params:
            return
        try:
            grads = [p.grad for p in params if p.grad is not None]
            assert len(grads) == len(params)
            if self.comm is not None:
                _average(grads, self.comm)
            measured = _local_norms(grads)
            self._norms += measured
            if self._mode == "step":
                local = [_local(g) for g in grads]
                norms = [n for _, n in measured]
                if self._step_coef is not None:
                    torch._foreach_mul_(local, self._step_coef)
                    norms = list(torch._foreach_mul(norms, self._step_coef))
                together = getattr(self.optimizer, "steps_with_group", None)
                hold = together(params) if together is not None else [False] * len(params)
                now = []
                for j, (p, g, n, h) in enumerate(zip(params, grads, norms, hold, strict=True)):
                    if h:  # out of this bucket's step; back at the backward's end
                        self._held.append((p, g, n))
                        p.grad = None
                    else:
                        now.append(j)
                if now:
                    self._step([local[j] for j in now], [norms[j] for j in now])
        finally:  # stepped or refused, a bucket's gradients never stay for the next pass
            for p in params:
                p.grad = None

    def _step(self, local: list[Tensor], norms: list[Tensor]) -> None:
        """``optimizer.step()`` of the parameters holding a gradient, whose local gradient
        tensors are ``local`` with 2-norms ``norms``."""
        reuse = getattr(self.optimizer, "reuse_grad_norms", None)
        if reuse is not None:  # COAP: its step's non-finite check is these norms
            reuse(local, norms)
        self.optimizer.step()

    def _step_held(self) -> None:
        """Step the parameters held back by :meth:`_flush` (all of a ``rank="auto"`` group's
        matrices at an SVD step) in one ``step()``, then free their gradients."""
        held, self._held = self._held, []
        if not held:
            return
        try:
            for p, g, _ in held:
                p.grad = g
            self._step([_local(g) for _, g, _ in held], [n for _, _, n in held])
        finally:
            for p, _, _ in held:
                p.grad = None

    def _finish(self) -> None:
        """End of a backward pass: step the rest, then the global norm since the model's
        forward (one all-reduce per set of sharded mesh dims; several passes under
        reentrant checkpointing: the last one has every gradient) and, from it, the next
        clip coefficient."""
        self._queued = False
        self._ready_count.clear()
        self._flush()
        self._step_held()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        by_dims: dict[tuple[int, ...], list[Tensor]] = {}
        for dims, n in self._norms:
            by_dims.setdefault(dims, []).append(n)
        mesh = next((p.device_mesh for p in self.params if isinstance(p, DTensor)), None)
        for dims, norms in by_dims.items():
            sq = torch.linalg.vector_norm(torch.stack(norms)) ** 2
            for d in dims:
                assert mesh is not None
                dist.all_reduce(sq, group=mesh.get_group(d))
            total = total + sq
        self.grad_norm = total.sqrt()
        if self.max_grad_norm is not None:
            self._coef = self._coefficient(self.grad_norm)

    def _coefficient(self, norm: Tensor) -> Tensor:
        assert self.max_grad_norm is not None
        return torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)


def _local(t: Tensor) -> Tensor:
    """This rank's tensor of a DTensor (the object itself, as the layouts see it)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _local_norms(grads: Sequence[Tensor]) -> list[tuple[tuple[int, ...], Tensor]]:
    """Each gradient's local 2-norm, with the mesh dims its DTensor is sharded over (whose
    groups sum the squares); ``()`` for plain (replicated or averaged) gradients."""
    local = [_local(g) for g in grads]
    norms = torch._foreach_norm(local)
    dims = [
        tuple(d for d, pl in enumerate(g.placements) if pl.is_shard())
        if isinstance(g, DTensor)
        else ()
        for g in grads
    ]
    return list(zip(dims, norms, strict=True))


def _average(grads: Sequence[Tensor], comm: Comm) -> None:
    """g <- mean over the group's ranks of g, in place, one flat all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        torch._foreach_div_(same, comm.world)  # (as DDP: divide, then sum)
        for g, total in zip(same, comm.all_reduce_list(same), strict=True):
            g.copy_(total)


def _broadcast_from_first(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps)."""
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=src, group=group)


def _save_buffers(model: nn.Module) -> list[tuple[nn.Module, str, Tensor, Tensor]]:
    """(module, name, the buffer, a copy of it) for every buffer (BatchNorm's running
    statistics and counters): a norm pre-pass's forward must not advance them."""
    out = []
    for module in model.modules():
        for name, b in module.named_buffers(recurse=False):
            if b is not None:
                out.append((module, name, b, b.detach().clone()))
    return out


def _restore_buffers(model: nn.Module, saved: list[tuple[nn.Module, str, Tensor, Tensor]]) -> None:
    """Put back :func:`_save_buffers`' values, into the same tensors (or the registered
    name, where the forward replaced the tensor)."""
    with torch.no_grad():
        for module, name, b, value in saved:
            now = module._buffers.get(name)
            if now is b:
                b.copy_(value)
            else:
                module._buffers[name] = value


@contextlib.contextmanager
def _same_rng(device: torch.device) -> Iterator[None]:
    """Run the body under a copy of the RNG state (the CPU's and, on an accelerator, that
    device's): what follows draws the same numbers."""
    on_device = device.type not in ("cpu", "meta")
    with torch.random.fork_rng(
        devices=[device] if on_device else [], device_type=device.type if on_device else "cuda"
    ):
        yield


def _refuse_wrappers(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse, naming what to use instead, the wrappers whose gradients in-backward cannot
    step (the support declaration's reasons): DeepSpeed, FSDP1, and DDP (which reduces only
    after the whole backward: pass its module)."""
    from torch.nn.parallel import DistributedDataParallel

    from coap_dist.distributed.support import reason

    if type(model).__name__ == "DeepSpeedEngine" or type(optimizer).__module__.startswith(
        "deepspeed"
    ):
        raise ValueError(
            f"optimizer_in_backward: DeepSpeed is not supported: {reason('zero', 'in_backward')}"
        )
    if any(getattr(p, "_fsdp_flattened", False) for p in model.parameters()):
        raise ValueError(
            f"optimizer_in_backward: FSDP1 is not supported: {reason('fsdp1', 'in_backward')}"
        )
    if isinstance(model, DistributedDataParallel):
        raise ValueError(
            "optimizer_in_backward: pass the module itself, not DistributedDataParallel: DDP "
            "averages gradients only after the whole backward, too late to step inside it; "
            "the handler averages each bucket over the data-parallel group instead "
            "(optimizer_in_backward(ddp_model.module, ...) on an unwrapped model)"
        )
