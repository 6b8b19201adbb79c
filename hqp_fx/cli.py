"""The ``hqp`` command line."""
from __future__ import annotations

import argparse
import sys

import torch

from . import meta
from .core import HQPError, format_graph
from .count import count_macs, count_params
from .models import build_model
from .passes import ChannelDependencyPass
from .trace import trace

__all__ = ["main"]


def _human(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    spec = build_model(args.model, args.weights)
    shape = spec.input_shape if not args.input_size else spec.input_shape[:2] + (args.input_size, args.input_size)
    example = torch.randn(shape)
    gm = trace(spec.model, example, leaf_modules=args.leaf or ())
    ChannelDependencyPass()(gm)
    groups = meta.channel_groups(gm)
    console = Console(width=200 if not sys.stdout.isatty() else None)
    if not args.summary_only:
        console.print(format_graph(gm), markup=False, highlight=False)
        console.print()
    table = Table(title=f"channel groups of {args.model} (input {'x'.join(map(str, shape))})")
    for col in ("group", "channels", "layers", "prunable", "cross-channel", "why not"):
        table.add_column(col)
    for g in groups:
        table.add_row(g.id, str(g.size), str(len(g.layers)), "yes" if g.prunable else "no",
                      "yes" if g.cross_channel else "", g.reason)
    console.print(table)
    if args.details:
        for g in groups:
            console.print(g.details(), markup=False, highlight=False)
    prunable = [g for g in groups if g.prunable]
    console.print(
        f"groups: {len(groups)} ({len(prunable)} prunable, {sum(g.size for g in prunable)} prunable channels) | "
        f"MACs: {_human(count_macs(gm, example))} | params: {_human(count_params(gm))}",
        markup=False, highlight=False,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hqp", description="HQP: sensitivity-aware pruning + INT8 quantization of CNNs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the traced graph, its coupled channel groups, MACs and params")
    p.add_argument("model", help="torchvision:NAME | cifar:resnet20|32|44|56|110 | path/to/file.py:factory")
    p.add_argument("--weights", help="local checkpoint (state dict); for torchvision also a hub weights name")
    p.add_argument("--input-size", type=int, help="square input resolution (default: the model's own)")
    p.add_argument("--leaf", action="append", help="module name to keep opaque while tracing (repeatable)")
    p.add_argument("--details", action="store_true", help="list every parameter slice of every group")
    p.add_argument("--summary-only", action="store_true", help="skip the per-node graph printout")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (HQPError, ValueError, FileNotFoundError, TypeError) as exc:
        print(f"hqp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
