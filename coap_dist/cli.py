"""``coap-dist`` command line.

Examples::

    coap-dist memory --model 1b --optimizer coap --rank 512 --dtype bf16
    coap-dist memory --model 7b --optimizer coap8bit --rank 1024 --world-size 8
    coap-dist memory --model 7b --optimizer coap --rank 1024 --world-size 512 --layout fsdp2
    coap-dist memory --model 1b --rank 512 --all          # every optimizer, ratio to bf16 AdamW
    coap-dist ds-to-universal ckpt/ ckpt_universal/      # DeepSpeed ZeRO 1-3, any world size

``memory`` figures are optimizer-state bytes (moment + projector tensors, see
``coap_dist.memory``) computed from shapes alone: nothing is allocated. ``ds-to-universal``
converts a COAP run's DeepSpeed ZeRO checkpoint into a universal checkpoint that resumes at
another world size (:func:`coap_dist.integrations.deepspeed.to_universal`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import torch

from coap_dist.memory import LAYOUTS, MIB, OPTIMIZERS, StateBytes, estimate_state_bytes
from coap_dist.models.llama import LLAMA_PRESETS

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
LOWRANK_OPTIMIZERS = ("galore", "coap", "coap8bit")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse prefixes the flag name to the error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _rank(text: str) -> int | str:
    """argparse type: a positive integer, or ``auto`` (COAP's automatic ranks, whose state
    never exceeds the bytes of ``--rank-ratio``'s fixed ranks: that budget is the estimate)."""
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer or 'auto', got {text!r}"
        ) from None


def _check_rank(
    args: argparse.Namespace, parser: argparse.ArgumentParser, names: list[str]
) -> None:
    """The --rank / --rank-ratio combinations the estimators take, refused by flag name."""
    if args.rank == "auto":
        if args.rank_ratio is None:
            parser.error("argument --rank: auto needs --rank-ratio (the fixed ranks' budget)")
        others = [n for n in names if n not in ("coap", "coap8bit")]
        if others:
            parser.error(
                f"argument --rank: auto is COAP's (--optimizer coap or coap8bit), not {others}"
            )
    elif args.rank is not None and args.rank_ratio is not None:
        parser.error("argument --rank-ratio: not allowed with --rank")


