"""How much does one round's fine-tune win back, by learning rate and distillation weight, on a fixed cut?

    python benchmarks/finetune_recipe.py --data CLEAN --model cifar:resnet20=PATH \
        --remove layer1.0 layer1.1 layer2.2 --lr 0.005 0.01 0.02 0.05 [--distill 0.9] [--epochs 1]

``hqp compress`` fine-tunes each round with one recipe (its defaults: SGD, Nesterov, cosine to zero within the
round, distillation from the dense model). Whether that recipe is the one that recovers most per epoch decides
how much accuracy each millisecond costs, so this script holds everything else fixed: the dense checkpoint, one
cut (the residual blocks named by ``--remove``, each removed whole through ``PruneChannelsPass`` as the loop
removes them), the data order (one seed for every config) and the epochs, and varies only the recipe.

Each config's pruned model is scored on the validation split of ``--data``, which must have a ``val/``: the
decision this informs is a default, so it is made on images no checkpoint trained on (make such a folder with
``clean_val_folder.py``). ``test/`` is not read. Drops are against the dense model on the same images, with the
paired standard error; the last column is each config against the default recipe, paired the same way.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import time
from dataclasses import replace

import torch

import hqp_fx
from hqp_fx import meta
from hqp_fx.cli import build_parser, compress_config
from hqp_fx.data import BatchLoader, find_splits, load_split
from hqp_fx.measure import machine_description
from hqp_fx.models import build_model
from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass
from hqp_fx.train import evaluate, finetune, paired_drop


def remove_blocks(dense: torch.nn.Module, example: torch.Tensor, blocks: list[str], *,
                  drop_bias: bool = True) -> torch.nn.Module:
    """A copy of ``dense`` with each named residual block removed whole (its conv1 group emptied), as the loop
    removes one (``drop_bias``: the loop's default, the block becomes the identity)."""
    gm = ChannelDependencyPass()(hqp_fx.trace(copy.deepcopy(dense), example)).graph_module
    sizes = {g.id: g.size for g in meta.channel_groups(gm)}
    plan = {}
    for block in blocks:
        group = f"{block}.conv1"
        if group not in sizes:
            raise SystemExit(f"{block} is not a residual block (no group {group})")
        plan[group] = list(range(sizes[group]))
    return PruneChannelsPass(plan, drop_branch_bias=drop_bias)(gm).graph_module


def clean_data_and_dense(data: str, model: str):
    """(train, val, dense model) for a fixed-cut experiment: ``data`` must have a ``val/`` no checkpoint trained on;
    ``model`` is SPEC=WEIGHTS."""
    folders = find_splits(data)
    if folders.validation is None:
        raise SystemExit(f"{data} has no val/: make one of images the checkpoint never trained on with "
                         "benchmarks/clean_val_folder.py")
    train = load_split(folders.train, size=32)
    val = load_split(folders.validation, classes=train.classes, size=32)
    spec, _, weights = model.partition("=")
    return train, val, build_model(spec, weights or None).model.eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="ImageFolder root with train/ and val/ (val/: never trained on)")
    ap.add_argument("--model", required=True, help="SPEC=WEIGHTS, e.g. cifar:resnet20=path.pt")
    ap.add_argument("--remove", nargs="+", required=True, help="residual blocks to remove whole, e.g. layer1.0")
    ap.add_argument("--lr", type=float, nargs="+", help="learning rates to try (default: compress's)")
    ap.add_argument("--distill", type=float, nargs="+", help="distillation weights to try (default: compress's)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="the fine-tune's data order, the same for every config")
    args = ap.parse_args()

    train, val, dense = clean_data_and_dense(args.data, args.model)
    spec, _, weights = args.model.partition("=")
    example = torch.randn(1, 3, 32, 32)
    cut = remove_blocks(dense, example, args.remove)

    # the recipe `hqp compress` runs by default, and its batch size
    cli = build_parser().parse_args(["compress", spec, "--data", args.data, "--out", "unused"])
    base, batch_size = compress_config(cli, lr=cli.lr, augment=True).finetune, cli.batch_size
    val_loader = BatchLoader(val, 500)
    dense_hits: list[torch.Tensor] = []
    dense_top1 = evaluate(dense, val_loader, hits=dense_hits)["top1"]
    cut_top1 = evaluate(cut, val_loader)["top1"]
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {machine_description()}, torch {torch.__version__}")
    print(f"{spec} {weights.rsplit('/', 1)[-1]}: removed {' '.join(args.remove)}; train {len(train)}, validation "
          f"{len(val)}; dense validation top-1 {dense_top1:.2f}, cut before fine-tuning {cut_top1:.2f}; "
          f"{args.epochs:g} epoch(s), seed {args.seed}, default recipe lr {base.lr:g} distill {base.distill:g}")
    print("| lr | distill | validation top-1 | drop (± se) | drop against the default recipe (± se) | minutes |")
    print("|---|---|---|---|---|---|")
    results = {}
    configs = list(itertools.product(args.lr or [base.lr], args.distill or [base.distill]))
    default = (base.lr, base.distill)
    configs.sort(key=lambda c: c != default)  # the default first, so every later row can be paired with it
    for lr, distill in configs:
        start = time.perf_counter()
        model = copy.deepcopy(cut).requires_grad_(True)
        config = replace(base, lr=lr, distill=distill, epochs=args.epochs)
        finetune(model, BatchLoader(train, batch_size, shuffle=True, augment=True, seed=args.seed),
                 config, teacher=dense if distill > 0 else None)
        hits: list[torch.Tensor] = []
        top1 = evaluate(model, val_loader, hits=hits)["top1"]
        results[(lr, distill)] = hits
        drop, se = paired_drop(dense_hits, hits)
        against = "–"
        if default in results and (lr, distill) != default:
            d, s = paired_drop(results[default], hits)
            against = f"{d:+.2f} ± {s:.2f}"
        print(f"| {lr:g} | {distill:g} | {top1:.2f} | {drop:.2f} ± {se:.2f} | {against} | "
              f"{(time.perf_counter() - start) / 60:.1f} |", flush=True)


if __name__ == "__main__":
    main()
