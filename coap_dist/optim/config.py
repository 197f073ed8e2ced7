"""Every COAP hyperparameter in one place: its name, default, validation and meaning.

:class:`COAPAdamWConfig` and :class:`COAPAdafactorConfig` (frozen, kw-only dataclasses) are
the single source of truth. What reads them:

* the optimizer constructors (``COAPAdamW(params, lr, **hyperparameters)``: the keyword
  arguments are this dataclass's fields; the class docstring is generated from it);
* parameter-group validation (:meth:`COAPAdamWConfig.validate_group`, at construction, at
  ``add_param_group`` and after ``load_state_dict``);
* the training app's ``optimizer`` section (``coap_dist.train.config``: every field is a
  config key, validated by the same checks);
* DeepSpeed JSON ``"params"`` (they become constructor keyword arguments);
* the memory estimator (it builds the optimizer's own plan from them).

Two scopes: *group* fields may differ per parameter group (torch's ``defaults``);
*optimizer* fields (``state_bits``, ``skip_nonfinite``) hold for the whole optimizer.
Unknown keys fail naming the key and the nearest valid one. Side-effect free.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

ALGORITHMS = ("auto", "coap", "adamw")
PROJECTOR_UPDATES = ("scale_free", "reference")
MOMENT_MODES = ("rotate", "keep")
SIDES = ("auto", "right", "left")
REFRESH_MODES = ("fixed", "adaptive")
STATE_BITS = (None, 32, 16, 8)

MISSPELLING_CUTOFF = 0.8
"""A group key this similar (``difflib`` ratio) to a hyperparameter, but not one, is taken
for a misspelling of it (as is a key of 4+ letters one typo from one: ``rnak``)."""

RENAMED = {
    "beta1": "betas",
}
"""Keys that were renamed: ``COAPAdafactor`` reads its momentum from ``betas[0]`` (so
schedulers that cycle momentum, e.g. OneCycleLR, reach every parameter)."""

Check = Callable[[Any], str | None]
"""A field check: ``None`` when the value is valid, else what is allowed."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def number(*, low: float, strict: bool = False, high: float | None = None) -> Check:
    """A finite number >= low (> low when ``strict``), < high when ``high`` is given."""

    def check(x: Any) -> str | None:
        ok = _is_number(x) and (x > low if strict else x >= low) and (high is None or x < high)
        if ok:
            return None
        interval = f"{'(' if strict else '['}{low}, {'inf' if high is None else high})"
        if hasattr(x, "item") and hasattr(x, "device"):  # a tensor (torch's capturable lr)
            return (
                f"must be a finite number in {interval}, a Python number: COAP's step sizes "
                "and schedule are host numbers, so a tensor (torch's form for capturable "
                "steps) is not taken; pass float(value)"
            )
        return f"must be a finite number in {interval}"

    return check


def ratio() -> Check:
    """A rank ratio: a finite number >= 1 (ranks are dimensions // ratio)."""
    at_least_one = number(low=1.0)
    return lambda x: (
        None
        if at_least_one(x) is None
        else "must be a finite number >= 1 (ranks are dimensions divided by it: 1 keeps every "
        "direction, a ratio below 1 would ask for more directions than the weight has)"
    )


def integer(*, low: int) -> Check:
    """An int >= low (bools refused)."""
    return lambda x: None if _is_int(x) and x >= low else f"must be an integer >= {low}"


def choice(options: tuple[Any, ...]) -> Check:
    """One of ``options``."""
    return lambda x: None if x in options else f"must be one of {options}"


def rank_value(x: Any) -> str | None:
    """A projection rank: an integer >= 1, or "auto"."""
    return None if x == "auto" or (_is_int(x) and x >= 1) else 'must be an integer >= 1 or "auto"'


def boolean(x: Any) -> str | None:
    """True or False."""
    return None if isinstance(x, bool) else "must be True or False"


def optional(check: Check, meaning: str) -> Check:
    """None (``meaning``) or what ``check`` accepts."""
    return lambda x: None if x is None or check(x) is None else f"{check(x)}, or None ({meaning})"


def unit_pair(x: Any) -> str | None:
    """Adam's betas: two numbers in [0, 1)."""
    ok = (
        isinstance(x, (tuple, list))
        and len(x) == 2
        and all(_is_number(b) and 0.0 <= b < 1.0 for b in x)
    )
    return None if ok else "must be a pair of numbers, each in [0, 1)"


Scope = Literal["group", "optimizer"]


