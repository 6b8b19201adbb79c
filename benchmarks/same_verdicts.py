"""Does a refactor change what hqp_fx decides? Record the analysis verdicts and pruned outputs of the test zoo with
whichever hqp_fx is importable, then compare two recordings bit for bit.

    PYTHONPATH=/path/to/old/checkout python benchmarks/same_verdicts.py record old.pt
    python benchmarks/same_verdicts.py record new.pt
    python benchmarks/same_verdicts.py compare old.pt new.pt

Per model (torchvision zoo and CIFAR ResNets of tests/helpers.py, realistic random weights): every group's id,
size, prunable flag and reason, cross-channel and removable flags and layers; the output of a seeded 30% random
plan; and, where a group is removable, the output with one such group removed whole.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def record(path: str) -> None:
    import hqp_fx
    from hqp_fx import meta
    from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass
    from helpers import ZOO_CIFAR, ZOO_TORCHVISION, build_zoo_model, random_plan

    print(f"hqp_fx from {hqp_fx.__file__}")
    out = {}
    for name in ZOO_TORCHVISION + ZOO_CIFAR:
        model, x = build_zoo_model(name)
        gm = hqp_fx.trace(model, x)
        ChannelDependencyPass()(gm)
        groups = meta.channel_groups(gm)
        verdicts = [(g.id, g.size, g.prunable, g.reason, g.cross_channel, g.removable, tuple(g.layers)) for g in groups]
        with torch.no_grad():
            y = PruneChannelsPass(random_plan(groups, 0.3, seed=0))(gm).graph_module(x)
            removable = [g for g in groups if g.removable]
            y_branch = None
            if removable:
                g = removable[len(removable) // 2]
                y_branch = PruneChannelsPass({g.id: list(range(g.size))})(gm).graph_module(x)
        out[name] = {"verdicts": verdicts, "out": y, "branch_out": y_branch}
        print(f"{name}: {len(groups)} groups, {sum(g.prunable for g in groups)} prunable")
    torch.save(out, path)


def compare(old_path: str, new_path: str) -> int:
    old, new = torch.load(old_path, weights_only=False), torch.load(new_path, weights_only=False)
    differ = 0
    for name in old:
        a, b = old[name], new.get(name)
        same = b is not None and a["verdicts"] == b["verdicts"] and torch.equal(a["out"], b["out"]) and (
            (a["branch_out"] is None and b["branch_out"] is None) or torch.equal(a["branch_out"], b["branch_out"]))
        differ += not same
        print(f"{name}: {'same' if same else 'DIFFERENT'}")
    print(f"{len(old) - differ} of {len(old)} models: identical verdicts and bit-identical pruned outputs")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("record").add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("old")
    c.add_argument("new")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.command == "record":
        record(args.out)
        return 0
    return compare(args.old, args.new)


if __name__ == "__main__":
    sys.exit(main())
