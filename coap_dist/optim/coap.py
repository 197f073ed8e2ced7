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
"""

from __future__ import annotations

import math
import textwrap
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from coap_dist.functional import projection as fproj
from coap_dist.optim import kernels
from coap_dist.optim.config import COAPAdafactorConfig, COAPAdamWConfig
from coap_dist.optim.layout import (
    Layout,
    Update,
    Work,
    refuse_fsdp1,
    resolve_layout,
    run_construction_hooks,
)
from coap_dist.optim.spec import ParamSpec, StateFormat, make_spec, with_stagger
from coap_dist.optim.storage import convert_full

SHARDING_NAMES = (None, "none", "owner", "local")

COUNTERS = (
    "refreshes",
    "recalibrations",
    "projector_updates",
    "nonfinite_skips",
    "refresh_keep_old",
    "init_deferred",
)
"""Counters in ``metrics()`` (identical on every rank: every rank sees every decision)."""


class _COAPBase(Optimizer):
    """Shared machinery of the COAP optimizers: late binding, the step loop, checkpoints."""

    _rule: kernels.AdamWRule | kernels.AdafactorRule = kernels.AdamWRule()
    config_class: type[COAPAdamWConfig] = COAPAdamWConfig

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None,
        config: COAPAdamWConfig | None,
        hyperparameters: Mapping[str, Any],
        *,
        sharding: Any,
        process_group: Any,
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
        if isinstance(given.get("betas"), list):
            given["betas"] = tuple(given["betas"])
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
        self._pending: Tensor | None = None
        self._pending_load: dict[str, Any] | None = None
        self._consolidated: tuple[int, dict[str, Any]] | None = None
        self._step_calls = 0
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._refreshed: list[int] = []
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
            self.plan([_global_shape(p) for p in built], [p.dtype for p in built], group_of, False)
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
        self.config_class.validate_group(self.param_groups[-1], where, own=own)
        for j, p in enumerate(self.param_groups[-1]["params"]):
            _refuse_unsupported(p, f"{where} parameter {j}")

    # --------------------------------------------------------------------- Core protocol
    @property
    def built(self) -> list[list[Tensor | None]]:
        """Per group, the tensors the optimizer was built with (None where freed)."""
        return [[r() for r in refs] for refs in self._built]

    def plan(
        self,
        shapes: list[tuple[int, ...]],
        dtypes: list[torch.dtype],
        group_of: list[int],
        force_right: bool,
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
                    forced_side="right" if force_right else None,
                    where=f"{self.name} param_groups[{gi}]",
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
        layout = resolve_layout(self.groups, self.built, self._sharding, self._process_group)
        self.specs = layout.bind(self)
        self.group_of = layout.group_of
        self._layout = layout
        self.state.clear()
        self._steps = [0] * len(self.specs)
        self._pending = torch.zeros(2 * len(self.specs) + 1, device=layout.device)
        load = old_state if old_state is not None else self._pending_load
        self._pending_load = None
        if load is not None:
            self._load(load)
        if old_state is not None:
            # Groups added since keep the old parameters' indices; the new ones start at 0.
            self._steps += [0] * (len(self.specs) - len(self._steps))
        self._bound_groups = len(self.groups)

    # -------------------------------------------------------------------------- step
    @torch.compiler.disable(recursive=True)
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step (see the module docstring for the exact update).

        Runs eagerly under ``torch.compile``: a compiled train step breaks its graph here
        (the step's layout binding, refresh schedule and host synchronisation are Python
        control flow; its GEMMs and foreach kernels are already batched)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        present = self._present_groups()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise RuntimeError(
                        f"{self.name}: a parameter of shape {tuple(p.shape)} has a "
                        f"{p.grad.layout} gradient (e.g. nn.Embedding(sparse=True)); COAP "
                        "needs dense gradients: build the module with sparse=False, or give "
                        "it to torch.optim.SparseAdam"
                    )
        lay = self._bound()
        ids = lay.begin(present)
        if ids is None:
            self._bind()
            lay = self._bound()
            ids = lay.begin(present)
            assert ids is not None
        self._step_calls += 1
        host = lay.agree(self._grad_stats(lay, ids))
        if self._step_calls == 1 and ids and not any(host[3 * i] for i in ids):
            raise RuntimeError(
                f"{self.name}: the first step() found no gradient on any of its "
                f"{len(ids)} parameters on any rank. If the optimizer was built before "
                "fully_shard / FSDP wrapping, its parameters are no longer the model's: build "
                "it after wrapping, or let accelerate.prepare(model, optimizer) or the HF "
                "Trainer swap them in (both supported)"
            )
        active = self._decide(lay, ids, host)
        due = {i: kind for i in active if (kind := self._due(i)) is not None}
        for i in active:
            self._steps[i] += 1
            st = self.state.get(lay.params[i])
            if st:
                st["step"] += 1
        self._count_refreshes(due)
        work = lay.gather(active)
        t0 = time.perf_counter()
        oks = lay.refresh(work, due)
        self._projector_time += time.perf_counter() - t0
        assert self._pending is not None
        for ok in oks:
            self._pending[-1] += ok.logical_not().float()
        updates = self._updates(lay, work, active, due)
        kernels.dense_steps(work.dense, [self._steps[w.index] for w in work.dense])
        lay.scatter(updates, work)
        return loss

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

        One reduction per gradient: its sum (non-finite iff an entry is NaN or +-inf, or
        the sum overflows), or before a parameter's first step its L2 norm (zero iff the
        gradient is, the deferred-initialisation rule). With ``skip_nonfinite=False`` a
        parameter that has stepped needs none."""
        n = len(self.specs)
        assert self._pending is not None
        present = {i: g for i in ids if (g := lay.local_grad(i)) is not None}
        first = [i for i in present if self._steps[i] == 0]
        later = [i for i in present if self._steps[i] > 0 and self.skip_nonfinite]
        rows = {}
        if present:
            one = torch.ones((), device=lay.device)
            red: dict[int, Tensor] = {}
            if first:
                norms = torch._foreach_norm([present[i] for i in first])
                red.update(zip(first, norms, strict=True))
            red.update({i: present[i].sum() for i in later})
            for i in present:
                if i not in red:
                    rows[i] = torch.stack([one, one * 0, one])
            if red:
                v = torch.stack([red[i].float() for i in red])
                bad = torch.isfinite(v).logical_not()  # (not ~: unsupported by fake CUDA tensors)
                nonzero = torch.tensor([i in later for i in red], device=v.device) | (v != 0)
                flags = torch.stack([torch.ones_like(v), bad.float(), nonzero.float()], 1)
                rows.update(zip(red, flags, strict=True))
        none = torch.zeros(3, device=lay.device)
        buf = torch.cat(
            [torch.stack([rows.get(i, none) for i in range(n)]).reshape(-1), self._pending]
        )
        self._pending.zero_()
        return buf

    def _decide(self, lay: Layout, ids: list[int], host: list[float]) -> list[int]:
        """Which parameters step (the same on every rank): present somewhere, finite
        everywhere, and not an all-zero first gradient. Allocates state lazily."""
        n = len(self.specs)
        tail = host[3 * n :]
        if self._refreshed:
            # ||G - G P^T P|| / ||G|| = sqrt(1 - ||R||^2 / ||G||^2) of each matrix refreshed
            # last step, from its sums over ranks (see functional.projection.residual_from_sums)
            res = [
                math.sqrt(max(0.0, 1.0 - tail[2 * i] / tail[2 * i + 1]))
                for i in self._refreshed
                if tail[2 * i + 1] > 0
            ]
            if res:
                self._residual = sum(res) / len(res)
            self._refreshed = []
        self._counters["refresh_keep_old"] += round(tail[-1])
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

    def _due(self, index: int) -> str | None:
        """Which projector refresh is due before this step of a low-rank parameter."""
        spec = self.specs[index]
        if not spec.lowrank:
            return None
        k = self._steps[index]
        if k == 0:
            return "init"
        group = self.groups[self.group_of[index]]
        kk = k + spec.offset
        tu = group["update_interval"]
        if kk % (tu * group["reproject_factor"]) == 0:
            return "recalibrate"
        if kk % tu == 0:
            return "update"
        return None

    def _count_refreshes(self, due: Mapping[int, str]) -> None:
        self._counters["refreshes"] += len(due)
        self._counters["recalibrations"] += sum(k == "recalibrate" for k in due.values())
        self._counters["projector_updates"] += sum(k == "update" for k in due.values())
        self._refreshed = [i for i in due if self.specs[i].kind == "matrix"]

    def _updates(
        self, lay: Layout, work: Work, active: list[int], due: Mapping[int, str]
    ) -> list[Update]:
        """Directions of every matrix piece (rounds of sums over split rows through the
        layout) and convolution, with their step sizes."""
        assert self._pending is not None
        mats = work.matrices
        rs = [kernels.project(mw) for mw in mats]
        for mw, r in zip(mats, rs, strict=True):
            if mw.index in due:
                i = mw.index
                self._pending[2 * i : 2 * i + 2] += fproj.residual_partials(mw.grad, r)
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

    # ------------------------------------------------------------------- checkpoints
    def _group_sizes(self) -> list[int]:
        """Parameters per group, counting the tensors state is keyed by (a wrapper's groups
        may hold flat partitions instead)."""
        if self._layout is None:
            return [len(refs) for refs in self._built]
        return [self.group_of.count(gi) for gi in range(len(self.groups))]

    def _packed_groups(self) -> list[dict[str, Any]]:
        out, start = [], 0
        for g, n in zip(self.groups, self._group_sizes(), strict=True):
            hyper = {k: v for k, v in g.items() if k != "params"}
            out.append({**hyper, "params": list(range(start, start + n))})
            start += n
        return out

    def _local_state_dict(self) -> dict[str, Any]:
        """This rank's state in torch's format (indices in optimizer order), plus the
        global step counts every rank keeps."""
        lay = self._bound()
        state = {i: dict(self.state[p]) for i, p in enumerate(lay.params) if self.state.get(p)}
        return {
            "state": state,
            "param_groups": self._packed_groups(),
            "coap_steps": list(self._steps),
        }

    def state_dict(self) -> dict[str, Any]:
        """Tensors only (loads with ``torch.load(..., weights_only=True)``).

        One process or replicated state: the whole state. Sharded layouts: FSDP2's default
        returns DTensor state for ``torch.distributed.checkpoint``; DeepSpeed this rank's
        pieces; the other owner layouts raise unless :meth:`consolidate_state_dict` ran on
        every rank first (then the rank it named gets the whole state). Never enters a
        collective.
        """
        if self._consolidated is not None:
            at, sd = self._consolidated
            if at != self._step_calls:
                raise RuntimeError(
                    f"{self.name}: the state consolidated by consolidate_state_dict() is from "
                    f"before the last {self._step_calls - at} step(s); call it again on every "
                    "rank before state_dict()"
                )
            return sd
        if self._layout is None:
            if self._pending_load is not None:
                return self._pending_load
            return {"state": {}, "param_groups": self._packed_groups()}
        return self._layout.state_dict(self._local_state_dict)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective (call it on every rank): gather the whole single-process state on rank
        ``to`` of the layout's group, where the next :meth:`state_dict` returns it."""
        lay = self._bound()
        full = lay.consolidate(to)
        self._consolidated = None
        if full is not None:
            sd = {
                "state": full,
                "param_groups": self._packed_groups(),
                "coap_steps": list(self._steps),
            }
            self._consolidated = (self._step_calls, sd)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load state (any form :meth:`state_dict` returns, from any world size for the
        whole state); each rank keeps the pieces its layout assigns it. Before the first
        step the state is kept and applied once the layout is bound.

        Hyperparameters: this optimizer's win. Only what a scheduler drives is restored
        from the checkpoint, as torch does, so a resumed schedule continues: ``lr`` and
        group keys that are not hyperparameters (``initial_lr``, ``max_lr``, metadata).
        Every other saved value that differs (``weight_decay``, ``betas``, ``rank``, ...)
        is replaced by this optimizer's, with a ``UserWarning`` listing them.

        State: converted to this optimizer's format where it can be (single-process form,
        e.g. a ``state_dict()`` of one process or after ``consolidate_state_dict()``):
        dtype and ``state_bits`` changes, and a changed rank by re-projection
        (:func:`coap_dist.optim.storage.convert_full`); what cannot be converted (another
        projection side or shape, another optimizer's state) raises naming the parameter.
        Sharded state (DCP DTensors, DeepSpeed pieces) must match this optimizer's format.
        """
        saved = state_dict.get("param_groups")
        if not isinstance(saved, list) or "state" not in state_dict:
            raise ValueError(
                f"{self.name}.load_state_dict: expected a dict with 'state' and 'param_groups' "
                f"(an optimizer state dict), got keys {sorted(state_dict)}"
            )
        marks = ("update_interval", "projector_update", "moments")
        for i, g in enumerate(saved):
            missing = [k for k in marks if k not in g]
            if missing:
                foreign = sorted(set(g) - set(self.defaults) - {"params"})
                raise ValueError(
                    f"{self.name}.load_state_dict: saved param_groups[{i}] has no "
                    f"{', '.join(f'`{k}`' for k in missing)}: it is another optimizer's state "
                    f"dict (its own keys: {foreign}), whose state COAP cannot take over. Load "
                    f"the model weights only and start {self.name} fresh, or load into the "
                    "optimizer that saved it"
                )
        if [len(g["params"]) for g in saved] != self._group_sizes():
            raise ValueError(
                f"{self.name}.load_state_dict: the saved groups hold "
                f"{[len(g['params']) for g in saved]} parameters, this optimizer's "
                f"{self._group_sizes()}"
            )
        # Saved parameter ids are positions in the saved groups (torch's convention; DCP
        # uses fully qualified names): map them to this optimizer's order.
        position = {pid: i for i, pid in enumerate(pid for g in saved for pid in g["params"])}
        state_dict = {
            **state_dict,
            "state": {position[k]: v for k, v in state_dict["state"].items() if k in position},
            "param_groups": [{**g, "params": [position[p] for p in g["params"]]} for g in saved],
        }
        hyper = set(self.config_class.keys("group")) - {"lr"}
        replaced = []
        for i, (group, old) in enumerate(zip(self.groups, saved, strict=True)):
            for k, v in old.items():
                v = tuple(v) if k == "betas" else v
                if k == "params":
                    continue
                if k not in hyper:
                    group[k] = v
                elif group.get(k) != v:
                    replaced.append(f"param_groups[{i}].{k}: {v!r} -> {group.get(k)!r}")
            self.config_class.validate_group(group, f"{self.name} param_groups[{i}]", own={})
        if replaced:
            warnings.warn(
                f"{self.name}.load_state_dict: this optimizer's hyperparameters replace the "
                f"checkpoint's: {'; '.join(replaced)}",
                UserWarning,
                stacklevel=2,
            )
        self._consolidated = None
        if self._layout is None:
            # Applied at the first step: a snapshot now (on the CPU), as torch would have
            # copied the values by the time the saving optimizer steps on.
            self._pending_load = {**state_dict, "state": _snapshot(state_dict["state"])}
            return
        self._load(state_dict)

    def _load(self, sd: Mapping[str, Any]) -> None:
        lay = self._bound()
        state = dict(sd["state"])
        partial = "coap_layout" in sd
        for i, st in sd["state"].items():
            if not 0 <= int(i) < len(self.specs):
                raise ValueError(
                    f"{self.name}.load_state_dict: state for parameter {i} of {len(self.specs)}"
                )
            if not (partial or _is_dtensor_state(st)):
                # a rank's pieces are checked by the layout (they must be its own)
                state[i] = convert_full(
                    self.specs[int(i)], st, f"{self.name}.load_state_dict: parameter {i}"
                )
        lay.load_state_dict({**sd, "state": state})
        steps = sd.get("coap_steps")
        if steps is None:
            steps = [int(state[i]["step"]) if i in state else 0 for i in range(len(self.specs))]
        self._steps = [int(k) for k in steps]

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
            self,
            saved["param_groups"],
            None,
            saved["config"],
            {},
            sharding=saved["sharding"],
            process_group=None,
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
        the optimizer's collectives and bytes of the last step. Counters are the same on
        every rank; the residual (mean over the matrices of the last refresh) is read at the
        next step's host sync."""
        out = {f"optim/{k}": float(v) for k, v in self._counters.items()}
        out["optim/state_bytes"] = float(self.state_bytes())
        out["optim/projector_time_s"] = self._projector_time
        out["optim/projection_residual"] = self._residual
        out.update(
            {"optim/comm_calls_per_step": 0.0, "optim/comm_bytes_per_step": 0.0}
            | ({} if self._layout is None else self._layout.metrics())
        )
        return out


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


def _snapshot(state: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """CPU copies of plain state tensors (DTensor state and pieces are the layout's)."""
    from torch.distributed.tensor import DTensor

    return {
        i: {
            k: v.detach().to("cpu", copy=True)
            if isinstance(v, Tensor) and not isinstance(v, DTensor)
            else v
            for k, v in st.items()
        }
        for i, st in state.items()
    }


def _global_shape(p: Tensor) -> tuple[int, ...]:
    """Shape of the whole parameter (DeepSpeed zero.Init keeps it in ``ds_shape``)."""
    ds_shape = getattr(p, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(p.shape)


def _is_dtensor_state(st: Mapping[str, Any]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, DTensor) for v in st.values())


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
        super().__init__(
            params, lr, config, hyperparameters, sharding=sharding, process_group=process_group
        )


class COAPAdafactor(_COAPBase):
    """Adafactor (factored second moment, update clipping, momentum ``betas[0]``) on COAP
    projections; AdamW with ``betas`` for every other parameter.

    Built like :class:`COAPAdamW` (``config``: a
    :class:`~coap_dist.optim.config.COAPAdafactorConfig`); ``lr`` is an absolute step size
    (no relative step, no parameter scaling). Hyperparameters (generated from the config):
    """

    config_class = COAPAdafactorConfig
    _rule = kernels.AdafactorRule()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        *,
        config: COAPAdafactorConfig | None = None,
        sharding: Any = None,
        process_group: Any = None,
        **hyperparameters: Any,
    ) -> None:
        super().__init__(
            params, lr, config, hyperparameters, sharding=sharding, process_group=process_group
        )


for _cls in (COAPAdamW, COAPAdafactor):
    _cls.__doc__ = f"{_cls.__doc__}\n{textwrap.indent(_cls.config_class.docs(), '    ')}\n"