def hp(
    default: Any, doc: str, check: Check, *, scope: Scope = "group", planned: bool = False
) -> Any:
    """A hyperparameter field: default, meaning (``doc``), validation, scope, and whether
    the state's plan is made from it (``planned``: read once, when the first step binds
    the optimizer; a group's later edit of it is refused)."""
    return dataclasses.field(
        default=default,
        metadata={"doc": doc, "check": check, "scope": scope, "planned": planned},
    )


_H = TypeVar("_H", bound="Hyperparameters")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hyperparameters:
    """Base of the hyperparameter dataclasses: fields made with :func:`hp`, checked in
    ``__post_init__``, built from mappings with unknown keys refused by name."""

    optimizer_name: ClassVar[str] = "optimizer"

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Refuse an unknown keyword naming the nearest field, as :meth:`from_mapping` does
        (the dataclass's own ``__init__`` would raise a bare ``TypeError``)."""
        for key in kwargs:
            _refuse_unknown(key, cls.keys(), cls.optimizer_name, near_only=False)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if isinstance(getattr(self, "betas", None), list):
            object.__setattr__(self, "betas", tuple(self.betas))  # type: ignore[attr-defined]
        values = self.as_dict()
        where = self.optimizer_name
        for f in dataclasses.fields(self):
            _check_field(f, values[f.name], where)
        self._check_combined(values, where, own=values)

    # ----------------------------------------------------------------------- fields
    @classmethod
    def keys(cls, scope: Scope | None = None) -> tuple[str, ...]:
        """Field names (of one scope, or all)."""
        return tuple(
            f.name for f in dataclasses.fields(cls) if scope is None or f.metadata["scope"] == scope
        )

    @classmethod
    def planned_keys(cls) -> tuple[str, ...]:
        """The fields the state's plan is made from (fixed after the first step)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["planned"])

    def as_dict(self, scope: Scope | None = None) -> dict[str, Any]:
        """Field values (of one scope, or all)."""
        return {k: getattr(self, k) for k in self.keys(scope)}

    @classmethod
    def from_mapping(cls: type[_H], data: Mapping[str, Any], where: str | None = None) -> _H:
        """Build from keyword arguments or a config section; an unknown key fails naming
        the nearest valid one, a bad value naming the field (prefixed by ``where``)."""
        where = where or cls.optimizer_name
        for key in data:
            _refuse_unknown(key, cls.keys(), where, near_only=False)
        defaults = cls.keys()
        values = {**{k: getattr(cls, k) for k in defaults}, **data}
        if isinstance(values.get("betas"), list):
            values["betas"] = tuple(values["betas"])
        for f in dataclasses.fields(cls):
            _check_field(f, values[f.name], where)
        cls._check_combined(values, where, own=data)
        return cls(**values)

    @classmethod
    def docs(cls) -> str:
        """The hyperparameter reference (Markdown table) generated from the fields; the
        README and the optimizers' docstrings show it."""
        rows = ["| argument | default | meaning |", "| --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            scope = " (whole optimizer)" if f.metadata["scope"] == "optimizer" else ""
            scope += " (fixed at the first step)" if f.metadata["planned"] else ""
            rows.append(f"| `{f.name}` | `{f.default!r}` | {f.metadata['doc']}{scope} |")
        return "\n".join(rows)

    @classmethod
    def _check_combined(
        cls, values: Mapping[str, Any], where: str, *, own: Mapping[str, Any], group: bool = False
    ) -> None:
        """Rules across fields (none here)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class COAPAdamWConfig(Hyperparameters):
    """Hyperparameters of :class:`~coap_dist.COAPAdamW` (see each field's ``doc``)."""

    optimizer_name: ClassVar[str] = "COAPAdamW"

    lr: float = hp(1e-3, "learning rate", number(low=0.0))
    betas: tuple[float, float] = hp(
        (0.9, 0.999), "Adam's (beta1, beta2); a scheduler may cycle beta1", unit_pair
    )
    eps: float = hp(
        1e-6,
        "added to sqrt(V) before bias correction (torch AdamW's eps / sqrt(1 - b2^t)); > 0: "
        "a direction of the rank-r moments that is exactly zero would give 0/0",
        number(low=0.0, strict=True),
    )
    weight_decay: float = hp(
        0.0, "decoupled decay: W <- (1 - lr wd) W after the update", number(low=0.0)
    )
    algorithm: str = hp(
        "auto",
        '"auto" (COAP for matrices and large convolutions, AdamW else), "coap" or "adamw"',
        choice(ALGORITHMS),
        planned=True,
    )
    rank: int | str | None = hp(
        None,
        'r = min(rank, min(m, n)); exactly one of rank / rank_ratio for COAP groups holding a matrix; "auto": '
        "per-matrix ranks chosen at every SVD from the spectrum, within the state bytes of "
        "rank_ratio's fixed ranks (fixed schedule; under FSDP2 every matrix must be sharded)",
        optional(rank_value, "use rank_ratio"),
        planned=True,
    )
    rank_ratio: float | None = hp(
        None,
        "r = max(min(m, n) // rank_ratio, 1)",
        optional(ratio(), "use rank"),
        planned=True,
    )
    rank_ratio_cnn: float | None = hp(
        None,
        "Tucker-2 ratio for 4-D convolutions of more than 9216 elements",
        optional(ratio(), "convolutions use AdamW"),
        planned=True,
    )
    update_interval: int = hp(32, "T_u: steps between projector moves", integer(low=1))
    reproject_factor: int = hp(
        5, "F: every T_u F steps a warm-started randomized SVD", integer(low=1)
    )
    scale: float = hp(
        1.0,
        "alpha applied to the back-projected update (the LLaMA recipes use 0.25)",
        number(low=0.0, strict=True),
    )
    projector_update: str = hp(
        "scale_free",
        '"scale_free" (relative objective + QR) or "reference" (the published step)',
        choice(PROJECTOR_UPDATES),
    )
    moments: str = hp(
        "rotate",
        '"rotate" (M <- M C, V <- V (C*C), C = P_old P_new^T) or "keep" (published)',
        choice(MOMENT_MODES),
    )
    projection_side: str = hp(
        "auto", '"auto" (compress the smaller dim), "right" or "left"', choice(SIDES), planned=True
    )
    oversample: int = hp(0, "randomized-SVD oversampling columns", integer(low=0))
    power_iters: int = hp(0, "randomized-SVD power iterations", integer(low=0))
    projector_lr: float = hp(
        0.1, "step size of the correlation-aware projector update", number(low=0.0, strict=True)
    )
    stagger: bool = hp(
        False,
        "spread matrices' refresh steps over T_u (flattens SVD spikes)",
        boolean,
        planned=True,
    )
    refresh: str = hp(
        "fixed",
        '"fixed" (the T_u / F schedule) or "adaptive" (every T_u steps the projection '
        "residual decides: SVD, projector step or nothing, within refresh_budget)",
        choice(REFRESH_MODES),
        planned=True,
    )
    refresh_threshold: float = hp(
        0.1,
        "adaptive: rise of the residual ||G - G P^T P|| / ||G|| since the last SVD, "
        "relative to its value just after it, that calls for a recalibration",
        number(low=0.0),
    )
    refresh_budget: float = hp(
        1.0,
        "adaptive: randomized SVDs per matrix per T_u F steps on average (at most 2 banked)",
        number(low=0.0, strict=True),
    )
    state_bits: int | None = hp(
        None,
        "None (parameter dtype), 32, 16 (bf16) or 8 (blockwise 8-bit moments where a moment "
        "has 4096+ entries; smaller ones keep the parameter dtype, as bitsandbytes does)",
        choice(STATE_BITS),
        scope="optimizer",
        planned=True,
    )
    skip_nonfinite: bool = hp(
        True,
        "skip (on every rank) the step of a parameter whose gradient is not finite; False: "
        "no check, and no host sync in step() after the first under one process, DDP, FSDP2",
        boolean,
        scope="optimizer",
    )

    # ---------------------------------------------------------------- param groups
    @classmethod
    def check_group_keys(
        cls, group: Mapping[str, Any], where: str, optimizer: str | None = None
    ) -> None:
        """Raise ValueError for a group key that looks like a misspelt or renamed
        hyperparameter (``update_intervall``, ``beta1``), naming the nearest valid one
        (``optimizer``: the constructor an optimizer-wide key goes to, in the message).

        Keys that resemble no hyperparameter are left alone: torch lets a group carry the
        caller's own metadata (``name``, ``param_names``, a layer id for layer-wise lr
        decay) and schedulers add theirs (``initial_lr``)."""
        for key in group:
            if isinstance(key, str) and key != "params":
                _refuse_unknown(key, cls.keys("group"), where, near_only=True)
        for key in cls.keys("optimizer"):
            if key in group:
                raise ValueError(
                    f"{_at(where, key)} is set for the whole optimizer, not per parameter "
                    f"group; pass {key}=... to the {optimizer or cls.optimizer_name} constructor"
                )

    @classmethod
    def check_value(cls, key: str, value: Any, where: str) -> None:
        """Raise ValueError if ``value`` is not a valid ``key`` (one field's own check)."""
        _check_field(next(f for f in dataclasses.fields(cls) if f.name == key), value, where)

    @classmethod
    def validate_group(
        cls,
        group: Mapping[str, Any],
        where: str,
        own: Mapping[str, Any] | None = None,
        *,
        matrices: bool = True,
    ) -> None:
        """Raise ValueError naming the first invalid field of a parameter group (defaults
        merged in). ``own``: the keys the caller set on this group itself, for the rule
        that a group sets at most one of ``rank`` / ``rank_ratio``; ``matrices``: whether
        the group may hold a 2-D parameter (one that needs a rank; a group of vectors and
        convolutions only, e.g. the no-decay group of biases and norms, needs none)."""
        cls.check_group_keys(group, where)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in cls.keys("group"):
            _check_field(fields[key], group.get(key), where)
        cls._check_combined(
            group, where, own=group if own is None else own, group=True, matrices=matrices
        )

    @classmethod
    def _check_combined(
        cls,
        values: Mapping[str, Any],
        where: str,
        *,
        own: Mapping[str, Any],
        group: bool = False,
        matrices: bool = True,
    ) -> None:
        """Rules across fields: at most one of rank / rank_ratio set at one level; a group
        (``group``) that COAP may project and that may hold a 2-D parameter (``matrices``)
        needs one of them (the constructor's defaults need not: groups may set it)."""
        if values.get("rank") == "auto":
            _check_auto_rank(values, where, group=group)
        elif own.get("rank") is not None and own.get("rank_ratio") is not None:
            raise ValueError(
                f"{_at(where, 'rank')}={own['rank']!r} and {_at(where, 'rank_ratio', False)}="
                f"{own['rank_ratio']!r} are both set; set one of them (the other to None)"
            )
        if (
            group
            and matrices
            and values.get("algorithm") != "adamw"
            and values.get("rank") is None
            and values.get("rank_ratio") is None
        ):
            raise ValueError(
                f"{_at(where, 'rank')} and {_at(where, 'rank_ratio', False)} are both unset; COAP needs one of them for "
                "its matrix parameters (e.g. rank=128 or rank_ratio=4), or algorithm='adamw' "
                "for this group"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class COAPAdafactorConfig(COAPAdamWConfig):
    """Hyperparameters of :class:`~coap_dist.COAPAdafactor`: COAPAdamW's, plus Adafactor's.

    Matrices: Adafactor with momentum ``betas[0]`` (the correlation-aware projector update
    uses the first moment) and a factored second moment decaying as 1 - t^decay_rate; every
    other parameter: AdamW with ``betas``. ``lr`` is absolute (no relative step)."""

    optimizer_name: ClassVar[str] = "COAPAdafactor"

    clip_threshold: float = hp(
        1.0, "update clipping: U / max(1, RMS(U) / d)", number(low=0.0, strict=True)
    )
    decay_rate: float = hp(
        -0.8,
        "second-moment decay beta2_t = 1 - t^decay_rate, in [-1, 0)",
        number(low=-1.0, high=0.0),
    )
    eps1: float = hp(
        1e-30,
        "added to the factored second moment; > 0 (an exactly zero row would give 0/0)",
        number(low=0.0, strict=True),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.state_bits == 8:
            raise ValueError(
                f"{_at(self.optimizer_name, 'state_bits')}=8 is invalid: 8-bit state is for "
                "COAPAdamW only (Adafactor's factored moments are already tiny)"
            )


def _check_auto_rank(values: Mapping[str, Any], where: str, *, group: bool) -> None:
    """rank="auto": its budget comes from rank_ratio; the ranks are re-chosen for all of a
    group's matrices at once, at the fixed schedule's common SVD steps."""
    if group and values.get("rank_ratio") is None:
        raise ValueError(
            f"{_at(where, 'rank')}='auto' needs {_at(where, 'rank_ratio', False)}: the state "
            "bytes of its fixed ranks are the budget the automatic ranks share (e.g. "
            "rank='auto', rank_ratio=4)"
        )
    for key, plain in (("refresh", "fixed"), ("stagger", False)):
        if values.get(key, plain) != plain:
            raise ValueError(
                f"{_at(where, 'rank')}='auto' is invalid with {_at(where, key, False)}="
                f"{values[key]!r}: automatic ranks are re-allocated over a group's matrices at "
                f"their common SVD steps; set {key}={plain!r} or a fixed rank"
            )


def _check_field(f: dataclasses.Field[Any], value: Any, where: str) -> None:
    problem = f.metadata["check"](value)
    if problem is not None:
        raise ValueError(f"{_at(where, f.name)}={value!r} is invalid: {problem}")


TORCH_FLAGS: dict[str, tuple[tuple[Any, ...], str]] = {
    "amsgrad": ((False,), "COAP keeps no running maximum of the second moment"),
    "maximize": ((False,), "negate the loss to maximise it"),
    "capturable": (
        (False,),
        "COAP's refresh schedule is host control flow (a refresh runs other kernels), so "
        "its step cannot be captured in a CUDA graph; skip_nonfinite=False gives a step "
        "without host synchronisation",
    ),
    "differentiable": ((False,), "COAP's step runs under torch.no_grad"),
    "foreach": (
        (None, True),
        "COAP's AdamW parameters always step through torch's fused multi-tensor kernel and "
        "its matrices through COAP's own step: there is no per-tensor loop to choose",
    ),
    "fused": (
        (None, True),
        "COAP's AdamW parameters always step through torch's fused kernel",
    ),
}
"""``torch.optim.AdamW``'s implementation flags, which code written for AdamW passes out of
habit: (the values COAP honours, why it cannot honour the others). Not hyperparameters:
accepted at those values and kept nowhere (:func:`without_torch_flags`)."""


def without_torch_flags(kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``kwargs`` without the :data:`TORCH_FLAGS` COAP honours (``amsgrad=False``,
    ``fused=True``, ...); any other value of one is refused naming the flag, the value and
    why."""
    out = {}
    for key, value in kwargs.items():
        if key not in TORCH_FLAGS:
            out[key] = value
            continue
        honoured, why = TORCH_FLAGS[key]
        if not any(value is v for v in honoured):
            raise ValueError(
                f"{where}: `{key}`={value!r} (a torch.optim.AdamW flag) cannot be honoured: "
                f"{why}. Accepted: {' or '.join(repr(v) for v in honoured)}, or leave it out"
            )
    return out


def _refuse_unknown(key: str, known: Iterable[str], where: str, *, near_only: bool) -> None:
    """Raise for ``key`` not in ``known`` (only when it resembles one, with ``near_only``)."""
    known = sorted(known)
    if key in known:
        return
    if key in RENAMED:
        raise ValueError(
            f"{_at(where, key)} is now `{RENAMED[key]}`: COAPAdafactor's momentum is "
            "betas[0], as in torch's optimizers (pass betas=(beta1, beta2))"
        )
    # A key that must be a hyperparameter gets the nearest one as a hint at a lower bar.
    near = nearest_key(key, known, cutoff=MISSPELLING_CUTOFF if near_only else 0.6)
    if near_only and near is None:
        return
    hint = f"did you mean `{near}`? " if near else ""
    what = (
        f"unknown config key {where}{key}"
        if where.endswith(".")
        else f"{where}: unknown key `{key}`"
    )
    raise ValueError(f"{what}; {hint}(valid keys: {', '.join(known)})")


def nearest_key(key: str, known: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The key of ``known`` that ``key`` most likely misspells: the closest by
    ``difflib`` similarity (>= ``cutoff``), else one a single typo away (a swap, a
    missing, extra or wrong letter; names of 4 letters or more); None if neither."""
    known = sorted(known)
    near = difflib.get_close_matches(key, known, n=1, cutoff=cutoff)
    if near:
        return near[0]
    return next((k for k in known if len(key) >= 4 and _one_typo(key, k)), None)


def _one_typo(a: str, b: str) -> bool:
    """Whether ``a`` becomes ``b`` by one edit: a letter inserted, dropped or replaced, or
    two neighbouring letters swapped (``rnak`` -> ``rank``)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        i = diff[0]
        return len(diff) == 2 and diff[1] == i + 1 and a[i] == b[i + 1] and a[i + 1] == b[i]
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def _at(where: str, key: str, first: bool = True) -> str:
    """How a message names field ``key`` of ``where``: a config path (``where`` ending in
    ".") reads ``optimizer.rank``, anything else ``COAPAdamW param_groups[0]: `rank```
    (``first=False``: without the prefix, for a second field in one sentence)."""
    if where.endswith("."):
        return f"{where}{key}"
    return f"{where}: `{key}`" if first else f"`{key}`"
