"""Checkpoints of the COAP optimizers: torch's ``state_dict`` / ``load_state_dict``
contract over any layout, and ``consolidate_state_dict`` for owner layouts.

A mixin of :class:`~coap_dist.optim.coap.COAPAdamW` and ``COAPAdafactor``: it reads the
optimizer's groups, plan and bound layout (declared below) and converts saved state with
:func:`coap_dist.optim.storage.convert_full`. The format: torch's (``state`` keyed by
position in optimizer order, ``param_groups`` with positions), tensors only, plus
``coap_steps`` (every parameter's update count, which every rank keeps), ``coap_shapes``
(every parameter's global shape, checked position by position on load) and, with adaptive
refresh, ``coap_refresh`` (every adaptive matrix's schedule record, also kept by every rank).
``torch.distributed.checkpoint`` keeps only ``state`` and ``param_groups``: there the
per-parameter entries carry both (``step``, and the 0-d ``refresh_*`` entries of
:data:`REFRESH_KEYS`).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from coap_dist.optim.config import RENAMED, COAPAdamWConfig
from coap_dist.optim.layout import Layout
from coap_dist.optim.schedule import AdaptiveState
from coap_dist.optim.spec import ParamSpec
from coap_dist.optim.storage import assemble_all, convert_full

PENDING_STATE = "coap_state_pending"
"""A param-group key a checkpoint converter writes into the groups a wrapper restores by
itself (``coap-dist ds-to-universal``: DeepSpeed's universal loader copies the saved groups'
keys into the optimizer's), naming the file that holds COAP's state. The loader that gives
COAP that state removes it; a ``step()`` that still finds it raises instead of stepping on
fresh state."""

REFRESH_KEYS = ("refresh_credit", "refresh_base", "refresh_rho", "refresh_last")
"""Per-parameter state-dict entries (0-d fp64 tensors) of an adaptive matrix's schedule
record, :meth:`AdaptiveState.as_list` order; added to the saved copies only."""
RETIRED_KEYS = ("refreshes",)
"""Per-parameter entries that checkpoints of earlier versions hold and nothing reads any
more (a matrix's refresh count, kept only by the ranks holding its state, which broke
torch's full-state-dict load without a broadcast; ``metrics()`` counts refreshes): dropped
on load."""


def refresh_entries(record: Sequence[float]) -> dict[str, Tensor]:
    """An adaptive matrix's schedule record as its state-dict entries (0-d fp64 tensors,
    :data:`REFRESH_KEYS`)."""
    return {
        k: torch.tensor(v, dtype=torch.float64) for k, v in zip(REFRESH_KEYS, record, strict=True)
    }


class Checkpoints:
    """``state_dict``, ``consolidate_state_dict``, ``load_state_dict`` (see each)."""

    name: str
    config_class: type[COAPAdamWConfig]
    groups: list[dict[str, Any]]
    defaults: dict[str, Any]
    state: Any
    specs: list[ParamSpec]
    group_of: list[int]
    _built: list[list[weakref.ref[Tensor]]]
    _layout: Layout | None
    _steps: list[int]
    _adaptive: dict[int, AdaptiveState]
    _auto_rank: dict[int, int]
    _step_calls: int
    _pending_load: dict[str, Any] | None
    _consolidated: tuple[int, dict[str, Any]] | None
    _interrupted: str | None
    _optimizer_state_dict_pre_hooks: Any  # (torch.optim.Optimizer's hook registries)
    _optimizer_state_dict_post_hooks: Any  # (torch.optim.Optimizer's hook registries)
    _optimizer_load_state_dict_pre_hooks: Any  # (torch.optim.Optimizer's hook registries)
    _optimizer_load_state_dict_post_hooks: Any  # (torch.optim.Optimizer's hook registries)

    if TYPE_CHECKING:

        def _bound(self) -> Layout:
            """The bound layout (the optimizer's)."""
            ...

        def _refuse_interrupted(self, call: str) -> None:
            """Raise if a step stopped part-way (the optimizer's)."""
            ...

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
        return self._saved_form(state)

    def _saved_form(self, state: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """The state dict of parameter entries ``state`` (by index): each adaptive matrix's
        entry with its record (:data:`REFRESH_KEYS`), the groups and the host records."""
        for i, st in self._adaptive.items():
            if i in state:
                state[i] = {**state[i], **refresh_entries(st.as_list())}
        return {"state": state, "param_groups": self._packed_groups(), **self._host_records()}

    def _host_records(self) -> dict[str, Any]:
        """What every rank keeps about every parameter: update counts and adaptive records."""
        out: dict[str, Any] = {
            "coap_steps": list(self._steps),
            "coap_shapes": [list(s.shape) for s in self.specs],
        }
        if self._auto_rank:
            out["coap_ranks"] = dict(self._auto_rank)
        if self._adaptive:
            out["coap_refresh"] = {i: st.as_list() for i, st in self._adaptive.items()}
        return out

    def state_dict(self) -> dict[str, Any]:
        """Tensors only (loads with ``torch.load(..., weights_only=True)``); the hooks of
        ``register_state_dict_pre_hook`` / ``post_hook`` run around it as torch runs them.

        One process or replicated state: the whole state. Sharded layouts: FSDP2's default
        returns DTensor state for ``torch.distributed.checkpoint``; DeepSpeed this rank's
        pieces; the other owner layouts raise unless :meth:`consolidate_state_dict` ran on
        every rank first (then the rank it named gets the whole state). Never enters a
        collective, except when torch's full-state gather calls it
        (``get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))``:
        accelerate's and the HF Trainer's FSDP ``FULL_STATE_DICT``, torchtune's), which every
        rank runs together: then a sharded layout gathers the whole single-process state
        itself (``Layout.full_state_ranks``), on rank 0 with ``cpu_offload`` (torch keeps
        only rank 0's dict) and on every rank without, since torch gathers only DTensors.
        Refused after a ``step()`` that stopped part-way through its writes (its state is
        partly updated: load a checkpoint first).
        """
        self._refuse_interrupted("state_dict()")
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self._state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _state_dict(self) -> dict[str, Any]:
        ranks = None if self._layout is None else self._layout.full_state_ranks()
        if ranks is not None:
            # torch's full-state gather, on every rank now: the whole state where it keeps
            # it (gathered afresh, whatever an earlier consolidate_state_dict left here on
            # some ranks, so that every rank enters the same collectives)
            full = self._gather_full(ranks)
            return full or {"state": {}, "param_groups": self._packed_groups()}
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
            if self._pending_load is not None:  # (a copy: callers rewrite its keys, as DCP)
                pending = self._pending_load
                return {
                    **pending,
                    "state": {i: dict(st) for i, st in pending["state"].items()},
                    "param_groups": [{**g} for g in pending["param_groups"]],
                }
            return {"state": {}, "param_groups": self._packed_groups()}
        return self._layout.state_dict(self._local_state_dict)

    def consolidate_state_dict(self, to: int | None = 0) -> None:
        """Collective (call it on every rank): gather the whole single-process state on rank
        ``to`` of the layout's group, where the next :meth:`state_dict` returns it; with
        ``to=None`` on every rank (one gather per rank, the traffic of an all-gather: for
        callers that call ``state_dict()`` on every rank and keep rank 0's, as accelerate's
        ``save_state``)."""
        self._refuse_interrupted("consolidate_state_dict()")
        lay = self._bound()
        if to is not None and not 0 <= to < lay.world:
            raise ValueError(
                f"{self.name}.consolidate_state_dict: to={to!r} is not a rank of the layout's "
                f"group (0 .. {lay.world - 1}); pass one of them, or to=None for every rank"
            )
        self._consolidated = None
        sd = self._gather_full(range(lay.world) if to is None else (to,))
        if sd is not None:
            self._consolidated = (self._step_calls, sd)

    def _gather_full(self, ranks: Iterable[int]) -> dict[str, Any] | None:
        """Collective: the whole single-process state dict on each of ``ranks`` (None on
        the others), adaptive records in the entries too (as one process's)."""
        lay = self._bound()
        sd = None
        for q in ranks:
            full = lay.consolidate(q)
            if full is not None:
                sd = self._saved_form(full)
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load state (any form :meth:`state_dict` returns, from any world size for the
        whole state); each rank keeps the pieces its layout assigns it. Before the first
        step the state is kept and applied once the layout is bound.

        Hyperparameters: this optimizer's win. Only what a scheduler drives is restored
        from the checkpoint, as torch does, so a resumed schedule continues: ``lr``,
        ``betas[0]`` where a momentum scheduler marks the group (``max_momentum``:
        OneCycleLR, CyclicLR with ``cycle_momentum``) and group keys that are not
        hyperparameters (``initial_lr``, ``max_lr``, metadata).
        Every other saved value that differs (``weight_decay``, ``betas``, ``rank``, ...)
        is replaced by this optimizer's, with a ``UserWarning`` listing them.

        State: converted to this optimizer's format where it can be (single-process form,
        e.g. a ``state_dict()`` of one process or after ``consolidate_state_dict()``):
        dtype and ``state_bits`` changes, and a changed rank by re-projection
        (:func:`coap_dist.optim.storage.convert_full`); what cannot be converted (another
        projection side or shape, another optimizer's state) raises naming the parameter.
        Sharded state (DCP DTensors, DeepSpeed pieces) must match this optimizer's format.

        Loading is also how an optimizer whose ``step()`` stopped part-way (an exception
        after it began writing: Ctrl-C, an out-of-memory error, a failed collective) goes
        on: until then ``step()`` and ``state_dict()`` refuse, naming that exception. An
        exception before the writes (in the check, the ranks' agreement or the gradient
        exchange) leaves the optimizer unchanged, metrics included, and ``step()`` can
        simply be called again, as after a refused input (a sparse gradient, a pending
        checkpoint that does not fit). A step that finds
        the ranks stepped different parameters earlier (``skip_nonfinite=False`` with
        gradients on some ranks only) refuses like an interrupted one.

        The hooks of ``register_load_state_dict_pre_hook`` (which may return a replacement
        dict) and ``post_hook`` run around it as torch runs them.
        """
        state_dict = dict(state_dict)  # shallow copy, as torch's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict(state_dict)
        self._interrupted = None  # a step that stopped part-way: its state is replaced
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if "coap_shards" in state_dict:
            state_dict = _from_shards(state_dict["coap_shards"], self.name)
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
            "state": {
                position[k]: _current(v) for k, v in state_dict["state"].items() if k in position
            },
            "param_groups": [{**g, "params": [position[p] for p in g["params"]]} for g in saved],
        }
        backup = [dict(g) for g in self.groups]
        try:
            self._apply_loaded(state_dict, saved)
        except BaseException:  # a refused state dict leaves the groups as they were
            for g, kept in zip(self.groups, backup, strict=True):
                g.clear()
                g.update(kept)
            raise

    def _apply_loaded(self, state_dict: dict[str, Any], saved: list[dict[str, Any]]) -> None:
        hyper = set(self.config_class.keys("group")) - {"lr"}
        replaced = []
        for i, (group, old) in enumerate(zip(self.groups, saved, strict=True)):
            for k, v in old.items():
                v = tuple(v) if k == "betas" else v
                if k == "params" or k in RENAMED:
                    continue  # a renamed key (an older checkpoint's `beta1`): the new one wins
                if k == "betas" and "max_momentum" in old:
                    # a momentum scheduler (OneCycleLR, CyclicLR) drives beta1: restored
                    v, group[k] = (v[0], group[k][1]), (v[0], group[k][1])
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
        ranks = saved_ranks(state_dict)
        if self._layout is not None and ranks != self._auto_rank:
            # rank="auto": the saved ranks decide the plan; bind again at the next step.
            self._layout = None
        if self._layout is None:
            # Applied at the first step: a snapshot now (on the CPU), as torch would have
            # copied the values by the time the saving optimizer steps on.
            self._pending_load = {**state_dict, "state": _snapshot(state_dict["state"])}
            if "coap_shards" in state_dict:
                self._pending_load["coap_shards"] = [
                    {**sd, "state": _snapshot(sd["state"])} for sd in state_dict["coap_shards"]
                ]
            # Until the bind replaces them with the layout's state, opt.state holds the
            # loaded entries, as torch's does after a load: a caller testing it sees a
            # loaded optimizer (DCP's get/set_optimizer_state_dict then take no
            # zero-gradient initialisation step, which would be a real step of this state).
            # (Only where the groups hold the tensors the optimizer was built with, which
            # the indices count; a wrapper's flat partitions, as DeepSpeed's, do not.)
            params = [p for g in self.groups for p in g["params"]]
            built = [r() for g in self._built for r in g]
            self.state.clear()
            if len(built) == len(params) and all(
                a is b for a, b in zip(built, params, strict=False)
            ):
                for i, st in self._pending_load["state"].items():
                    if 0 <= int(i) < len(params):
                        self.state[params[int(i)]] = dict(st)
            return
        self._load(state_dict)

    def _load(self, sd: Mapping[str, Any]) -> None:
        lay = self._bound()
        if "coap_shards" in sd:
            items = []
            for shard in sd["coap_shards"]:
                for i, st in shard["state"].items():
                    a, b = shard["coap_pieces"][i]
                    kept = {k: v for k, v in _current(st).items() if k not in REFRESH_KEYS}
                    items.append((int(i), a, b, kept))
            where = f"{self.name}.load_state_dict(coap_shards)"
            sd = {k: v for k, v in sd.items() if k != "coap_shards"}
            sd["state"] = assemble_all(self.specs, items, where)
        self._check_shapes(sd.get("coap_shapes"))
        state = dict(sd["state"])
        partial = "coap_layout" in sd
        records: dict[int, AdaptiveState] = {}
        for i, st in sd["state"].items():
            if any(k in st for k in REFRESH_KEYS):
                values = [float(st[k]) for k in REFRESH_KEYS]
                records[int(i)] = AdaptiveState.from_list(values)
                state[i] = st = {k: v for k, v in st.items() if k not in REFRESH_KEYS}
            if not 0 <= int(i) < len(self.specs):
                raise ValueError(
                    f"{self.name}.load_state_dict: state for parameter {i} of {len(self.specs)}"
                )
            if not (partial or _is_chunked_state(st) or (lay.world > 1 and _counters_only(st))):
                # a rank's pieces, and the counters a DCP form gives the ranks without a
                # piece, are checked by the layout (they must be its own)
                state[i] = convert_full(
                    self.specs[int(i)],
                    st,
                    f"{self.name}.load_state_dict: parameter {i}",
                    optional=("projector",) if lay.world > 1 else (),
                )
        steps = sd.get("coap_steps")
        if steps is None:
            steps = self._entry_steps(lay, state)
        saved = {int(i): AdaptiveState.from_list(v) for i, v in sd.get("coap_refresh", {}).items()}
        if len(steps) > len(self.specs):
            raise ValueError(
                f"{self.name}.load_state_dict: step counts of {len(steps)} parameters, but "
                f"this optimizer has {len(self.specs)}: load a checkpoint of these parameters"
            )
        self._refuse_lost_records(sd, steps, saved, records)
        lay.load_state_dict({**sd, "state": state})
        # Parameters the checkpoint does not cover (groups added since) start at 0.
        self._steps = [int(k) for k in steps] + [0] * (len(self.specs) - len(steps))
        for i in self._adaptive:
            # A matrix without a saved record (a fixed-schedule checkpoint) counts from now.
            fresh = AdaptiveState(last_svd=self._steps[i])
            self._adaptive[i] = saved.get(i) or records.get(i) or fresh

    def _entry_steps(self, lay: Layout, state: Mapping[Any, Mapping[str, Any]]) -> list[int]:
        """Update counts from the entries' ``step`` when the state dict has no
        ``coap_steps``: a torch-format state dict, or one rebuilt by DCP's
        ``StateDictOptions(flatten_optimizer_state_dict=True)`` (torchtitan's setting),
        whose unflattening keeps only the keys of this rank's live state, so that a rank of
        a sharded layout gets no entry for a parameter it holds no piece of.

        At world > 1 every rank contributes the counts it has: one sum over the ranks of
        (k_i, c_i, q_i) = (1, t_i, t_i^2) where entry i has a count t_i, else zeros. Every
        rank then takes t_i = c_i / k_i (0 where no rank had one) and refuses alike when
        the counts differ between ranks (k_i q_i != c_i^2). A collective on every rank
        (whether ``coap_steps`` is in the state dict is the same on every rank)."""
        n = len(self.specs)
        local = [0.0] * (3 * n)
        for key, st in state.items():
            i = int(key)
            if "step" in st and 0 <= i < n:
                t = float(st["step"])
                local[3 * i : 3 * i + 3] = [1.0, t, t * t]
        if lay.world > 1:
            summed = torch.tensor(local, dtype=torch.float64, device=lay.device)
            local = lay.reduce_sum(summed).cpu().tolist()
        steps = []
        for i in range(n):
            k, c, q = local[3 * i : 3 * i + 3]
            if k > 0 and k * q != c * c:
                raise ValueError(
                    f"{self.name}.load_state_dict: the ranks' entries for parameter {i} hold "
                    "different step counts: the ranks were given different checkpoints. Load "
                    "the same checkpoint on every rank"
                )
            steps.append(round(c / k) if k > 0 else 0)
        return steps

    def _refuse_lost_records(
        self,
        sd: Mapping[str, Any],
        steps: Sequence[int],
        saved: Mapping[int, AdaptiveState],
        records: Mapping[int, AdaptiveState],
    ) -> None:
        """Refuse a state dict saved with ``refresh="adaptive"`` that has lost the refresh
        records of matrices that had stepped (``coap_refresh`` and the entries'
        ``refresh_*`` keys): DCP's ``flatten_optimizer_state_dict=True`` drops both on
        load. Resuming would restart their refresh schedules silently."""
        groups = sd.get("param_groups") or []
        adaptive_saved = {
            int(pid) for g in groups if g.get("refresh") == "adaptive" for pid in g["params"]
        }
        lost = [
            i
            for i in self._adaptive
            if i in adaptive_saved
            and i < len(steps)  # (groups added since the save: not in the checkpoint)
            and int(steps[i]) > 0
            and i not in saved
            and i not in records
        ]
        if lost:
            raise ValueError(
                f"{self.name}.load_state_dict: the checkpoint was saved with "
                f"refresh='adaptive', but the state dict has no refresh records for parameters "
                f"{lost[:8]}{' ...' if len(lost) > 8 else ''}. DCP's "
                "StateDictOptions(flatten_optimizer_state_dict=True) drops them when it "
                "rebuilds the state dict from this optimizer's live state, so resuming would "
                "restart their refresh schedules. With refresh='adaptive', save and load "
                "without that option (flattened checkpoints resume exactly with "
                "refresh='fixed', the default)"
            )

    def _check_shapes(self, saved: Any) -> None:
        """Refuse a state dict saved for parameters of other global shapes, position by
        position (``coap_shapes``; absent in checkpoints of coap_dist before 2026-12-07).

        A matrix's state has the same shapes for W (m x n, right side) and W^T (n x m,
        left side), and an AdamW moment reshapes to any shape of its size: without this
        check an up- and a down-projection listed in the other order would swap state."""
        if saved is None:
            return
        for i, (shape, spec) in enumerate(zip(saved, self.specs, strict=False)):
            if tuple(int(d) for d in shape) != spec.shape:
                raise ValueError(
                    f"{self.name}.load_state_dict: parameter {i} (group {spec.group}) has "
                    f"shape {spec.shape}, but the checkpoint's parameter {i} had shape "
                    f"{tuple(shape)}: the parameters are in another order or split into "
                    "groups differently than when it was saved. Build the optimizer with "
                    "the saving run's parameter order (model code and param_groups call)"
                )


def saved_ranks(sd: Mapping[str, Any]) -> dict[int, int]:
    """The ranks of a state dict's ``rank="auto"`` matrices, by position: its ``coap_ranks``
    record, or where that record was dropped (DCP's ``get_optimizer_state_dict`` /
    ``get_state_dict`` keep only ``state`` and ``param_groups``) the rows r of each saved
    projector (r x b) of a group saved with ``rank="auto"``."""
    if "coap_ranks" in sd:
        return {int(i): int(r) for i, r in sd["coap_ranks"].items()}
    state = sd.get("state") or {}
    out = {}
    for group in sd.get("param_groups") or []:
        if group.get("rank") != "auto":
            continue
        for pid in group["params"]:
            st = state.get(pid)
            proj = st.get("projector") if isinstance(st, Mapping) else None
            if proj is not None and len(proj.shape) == 2:
                out[int(pid)] = int(proj.shape[0])
    return out


def _current(entry: Any) -> Any:
    """A saved parameter entry without its :data:`RETIRED_KEYS`."""
    if isinstance(entry, Mapping) and any(k in entry for k in RETIRED_KEYS):
        return {k: v for k, v in entry.items() if k not in RETIRED_KEYS}
    return entry


def _from_shards(shards: Any, name: str) -> dict[str, Any]:
    """The state dict that ``{"coap_shards": [sd_0, ..., sd_{N-1}]}`` stands for: the
    per-rank state dicts of a rank-local sharded layout (DeepSpeed ZeRO 1-3) saved at N
    ranks, to be assembled into the single-process form once the plan is bound (so they load
    at any world size and under any layout). Host records and groups are every rank's."""
    if not isinstance(shards, list | tuple) or not shards:
        raise ValueError(
            f"{name}.load_state_dict: `coap_shards` must be a non-empty list of "
            f"per-rank state dicts, got {type(shards).__name__}"
        )
    for q, sd in enumerate(shards):
        if not isinstance(sd, Mapping) or "coap_pieces" not in sd or "state" not in sd:
            raise ValueError(
                f"{name}.load_state_dict: coap_shards[{q}] is not a per-rank COAP state dict "
                "of a sharded layout (no `coap_pieces`); pass every rank's "
                "optimizer.state_dict() of a DeepSpeed ZeRO 1-3 run, in rank order"
            )
    first = shards[0]
    keep = {k: v for k, v in first.items() if k not in ("state", "coap_layout", "coap_pieces")}
    return {**keep, "state": {}, "coap_shards": list(shards)}


def _snapshot(state: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """CPU copies of plain state tensors (DTensor state and DCP pieces are the layout's)."""
    return {
        i: {
            k: v.detach().to("cpu", copy=True)
            if isinstance(v, Tensor) and not _is_chunked(v)
            else v
            for k, v in st.items()
        }
        for i, st in state.items()
    }


def _is_chunked(v: Any) -> bool:
    """Whether ``v`` is a global tensor of which this rank holds chunks (a DTensor, or an
    owner layout's DCP ``Pieces``: both implement DCP's ``__create_chunk_list__``)."""
    return isinstance(v, Tensor) and hasattr(v, "__create_chunk_list__")


def _is_chunked_state(st: Mapping[str, Any]) -> bool:
    return any(_is_chunked(v) for v in st.values())


def _counters_only(st: Mapping[str, Any]) -> bool:
    """A state entry without moments (a DCP form's entry on a rank holding no piece)."""
    return not any(isinstance(v, Tensor) and v.ndim for v in st.values())
