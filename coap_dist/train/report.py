"""End-of-job outputs on rank 0: the comparison table, ``summary.json`` and the loss-curve
PNG (matplotlib, Agg backend, imported only here)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coap_dist.train.loggers import strict_json

MIB = 1 << 20


@dataclass
class RunResult:
    """Summary of one optimizer's run.

    Attributes:
        name: optimizer name (``coap``, ``adamw``, ...).
        train_loss: mean training loss over the last ``log_every`` steps.
        val_loss: validation loss after the last step.
        state_bytes: optimizer-state bytes held by each rank, ``[rank 0, rank 1, ...]``.
        tokens_per_s: training throughput over all ranks (forward, backward and optimizer
            step; validation and checkpointing excluded).
        peak_memory_bytes: peak memory of each rank (CUDA max allocated, or peak host RSS).
        history: the logged records, each with ``step`` and ``train/loss`` or ``val/loss``.
    """

    name: str
    train_loss: float
    val_loss: float
    state_bytes: list[int]
    tokens_per_s: float
    peak_memory_bytes: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state_mib(self) -> float:
        """Optimizer state of the most loaded rank, in MiB."""
        return max(self.state_bytes) / MIB

    @property
    def peak_memory_mib(self) -> float:
        """Peak memory of the most loaded rank, in MiB."""
        return max(self.peak_memory_bytes, default=0) / MIB


def format_table(results: list[RunResult]) -> str:
    """A fixed-width table: optimizer, final train / val loss, optimizer state and peak memory
    of the most loaded rank (MiB), tokens/s."""
    header = (
        "optimizer",
        "train loss",
        "val loss",
        "opt state MiB/rank",
        "peak mem MiB/rank",
        "tokens/s",
    )
    rows = [
        (
            r.name,
            f"{r.train_loss:.4f}",
            f"{r.val_loss:.4f}",
            f"{r.state_mib:.3f}",
            f"{r.peak_memory_mib:,.0f}",
            f"{r.tokens_per_s:,.0f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "| " + " | ".join([first, *rest]) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def write_summary(results: list[RunResult], path: Path) -> None:
    """The table's numbers (and each run's state bytes per rank) as strict JSON (a number
    that is not finite, e.g. the validation loss of a run without evaluation, is null)."""
    rows = []
    for r in results:
        row = asdict(r)
        row.pop("history")
        row["state_mib"] = r.state_mib
        row["peak_memory_mib"] = r.peak_memory_mib
        rows.append(row)
    path.write_text(json.dumps(strict_json(rows), indent=2, allow_nan=False) + "\n", "utf-8")


def plot_losses(results: list[RunResult], path: Path, title: str) -> None:
    """Train (lines) and validation (markers) loss against step, one color per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, r in enumerate(results):
        color = f"C{i}"
        train = [(h["step"], h["train/loss"]) for h in r.history if "train/loss" in h]
        val = [(h["step"], h["val/loss"]) for h in r.history if "val/loss" in h]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, label=f"{r.name} train")
        if val:
            ax.plot(*zip(*val, strict=True), "o--", color=color, label=f"{r.name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
