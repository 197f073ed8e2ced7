"""What every layout supports: the one declaration the layouts refuse from and the README's
support table is generated from (:func:`markdown`; ``tests/test_support.py`` checks both).

Each cell is one of

* ``tested``: runs, and the named test checks it under that layout against one process
  (real process groups or engines, 2 and/or 3 ranks);
* ``refused``: the layout raises at the first ``step()``, before any state or weight
  changes, with the cell's reason and what to use instead (:func:`check_specs`, and
  ``Layout.resize_refusal`` for ``rank="auto"``; ``in_backward``: at
  ``optimizer_in_backward()``, :mod:`coap_dist.distributed.in_backward`);
* ``untested``: runs (nothing refuses it) but no test covers it under that layout yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from coap_dist.optim.spec import ParamSpec

FEATURES: dict[str, str] = {
    "8bit": "`state_bits=8`",
    "tucker": "Tucker convs (`rank_ratio_cnn`)",
    "auto": '`rank="auto"`',
    "adaptive": '`refresh="adaptive"`',
    "adafactor": "`COAPAdafactor`",
    "accum": "grad accumulation",
    "bf16": "bf16 parameters / state",
    "resume": "resume, same world size",
    "reshard": "resume at another world size / layout",
    "in_backward": "`optimizer_in_backward`",
}
"""Feature key -> what the user sets (the table's column heading)."""

LAYOUTS: dict[str, str] = {
    "single": "one process",
    "ddp": "DDP, replicated state",
    "ddp_owner": 'DDP `sharding="owner"` (ZeRO-1/2)',
    "fsdp2": "FSDP2 / HSDP default",
    "fsdp2_owner": 'FSDP2 / HSDP `sharding="owner"`',
    "fsdp1": "FSDP1 `Fsdp1Sharding`",
    "zero0": "DeepSpeed ZeRO 0",
    "zero": "DeepSpeed ZeRO 1-3",
}
"""Row key -> how a user gets it (the table's row heading). The keys are the layout names of
:data:`~coap_dist.optim.layout.LAYOUT_NAMES`, except the three routes to the ``replicated``
layout (:data:`REPLICATED_ROUTES`), which get a row each."""

REPLICATED_ROUTES = ("single", "ddp", "zero0")
"""Rows whose layout is ``replicated``."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One layout x feature cell: ``status`` (tested / refused / untested) and ``note``
    (the test, or the reason and what to use instead)."""

    status: str
    note: str = ""


def _t(note: str) -> Cell:
    return Cell("tested", note)


_U = Cell("untested")

_M = "tests/distributed/test_matrix.py"
"""The layout x feature matrix test (2 and 3 ranks against one process; HSDP 2 x 2)."""


def _row(eight_bit: Cell = _U, **cells: Cell) -> dict[str, Cell]:
    """A layout's cells in FEATURES order (``eight_bit``: the "8bit" cell); the features
    not named are untested."""
    cells["8bit"] = eight_bit
    unknown = set(cells) - set(FEATURES)
    assert not unknown, unknown
    return {f: cells.get(f, _U) for f in FEATURES}


def _matrix_cells(**override: Cell) -> dict[str, Cell]:
    """Every cell proved by the matrix test (``override``: cells proved otherwise)."""
    cells = {
        "eight_bit": _t(f"{_M} (with a Tucker conv)"),
        "tucker": _t(_M),
        "auto": _t(_M),
        "adaptive": _t(_M),
        "adafactor": _t(_M),
        "accum": _t(_M),
        "bf16": _t(f"{_M} (rel. 2e-2)"),
        "resume": _t(f"{_M} (consolidated)"),
        "reshard": _t(f"{_M} (consolidated, -> another layout)"),
        "in_backward": _t(f"{_M} (exact clipping, rank='auto'; HSDP too)"),
    }
    return {**cells, **override}


_NO_HOOK = (
    "{what}, so there is no gradient to step inside the backward; use FSDP2 (fully_shard) "
    "or DDP's unwrapped module with optimizer_in_backward, or the normal step"
)
_DEEPSPEED_IN_BACKWARD = Cell(
    "refused",
    _NO_HOOK.format(
        what="engine.backward() reduces gradients into ZeRO partitions and engine.step() "
        "steps them after the whole backward, with no per-parameter hook"
    ),
)


SUPPORT: dict[str, dict[str, Cell]] = {
    "single": _row(
        eight_bit=_t("tests/test_optim.py"),
        tucker=_t("tests/test_optim.py"),
        auto=_t("tests/test_optim.py"),
        adaptive=_t("tests/test_optim.py"),
        adafactor=_t("tests/test_optim.py"),
        accum=_t("tests/train/test_resume_faults.py"),
        bf16=_t("tests/test_optim.py"),
        resume=_t("tests/test_optim.py"),
        reshard=_t("tests/distributed/test_owner.py (consolidated state)"),
        in_backward=_t(
            "tests/test_in_backward.py (COAP, 8-bit, rank='auto', fused AdamW; app: tests/train)"
        ),
    ),
    "ddp": _row(**_matrix_cells()),
    "ddp_owner": _row(
        eight_bit=_t("tests/distributed/test_owner.py (2 and 3 ranks, with a Tucker conv)"),
        tucker=_t("tests/distributed/test_owner.py (2 and 3 ranks)"),
        auto=_t("tests/distributed/test_owner.py"),
        adaptive=_t("tests/distributed/test_owner.py"),
        adafactor=_t("tests/distributed/test_owner.py"),
        accum=_t(_M),
        bf16=_t(f"{_M} (rel. 2e-2)"),
        resume=_t("tests/train/test_launch.py (torchrun, 2 processes)"),
        reshard=_t("tests/distributed/test_owner.py (2 -> 3 ranks, consolidated)"),
        in_backward=_t(f"{_M} (exact clipping); tests/train/test_launch.py (app, torchrun)"),
    ),
    "fsdp2": _row(
        eight_bit=_t(f"{_M} (with a Tucker conv: 8-bit matrices; dense; HSDP too)"),
        tucker=_t(f"{_M} (whole on one rank, LPT)"),
        auto=_t(
            f"{_M} and tests/distributed/test_fsdp2.py (8-bit rows moved at a re-plan; "
            "checkpoints consolidated: DCP refuses it)"
        ),
        adaptive=_t("tests/distributed/test_fsdp2.py"),
        adafactor=_t("tests/distributed/test_fsdp2.py"),
        accum=_t(_M),
        bf16=_t(f"{_M} (rel. 2e-2)"),
        resume=_t("tests/distributed/test_fsdp2.py (DCP)"),
        reshard=_t("tests/distributed/test_fsdp2.py (DCP, 2 -> 3 and 1 ranks)"),
        in_backward=_t(f"{_M} (HSDP too); tests/train/test_app.py (app, DCP resume)"),
    ),
    "fsdp2_owner": _row(
        eight_bit=_t(f"{_M} (with a Tucker conv, and dense; HSDP too)"),
        tucker=_t(_M),
        auto=_t(
            "tests/distributed/test_fsdp2.py (checkpoints consolidated: DCP refuses it, "
            "tests/distributed/test_fsdp2_dcp.py)"
        ),
        adaptive=_t(_M),
        adafactor=_t(_M),
        accum=_t(_M),
        bf16=_t(f"{_M} (rel. 2e-2)"),
        resume=_t(f"{_M} (consolidated); tests/distributed/test_fsdp2_dcp.py (DCP, bitwise)"),
        reshard=_t(
            "tests/distributed/test_fsdp2_dcp.py (DCP: HSDP 2 x 2 -> 3 ranks, to and from "
            "the default layout, one process); tests/distributed/test_fsdp2.py (consolidated)"
        ),
        in_backward=_t(f"{_M} (HSDP too)"),
    ),
    "fsdp1": _row(
        **_matrix_cells(
            eight_bit=_t(f"{_M} (with a Tucker conv, and dense)"),
            in_backward=Cell(
                "refused",
                _NO_HOOK.format(
                    what="FSDP1's flat parameters get their gradients only in its own "
                    "post-backward, after autograd's per-parameter hooks"
                ),
            ),
        )
    ),
    "zero0": _row(
        eight_bit=_t("tests/integrations/test_deepspeed.py (with a Tucker conv)"),
        tucker=_t("tests/integrations/test_deepspeed.py"),
        auto=_t("tests/integrations/test_deepspeed.py"),
        adaptive=_t("tests/integrations/test_deepspeed.py"),
        adafactor=_t("tests/integrations/test_deepspeed.py"),
        accum=_t("tests/integrations/test_deepspeed.py"),
        bf16=_t("tests/integrations/test_deepspeed.py (losses, rtol 5e-2)"),
        resume=_t("tests/integrations/test_deepspeed.py"),
        reshard=_t("tests/integrations/test_deepspeed_resize.py (2 -> 3 and 3 -> 2 ranks)"),
        in_backward=_DEEPSPEED_IN_BACKWARD,
    ),
    "zero": _row(
        eight_bit=_t("tests/integrations/test_deepspeed.py (stages 2, 3; dense at 3)"),
        tucker=_t("tests/integrations/test_deepspeed.py (stages 2, 3)"),
        auto=_t("tests/integrations/test_deepspeed.py (stage 3)"),
        adaptive=_t("tests/integrations/test_deepspeed.py (stage 2)"),
        adafactor=_t("tests/integrations/test_deepspeed.py (stage 2)"),
        accum=_t("tests/integrations/test_deepspeed.py (stage 2, bf16 losses)"),
        bf16=_t("tests/integrations/test_deepspeed.py (losses, rtol 5e-2)"),
        resume=_t("tests/integrations/test_deepspeed.py"),
        reshard=_t(
            "tests/integrations/test_deepspeed_resize.py (stages 2, 3: 2 -> 3 and 3 -> 2 "
            "ranks, universal checkpoint); tests/train/test_launch.py (app, 2 -> 1)"
        ),
        in_backward=_DEEPSPEED_IN_BACKWARD,
    ),
}
"""The declaration (module docstring)."""


def reason(layout: str, feature: str) -> str:
    """The refusal reason of a refused cell ("" when the cell is not refused)."""
    cell = SUPPORT[layout][feature]
    return cell.note if cell.status == "refused" else ""


def check_specs(layout: str, specs: Sequence[ParamSpec], optimizer: str) -> None:
    """Raise (at bind, before any state exists) if a planned parameter needs a feature
    ``layout`` refuses: 8-bit state or a Tucker-projected convolution."""
    for s in specs:
        feature = "tucker" if s.kind == "conv" else "8bit" if s.fmt.quantized else ""
        why = reason(layout, feature) if feature else ""
        if why:
            field = "rank_ratio_cnn" if feature == "tucker" else "state_bits=8"
            raise ValueError(
                f"{optimizer}: {FEATURES[feature]} ({field}, parameter of shape {s.shape}) is "
                f"not supported under the {LAYOUTS[layout]} layout: {why}"
            )


def markdown() -> str:
    """The README's layout x feature table: yes (tested; see the test), refused (the
    reason is the error message), untested (runs, no test yet)."""
    marks = {"tested": "yes", "refused": "refused", "untested": "untested"}
    head = ["layout", *FEATURES.values()]
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for key, name in LAYOUTS.items():
        cells = [marks[SUPPORT[key][f].status] for f in FEATURES]
        rows.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(rows)
