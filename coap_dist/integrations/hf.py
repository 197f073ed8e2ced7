"""Hugging Face Trainer integration: checkpoints of sharded COAP state under DDP.

The Trainer builds the optimizer itself (``optimizer_cls_and_kwargs=(COAPAdamW, {...})``)
before it wraps the model, which COAP's late binding supports under every layout. What it
saves depends on the setup:

* FSDP (``fsdp_config={"fsdp_version": 2}``): accelerate's ``save_fsdp_optimizer``. With
  ``"state_dict_type": "SHARDED_STATE_DICT"``, ``torch.distributed.checkpoint`` of
  ``get_optimizer_state_dict`` on every rank: works with COAP's FSDP2 default layout (DTensor
  state) and with ``sharding="owner"`` (its pieces as
  :class:`~coap_dist.distributed.pieces.Pieces`; ``rank="auto"`` excepted). With
  ``"FULL_STATE_DICT"``, torch's full-state gather, for which COAP gathers its own whole
  state on rank 0: one file of the single-process state, for every layout.
* DeepSpeed: ``engine.save_checkpoint`` (per-rank files): works.
* Otherwise (one process, DDP): ``torch.save(optimizer.state_dict())`` on the main process
  only. Replicated COAP state (``sharding=None``) saves as is; with ``sharding="owner"`` the
  main process does not hold all of it, so add :class:`COAPCheckpointCallback`, which
  gathers it there (``consolidate_state_dict(to=0)`` on every rank) just before each save;
  without it the save stops at once with an error saying so (it never hangs).

``transformers`` is imported by this module only.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from coap_dist.integrations.accelerate import coap_optimizer, needs_consolidation

__all__ = ["COAPCheckpointCallback", "coap_optimizer"]


class COAPCheckpointCallback(TrainerCallback):
    """Before every checkpoint the Trainer writes, gather sharded COAP state on the main
    process (a collective: the callback runs on every rank, right before the save). The
    Trainer decides a save at a step's end (``save_strategy="steps"``), at an epoch's end
    (``"epoch"``) or after an evaluation that found a new best metric (``"best"``: decided
    after the last callback of that evaluation, so every evaluation consolidates)."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._before_save(control, control.should_save, kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._before_save(control, control.should_save, kwargs)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._before_save(control, args.save_strategy == "best", kwargs)

    @staticmethod
    def _before_save(control: Any, saving: bool, kwargs: dict[str, Any]) -> Any:
        opt = coap_optimizer(kwargs.get("optimizer"))
        if saving and opt is not None and needs_consolidation(opt):
            opt.consolidate_state_dict(to=0)
        return control
