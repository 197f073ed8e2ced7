"""COAPAdamW and COAPAdafactor: low-rank projected optimizer state with a moving projector.

Per matrix parameter W (global m x n, rank r; see :mod:`coap_dist.functional.projection` for the
canonical orientation), with k the number of completed steps, T_u = ``update_interval`` and
F = ``reproject_factor``:

1. projector schedule: k == 0: P = RSVD(G); k % (T_u F) == 0: P = RSVD(G, warm start at P);
   k % T_u == 0: P = correlation-aware step (``projector_update``). With ``moments="rotate"``
   the moments are re-expressed in the new basis through C = P_old P_new^T.
2. R = G P^T; Adam (or Adafactor) on R; W <- (1 - lr wd) (W - lr_t alpha back(D)).

Convolutions (4-D, > 9216 elements, ``rank_ratio_cnn`` set) use a Tucker-2 core instead of R;
everything else (1-D, small convs, groups with ``algorithm="adamw"``) runs AdamW.

Where the state lives is the layout's business (:mod:`coap_dist.optim.layout`), bound late:
from the tensors in the groups at the first ``step()``, so building the optimizer before
``fully_shard``, ``accelerator.prepare`` or a DeepSpeed engine works like building it after.
State is created lazily: a parameter that never gets a gradient costs nothing.

Non-finite gradients: the step of an affected parameter is skipped on every rank (moments,
projector, weights and its step counter untouched) and counted in ``metrics()``; a refresh
never installs a non-finite projector (the old one is kept, without a host sync). A
parameter whose first gradient is all zero (DeepSpeed's construction-time step, DCP's state
initialisation) gets its state allocated but takes no step. The check is one reduction per
gradient and one all-reduce of a flag vector: the step's only host synchronisation.

``skip_nonfinite=False`` (no check, as torch AdamW): where the wrapper gives every rank the
same gradients (``Layout.uniform_grads``: one process, DDP, FSDP2 / HSDP) a step whose
parameters have all stepped before decides from this rank alone and makes no host
synchronisation; the flag vector is still summed on the device and read at the next
``metrics()`` (or deciding step), which folds in the refresh metrics and raises if the ranks
turn out to have held gradients of different parameters.
"""

from __future__ import annotations

import math
import textwrap
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from coap_dist.functional import projection as fproj
from coap_dist.optim import autorank, kernels, schedule
from coap_dist.optim.checkpoint import PENDING_STATE, Checkpoints, saved_ranks
from coap_dist.optim.config import COAPAdafactorConfig, COAPAdamWConfig, without_torch_flags
from coap_dist.optim.layout import (
    Layout,
    Update,
    Work,
    refuse_fsdp1,
    resolve_layout,
    run_construction_hooks,
)
from coap_dist.optim.schedule import COUNTERS, AdaptiveState, count_refreshes, refresh_due
from coap_dist.optim.spec import ParamSpec, StateFormat, make_spec, with_stagger
from coap_dist.optim.storage import rank_change, read_moment

SHARDING_NAMES = (None, "none", "owner", "local")
STACKED_SUM_NUMEL = 1 << 14
"""The non-finite check sums gradients of at most this many entries (norm weights, biases)
as rows of one stack per size: a copy this small costs less than a kernel per gradient."""
STACK_BUDGET_NUMEL = 1 << 20
"""At most this many entries per such stack (its temporary stays at 4 MiB in fp32)."""


