"""accelerate integration: ``Accelerator.save_state`` of sharded COAP state under DDP.

``accelerator.prepare(model, opt)`` works under every layout (COAP binds late). What
``save_state`` saves depends on the setup:

* FSDP: ``save_fsdp_optimizer``: ``torch.distributed.checkpoint`` on every rank
  (``SHARDED_STATE_DICT``) or torch's full-state gather and one file from rank 0
  (``FULL_STATE_DICT``, for which COAP gathers its own state): both work with both FSDP2
  layouts.
* DeepSpeed: the engine's per-rank files: works.
* Otherwise (one process, DDP): ``opt.state_dict()`` on EVERY rank, of which the main
  process writes its own. Replicated COAP state (``sharding=None``) saves as is. With
  ``sharding="owner"`` no rank holds all of it, so call :func:`consolidate_on_save_state`
  once after ``prepare``: before each ``save_state`` it gathers the whole state on every
  rank (``consolidate_state_dict(to=None)``, a collective that ``save_state`` runs on every
  rank anyway); without it ``save_state`` stops at once with an error saying so (it never
  hangs). ``load_state`` then loads the single-process state on every rank, at any world
  size.

accelerate is imported by the caller, not by this module.
"""

from __future__ import annotations

from typing import Any


def coap_optimizer(optimizer: Any) -> Any | None:
    """The COAP optimizer inside accelerate's ``AcceleratedOptimizer`` (or None)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if hasattr(optimizer, "consolidate_state_dict") and hasattr(optimizer, "layout"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


def needs_consolidation(opt: Any) -> bool:
    """Whether ``state_dict()`` of COAP optimizer ``opt`` on one rank needs
    ``consolidate_state_dict`` first: an owner layout of one-file form over several ranks
    (FSDP2's owner layout saves through DCP instead)."""
    lay = opt.layout
    view = getattr(lay, "view", None)
    return lay.world > 1 and view is not None and not view.rank_local and view.name != "fsdp2_owner"


def consolidate_on_save_state(accelerator: Any, *optimizers: Any) -> Any:
    """Register an ``accelerator.save_state`` pre-hook that gathers the whole state of each
    sharded COAP optimizer among ``optimizers`` (prepared or not; others are left alone) on
    every rank before the save. Returns the hook's removable handle.

    Example::

        model, opt = accelerator.prepare(model, COAPAdamW(..., sharding="owner"))
        coap_dist.integrations.accelerate.consolidate_on_save_state(accelerator, opt)
        ...
        accelerator.save_state("ckpt")  # on every rank, as accelerate requires
    """
    inner = [coap_optimizer(o) for o in optimizers]
    found = [o for o in inner if o is not None]
    missing = [i for i, o in enumerate(inner) if o is None]
    if missing or not optimizers:
        raise ValueError(
            "consolidate_on_save_state: optimizer argument(s) "
            f"{missing if optimizers else '(none given)'} hold no COAP optimizer; pass the "
            "COAPAdamW / COAPAdafactor (or what accelerator.prepare returned for it)"
        )

    def hook(models: Any, weights: Any, output_dir: Any) -> None:
        for opt in found:
            if needs_consolidation(opt):
                opt.consolidate_state_dict(to=None)

    return accelerator.register_save_state_pre_hook(hook)
