"""COAPAdamW and COAPAdafactor: low-rank projected optimizer state with a moving projector.

Per matrix parameter W (global m x n, rank r; see :mod:`coap_dist.functional.projection` for the
canonical orientation), with k the number of completed steps, T_u = ``update_interval`` and
F = ``reproject_factor``:

1. projector schedule: k == 0: P = RSVD(G); k % (T_u F) == 0: P = RSVD(G, warm start at P);
   k % T_u == 0: P = correlation-aware step (``projector_update``). With ``moments="rotate"``
   the moments are re-expressed in the new basis through C = P_old P_new^T.
2. R = G P^T; Adam (or Adafactor) on R; W <- W - lr_t alpha back(D); W <- W - lr wd W.

Convolutions (4-D, > 9216 elements, ``rank_ratio_cnn`` set) use a Tucker-2 core instead of R;
everything else (1-D, small convs, groups with ``algorithm="adamw"``) runs AdamW.

Non-finite gradients: the step of an affected parameter is skipped entirely (moments,
projector, weights and its step counter untouched) and counted in ``metrics()``; a refresh
never installs a non-finite projector (the old one is kept). An all-zero gradient at k == 0
(DeepSpeed's construction-time step) does not initialise the projector. The check costs one
host synchronisation per step on a vector of flags (and, when sharded, one tiny all-reduce).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from coap_dist.functional import adam as fadam
from coap_dist.functional import projection as fproj
from coap_dist.functional import quant as fquant
from coap_dist.functional import tucker as ftucker
from coap_dist.optim.config import STATE_BITS, validate_group
from coap_dist.optim.layout import (
    AppliedUpdate,
    Layout,
    LowRankUpdate,
    MatrixGeometry,
    Update,
    resolve_layout,
)

QUANT_MIN_NUMEL = 4096
"""8-bit state applies to moments with at least this many elements; smaller ones stay fp32."""


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts about one parameter, derived from its global shape and its group."""

    kind: str  # "matrix" | "conv" | "dense"
    index: int
    group: int
    side: fproj.Side = "right"
    rank: int = 0
    rows: int = 0  # global rows a of the canonical gradient
    cols: int = 0  # b
    ranks_cnn: tuple[int, int | None] = (0, None)
    offset: int = 0  # refresh stagger