def _rank_ratio(text: str) -> float:
    """argparse type: a rank ratio, a finite number >= 1 (r = min(m, n) // ratio)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 1 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"must be a number >= 1 (r = min(m, n) // ratio; 1 keeps every direction), got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``coap-dist`` argument parser (sub-commands ``memory`` and ``ds-to-universal``)."""
    parser = argparse.ArgumentParser(prog="coap-dist", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    mem = sub.add_parser(
        "memory",
        help="estimate optimizer-state memory of a LLaMA preset",
        description="Optimizer-state memory (MiB = 2**20 bytes) of a LLaMA preset, from "
        "shapes alone. Counts moments, projectors and 8-bit quantization scales; "
        "step counters are not counted.",
    )
    mem.add_argument("--model", required=True, choices=sorted(LLAMA_PRESETS), help="LLaMA preset")
    mem.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=None,
        help="optimizer to estimate (omit with --all)",
    )
    mem.add_argument(
        "--all",
        action="store_true",
        help="every optimizer side by side, with the ratio to bf16 AdamW",
    )
    mem.add_argument(
        "--rank",
        type=_rank,
        default=None,
        help="projection rank r (galore/coap/coap8bit), or auto (coap with --rank-ratio)",
    )
    mem.add_argument(
        "--rank-ratio",
        type=_rank_ratio,
        default=None,
        help="rank as min(m, n) // RATIO (instead of --rank)",
    )
    mem.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bf16",
        help="parameter dtype; full-precision state uses it (default bf16)",
    )
    mem.add_argument(
        "--state-dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of unquantized moments and projectors (default: --dtype; "
        "COAPAdamW state_bits=32/16 is fp32/bf16)",
    )
    mem.add_argument(
        "--world-size",
        type=_positive_int,
        default=1,
        help="ranks sharing the state (per-rank figures from the layout's own planner)",
    )
    mem.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=None,
        help="with --world-size: how COAP spreads its state: ddp_owner (DDP, sharding='owner', "
        "the default), fsdp2 (FSDP2's default), fsdp2_owner (FSDP2, sharding='owner'), zero "
        "(DeepSpeed ZeRO 1-3); other optimizers' state is split evenly",
    )
    mem.add_argument(
        "--adamw-patterns",
        default=None,
        help="comma-separated fnmatch patterns of parameter names kept in AdamW, as in "
        "coap_dist.param_groups (always: embeddings, output head, norms, biases)",
    )
    mem.add_argument(
        "--per-param",
        action="store_true",
        help="also print one line per parameter (single optimizer only)",
    )
    mem.add_argument(
        "--step",
        action="store_true",
        help="peak memory per rank of a whole fp32 training step (parameters, gradients, "
        "activations, state; --optimizer adamw or coap; --layout ddp_owner: whole parameters "
        "per rank, state sharded (AdamW: evenly, as ZeroRedundancyOptimizer), or fsdp2)",
    )
    mem.add_argument(
        "--batch", type=_positive_int, default=None, help="--step: sequences per rank (default 1)"
    )
    mem.add_argument(
        "--seq-len",
        type=_positive_int,
        default=None,
        help="--step: tokens per sequence (default: the model's max_seq_len)",
    )
    mem.add_argument(
        "--in-backward",
        action="store_true",
        help="--step: with coap_dist.optimizer_in_backward (gradients freed as they are ready)",
    )
    mem.set_defaults(subparser=mem)
    uni = sub.add_parser(
        "ds-to-universal",
        help="convert a COAP DeepSpeed ZeRO 1-3 checkpoint to a universal checkpoint",
        description="Write a DeepSpeed universal checkpoint (fp32 masters per parameter and "
        "COAP's per-rank state) that resumes at any data-parallel world size with "
        '"checkpoint": {"load_universal": true} and '
        "coap_dist.integrations.deepspeed.load_checkpoint(engine, DST).",
    )
    uni.add_argument("src", help="the engine.save_checkpoint directory")
    uni.add_argument("dst", help="output directory (the tag folder is replaced if present)")
    uni.add_argument("--tag", default=None, help="checkpoint tag (default: SRC/latest)")
    uni.set_defaults(subparser=uni)
    return parser


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned plain-text table (first column left-aligned)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.1f}"


def _rows(results: Sequence[StateBytes], world_size: int) -> list[list[str]]:
    rows = [
        ["moments", *(_mib(r.moments) for r in results)],
        ["projectors", *(_mib(r.projectors) for r in results)],
        ["quant scales", *(_mib(r.quant_scales) for r in results)],
        ["total", *(_mib(r.total) for r in results)],
    ]
    if world_size > 1:
        rows.append([f"max per rank (of {world_size})", *(_mib(r.max_per_rank) for r in results)])
        rows.append(["mean per rank", *(_mib(r.mean_per_rank) for r in results)])
    return rows