class _COAPBase(Checkpoints, Optimizer):
    """Shared machinery of the COAP optimizers: late binding and the step loop (checkpoints:
    :class:`~coap_dist.optim.checkpoint.Checkpoints`)."""

    _rule: kernels.AdamWRule | kernels.AdafactorRule = kernels.AdamWRule()
    config_class: type[COAPAdamWConfig] = COAPAdamWConfig

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        *,
        config: COAPAdamWConfig | None = None,
        sharding: Any = None,
        process_group: Any = None,
        **hyperparameters: Any,
    ) -> None:
        name = type(self).__name__
        given = {} if config is None else config.as_dict()
        if config is not None and not isinstance(config, self.config_class):
            raise TypeError(
                f"{name}: `config` must be a {self.config_class.__name__}, got "
                f"{type(config).__name__}"
            )
        if lr is not None:
            given["lr"] = lr
        hyperparameters = without_torch_flags(hyperparameters, name)
        self.config = self.config_class.from_mapping({**given, **hyperparameters}, name)
        if not isinstance(sharding, Layout) and sharding not in SHARDING_NAMES:
            raise ValueError(
                f"{name}: invalid `sharding`={sharding!r}; must be one of "
                f"{SHARDING_NAMES} or a coap_dist.distributed layout instance"
            )
        self.name = name
        self.state_bits = self.config.state_bits
        self.skip_nonfinite = self.config.skip_nonfinite
        super().__init__(params, self.config.as_dict("group"))
        # Weak references: after accelerate/FSDP2 swap in sharded parameters, the originals
        # must be freed; DeepSpeed keeps its model parameters alive, and this optimizer
        # needs them (its groups then hold flat partitions).
        self._built = [[weakref.ref(p) for p in g["params"]] for g in self.param_groups]
        # The group dicts, in order: wrappers may show a subset in ``param_groups`` during a
        # step (DeepSpeed ZeRO 1-2 steps one group at a time) or swap their tensors.
        self.groups: list[dict[str, Any]] = list(self.param_groups)
        self._sharding = sharding
        self._process_group = process_group
        self._layout: Layout | None = None
        self._layout_stale = False
        self._bound_groups = len(self.groups)  # groups the layout was bound with
        self.specs: list[ParamSpec] = []
        self.group_of: list[int] = []
        self._steps: list[int] = []
        self._adaptive: dict[int, AdaptiveState] = {}
        self._auto_rank: dict[int, int] = {}  # rank="auto": each matrix's current rank
        self._planned: list[dict[str, Any]] = []  # planned_keys per group, at the bind
        # per group dict id: its hyperparameters (lr aside) when last validated
        self._validated: dict[int, tuple[Any, ...]] = {}
        self._pending: Tensor | None = None
        # id(gradient piece) -> (weak reference to it, its version then, its norm)
        self._checked: dict[int, tuple[weakref.ref[Tensor], int, Tensor]] = {}
        # per kind (index order, presence, first step): the last pattern and its tensor
        self._device_cache: dict[str, tuple[tuple[Any, ...], Tensor]] = {}
        # (the bound layout, and the optimizer index of each tensor id: steps_with_group)
        self._index_of: tuple[Layout, dict[int, int]] | None = None
        self._pending_load: dict[str, Any] | None = None
        self._consolidated: tuple[int, dict[str, Any]] | None = None
        self._step_calls = 0
        self._interrupted = None  # why step() and state_dict() refuse (see _refuse_interrupted)
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._refreshed: list[int] = []
        # Flag vectors summed but not read yet (steps that decided locally): see _read_late.
        self._late: Tensor | None = None  # [refresh_keep_old count, presence disagreements]
        self._late_residual: tuple[Tensor, list[int]] | None = None
        self._projector_time = 0.0
        self._residual = float("nan")
        built = [p for g in self.param_groups for p in g["params"]]
        if sharding == "owner" and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "invalid `sharding`='owner': it needs torch.distributed to be "
                "initialized first (launch with torchrun and call "
                "dist.init_process_group), or use sharding=None in one process"
            )
        if sharding in (None, "none", "owner"):
            # Built after FSDP1 wrapping without its layout: fail now, not at the first step.
            refuse_fsdp1(built)
        # Plan once from the shapes known now, so that a bad group fails at construction
        # (the real plan is made at the first step, from the tensors present then).
        if not any(getattr(p, "_fsdp_flattened", False) for p in built):
            group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
            self.plan([_global_shape(p) for p in built], [p.dtype for p in built], group_of)
        run_construction_hooks()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` (defaults fill the keys a group does not set), with
        the group validated by :attr:`config_class`; a group setting ``rank`` (or
        ``rank_ratio``) overrides the other one's default. Works after steps in one process
        (the new parameters' state starts at their first gradient)."""
        where = f"{self.name} param_groups[{len(self.param_groups)}]"
        own = {k: v for k, v in param_group.items() if k != "params"}
        for key, other in (("rank", "rank_ratio"), ("rank_ratio", "rank")):
            if own.get(key) is not None and other not in own:
                param_group[other] = None
        super().add_param_group(param_group)
        try:  # a refused group is not added
            group = self.param_groups[-1]
            self.config_class.validate_group(
                group, where, own=own, matrices=any(_may_be_matrix(p) for p in group["params"])
            )
            for j, p in enumerate(self.param_groups[-1]["params"]):
                _refuse_unsupported(p, f"{where} parameter {j}")
        except BaseException:
            self.param_groups.pop()
            raise
        if "groups" in self.__dict__:  # (not during torch's __init__): joins now, so that
            try:  # state_dict() before the next step carries it
                self._present_groups()
            except BaseException:  # refused (sharded state exists): the group is not added
                self.param_groups.pop()
                if self.groups and self.groups[-1] is param_group:
                    self.groups.pop()
                    self._built.pop()
                self._layout_stale = False
                raise

    # --------------------------------------------------------------------- Core protocol
    @property
    def built(self) -> list[list[Tensor | None]]:
        """Per group, the tensors the optimizer was built with (None where freed)."""
        return [[r() for r in refs] for refs in self._built]

    def plan(
        self,
        shapes: Sequence[tuple[int, ...]],
        dtypes: Sequence[torch.dtype],
        group_of: Sequence[int],
        *,
        fixed_rank: bool = False,
    ) -> list[ParamSpec]:
        """Every parameter's plan (see :class:`coap_dist.optim.layout.Core`)."""
        specs = []
        for i, (shape, dtype, gi) in enumerate(zip(shapes, dtypes, group_of, strict=True)):
            specs.append(
                make_spec(
                    index=i,
                    group_index=gi,
                    group=self.groups[gi],
                    shape=shape,
                    fmt=self._format(dtype),
                    where=f"{self.name} param_groups[{gi}]",
                    rank=None if fixed_rank else self._auto_rank.get(i),
                )
            )
        return with_stagger(specs, self.groups)

    def _format(self, dtype: torch.dtype) -> StateFormat:
        """State dtypes for a parameter updated in ``dtype`` (a wrapper's fp32 master copy
        when there is one); 8-bit state keeps projectors in that dtype."""
        if self.state_bits == 32:
            moment = proj = torch.float32
        elif self.state_bits == 16:
            moment = proj = torch.bfloat16
        else:
            moment = proj = dtype
        return StateFormat(moment, proj, self.state_bits == 8, self._rule.factored)

    def settings(self) -> dict[str, Any]:
        """Settings every rank must share: group hyperparameters, sizes, state_bits."""
        out: dict[str, Any] = {"state_bits": self.state_bits, "skip_nonfinite": self.skip_nonfinite}
        for i, g in enumerate(self.groups):
            for k, v in g.items():
                out[f"param_groups[{i}].{k}"] = len(v) if k == "params" else v
        return out

    def step_size(self, index: int) -> float:
        """alpha of this step's update of low-rank parameter ``index`` (after its count)."""
        spec, group = self.specs[index], self.groups[self.group_of[index]]
        if spec.kind == "conv":
            return kernels.adam_alpha(group, self._steps[index])
        return self._rule.alpha(group, self._steps[index])

    # ----------------------------------------------------------------------- binding
    @property
    def layout(self) -> Layout:
        """The distribution layout, bound from the tensors present now if not yet."""
        return self._bound()

    @property
    def params(self) -> list[Tensor]:
        """The parameters in optimizer order: the keys of ``state`` (bound layout)."""
        return self._bound().params

    def _bound(self) -> Layout:
        if self._layout is None:
            self._bind()
        assert self._layout is not None
        return self._layout

    def _bind(self) -> None:
        """Choose the layout from the tensors in the groups now and plan every parameter.
        State that already exists (tensors swapped after some steps) is carried over."""
        old_layout, old_state = self._layout, None
        if old_layout is not None:
            self._refuse_replanning()  # (a re-bind would plan from an edited group)
        added = len(self.groups) > self._bound_groups
        if old_layout is not None and any(self.state.values()):
            if old_layout.world != 1 and added:
                raise RuntimeError(
                    f"{self.name}: add_param_group after the first step is supported in one "
                    f"process; under the sharded `{old_layout.name}` layout every rank's state "
                    "placement would change. Add every group before the first step (a group "
                    "can start with lr=0), or save with consolidate_state_dict() and load into "
                    "a new optimizer built with all groups"
                )
            if old_layout.world != 1:
                raise RuntimeError(
                    f"{self.name}: a wrapper replaced the optimizer's tensors after sharded "
                    f"state was created under the `{old_layout.name}` layout; build the "
                    "optimizer before the first step with the final parameters, or save with "
                    "consolidate_state_dict() and load into a new optimizer"
                )
            old_state = self._local_state_dict()
        load = old_state if old_state is not None else self._pending_load
        if load is not None:  # the loaded ranks decide (none saved: the ranks of rank_ratio)
            # ... of the matrices whose group is rank="auto" now: a fixed rank of this
            # optimizer wins, the saved state converting to it (as a loaded fixed rank does)
            auto_now = [
                g.get("rank") == "auto"
                for g, n in zip(self.groups, self._group_sizes(), strict=True)
                for _ in range(n)
            ]
            self._auto_rank = {
                i: r for i, r in saved_ranks(load).items() if i < len(auto_now) and auto_now[i]
            }
        if old_layout is None:
            self.state.clear()  # (only a pending load's entries: load_state_dict)
        layout = self._new_layout()
        auto = [g for g in self.groups if g.get("rank") == "auto"]
        if auto and layout.world != 1 and layout.resize_refusal:
            self._layout = None  # refused: a later step must not run on it
            raise ValueError(
                f"{self.name}: rank='auto' re-sizes each matrix's state at its SVDs, which "
                f"the `{layout.name}` layout cannot: {layout.resize_refusal}"
            )
        self.state.clear()
        self._steps = [0] * len(self.specs)
        self._adaptive = {
            i: AdaptiveState()
            for i, s in enumerate(self.specs)
            if schedule.adaptive(s, self.groups[self.group_of[i]])
        }
        self._pending = torch.zeros(2 * len(self.specs) + 1, device=layout.device)
        if load is not None:
            try:
                self._load(load)  # (groups added since keep the old indices; new ones at 0)
            except BaseException as e:
                if old_state is not None:
                    raise
                # A state dict loaded before the first step: kept, so that every step
                # refuses it again rather than training from fresh state.
                self._layout = None
                self.state.clear()
                if not isinstance(e, Exception):
                    raise
                what = (
                    str(e)
                    if isinstance(e, ValueError)
                    else f"{self.name}.load_state_dict: the state dict does not fit this "
                    f"optimizer ({type(e).__name__}: {e})"
                )
                raise ValueError(
                    f"{what}. (This state dict was given to load_state_dict before the first "
                    "step(); it is applied when the layout binds, at the first step, and "
                    "was refused there before any update)"
                ) from (None if isinstance(e, ValueError) else e)
        self._pending_load = None
        self._bound_groups = len(self.groups)

    # -------------------------------------------------------------------------- step
    @torch.compiler.disable(recursive=True)
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step (see the module docstring for the exact update).

        Runs eagerly under ``torch.compile``: a compiled train step breaks its graph here
        (the step's layout binding, refresh schedule and host synchronisation are Python
        control flow; its GEMMs and foreach kernels are already batched)."""
        self._refuse_interrupted("step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        present = self._present_groups()
        for g in self.param_groups:
            if PENDING_STATE in g:
                raise RuntimeError(
                    f"{self.name}: a checkpoint was loaded into this optimizer's groups but "
                    f"not its state (in {g[PENDING_STATE]!r} of the checkpoint): a universal "
                    "checkpoint of `coap-dist ds-to-universal` loads with "
                    "coap_dist.integrations.deepspeed.load_checkpoint(engine, dir), not "
                    "engine.load_checkpoint alone"
                )
            for p in g["params"]:
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise RuntimeError(
                        f"{self.name}: a parameter of shape {tuple(p.shape)} has a "
                        f"{p.grad.layout} gradient (e.g. nn.Embedding(sparse=True)); COAP "
                        "needs dense gradients: build the module with sparse=False, or give "
                        "it to torch.optim.SparseAdam"
                    )
        lay, ids = self._begin(present)
        # What the plan phase updates besides the state (metrics and their pending sums):
        # restored if it raises, so that a retried step counts once.
        kept = self._step_calls, dict(self._counters), self._refreshed, self._late
        kept_tail = self._late_residual, self._residual
        self._step_calls += 1
        try:
            lay, active, work = self._step_plan(lay, ids)
        except BaseException:  # nothing written yet: the step can be retried
            self._step_calls, counters, self._refreshed, self._late = kept
            self._counters.update(counters)
            self._late_residual, self._residual = kept_tail
            raise
        try:
            self._step_write(lay, present, active, work)
        except BaseException as exc:
            self._interrupted = (
                f"an earlier step() stopped part-way ({f'{type(exc).__name__}: {exc}'[:300]}) "
                "after it had begun writing weights and optimizer state, so some parameters "
                "took that step and others did not"
            )
            raise
        return loss

    def _step_plan(self, lay: Layout, ids: list[int]) -> tuple[Layout, list[int], Work]:
        """The part of a step that writes no parameter or state (the check, the ranks'
        agreement and the gathering of the gradients): an exception here leaves the
        optimizer as it was (:meth:`step` restores its metrics). Returns the layout, the
        stepping parameters and this rank's work."""
        self._check_edited_groups()
        self._refuse_replanning()
        # (the checked default never scans for this-rank presence here)
        decide_here = not self.skip_nonfinite and lay.uniform_grads and self._step_calls > 1
        if decide_here:
            local = [i for i in ids if lay.local_grad(i) is not None]
            decide_here = all(self._steps[i] > 0 for i in local)
        stats = self._grad_stats(lay, ids)
        if decide_here:
            # Nothing to check, every parameter has stepped and the ranks hold the same
            # gradients: decide from this rank; the summed flags are read later.
            self._defer(lay, stats)
            active = local
        else:
            self._read_late()
            host = lay.agree(stats)
            if self._step_calls == 1 and ids and not any(host[3 * i] for i in ids):
                raise RuntimeError(
                    f"{self.name}: the first step() found no gradient on any of its "
                    f"{len(ids)} parameters on any rank. If the optimizer was built before "
                    "fully_shard / FSDP wrapping, its parameters are no longer the model's: "
                    "build it after wrapping, or let accelerate.prepare(model, optimizer) or "
                    "the HF Trainer swap them in (both supported)"
                )
            active = self._decide(lay, ids, host)
        return lay, active, lay.gather(active)

    def _step_write(self, lay: Layout, present: list[bool], active: list[int], work: Work) -> None:
        """The part of a step that writes: the refresh schedule (adaptive credits), step
        counts, refreshes, moments, weights. An exception here leaves some of them written;
        :meth:`step` then refuses to go on."""
        assert self._pending is not None
        self._pending.zero_()  # (its sums went into this step's flag vector)
        due = self._schedule(active)
        measure = [
            i
            for i in active
            if i in self._adaptive
            and schedule.measure_due(
                self.specs[i], self.groups[self.group_of[i]], self._steps[i], self._adaptive[i]
            )
        ]
        counts: list[Tensor] = []  # the state's 0-dim CPU "step" tensors, one foreach add
        for i in active:
            self._steps[i] += 1
            st = self.state.get(lay.params[i])
            if st:
                if isinstance(st["step"], Tensor):
                    counts.append(st["step"])
                else:
                    st["step"] += 1
        if counts:
            torch._foreach_add_(counts, 1.0)
        count_refreshes(self._counters, due)
        self._refreshed = [i for i in due if self.specs[i].kind == "matrix"]
        t0 = time.perf_counter()
        if self._reallocate(work, due):
            lay = self._bound()  # re-planned with the new ranks
            lay.begin(present)
            work = lay.gather(active)
        oks = lay.refresh(work, due)
        self._projector_time += time.perf_counter() - t0
        assert self._pending is not None
        for ok in oks:
            self._pending[-1] += ok.logical_not().float()
        measured = torch.zeros(2 * len(self.specs), device=lay.device) if measure else None
        updates = self._updates(lay, work, active, due, set(measure), measured)
        kernels.dense_steps(
            work.dense, [self._steps[w.index] for w in work.dense], lay.share_block_max
        )
        lay.scatter(updates, work)
        if measured is not None:
            self._record_residuals(lay, measure, measured)

    def _refuse_interrupted(self, call: str) -> None:
        """Raise if an earlier ``step()`` left the state unfit to step or save: it stopped
        part-way through its writes, or found that the ranks had stepped different
        parameters."""
        if self._interrupted is not None:
            raise RuntimeError(
                f"{self.name}.{call}: {self._interrupted}. Load the last checkpoint into the "
                f"model and into this optimizer ({self.name}.load_state_dict) before stepping "
                "or saving again"
            )

    @torch.no_grad()
    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's parameters (the same
        arguments after ``max_norm``), with the next ``step()``'s non-finite check folded
        into its one reduction.

        ||g||_p = (sum_i ||g_i||_p^p)^(1/p) (``norm_type`` p > 0; inf: max_i ||g_i||_inf)
        over every gradient of the model (the pieces of every rank: one all-reduce, a sum or
        a max, where they partition the gradients, as under FSDP2; none where each rank
        holds all of them, as under DDP), then g_i <- c g_i with
        c = min(1, max_norm / (||g|| + 1e-6)) (``max_norm=inf``: no scaling). The per-gradient
        norms c ||g_i||_p (NaN or inf iff g_i is non-finite after clipping, 0 iff it is zero)
        are what ``step()`` would reduce each gradient to: a gradient unchanged since then
        is not read again there. Returns ||g|| (0-dim, on the parameters' device, before
        clipping; no host synchronisation, unless ``error_if_nonfinite``, which reads it
        and raises for a NaN or inf norm before any gradient is scaled, as torch does).
        ``foreach``: accepted as torch's; the foreach kernels always run (same result)."""
        p = float(norm_type)
        if not p > 0:
            raise ValueError(
                f"{self.name}.clip_grad_norm_: norm_type={norm_type!r} must be > 0 (or inf)"
            )
        lay, ids = self._begin(self._present_groups())
        grads = {i: g for i in ids if (g := lay.local_grad(i)) is not None}
        gs = list(grads.values())
        if not gs:
            local = torch.zeros((), device=lay.device)
        else:
            norms = _norms_fp32(gs, p)
            stacked = torch.stack(norms)
            if math.isinf(p):
                local = stacked.max()
            elif p == 2.0:
                local = torch.linalg.vector_norm(stacked).square()
            else:
                local = stacked.pow(p).sum()
        total = lay.grad_total(local, "max" if math.isinf(p) else "sum")
        if not math.isinf(p):
            total = total.sqrt() if p == 2.0 else total.pow(1.0 / p)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise RuntimeError(
                f"{self.name}.clip_grad_norm_: the total norm of order {norm_type} of the "
                "gradients is non-finite, so it cannot be clipped (error_if_nonfinite=True); "
                "no gradient was changed. Pass error_if_nonfinite=False to let step() skip "
                "the parameters with non-finite gradients instead"
            )
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        self._checked = {}
        if gs:
            if math.isinf(max_norm):  # no scaling (c would be NaN for a non-finite total)
                self.reuse_grad_norms(gs, norms)
            else:
                torch._foreach_mul_(gs, coef.to(gs[0].dtype))
                self.reuse_grad_norms(gs, torch._foreach_mul(norms, coef))
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; also forgets norms noted for the gradients it drops (a new
        gradient could take a freed one's storage)."""
        self._checked = {}
        super().zero_grad(set_to_none=set_to_none)

    def reuse_grad_norms(self, grads: Sequence[Tensor], norms: Sequence[Tensor]) -> None:
        """Let the next ``step()`` take ``norms[j]`` (a 0-dim tensor: ||grads[j]||_2 as it is
        now) as the reduction of its non-finite check for the gradient piece ``grads[j]``
        (the tensor ``Layout.local_grad`` returns), instead of reading it again. Another
        tensor there, or this one changed in place since (its version counter moved), is
        read again. Used by :meth:`clip_grad_norm_` and ``optimizer_in_backward``."""
        for g, n in zip(grads, norms, strict=True):
            self._checked[id(g)] = (weakref.ref(g), g._version, n)

    def steps_with_group(self, params: Sequence[Tensor]) -> list[bool]:
        """For callers that step a group's parameters over several ``step()`` calls
        (``optimizer_in_backward``, bucket by bucket): whether each of ``params`` (tensors of
        the groups) must take its next step in one call with the rest of its group. True for
        the matrices of a ``rank="auto"`` group whose next step takes an SVD (the first, a
        recalibration): their ranks are chosen over all of the group's matrices due then,
        so stepping a subset would choose other ranks."""
        if not any(g.get("rank") == "auto" for g in self.groups):
            return [False] * len(params)
        lay = self._bound()
        if self._index_of is None or self._index_of[0] is not lay:  # (once per binding)
            index = {id(t): i for i, t in enumerate(lay.params)}
            flat = [t for g in self.groups for t in g["params"]]
            if len(flat) == len(lay.params):
                index.update((id(t), i) for i, t in enumerate(flat))
            self._index_of = (lay, index)
        index = self._index_of[1]
        out = []
        for t in params:
            i = index.get(id(t))
            group = self.groups[self.group_of[i]] if i is not None else None
            out.append(
                i is not None
                and group is not None
                and group.get("rank") == "auto"
                and refresh_due(self.specs[i], group, self._steps[i]) in ("init", "recalibrate")
            )
        return out

    def _begin(self, present: Sequence[bool]) -> tuple[Layout, list[int]]:
        """The bound layout and the parameters taking part now; binds again first when a
        wrapper swapped the tensors in the groups since."""
        lay = self._bound()
        ids = lay.begin(present)
        if ids is None:
            self._bind()
            lay = self._bound()
            ids = lay.begin(present)
            assert ids is not None
        return lay, ids

    def _reallocate(self, work: Work, due: Mapping[int, str]) -> bool:
        """rank="auto": before this step's SVDs, choose the ranks of each auto group's
        matrices due one from their gradients' spectra (:mod:`coap_dist.optim.autorank`) and
        re-plan the changed ones, their state re-projected to the new rank (the SVD that
        follows then fits the projector at that rank). Returns whether any rank changed.

        Under sharding every rank takes the same decision from the same numbers: the sketch
        sums of a matrix split over ranks go through one ``team_sum``; the piece holding row 0
        turns them into the profile; one ``agree`` then gives every rank every profile and
        the second-moment column sums (over all rows) that a rank decrease keeps by."""
        auto = sorted(
            i
            for i, kind in due.items()
            if kind in ("init", "recalibrate")
            and self.specs[i].kind == "matrix"
            and self.groups[self.group_of[i]].get("rank") == "auto"
        )
        if not auto:
            return False
        lay = self._bound()
        fixed = {
            i: fproj.resolve_rank(
                self.specs[i].shape, None, self.groups[self.group_of[i]]["rank_ratio"]
            )
            for i in auto
        }
        width = {i: autorank.sketch_width(self.specs[i], fixed[i]) for i in auto}
        mats = {mw.index: mw for mw in work.matrices if mw.index in width}
        partials = {
            i: autorank.sketch_partials(
                mw.grad, mw.projector if due[i] == "recalibrate" else None, width[i]
            )
            for i, mw in mats.items()
        }
        sizes = {i: width[i] * (width[i] + self.specs[i].cols) for i in auto}
        sums = lay.team_sum(partials, sizes, torch.float64)
        offset, total = {}, 0
        for i in auto:
            offset[i] = total
            total += width[i] + self.specs[i].rank
        slots = torch.zeros(total, dtype=torch.float64, device=lay.device)
        for i, mw in mats.items():
            o, h, r = offset[i], width[i], self.specs[i].rank
            first = mw.rows[0] == 0  # one piece per matrix holds row 0
            if first:
                slots[o : o + h] = autorank.profile_from_sums(sums[i], h)
            if "exp_avg_sq_col" in mw.state:  # factored: the statistic is over all rows
                if first:
                    slots[o + h : o + h + r] = mw.state["exp_avg_sq_col"].double()
            else:
                slots[o + h : o + h + r] = (
                    read_moment(mw.state, "exp_avg_sq", False).double().sum(0)
                )
        host = lay.agree(slots)
        changed: dict[int, int] = {}
        for gi in sorted({self.group_of[i] for i in auto}):
            mine = [i for i in auto if self.group_of[i] == gi]
            profiles = {i: host[offset[i] : offset[i] + width[i]] for i in mine}
            ranks = autorank.allocate(profiles, {i: self.specs[i] for i in mine}, fixed)
            changed.update({i: r for i, r in ranks.items() if r != self.specs[i].rank})
        if changed:
            energy = {
                i: torch.tensor(
                    host[offset[i] + width[i] : offset[i] + width[i] + self.specs[i].rank],
                    dtype=torch.float64,
                )
                for i in changed
            }
            self._replan(changed, energy, work)
        return bool(changed)

    def _new_layout(self) -> Layout:
        """Resolve and bind a layout for the tensors present now; it becomes the bound one
        (``specs``, ``group_of``), state untouched."""
        layout = resolve_layout(self.groups, self.built, self._sharding, self._process_group)
        self.specs = layout.bind(self)
        self.group_of = layout.group_of
        self._layout = layout
        keys = self.config_class.planned_keys()
        self._planned = [{k: g.get(k) for k in keys} for g in self.groups]
        return layout

    def _check_edited_groups(self) -> None:
        """Validate each group whose hyperparameters changed since it was last validated
        (a user's or scheduler's edit of ``param_groups``): a value the step cannot take
        (``update_interval=0``, one beta, ``weight_decay=None``) is refused by name before
        the step writes anything, so that the step can run again once it is set back. The
        learning rate, which a scheduler changes every step, is checked alone."""
        keys = self.config_class.keys("group")
        for gi, g in enumerate(self.groups):
            where = f"{self.name} param_groups[{gi}]"
            snapshot = tuple(g.get(k) for k in keys if k != "lr")
            if self._validated.get(id(g)) != snapshot:
                matrices = any(_may_be_matrix(p) for p in g["params"])
                self.config_class.validate_group(g, where, own={}, matrices=matrices)
                self._validated[id(g)] = snapshot
            else:
                self.config_class.check_value("lr", g.get("lr"), where)

    def _refuse_replanning(self) -> None:
        """A group's edit of a hyperparameter the plan is made from (``rank``,
        ``algorithm``, ... :meth:`~coap_dist.optim.config.COAPAdamWConfig.planned_keys`)
        after the first step would be ignored: refused, naming it, before any write."""
        for j, (group, planned) in enumerate(zip(self.groups, self._planned, strict=False)):
            for key, was in planned.items():
                now = group.get(key)
                if now == was:
                    continue
                if key in ("rank", "rank_ratio", "state_bits"):
                    other = (
                        f"or save state_dict() and load it into a new optimizer built with "
                        f"{key}={now!r} (its state is converted on load)"
                    )
                else:
                    other = (
                        f"or start a new optimizer with {key}={now!r} (this state cannot be "
                        "converted to it)"
                    )
                raise ValueError(
                    f"{self.name} param_groups[{j}].{key} was changed from {was!r} to {now!r} "
                    f"after the first step, but the state is planned from it then. Set it back "
                    f"to {was!r}, {other}"
                )

    def _replan(self, ranks: Mapping[int, int], energy: Mapping[int, Tensor], work: Work) -> None:
        """Bind a fresh layout planned with ``ranks`` (collective under sharding: every rank
        re-plans at the same step), keeping every parameter's state and re-projecting this
        rank's pieces of the matrices whose rank changes
        (:func:`coap_dist.optim.storage.rank_change`, from ``energy``: each matrix's
        second-moment column sums over all its rows) through ``Layout.resize``."""
        old = self._bound()
        kept = {i: self.state[p] for i, p in enumerate(old.params) if self.state.get(p)}
        whole_p = {mw.index: mw.projector for mw in work.matrices}
        changes = {}
        for i, r in ranks.items():
            p_old = whole_p.get(i)
            if p_old is None and i in kept:
                p_old = kept[i].get("projector")  # a holder that keeps no rows
            changes[i] = rank_change(self.specs[i].rank, r, energy[i], p_old)
        self._auto_rank.update(ranks)
        layout = self._new_layout()
        self.state.clear()
        for i, st in kept.items():
            if i not in ranks:
                self.state[layout.params[i]] = st
        moved = {i: st for i, st in kept.items() if i in ranks}
        layout.resize(old, moved, changes, whole_p, f"{self.name}: rank='auto' re-plan")

    def _schedule(self, active: list[int]) -> dict[int, str]:
        """The refresh each active parameter takes before this update (fixed or adaptive
        schedule, :mod:`coap_dist.optim.schedule`); identical on every rank."""
        due: dict[int, str] = {}
        for i in active:
            spec, group, k = self.specs[i], self.groups[self.group_of[i]], self._steps[i]
            st = self._adaptive.get(i)
            if st is None:
                kind = refresh_due(spec, group, k)
            else:
                kind = schedule.adaptive_due(spec, group, k, st)
                if kind is None and schedule.candidate(spec, group, k):
                    self._counters["refresh_skips"] += 1
            if kind:
                due[i] = kind
        return due

    def _record_residuals(self, lay: Layout, measure: list[int], measured: Tensor) -> None:
        """Sum the residual partials of the adaptive matrices that measured this update over
        the ranks (one collective, read on the host) and record rho in their schedule state.
        The counts have been advanced: the measurement belongs to update k = count - 1."""
        host = lay.agree(measured)
        for i in measure:
            rr, gg = host[2 * i], host[2 * i + 1]
            rho = math.sqrt(max(0.0, 1.0 - rr / gg)) if gg > 0 else math.nan
            schedule.record_residual(
                self.specs[i],
                self.groups[self.group_of[i]],
                self._steps[i] - 1,
                self._adaptive[i],
                rho,
            )

    def _present_groups(self) -> list[bool]:
        """Which of :attr:`groups` take part in this call (all, unless a wrapper steps a
        subset); groups added since (``add_param_group``) join and force a new binding."""
        shown = self.param_groups
        for g in shown:
            if not any(g is h for h in self.groups):
                self.groups.append(g)
                self._built.append([weakref.ref(p) for p in g["params"]])
                self._layout_stale = True
        if self._layout_stale and self._layout is not None:
            self._layout_stale = False
            self._bind()
        return [any(g is h for h in shown) for g in self.groups]

    def _grad_stats(self, lay: Layout, ids: list[int]) -> Tensor:
        """[has gradient, non-finite, non-zero] per parameter (this rank's pieces), then the
        metric partials of the previous step (residual sums, rejected refreshes).

        One reduction per gradient, accumulated and returned in fp32 (a fp16 gradient's
        sum may pass fp16's 65504): its sum (non-finite iff an entry is NaN or +-inf, or
        the sum overflows fp32), or before a parameter's first step its max-norm (zero iff
        the gradient is, the deferred-initialisation rule; it never overflows). With
        ``skip_nonfinite=False`` a parameter that has stepped needs none; a gradient that
        :meth:`clip_grad_norm_` measured and nothing changed since reuses that norm (no
        reduction here). Small gradients of one size (up to :data:`STACKED_SUM_NUMEL`
        entries) are summed as the rows of one stack: one kernel instead of one per
        gradient. The n values are then placed by one indexed copy and flagged by a few
        whole-vector kernels, whatever n is."""
        n = len(self.specs)
        assert self._pending is not None
        present = {i: g for i in ids if (g := lay.local_grad(i)) is not None}
        checked, self._checked = self._checked, {}
        fresh = [i for i in present if self._steps[i] == 0]
        read = fresh + [i for i in present if self._steps[i] > 0 and self.skip_nonfinite]
        values: dict[int, Tensor] = {}
        for i in read:
            g = present[i]
            c = checked.get(id(g))
            if c is not None and c[0]() is g and c[1] == g._version:
                values[i] = c[2]
        todo = [i for i in fresh if i not in values]
        for i in todo:  # the fresh gradients still to read: max |g| (from aminmax: no
            g = present[i]  # temporary, NaN propagates, no overflow); an empty shard: 0
            if g.numel() == 0:
                values[i] = torch.zeros((), device=g.device)
                continue
            lo, hi = torch.aminmax(g)
            values[i] = torch.maximum(hi, lo.neg()).float()
        stacks: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
        for i in read:
            if i not in values:
                g = present[i]
                if 0 < g.numel() <= STACKED_SUM_NUMEL:  # (an empty shard: its own sum)
                    stacks.setdefault((g.numel(), g.dtype, g.device), []).append(i)
                else:
                    values[i] = g.sum(dtype=torch.float32)
        order, parts = [], []
        for (numel, _, _), members in stacks.items():
            if len(members) == 1:
                values[members[0]] = present[members[0]].sum(dtype=torch.float32)
                continue
            rows = max(1, STACK_BUDGET_NUMEL // numel)  # bounds the stack's temporary
            for a in range(0, len(members), rows):
                chunk = members[a : a + rows]
                flat = torch.cat([present[i].reshape(-1) for i in chunk])
                parts.append(flat.view(len(chunk), numel).sum(1, dtype=torch.float32))
                order += chunk
        if values:
            parts.append(
                torch.stack([x if x.dtype == torch.float32 else x.float() for x in values.values()])
            )
            order += values
        v = torch.zeros(n, device=lay.device)
        if order:
            v.index_copy_(0, self._cached(lay, ("order", tuple(order)), order), torch.cat(parts))
        has = self._cached(lay, ("present", n, tuple(present)), list(present), n)
        first = self._cached(lay, ("fresh", n, tuple(fresh)), fresh, n)
        bad = torch.isfinite(v).logical_not()  # (not ~: unsupported by fake CUDA tensors)
        nonzero = torch.where(first, v != 0, has)
        buf = torch.cat(
            [torch.stack([has.float(), bad.float(), nonzero.float()], 1).reshape(-1), self._pending]
        )
        return buf  # (``_pending`` is zeroed when the step starts writing)

    def _cached(self, lay: Layout, key: tuple[Any, ...], idx: list[int], n: int = 0) -> Tensor:
        """A tensor on the layout's device, kept while the step's pattern repeats (no
        host-to-device copy per step): the indices ``idx`` (int64), or with ``n`` > 0 the
        length-n bool mask that is True at them."""
        key = (*key, lay.device)
        hit = self._device_cache.get(key[0])
        if hit is None or hit[0] != key:
            if n:
                out = torch.zeros(n, dtype=torch.bool, device=lay.device)
                out[idx] = True
            else:
                out = torch.tensor(idx, dtype=torch.int64, device=lay.device)
            hit = self._device_cache[key[0]] = (key, out)
        return hit[1]

    def _fold_tail(self, tail: Sequence[float], refreshed: Sequence[int]) -> None:
        """Metrics from the summed tail of a flag vector: the residual of the matrices
        ``refreshed`` the step before, and the refreshes that kept their old projector."""
        # ||G - G P^T P|| / ||G|| = sqrt(1 - ||R||^2 / ||G||^2) of each matrix refreshed
        # last step, from its sums over ranks (see functional.projection.residual_from_sums)
        res = [
            math.sqrt(max(0.0, 1.0 - tail[2 * i] / tail[2 * i + 1]))
            for i in refreshed
            if tail[2 * i + 1] > 0
        ]
        if res:
            self._residual = sum(res) / len(res)
        self._counters["refresh_keep_old"] += round(tail[-1])

    def _defer(self, lay: Layout, stats: Tensor) -> None:
        """A step deciding locally: sum the flag vector over the ranks on the device (the
        same collective as a deciding step) and keep what a later read needs: the refresh
        metrics of its tail and how many parameters had a gradient here but not on every
        rank, or on another rank but not here (``uniform_grads`` broken)."""
        n = len(self.specs)
        mine = stats[0 : 3 * n : 3] > 0
        summed = lay.reduce_sum(stats)
        tail = summed[3 * n :]
        world = float(lay.world)
        counts = summed[0 : 3 * n : 3]
        broken = (mine & (counts < world)) | (mine.logical_not() & (counts > 0))
        late = torch.stack([tail[-1], broken.sum().float()])
        self._late = late if self._late is None else self._late + late
        if self._refreshed:
            self._late_residual = (tail, self._refreshed)
            self._refreshed = []

    def _read_late(self) -> None:
        """Read what steps that decided locally left on the device (one host sync): fold
        their metrics in and raise if the ranks' gradients were not the same set."""
        if self._late is None:
            return
        parts = [self._late] + ([self._late_residual[0]] if self._late_residual else [])
        host = torch.cat(parts).cpu().tolist()
        self._counters["refresh_keep_old"] += round(host[0])
        if self._late_residual is not None:
            self._fold_tail([*host[2:-1], 0.0], self._late_residual[1])
        self._late, self._late_residual = None, None
        if host[1] > 0:
            message = (
                f"{self.name}: with skip_nonfinite=False each step took its parameters from "
                "this rank's gradients (its wrapper gives every rank the same ones), but "
                f"{round(host[1])} time(s) a parameter had a gradient on some ranks only, so "
                "the ranks stepped different parameters. Give every rank a gradient for the "
                "same parameters (zero gradients for unused ones), or use skip_nonfinite=True "
                "(the ranks then agree before each step)"
            )
            # the ranks' states differ: no step or save on them
            self._interrupted = "the ranks stepped different parameters in earlier steps"
            raise RuntimeError(message)

    def _decide(self, lay: Layout, ids: list[int], host: list[float]) -> list[int]:
        """Which parameters step (the same on every rank): present somewhere, finite
        everywhere, and not an all-zero first gradient. Allocates state lazily."""
        n = len(self.specs)
        self._fold_tail(host[3 * n :], self._refreshed)
        self._refreshed = []
        active = []
        for i in ids:
            has, bad, nonzero = host[3 * i : 3 * i + 3]
            if has == 0:
                continue
            lay.ensure_state(i)
            if bad > 0 and self.skip_nonfinite:
                self._counters["nonfinite_skips"] += 1
                continue
            if self._steps[i] == 0 and nonzero == 0:
                self._counters["init_deferred"] += 1
                continue
            active.append(i)
        return active

    def _updates(
        self,
        lay: Layout,
        work: Work,
        active: list[int],
        due: Mapping[int, str],
        measure: set[int],
        measured: Tensor | None,
    ) -> list[Update]:
        """Directions of every matrix piece (rounds of sums over split rows through the
        layout) and convolution, with their step sizes. Residual partials of this rank's
        rows go to ``_pending`` (refreshed matrices, for ``metrics()``) and to ``measured``
        (the adaptive matrices in ``measure``)."""
        assert self._pending is not None
        mats = work.matrices
        rs = [kernels.project(mw) for mw in mats]
        for mw, r in zip(mats, rs, strict=True):
            i = mw.index
            refreshed = i in due
            measuring = i in measure
            if not (refreshed or measuring):
                continue
            partials = fproj.residual_partials(mw.grad, r)
            if refreshed:
                self._pending[2 * i : 2 * i + 2] += partials
            if measuring and measured is not None:
                measured[2 * i : 2 * i + 2] += partials
        active_mats = [i for i in active if self.specs[i].kind == "matrix"]
        rounds = [
            {i: self._rule.sum_sizes(self.specs[i])[k] for i in active_mats}
            for k in range(self._rule.rounds)
        ]
        gen = self._rule.directions(mats, rs, [self._steps[mw.index] for mw in mats])
        try:
            request = next(gen)
            for sizes in rounds:
                sums = lay.team_sum(
                    {mw.index: t for mw, t in zip(mats, request, strict=True)}, sizes
                )
                request = gen.send([sums[mw.index] for mw in mats])
            raise AssertionError("direction rounds did not finish")  # pragma: no cover
        except StopIteration as stop:
            directions: list[Tensor] = stop.value
        out = [
            Update(
                mw.index,
                d,
                self.step_size(mw.index),
                kernels.decay_keep(mw.group),
            )
            for mw, d in zip(mats, directions, strict=True)
        ]
        for cw in work.convs:
            out.append(
                Update(
                    cw.index,
                    kernels.conv_update(cw, self._steps[cw.index]),
                    self.step_size(cw.index),
                    kernels.decay_keep(cw.group),
                )
            )
        return out

    # ------------------------------------------------------------------------ metrics
    # ------------------------------------------------------------------ copy / pickle
    _COPIED = ("_counters", "_projector_time", "_residual", "_step_calls", "_refreshed")

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` carry: the constructor settings, the
        parameter groups (with their tensors) and :meth:`state_dict`, plus the counters of
        :meth:`metrics`. A copy binds its own layout at its next step and continues exactly
        like the original. Refused for sharded or process-group-bound optimizers: each rank
        holds only its part of the state; checkpoint those with ``state_dict`` (after
        ``consolidate_state_dict`` for owner layouts) instead."""
        self._read_late()
        lay = self._layout
        if (
            (lay is not None and lay.world != 1)
            or self._process_group is not None
            or not (self._sharding is None or isinstance(self._sharding, str))
        ):
            where = f"the `{lay.name}` layout" if lay is not None else "a distribution layout"
            raise RuntimeError(
                f"{self.name}: cannot copy or pickle an optimizer bound to {where} (each rank "
                "holds part of the state); save state_dict() (after consolidate_state_dict() "
                "for owner layouts) and load it into a new optimizer"
            )
        return {
            "config": self.config,
            "param_groups": self.param_groups,
            "sharding": self._sharding,
            "state_dict": self.state_dict(),
            "counters": {k: getattr(self, k) for k in self._COPIED},
        }

    def __setstate__(self, saved: dict[str, Any]) -> None:
        _COAPBase.__init__(
            self, saved["param_groups"], config=saved["config"], sharding=saved["sharding"]
        )
        self.load_state_dict(saved["state_dict"])
        for k, v in saved["counters"].items():
            setattr(self, k, v)

    def state_bytes(self) -> int:
        """Exact bytes of optimizer state held by this rank (every state tensor with
        ndim >= 1; DTensor state counts its local shard)."""
        return 0 if self._layout is None else self._layout.state_bytes()

    def metrics(self) -> dict[str, float]:
        """Counters for loggers: state bytes, refreshes, projector time, skips, residual,
        the optimizer's collectives and bytes of the last step; with adaptive refresh the
        mean measured residual and drift (``refresh_skips``: candidates that took nothing). Counters are the same on
        every rank; the residual (mean over the matrices of the last refresh) is read at the
        next step's host sync."""
        self._read_late()
        out = {f"optim/{k}": float(v) for k, v in self._counters.items()}
        out["optim/state_bytes"] = float(self.state_bytes())
        out["optim/projector_time_s"] = self._projector_time
        out["optim/projection_residual"] = self._residual
        if self._adaptive:
            # Adaptive schedule: the mean of the last measured residual rho and drift s.
            rhos = [st.last_rho for st in self._adaptive.values() if math.isfinite(st.last_rho)]
            out["optim/adaptive_residual"] = sum(rhos) / len(rhos) if rhos else math.nan
            drifts = [st.drift() for st in self._adaptive.values()]
            out["optim/adaptive_drift"] = sum(drifts) / len(drifts)
        out.update(
            {"optim/comm_calls_per_step": 0.0, "optim/comm_bytes_per_step": 0.0}
            | ({} if self._layout is None else self._layout.metrics())
        )
        return out