class _COAPBase(Optimizer):
    """Shared machinery of the COAP optimizers (schedule, state, layouts, accounting)."""

    _adafactor = False

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        state_bits: int | None,
        sharding: str | None,
        process_group: Any,
        skip_nonfinite: bool,
    ) -> None:
        name = type(self).__name__
        if state_bits not in STATE_BITS:
            raise ValueError(
                f"{name}: invalid `state_bits`={state_bits!r}; must be one of "
                f"{STATE_BITS} (None: same dtype as the parameter)"
            )
        if self._adafactor and state_bits == 8:
            raise ValueError(
                f"{name}: invalid `state_bits`=8; 8-bit state is available for "
                "COAPAdamW only (Adafactor's factored moments are already tiny)"
            )
        self.state_bits = state_bits
        self.skip_nonfinite = skip_nonfinite
        super().__init__(params, defaults)
        # The parameters as built, per group. A wrapper may later swap other tensors into the
        # groups (DeepSpeed's fp32 copies or flat ZeRO partitions): see _params_this_step.
        self._logical: dict[int, list[Tensor]] = {
            id(g): list(g["params"]) for g in self.param_groups
        }
        self._logical_groups: list[dict[str, Any]] = list(self.param_groups)
        for i, group in enumerate(self.param_groups):
            validate_group(group, f"{name} param_groups[{i}]", adafactor=self._adafactor)
        all_params = [p for g in self.param_groups for p in g["params"]]
        self._all_params = all_params
        self._layout: Layout = resolve_layout(all_params, sharding, process_group)
        if state_bits == 8 and not self._layout.supports_quantized_state:
            raise ValueError(
                f"{name}: invalid `state_bits`=8 under the `{self._layout.name}` "
                "layout; 8-bit state is supported in one process and with "
                "sharding='owner'. Use state_bits=16 or 32 here"
            )
        self._plans: dict[Tensor, _Plan] = {}
        n_matrix = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                plan = self._make_plan(p, gi, len(self._plans), n_matrix)
                n_matrix += plan.kind != "dense"
                self._plans[p] = plan
        self._fix_stagger(n_matrix)
        self._layout.bind(
            all_params, [self._cost(p) for p in all_params], [self._geometry(p) for p in all_params]
        )
        self._layout.check_config(self._fingerprint(), name)
        self._counters = {
            "refreshes": 0,
            "recalibrations": 0,
            "projector_updates": 0,
            "nonfinite_skips": 0,
            "refresh_keep_old": 0,
            "init_deferred": 0,
        }
        self._changed: set[Tensor] = set()
        self._projector_time = 0.0
        self._last_residual = float("nan")
        for group in self.param_groups:
            for p in group["params"]:
                if self._layout.owns(p):
                    self.state[p] = self._new_state(p, group)

    # ----------------------------------------------------------------------------- planning
    def _make_plan(self, p: Tensor, gi: int, index: int, n_matrix: int) -> _Plan:
        group = self.param_groups[gi]
        where = f"{type(self).__name__} param_groups[{gi}]"
        algo = group["algorithm"]
        shape = tuple(self._layout.global_shape(p))
        if algo == "adamw":
            return _Plan("dense", index, gi)
        if len(shape) == 2:
            side = self._layout.forced_side(p) or fproj.choose_side(shape, group["projection_side"])
            rank = fproj.resolve_rank(shape, group["rank"], group["rank_ratio"])
            rows, cols = (shape[0], shape[1]) if side == "right" else (shape[1], shape[0])
            return _Plan("matrix", index, gi, side, rank, rows, cols, offset=n_matrix)
        if len(shape) == 4:
            numel = shape[0] * shape[1] * shape[2] * shape[3]
            if group["rank_ratio_cnn"] is not None and numel > ftucker.SMALL_CONV_NUMEL:
                if not self._layout.supports_tucker(p):
                    raise ValueError(
                        f"{where}: a 4-D weight of shape {shape} would be Tucker-projected, which "
                        f"the `{self._layout.name}` layout does not support; set "
                        "rank_ratio_cnn=None (AdamW for convolutions) or use sharding='owner'"
                    )
                return _Plan(
                    "conv",
                    index,
                    gi,
                    ranks_cnn=ftucker.tucker_ranks(shape, group["rank_ratio_cnn"]),
                    offset=n_matrix,
                )
            return _Plan("dense", index, gi)
        if algo == "coap":
            raise ValueError(
                f"{where}: a {len(shape)}-D parameter of shape {shape} was put in a group with "
                "algorithm='coap'; COAP projects 2-D matrices and 4-D convolutions only. Use "
                "algorithm='adamw' (or 'auto') for this parameter"
            )
        return _Plan("dense", index, gi)

    def _fix_stagger(self, n_matrix: int) -> None:
        for p, plan in list(self._plans.items()):
            group = self._group_of(p)
            if plan.kind == "dense":
                continue
            offset = (
                (plan.offset * group["update_interval"]) // max(n_matrix, 1)
                if group["stagger"]
                else 0
            )
            self._plans[p] = dataclasses.replace(plan, offset=offset)

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        return self._logical_groups[self._plans[p].group]

    def _cost(self, p: Tensor) -> float:
        """Refresh compute cost for owner assignment: randomized SVDs cost ~ m n r for a COAP
        matrix and ~ numel (r0 + r1) for a Tucker convolution; AdamW parameters cost numel."""
        plan = self._plans[p]
        if plan.kind == "matrix":
            return float(plan.rows * plan.cols * plan.rank)
        numel = 1
        for s in self._layout.global_shape(p):
            numel *= s
        if plan.kind == "conv":
            r0, r1 = plan.ranks_cnn
            return float(numel * (r0 + (r1 or 0)))
        return float(numel)

    def _fingerprint(self) -> dict[str, Any]:
        """Settings every rank must share: group hyperparameters, sizes, state_bits."""
        out: dict[str, Any] = {"state_bits": self.state_bits, "skip_nonfinite": self.skip_nonfinite}
        for i, g in enumerate(self.param_groups):
            for k, v in g.items():
                out[f"param_groups[{i}].{k}"] = len(v) if k == "params" else v
        return out

    def _geometry(self, p: Tensor) -> MatrixGeometry | None:
        plan = self._plans[p]
        if plan.kind != "matrix":
            return None
        return MatrixGeometry(plan.side, plan.rank, plan.rows, plan.cols)

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        """dtype of unquantized state: projectors, Tucker factors, small or 16/32-bit moments.
        8-bit state keeps projectors in the parameter dtype (they are not quantized)."""
        if self.state_bits == 32:
            return torch.float32
        if self.state_bits == 16:
            return torch.bfloat16
        return self._layout.param(p).dtype  # a wrapper's fp32 master copy, if any

    # ------------------------------------------------------------------------------ state
    def _moment_tensors(
        self, p: Tensor, name: str, shape: tuple[int, ...], signed: bool, rows_like_param: bool
    ) -> dict[str, Tensor]:
        lay, dev = self._layout, self._layout.param(p).device
        numel = 1
        for s in shape:
            numel *= s
        if self.state_bits == 8 and numel >= QUANT_MIN_NUMEL:
            q = torch.zeros(shape, dtype=torch.uint8, device=dev)
            scales = torch.zeros(fquant.num_blocks(numel), dtype=torch.float32, device=dev)
            return {f"{name}_q": lay.wrap_state(p, q, rows_like_param), f"{name}_scale": scales}
        dtype = torch.float32 if self.state_bits == 8 else self._state_dtype(p)
        t = torch.zeros(shape, dtype=dtype, device=dev)
        return {name: lay.wrap_state(p, t, rows_like_param)}

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """Eagerly allocated state (same keys on every rank that holds p)."""
        plan = self._plans[p]
        lay = self._layout
        local = lay.param(p)
        dev = local.device
        st: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32)}
        if plan.kind == "dense":
            shape = tuple(local.shape)
            st.update(self._moment_tensors(p, "exp_avg", shape, True, True))
            st.update(self._moment_tensors(p, "exp_avg_sq", shape, False, True))
            return st
        st["refreshes"] = torch.zeros((), dtype=torch.float32)
        if plan.kind == "conv":
            o, i = lay.global_shape(p)[:2]
            r0, r1 = plan.ranks_cnn
            st["factor0"] = torch.zeros((o, r0), dtype=self._state_dtype(p), device=dev)
            if r1 is not None:
                st["factor1"] = torch.zeros((i, r1), dtype=self._state_dtype(p), device=dev)
            core_shape = (r0, r1 if r1 is not None else i, *local.shape[2:])
            st.update(self._moment_tensors(p, "exp_avg", core_shape, True, False))
            st.update(self._moment_tensors(p, "exp_avg_sq", core_shape, False, False))
            return st
        local_rows = fproj.canonical(local, plan.side).shape[0]
        proj = torch.zeros((plan.rank, plan.cols), dtype=self._state_dtype(p), device=dev)
        st["projector"] = lay.wrap_state(p, proj, False)
        st.update(self._moment_tensors(p, "exp_avg", (local_rows, plan.rank), True, True))
        if self._adafactor:
            st["exp_avg_sq_row"] = lay.wrap_state(
                p, torch.zeros(local_rows, dtype=torch.float32, device=dev), True
            )
            st["exp_avg_sq_col"] = lay.wrap_state(
                p, torch.zeros(plan.rank, dtype=torch.float32, device=dev), False
            )
        else:
            st.update(self._moment_tensors(p, "exp_avg_sq", (local_rows, plan.rank), False, True))
        return st

    def _read(self, st: dict[str, Any], name: str, signed: bool) -> Tensor:
        """The local moment as a compute tensor (dequantized fp32 for 8-bit state)."""
        if name in st:
            return self._layout.local(st[name])
        q = self._layout.local(st[f"{name}_q"])
        return fquant.dequantize(q, st[f"{name}_scale"], signed)

    def _write(self, st: dict[str, Any], name: str, value: Tensor, signed: bool) -> None:
        if name in st:
            loc = self._layout.local(st[name])
            if value.data_ptr() != loc.data_ptr():
                loc.copy_(value)
            return
        q, scales = fquant.quantize(value, signed)
        self._layout.local(st[f"{name}_q"]).copy_(q)
        st[f"{name}_scale"].copy_(scales)

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step (see the module docstring for the exact update)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lay = self._layout
        groups = self._params_this_step()
        all_params = self._all_params
        lay.begin_step(all_params)
        items: list[tuple[Tensor, dict[str, Any], Tensor, Tensor]] = []  # (p, group, g, R or g)
        for group, params in groups:
            for p in params:
                g = lay.grad(p) if lay.owns(p) else None
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                r = self._prepare(p, group, g)
                if r is not None:
                    items.append((p, group, g, r))
        if self.skip_nonfinite:
            # One flag per optimizer parameter (same length on every rank), ANDed over the
            # ranks sharing a parameter, then one host sync.
            flags = torch.ones(len(all_params), dtype=torch.bool)
            if items:
                idx = torch.tensor([self._plans[it[0]].index for it in items])
                # sum(t) is finite iff every entry is (NaN/Inf propagate): one fast reduction
                # per tensor instead of a full-size boolean mask.
                flags[idx] = torch.isfinite(torch.stack([it[3].sum() for it in items])).cpu()
            ok = lay.agree(flags, all_params).tolist()
            kept = [it for it in items if ok[self._plans[it[0]].index]]
            self._counters["nonfinite_skips"] += len(items) - len(kept)
            items = kept
        updates: dict[torch.nn.Parameter, Update] = {}
        low = [it for it in items if self._plans[it[0]].kind == "matrix"]
        for it in items:
            self.state[it[0]]["step"] += 1
        if low:
            updates.update(self._low_rank_updates(low))
        dense = [it for it in items if self._plans[it[0]].kind == "dense"]
        if dense:
            self._dense_steps(dense)
            updates.update((it[0], AppliedUpdate()) for it in dense)
        for p, group, _, r in items:
            if self._plans[p].kind == "conv":
                self._conv_step(p, group, r)
                updates[p] = AppliedUpdate()
        lay.commit(updates, all_params)
        return loss

    def _params_this_step(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """(group, parameters to update) for the groups present now. When a wrapper has swapped
        other tensors into the groups, the layout maps them back to the parameters the
        optimizer was built with (``Layout.adopt``; it may cover a subset per call), and state
        is created for parameters it newly assigns to this rank."""
        groups = self.param_groups
        name = type(self).__name__
        try:
            logical = [self._logical[id(g)] for g in groups]
        except KeyError:
            raise RuntimeError(
                f"{name}: a parameter group was added or replaced after construction; build "
                "the optimizer with all its groups"
            ) from None
        current = [g["params"] for g in groups]
        if all(
            len(c) == len(q) and all(a is b for a, b in zip(c, q, strict=True))
            for c, q in zip(current, logical, strict=True)
        ):
            return list(zip(groups, logical, strict=True))
        active = self._layout.adopt(current, logical)
        if active is None:
            raise RuntimeError(
                f"{name}: a wrapper replaced the optimizer's parameter tensors (e.g. flat ZeRO "
                f"partitions) and the `{self._layout.name}` layout cannot map them back to "
                "matrices. Under DeepSpeed, name the optimizer in the JSON config "
                '("optimizer": {"type": "COAP"}) after `import coap_dist`, or pass '
                "optimizer=lambda params: COAPAdamW(params, ...) to deepspeed.initialize"
            )
        keep = set(active)
        out = []
        for g, params in zip(groups, logical, strict=True):
            mine = [p for p in params if p in keep]
            for p in mine:
                if not self.state.get(p) and self._layout.owns(p):
                    self.state[p] = self._new_state(p, g)
            out.append((g, mine))
        return out

    @contextlib.contextmanager
    def _logical_view(self) -> Iterator[None]:
        """Put the parameters the optimizer was built with (the keys of its state) back into the
        groups for torch's state_dict / load_state_dict, then restore the wrapper's tensors,
        also into the new group dicts that load_state_dict creates."""
        groups = list(self.param_groups)
        swapped = [g["params"] for g in groups]
        for g in groups:
            g["params"] = self._logical[id(g)]
        try:
            yield
        finally:
            new = list(self.param_groups)
            for old, g, params in zip(groups, new, swapped, strict=True):
                if g is not old:
                    self._logical[id(g)] = self._logical.pop(id(old))
                    i = next(k for k, x in enumerate(self._logical_groups) if x is old)
                    self._logical_groups[i] = g
                g["params"] = params

    def _due(self, p: Tensor, group: dict[str, Any], k: int) -> str | None:
        """Which projector refresh is due at completed-step count k (None: none)."""
        if k == 0:
            return "init"
        kk = k + self._plans[p].offset
        tu = group["update_interval"]
        if kk % (tu * group["reproject_factor"]) == 0:
            return "recalibrate"
        if kk % tu == 0:
            return "update"
        return None

    def _prepare(self, p: Tensor, group: dict[str, Any], g: Tensor) -> Tensor | None:
        """Refresh the projector if due; return the projected gradient (matrix), the Tucker
        core (conv), the gradient (dense), or None when the step must not happen (k == 0 with
        a zero or non-finite gradient)."""
        plan = self._plans[p]
        if plan.kind == "dense":
            return g
        st = self.state[p]
        k = int(st["step"].item())
        due = self._due(p, group, k)
        if due is not None:
            t0 = time.perf_counter()
            installed = self._refresh(p, group, g, due)
            self._projector_time += time.perf_counter() - t0
            if due == "init" and not installed:
                return None
        if plan.kind == "conv":
            u0 = st["factor0"]
            return ftucker.core(g, u0, st.get("factor1"))
        proj = self._layout.local(st["projector"])
        gc = fproj.canonical(g, plan.side)
        r = fproj.project(gc, proj.to(gc.dtype))
        if due is not None and p in self._changed:  # a new projector: report how well it fits
            shards = self._layout.shard_group(p)
            self._last_residual = float(fproj.projection_residual(gc, r, shards))
        return r

    def _refresh(self, p: Tensor, group: dict[str, Any], g: Tensor, due: str) -> bool:
        """Compute and install a new projector; False if it was rejected (kept the old)."""
        plan, st, lay = self._plans[p], self.state[p], self._layout
        shards = lay.shard_group(p)
        if plan.kind == "conv":
            if not bool(torch.isfinite(g).all()) or (due == "init" and not bool(g.any())):
                self._counters["init_deferred" if due == "init" else "refresh_keep_old"] += 1
                return False
            f0, f1 = st["factor0"], st.get("factor1")
            warm0 = None if due == "init" else f0
            warm1 = None if due == "init" else f1
            n0, n1 = ftucker.refresh_factors(g, *plan.ranks_cnn, warm0, warm1)
            if not bool(torch.isfinite(n0).all()) or (
                n1 is not None and not bool(torch.isfinite(n1).all())
            ):
                self._counters["refresh_keep_old"] += 1
                return False
            if due != "init" and group["moments"] == "rotate":
                c0 = f0.float().t() @ n0
                c1 = None if n1 is None else f1.float().t() @ n1
                # Lifted core M x0 U0 x1 U1 re-projected: M x0 (U0_new^T U0) x1 (U1_new^T U1).
                m = ftucker.core(self._read(st, "exp_avg", True).float(), c0, c1)
                v = ftucker.core(
                    self._read(st, "exp_avg_sq", False).float(),
                    c0 * c0,
                    None if c1 is None else c1 * c1,
                )
                self._write(st, "exp_avg", m, True)
                self._write(st, "exp_avg_sq", v, False)
            f0.copy_(n0)
            if n1 is not None:
                f1.copy_(n1)
            self._count_refresh(st, due)
            return True
        gc = fproj.canonical(g, plan.side)
        proj_state = lay.local(st["projector"])
        if due == "init":
            # Global count of non-finite entries and |G| mass: a zero or non-finite first
            # gradient (DeepSpeed's construction-time step) does not initialise P.
            sums = torch.stack([(~torch.isfinite(gc)).sum().float(), gc.abs().sum().float()])
            if shards is not None:
                sums = shards.sum(sums)
            if bool(sums[0] > 0) or not bool(sums[1] > 0):
                self._counters["init_deferred"] += 1
                return False
        reference = group["projector_update"] == "reference"
        if due == "update":
            new = fproj.correlation_update(
                gc,
                proj_state,
                self._read(st, "exp_avg", True),
                global_rows=plan.rows,
                cos_axis="row" if plan.side == "right" else "col",
                scale_free=not reference,
                lr=group["projector_lr"],
                shards=shards,
            )[0]
        else:
            omega = None if due == "init" else proj_state.float().t()
            new = fproj.rsvd(
                gc,
                plan.rank,
                omega,
                oversample=group["oversample"],
                power_iters=group["power_iters"],
                shards=shards,
                fix_signs=not reference,
            )
        if not bool(torch.isfinite(new).all()):
            self._counters["refresh_keep_old"] += 1
            return due != "init"
        if due != "init" and group["moments"] == "rotate":
            c = fproj.rotation(proj_state, new)
            m = self._read(st, "exp_avg", True)
            if self._adafactor:
                self._write(st, "exp_avg", m @ c.to(m.dtype), True)
            else:
                v = self._read(st, "exp_avg_sq", False)
                m2, v2 = fproj.rotate_moments(m, v, c)
                self._write(st, "exp_avg", m2, True)
                self._write(st, "exp_avg_sq", v2, False)
        proj_state.copy_(new)
        self._count_refresh(st, due)
        self._changed.add(p)
        return True

    def _count_refresh(self, st: dict[str, Any], due: str) -> None:
        st["refreshes"] += 1
        self._counters["refreshes"] += 1
        if due == "recalibrate":
            self._counters["recalibrations"] += 1
        elif due == "update":
            self._counters["projector_updates"] += 1

    # --------------------------------------------------------------- per-kind moment steps
    def _low_rank_updates(
        self, items: list[tuple[Tensor, dict[str, Any], Tensor, Tensor]]
    ) -> dict[torch.nn.Parameter, Update]:
        """Adam on R for every COAP matrix, batched with torch._foreach per (dtype, group)."""
        out: dict[torch.nn.Parameter, Update] = {}
        buckets: dict[tuple[int, torch.dtype], list[Any]] = {}
        for it in items:
            p, group = it[0], it[1]
            m = self._read(self.state[p], "exp_avg", True)
            buckets.setdefault((id(group), m.dtype), []).append((*it, m))
        for bucket in buckets.values():
            group = bucket[0][1]
            b1, b2 = group["betas"]
            ms = [it[4] for it in bucket]
            vs = [self._read(self.state[it[0]], "exp_avg_sq", False) for it in bucket]
            rs = [it[3].to(ms[0].dtype) for it in bucket]
            ds = fadam.adam_directions(ms, vs, rs, b1, b2, group["eps"])
            for (p, _, _, _, _), m, v, d in zip(bucket, ms, vs, ds, strict=True):
                st = self.state[p]
                self._write(st, "exp_avg", m, True)
                self._write(st, "exp_avg_sq", v, False)
                t = int(st["step"].item())
                alpha = fadam.adam_step_size(group["lr"], b1, b2, t) * group["scale"]
                out[p] = self._low_rank_update(p, group, d, alpha)
        return out

    def _low_rank_update(
        self, p: Tensor, group: dict[str, Any], d: Tensor, alpha: float
    ) -> LowRankUpdate:
        st = self.state[p]
        changed = p in self._changed
        self._changed.discard(p)
        return LowRankUpdate(
            d,
            self._layout.local(st["projector"]),
            self._plans[p].side,
            alpha,
            group["lr"] * group["weight_decay"],
            changed,
        )

    def _dense_steps(self, items: list[tuple[Tensor, dict[str, Any], Tensor, Tensor]]) -> None:
        """AdamW (reference form), batched with torch._foreach per (group, dtypes):

        M <- b1 M + (1 - b1) G;  V <- b2 V + (1 - b2) G^2;
        W <- W - lr_t M / (sqrt(V) + eps);  W <- (1 - lr wd) W
        """
        buckets: dict[tuple[int, torch.dtype, torch.dtype], list[Any]] = {}
        for p, group, g, _ in items:
            st = self.state[p]
            m = self._read(st, "exp_avg", True)
            w = self._layout.param(p)
            buckets.setdefault((id(group), m.dtype, w.dtype), []).append((p, group, g, m, w))
        for bucket in buckets.values():
            group = bucket[0][1]
            b1, b2 = group["betas"]
            ms = [it[3] for it in bucket]
            vs = [self._read(self.state[it[0]], "exp_avg_sq", False) for it in bucket]
            gs = [it[2].to(ms[0].dtype) for it in bucket]
            ws = [it[4] for it in bucket]
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, gs, alpha=1.0 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, value=1.0 - b2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, group["eps"])
            sizes = [
                -fadam.adam_step_size(group["lr"], b1, b2, int(self.state[it[0]]["step"].item()))
                for it in bucket
            ]
            if ws[0].dtype == ms[0].dtype:
                torch._foreach_addcdiv_(ws, ms, denom, sizes)
            else:
                num = [m.to(ws[0].dtype) for m in ms]
                torch._foreach_addcdiv_(ws, num, [d.to(ws[0].dtype) for d in denom], sizes)
            if group["weight_decay"] > 0:
                torch._foreach_mul_(ws, 1.0 - group["lr"] * group["weight_decay"])
            for it, m, v in zip(bucket, ms, vs, strict=True):
                self._write(self.state[it[0]], "exp_avg", m, True)
                self._write(self.state[it[0]], "exp_avg_sq", v, False)

    def _conv_step(self, p: Tensor, group: dict[str, Any], core: Tensor) -> None:
        """Adam on the Tucker core; W -= lr_t alpha back(D); W -= lr wd W."""
        st = self.state[p]
        b1, b2 = group["betas"]
        m = self._read(st, "exp_avg", True)
        v = self._read(st, "exp_avg_sq", False)
        (d,) = fadam.adam_directions([m], [v], [core.to(m.dtype)], b1, b2, group["eps"])
        self._write(st, "exp_avg", m, True)
        self._write(st, "exp_avg_sq", v, False)
        w = self._layout.param(p)
        t = int(st["step"].item())
        alpha = fadam.adam_step_size(group["lr"], b1, b2, t) * group["scale"]
        w.add_(ftucker.back(d.to(w.dtype), st["factor0"], st.get("factor1")), alpha=-alpha)
        if group["weight_decay"] > 0:
            w.add_(w, alpha=-group["lr"] * group["weight_decay"])
        self._changed.discard(p)

    # ------------------------------------------------------------------ checkpoints, metrics
    def state_dict(self) -> dict[str, Any]:
        """Tensors only (loads with ``torch.load(..., weights_only=True)``). Sharded-owner
        layouts return the full, layout-independent state on every rank."""
        self._params_this_step()
        saved = self.state
        with self._logical_view():
            params = [p for g in self.param_groups for p in g["params"]]
            full = self._layout.gather_state(
                {p: s for p, s in saved.items() if s},
                lambda p: self._new_state(p, self._group_of(p)),
                params,
            )
            try:
                self.state = full  # type: ignore[assignment]
                return super().state_dict()
            finally:
                self.state = saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load hyperparameters and state. Unlike torch's default, state tensors keep their
        saved dtype (fp32 state of bf16 weights, uint8 codes) and are copied, never aliased
        with the caller's dict; ranks keep only the state their layout assigns them."""
        self._params_this_step()
        with self._logical_view():
            super().load_state_dict(state_dict)
            params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved is None or not self._layout.keep_state(p):
                self.state.pop(p, None)
                continue
            device = self._layout.param(p).device
            self.state[p] = {
                k: (v.clone() if v.ndim == 0 else v.to(device=device, copy=True))
                if isinstance(v, Tensor)
                else v
                for k, v in saved.items()
            }
            if self._plans[p].kind == "matrix":
                # Ranks that cache projectors get them again with the next update.
                self._changed.add(p)

    def state_bytes(self) -> int:
        """Exact bytes of optimizer state held by this rank (every state tensor with ndim >= 1,
        plus layout-side caches such as replicated projectors)."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, Tensor) and v.ndim >= 1:
                    loc = self._layout.local(v)
                    total += loc.numel() * loc.element_size()
        return total + self._layout.extra_state_bytes()

    def metrics(self) -> dict[str, float]:
        """Counters for loggers: state bytes, refreshes, projector time, skips, residual."""
        out = {f"optim/{k}": float(v) for k, v in self._counters.items()}
        out["optim/state_bytes"] = float(self.state_bytes())
        out["optim/projector_time_s"] = self._projector_time
        out["optim/projection_residual"] = self._last_residual
        out["optim/comm_bytes_per_step"] = float(self._layout.communicated_bytes())
        return out

    @property
    def layout(self) -> Layout:
        """The distribution layout this optimizer runs under."""
        return self._layout


def _coap_defaults(**kw: Any) -> dict[str, Any]:
    return {"algorithm": "auto", **kw}


class COAPAdamW(_COAPBase):
    """AdamW whose moments of matrix (and large conv) weights live in a moving rank-r subspace.

    Args:
        params: parameters or groups; a group may set any hyperparameter below and
            ``algorithm`` ("auto": COAP for matrices, AdamW else; "coap"; "adamw").
        lr, betas, eps, weight_decay: AdamW's (reference form: eps outside the square root,
            decoupled decay W <- W - lr wd W after the update).
        rank / rank_ratio: r = min(rank, min(m, n)) or min(m, n) // rank_ratio.
        rank_ratio_cnn: Tucker ratio for convolutions (None: convolutions use AdamW).
        update_interval: T_u, steps between projector updates.
        reproject_factor: F, every T_u F steps a warm-started randomized SVD.
        scale: alpha applied to the back-projected update.
        projector_update: "scale_free" (default: relative objective + QR re-orthonormalization)
            or "reference" (the published, scale-dependent step).
        moments: "rotate" (default: M <- M C, V <- V (C*C) with C = P_old P_new^T) or "keep".
        projection_side: "auto" (compress the smaller dim), "right" or "left".
        oversample / power_iters: randomized SVD options. projector_lr: correlation step size.
        stagger: spread refresh steps of matrices over the interval (flattens SVD spikes).
        state_bits: None (parameter dtype), 32, 16 (bf16) or 8 (blockwise 8-bit moments).
        sharding: None (automatic: FSDP2 DTensors -> local row shards), "owner" (shard state
            by owner over the data-parallel group) or "local".
        process_group: group for ``sharding="owner"`` (default: the world).
        skip_nonfinite: skip the step of a parameter whose gradient is not finite.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        rank: int | None = None,
        rank_ratio: float | None = None,
        rank_ratio_cnn: float | None = None,
        update_interval: int = 32,
        reproject_factor: int = 5,
        scale: float = 1.0,
        projector_update: str = "scale_free",
        moments: str = "rotate",
        projection_side: str = "auto",
        oversample: int = 0,
        power_iters: int = 0,
        projector_lr: float = 0.1,
        stagger: bool = False,
        state_bits: int | None = None,
        sharding: str | None = None,
        process_group: Any = None,
        skip_nonfinite: bool = True,
    ) -> None:
        defaults = _coap_defaults(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            rank_ratio=rank_ratio,
            rank_ratio_cnn=rank_ratio_cnn,
            update_interval=update_interval,
            reproject_factor=reproject_factor,
            scale=scale,
            projector_update=projector_update,
            moments=moments,
            projection_side=projection_side,
            oversample=oversample,
            power_iters=power_iters,
            projector_lr=projector_lr,
            stagger=stagger,
        )
        super().__init__(
            params,
            defaults,
            state_bits=state_bits,
            sharding=sharding,
            process_group=process_group,
            skip_nonfinite=skip_nonfinite,
        )


