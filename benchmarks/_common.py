"""Helpers shared by the benchmark scripts: machine description, tables, result files."""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Run from a checkout without `pip install -e .`: make the package importable.
if importlib.util.find_spec("coap_dist") is None:
    sys.path.insert(0, str(REPO_ROOT))


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Where and when a benchmark ran: CPU, cores, threads, library versions, UTC date."""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "galore_torch": _version("galore-torch"),
        "bitsandbytes": _version("bitsandbytes"),
        "coap_dist": _version("coap_dist"),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def training_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, handle: Any, tokens: torch.Tensor
) -> Callable[[], None]:
    """One LM training step on ``tokens`` (B x T+1): forward, fp32 cross-entropy, backward,
    clip to 1.0 and step; or ``handle.step`` of ``coap_dist.optimizer_in_backward``."""

    def closure() -> torch.Tensor:
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), tokens[:, 1:].flatten()
        )
        loss.backward()
        return loss

    def step() -> None:
        if handle is not None:
            handle.step(closure)
        else:
            closure()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; the first column is left-aligned, others right."""
    align = [":--" if i == 0 else "--:" for i in range(len(header))]
    lines = ["| " + " | ".join(map(str, header)) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def machine_markdown(info: dict[str, Any]) -> str:
    """Machine description as a markdown bullet list."""
    return "\n".join(f"- {k}: {v}" for k, v in info.items())


def write_results(name: str, data: dict[str, Any], markdown: str, out_dir: Path) -> list[Path]:
    """Write ``{out_dir}/{name}.json`` and ``{out_dir}/{name}.md``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return [json_path, md_path]


def require_positive(parser: Any, args: Any, flags: Sequence[str]) -> None:
    """argparse error unless every named option of ``args`` is an integer >= 1."""
    for flag in flags:
        if getattr(args, flag) < 1:
            parser.error(f"argument --{flag.replace('_', '-')}: must be a positive integer")


def publish(name: str, result: dict[str, Any], report: str, out_dir: Path) -> int:
    """Print the markdown report, write ``{name}.json`` / ``.md`` to out_dir; exit status 0."""
    print(report)
    for path in write_results(name, result, report, out_dir):
        print(f"wrote {path}")
    return 0
