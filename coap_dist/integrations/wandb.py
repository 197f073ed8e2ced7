"""Weights & Biases logging: ``wandb`` is imported only when a logger is created, and only on
global rank 0; every other rank gets a logger that does nothing.

``mode="offline"`` (or ``WANDB_MODE=offline``) needs no network: the run is written under
``dir`` and can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast


class WandbLogger:
    """One wandb run (e.g. one optimizer of a comparison), on rank 0 only.

    Args:
        project, entity, group, tags: wandb's run placement and labels.
        name: the run's display name.
        mode: ``online``, ``offline`` or ``disabled``.
        config: hyperparameters stored with the run.
        dir: directory for wandb's files (the Hydra run dir).
        rank: global rank; defaults to ``$RANK`` (0 when unset).
    """

    def __init__(
        self,
        *,
        project: str,
        name: str,
        mode: str = "online",
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        dir: str | None = None,
        rank: int | None = None,
    ) -> None:
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self._run: Any = None
        if rank != 0:
            return
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                "logger=wandb needs the wandb package: pip install 'coap_dist[wandb]'"
            ) from err
        self._run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=list(tags),
            # logger.mode is checked by the config; wandb.init rejects other strings itself
            mode=cast(Literal["online", "offline", "disabled"], mode),
            config=dict(config or {}),
            dir=dir,
        )

    @property
    def active(self) -> bool:
        """Whether this process logs (rank 0 with a live run)."""
        return self._run is not None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numeric entries of ``metrics`` at ``step``."""
        if self._run is None:
            return
        numeric = {
            k: v
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self._run.log(numeric, step=step)

    def close(self) -> None:
        """Finish the run (flushes offline files)."""
        if self._run is not None:
            self._run.finish()
            self._run = None