def _norms_fp32(gs: Sequence[Tensor], p: float) -> list[Tensor]:
    """||g||_p of each gradient as an fp32 0-dim tensor: fp16 / bf16 ones reduced in fp32
    (no overflow past 65504), fp32 and fp64 ones in their own dtype (a norm cannot narrow
    fp64 on the way), each a foreach kernel per dtype kind."""
    low = [i for i, g in enumerate(gs) if g.element_size() < 4]
    wide = [i for i, g in enumerate(gs) if g.element_size() >= 4]
    got: dict[int, Tensor] = {}
    if low:
        norms = torch._foreach_norm([gs[i] for i in low], p, dtype=torch.float32)
        got.update(zip(low, norms, strict=True))
    if wide:
        norms = torch._foreach_norm([gs[i] for i in wide], p)
        got.update(zip(wide, (n.float() for n in norms), strict=True))
    return [got[i] for i in range(len(gs))]


def _refuse_unsupported(p: Tensor, where: str) -> None:
    """Complex and sparse parameters: a clear error (torch AdamW would take them; COAP's
    projections are real and dense), naming the parameter and what to do."""
    if p.is_complex():
        raise ValueError(
            f"{where} (shape {tuple(p.shape)}, {p.dtype}) is complex; COAP optimizes real "
            "parameters only. Store it as torch.view_as_real(...) in the model, or give it to "
            "a separate torch.optim.AdamW"
        )
    if p.layout != torch.strided:
        raise ValueError(
            f"{where} (shape {tuple(p.shape)}) is a {p.layout} tensor; COAP needs dense "
            "parameters. Give it to a separate optimizer (torch.optim.SparseAdam for sparse)"
        )