def _step_memory(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``coap-dist memory --step``: the terms of :func:`coap_dist.step_memory.estimate_step_peak`."""
    from coap_dist.step_memory import STEP_LAYOUTS, estimate_step_peak

    if args.optimizer not in ("adamw", "coap"):
        parser.error("argument --step: needs --optimizer adamw or --optimizer coap")
    layout = args.layout if args.world_size > 1 else "replicated"
    if layout not in STEP_LAYOUTS:
        parser.error(f"argument --layout: --step models {', '.join(STEP_LAYOUTS)}, got {layout}")
    if args.optimizer == "coap" and args.rank is None and args.rank_ratio is None:
        parser.error("argument --rank: --optimizer coap needs --rank (or --rank-ratio)")
    _check_rank(args, parser, [args.optimizer])
    longest = LLAMA_PRESETS[args.model].max_seq_len
    seq_len = args.seq_len or longest
    if not 1 <= seq_len <= longest:
        parser.error(f"argument --seq-len: {seq_len} is outside 1 .. {longest} ({args.model}'s)")
    batch = args.batch or 1
    peak = estimate_step_peak(
        args.model,
        args.optimizer,
        batch=batch,
        seq_len=seq_len,
        world_size=args.world_size,
        layout=layout,
        in_backward=args.in_backward,
        rank=args.rank,
        rank_ratio=args.rank_ratio,
    )
    print(
        f"model {args.model}, {args.optimizer}, fp32, {batch} x {seq_len} tokens per rank, "
        f"world size {args.world_size} ({layout}), "
        f"{'in-backward' if args.in_backward else 'normal'} step; MiB per rank"
    )
    rows = [[k, _mib(v)] for k, v in peak.to_dict().items()]
    print(_format_table(["term", "MiB"], rows))
    return 0


def _memory(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.layout is not None and args.world_size == 1:
        parser.error(
            f"argument --layout: {args.layout} needs --world-size 2 or more (one process keeps "
            "the whole state: the layouts differ in how ranks share it)"
        )
    args.layout = args.layout or "ddp_owner"
    if args.step:
        return _step_memory(args, parser)
    for flag, given in (
        ("--batch", args.batch is not None),
        ("--seq-len", args.seq_len is not None),
        ("--in-backward", args.in_backward),
    ):
        if given:
            parser.error(
                f"argument {flag}: only with --step (the peak of a training step); without "
                "it the table is the optimizer state alone"
            )
    if args.all and args.optimizer is not None:
        parser.error("argument --all: not allowed with --optimizer (--all shows every optimizer)")
    if not args.all and args.optimizer is None:
        parser.error("argument --optimizer: required unless --all is given")
    if args.all and args.per_param:
        parser.error("argument --per-param: not allowed with --all")
    names = list(OPTIMIZERS) if args.all else [args.optimizer]
    if (
        args.rank is None
        and args.rank_ratio is None
        and any(n in LOWRANK_OPTIMIZERS for n in names)
    ):
        which = "--all" if args.all else f"--optimizer {args.optimizer}"
        parser.error(f"argument --rank: {which} needs --rank (or --rank-ratio)")
    _check_rank(args, parser, names)
    patterns = None
    if args.adamw_patterns is not None:
        patterns = [p for p in args.adamw_patterns.split(",") if p]
    dtype = DTYPES[args.dtype]
    results = [
        estimate_state_bytes(
            args.model,
            name,
            rank=args.rank,
            rank_ratio=args.rank_ratio,
            dtype=dtype,
            state_dtype=DTYPES[args.state_dtype] if args.state_dtype else None,
            world_size=args.world_size,
            layout=args.layout,
            adamw_patterns=patterns,
            per_param=args.per_param,
        )
        for name in names
    ]
    rank_text = (
        f"rank {args.rank}"
        if args.rank is not None
        else f"rank ratio {args.rank_ratio}"
        if args.rank_ratio is not None
        else "full rank"
    )
    print(
        f"model {args.model} ({LLAMA_PRESETS[args.model].num_params():,} params), "
        f"dtype {args.dtype}, {rank_text}, world size {args.world_size}"
        f"{f' ({args.layout} layout)' if args.world_size > 1 else ''}; "
        "optimizer state in MiB"
    )
    rows = _rows(results, args.world_size)
    if args.all:
        baseline = estimate_state_bytes(
            args.model,
            "adamw",
            dtype=torch.bfloat16,
            world_size=args.world_size,
            layout=args.layout,
            adamw_patterns=patterns,
        )
        rows.append(["ratio to bf16 AdamW", *(f"{r.total / baseline.total:.3f}" for r in results)])
    print(_format_table(["", *names], rows))
    if args.per_param and results[0].per_param is not None:
        print()
        prow = [
            [
                p.name,
                "x".join(map(str, p.shape)),
                p.algorithm,
                p.side or "-",
                str(p.rank) if p.rank is not None else "-",
                f"{p.total:,}",
            ]
            for p in results[0].per_param
        ]
        print(_format_table(["parameter", "shape", "algorithm", "side", "rank", "bytes"], prow))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coap-dist`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "memory":
        return _memory(args, args.subparser)
    if args.command == "ds-to-universal":
        from coap_dist.integrations.deepspeed import to_universal

        try:
            out = to_universal(args.src, args.dst, args.tag)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(
            f"wrote {out}; load it at any world size with "
            '"checkpoint": {"load_universal": true} and '
            f"coap_dist.integrations.deepspeed.load_checkpoint(engine, {args.dst!r})"
        )
        return 0
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks choices
    return 2


if __name__ == "__main__":
    sys.exit(main())
