"""``param_groups``: which parameters of a model COAP compresses and which stay in AdamW."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from coap_dist.optim.config import COAPAdafactorConfig

HEAD_NAMES = ("output", "lm_head", "head", "classifier", "embed_out")
"""Module names treated as output heads (kept in AdamW by default)."""


MHA_WEIGHTS = frozenset({"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"})
"""``nn.MultiheadAttention``'s input projections (its ``out_proj`` is an ``nn.Linear``)."""


def _is_projection(module: nn.Module, p_name: str) -> bool:
    """A weight matrix of a linear map: ``nn.Linear`` / convolutions, ``transformers``'
    ``Conv1D`` (GPT-2's linears, weight stored in x out) and ``nn.MultiheadAttention``'s
    input projections."""
    if isinstance(module, nn.MultiheadAttention):
        return p_name in MHA_WEIGHTS
    linear = isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
    return p_name == "weight" and (linear or type(module).__name__ == "Conv1D")


def _is_norm(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
        or "norm" in type(module).__name__.lower()
    )


WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
"""Module-name segments that wrappers insert (FSDP1, activation checkpointing,
``torch.compile``): names are matched as in the unwrapped model."""


def _unwrapped_name(root: nn.Module, name: str) -> str:
    """``name`` as in the unwrapped model: without :data:`WRAPPER_SEGMENTS` and, under a
    ``DistributedDataParallel`` / ``DataParallel`` root, without its leading ``module``."""
    parts = [x for x in name.split(".") if x and x not in WRAPPER_SEGMENTS]
    wrapped = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    if isinstance(root, wrapped) and parts[:1] == ["module"]:
        parts = parts[1:]
    return ".".join(parts)


def param_groups(
    model: nn.Module,
    *,
    adamw_patterns: Iterable[str] | None = None,
    coap_patterns: Iterable[str] | None = None,
    **coap_overrides: Any,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a COAP group and an AdamW group.

    Default rule: weights of linear and convolution layers (``nn.Linear``, ``nn.Conv*``,
    ``transformers``' ``Conv1D`` and ``nn.MultiheadAttention``'s input projections) go to
    COAP (the optimizer's
    ``algorithm``, by default ``"auto"``: small convolutions still fall back to AdamW inside
    the optimizer; ``algorithm="adamw"`` given to the optimizer makes this group AdamW too);
    embeddings, output heads (modules named one of :data:`HEAD_NAMES`), normalisation
    layers, biases and every other parameter with fewer than 2 dims go to
    ``algorithm="adamw"``. Name patterns (fnmatch on the full parameter name, e.g.
    ``"layers.0.*"``, as named in the unwrapped model: FSDP1's, activation checkpointing's,
    ``torch.compile``'s and DDP's name segments are dropped) override: ``adamw_patterns``
    first, then ``coap_patterns``.
    ``coap_overrides`` (rank, update_interval, ...) go into the COAP group. Shared (tied)
    parameters appear once. Empty groups are omitted; a model without any such weight (and
    no ``coap_patterns``) warns that COAP would compress nothing.
    """
    # (misspelt keys fail here, as in the optimizers' groups; the values are checked there)
    COAPAdafactorConfig.check_group_keys(
        coap_overrides, "param_groups(model, **overrides)", "COAPAdamW / COAPAdafactor"
    )
    adamw_pats = list(adamw_patterns or ())
    coap_pats = list(coap_patterns or ())
    seen: set[int] = set()
    coap: list[nn.Parameter] = []
    adamw: list[nn.Parameter] = []
    for raw_name, module in model.named_modules():
        mod_name = _unwrapped_name(model, raw_name)
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            leaf = mod_name.rsplit(".", 1)[-1]
            if any(fnmatch.fnmatchcase(full, pat) for pat in adamw_pats):
                to_coap = False
            elif any(fnmatch.fnmatchcase(full, pat) for pat in coap_pats):
                to_coap = True
            else:
                # By module type and name, not p.ndim: under FSDP1 a weight is a 1-D fragment.
                to_coap = (
                    _is_projection(module, p_name)
                    and leaf not in HEAD_NAMES
                    and not _is_norm(module)
                )
            (coap if to_coap else adamw).append(p)
    if not coap and not coap_pats and any(p.ndim >= 2 for p in adamw):
        warnings.warn(
            "coap_dist.param_groups: no parameter of this model is a weight of a linear or "
            "convolution layer (nn.Linear, nn.Conv*, transformers' Conv1D, "
            "nn.MultiheadAttention), so every one goes to AdamW and COAP compresses nothing; "
            "name the matrices to compress with coap_patterns",
            UserWarning,
            stacklevel=2,
        )
    groups: list[dict[str, Any]] = []
    if coap:
        # (no `algorithm` key: the optimizer's own, "auto" by default, rules this group)
        groups.append({"params": coap, **coap_overrides})
    if adamw:
        groups.append({"params": adamw, "algorithm": "adamw"})
    return groups
