"""Validated COAP hyperparameters (side-effect free).

Every group of a COAP optimizer is checked here at construction, so bad input fails before
the first step with an error naming the field and what is allowed.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

ALGORITHMS = ("auto", "coap", "adamw")
PROJECTOR_UPDATES = ("scale_free", "reference")
MOMENT_MODES = ("rotate", "keep")
SIDES = ("auto", "right", "left")
STATE_BITS = (None, 32, 16, 8)

MISSPELLING_CUTOFF = 0.8
"""A group key this similar (``difflib`` ratio) to a hyperparameter, but not one, is taken
for a misspelling of it."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_group_keys(group: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """Raise ValueError for a group key that looks like a misspelt hyperparameter
    (``update_intervall``), naming the key and the nearest valid one.

    Keys that resemble no hyperparameter are left alone: torch lets a group carry the
    caller's own metadata (``name``, ``param_names``, a layer id for layer-wise lr decay) and
    schedulers add theirs (``initial_lr``).
    """
    known = sorted(set(known) | {"params"})
    for key in group:
        if key in known or not isinstance(key, str):
            continue
        near = difflib.get_close_matches(key, known, n=1, cutoff=MISSPELLING_CUTOFF)
        if near:
            raise ValueError(
                f"{where}: unknown key `{key}`; did you mean `{near[0]}`? (valid keys: "
                f"{', '.join(k for k in known if k != 'params')})"
            )


def validate_group(group: Mapping[str, Any], where: str, *, adafactor: bool = False) -> None:
    """Raise ValueError naming the first invalid field of a parameter group.

    ``where`` prefixes the message (e.g. "COAPAdamW param_groups[1]").
    """

    def fail(field: str, allowed: str) -> None:
        raise ValueError(f"{where}: invalid `{field}`={group.get(field)!r}; {allowed}")

    lr = group.get("lr")
    if not _is_number(lr) or lr < 0:
        fail("lr", "must be a finite number >= 0")
    eps = group.get("eps")
    if not _is_number(eps) or eps < 0:
        fail("eps", "must be a finite number >= 0")
    betas = group.get("betas")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)
    ):
        fail("betas", "must be a pair of numbers, each in [0, 1)")
    if adafactor:
        beta1 = group.get("beta1")
        if beta1 is None:
            raise ValueError(
                f"{where}: invalid `beta1`=None; COAPAdafactor needs a first moment: the "
                "correlation-aware projector update uses it. Give beta1 in [0, 1), e.g. 0.9"
            )
        if not _is_number(beta1) or not 0.0 <= beta1 < 1.0:
            fail("beta1", "must be a number in [0, 1)")
        clip = group.get("clip_threshold")
        if not _is_number(clip) or clip <= 0:
            fail("clip_threshold", "must be a number > 0")
        decay = group.get("decay_rate")
        if not _is_number(decay) or not -1.0 <= decay < 0.0:
            fail("decay_rate", "must be a number in [-1, 0)")
    wd = group.get("weight_decay")
    if not _is_number(wd) or wd < 0:
        fail("weight_decay", "must be a finite number >= 0")
    if group.get("algorithm") not in ALGORITHMS:
        fail("algorithm", f"must be one of {ALGORITHMS}")
    rank, ratio = group.get("rank"), group.get("rank_ratio")
    if rank is not None and (not _is_int(rank) or rank <= 0):
        fail("rank", "must be a positive integer (or None when rank_ratio is given)")
    if ratio is not None and (not _is_number(ratio) or ratio <= 0):
        fail("rank_ratio", "must be a number > 0 (r = min(m, n) // rank_ratio)")
    cnn = group.get("rank_ratio_cnn")
    if cnn is not None and (not _is_number(cnn) or cnn <= 0):
        fail("rank_ratio_cnn", "must be a number > 0 (or None: convolutions use AdamW)")
    if group.get("algorithm") != "adamw" and rank is None and ratio is None:
        raise ValueError(
            f"{where}: neither `rank` nor `rank_ratio` is set; COAP needs one of them for its "
            "matrix parameters (e.g. rank=128 or rank_ratio=4), or algorithm='adamw' for this group"
        )
    ui = group.get("update_interval")
    if not _is_int(ui) or ui < 1:
        fail("update_interval", "must be an integer >= 1")
    rf = group.get("reproject_factor")
    if not _is_int(rf) or rf < 1:
        fail("reproject_factor", "must be an integer >= 1")
    sc = group.get("scale")
    if not _is_number(sc) or sc <= 0:
        fail("scale", "must be a number > 0")
    if group.get("projector_update") not in PROJECTOR_UPDATES:
        fail("projector_update", f"must be one of {PROJECTOR_UPDATES}")
    if group.get("moments") not in MOMENT_MODES:
        fail("moments", f"must be one of {MOMENT_MODES}")
    if group.get("projection_side") not in SIDES:
        fail("projection_side", f"must be one of {SIDES}")
    for key in ("oversample", "power_iters"):
        val = group.get(key)
        if not _is_int(val) or val < 0:
            fail(key, "must be an integer >= 0")
    plr = group.get("projector_lr")
    if not _is_number(plr) or plr <= 0:
        fail("projector_lr", "must be a number > 0")
    if not isinstance(group.get("stagger"), bool):
        fail("stagger", "must be True or False")