class COAPAdafactor(_COAPBase):
    """Adafactor (factored second moment, update clipping, first moment) on COAP projections.

    Matrices: HF-style Adafactor on R = G P^T with a first moment (``beta1`` is required: the
    correlation-aware projector update uses it). Other parameters: AdamW with ``betas``.
    ``lr`` is an absolute step size (no relative step, no parameter scaling).
    """

    _adafactor = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        beta1: float | None = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        eps1: float = 1e-30,
        betas: tuple[float, float] = (0.9, 0.999),
        rank: int | None = None,
        rank_ratio: float | None = None,
        rank_ratio_cnn: float | None = None,
        update_interval: int = 32,
        reproject_factor: int = 5,
        scale: float = 1.0,
        projector_update: str = "scale_free",
        moments: str = "rotate",
        projection_side: str = "auto",
        oversample: int = 0,
        power_iters: int = 0,
        projector_lr: float = 0.1,
        stagger: bool = False,
        state_bits: int | None = None,
        sharding: str | None = None,
        process_group: Any = None,
        skip_nonfinite: bool = True,
    ) -> None:
        defaults = _coap_defaults(
            lr=lr,
            beta1=beta1,
            eps=eps,
            weight_decay=weight_decay,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            eps1=eps1,
            betas=tuple(betas),
            rank=rank,
            rank_ratio=rank_ratio,
            rank_ratio_cnn=rank_ratio_cnn,
            update_interval=update_interval,
            reproject_factor=reproject_factor,
            scale=scale,
            projector_update=projector_update,
            moments=moments,
            projection_side=projection_side,
            oversample=oversample,
            power_iters=power_iters,
            projector_lr=projector_lr,
            stagger=stagger,
        )
        super().__init__(
            params,
            defaults,
            state_bits=state_bits,
            sharding=sharding,
            process_group=process_group,
            skip_nonfinite=skip_nonfinite,
        )

    def _low_rank_updates(
        self, items: list[tuple[Tensor, dict[str, Any], Tensor, Tensor]]
    ) -> dict[torch.nn.Parameter, Update]:
        out: dict[torch.nn.Parameter, Update] = {}
        for p, group, _, r in items:
            st, plan = self.state[p], self._plans[p]
            t = int(st["step"].item())
            m = self._layout.local(st["exp_avg"])
            d = fadam.adafactor_direction(
                r,
                m,
                self._layout.local(st["exp_avg_sq_row"]),
                self._layout.local(st["exp_avg_sq_col"]),
                beta1=group["beta1"],
                beta2t=fadam.adafactor_beta2(t, group["decay_rate"]),
                eps1=group["eps1"],
                clip_threshold=group["clip_threshold"],
                global_rows=plan.rows,
                shards=self._layout.shard_group(p),
            )
            out[p] = self._low_rank_update(p, group, d, group["lr"] * group["scale"])
        return out