def _may_be_matrix(p: Tensor) -> bool:
    """Whether ``p`` is, or may be (an FSDP1 flat parameter), a 2-D matrix, which needs a
    rank."""
    return len(_global_shape(p)) == 2 or getattr(p, "_fsdp_flattened", False)


def _global_shape(p: Tensor) -> tuple[int, ...]:
    """Shape of the whole parameter (DeepSpeed zero.Init keeps it in ``ds_shape``)."""
    ds_shape = getattr(p, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(p.shape)


class COAPAdamW(_COAPBase):
    """AdamW whose moments of matrix (and large conv) weights live in a moving rank-r subspace.

    ``COAPAdamW(params, lr, **hyperparameters)`` or ``COAPAdamW(params, config=cfg)`` with a
    :class:`~coap_dist.optim.config.COAPAdamWConfig` (keyword arguments override it). Every
    hyperparameter but ``state_bits`` / ``skip_nonfinite`` may be set per parameter group;
    ``algorithm`` ("auto": COAP for matrices, AdamW else; "coap"; "adamw") picks the method.
    AdamW is in the reference form: eps outside the square root, decoupled decay
    W <- (1 - lr wd) W after the update.

    Besides the hyperparameters (table below, generated from the config dataclass):

    Args:
        sharding: None (automatic, bound at the first step: FSDP2 DTensors -> row shards,
            DeepSpeed partitions -> ZeRO layout, else one process / replicated state),
            "owner" (state sharded over the data-parallel group), "local" (FSDP2 only) or a
            layout from ``coap_dist.distributed`` (``Fsdp1Sharding(model)``, ...).
        process_group: group for ``sharding="owner"`` (default: the world).
    """

    config_class = COAPAdamWConfig


class COAPAdafactor(_COAPBase):
    """Adafactor (factored second moment, update clipping, momentum ``betas[0]``) on COAP
    projections; AdamW with ``betas`` for every other parameter.

    Built like :class:`COAPAdamW` (``config``: a
    :class:`~coap_dist.optim.config.COAPAdafactorConfig`); ``lr`` is an absolute step size
    (no relative step, no parameter scaling). Hyperparameters (generated from the config):
    """

    config_class = COAPAdafactorConfig
    _rule = kernels.AdafactorRule()


for _cls in (COAPAdamW, COAPAdafactor):
    _cls.__doc__ = f"{_cls.__doc__}\n{textwrap.indent(_cls.config_class.docs(), '    ')}\n"


def innermost(optimizer: Any) -> Any:
    """Unwrap ZeroRedundancyOptimizer (``.optim``) and DeepSpeed wrappers (``.optimizer``)
    down to the object that owns the per-parameter state."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        if hasattr(optimizer, "state_bytes") or hasattr(optimizer, "metrics"):
            return optimizer
        inner = getattr(optimizer, "optim", None) or getattr(optimizer, "optimizer", None)
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer
