"""On a validation split the checkpoint trained on, does a control track the test drop?

    python benchmarks/control_baseline.py --data <cifar10-jpeg> --model cifar:resnet20=PATH --remove layer1.0 layer1.1

``hqp compress`` without a ``val/`` holds its validation split out of ``train/``; a checkpoint that trained on all
of ``train/`` has memorised it, and a pruned model that fine-tunes without those images loses them, so the drop
there overstates the test drop. A control, the dense model fine-tuned on the same schedule, would correct that if
it forgot the held-out images too. This script fine-tunes both, the control and one fixed cut (the residual blocks
named by ``--remove``, removed whole as the loop removes them), with ``compress``'s split, recipe and batch size,
and prints each drop on the held-out split and on test, and the cut's drop against the control, each with its
standard error paired over the images.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from finetune_recipe import remove_blocks  # same folder: the fixed cut, removed as the loop removes a block
from hqp_fx.cli import build_parser, compress_config
from hqp_fx.data import BatchLoader, find_splits, load_split
from hqp_fx.measure import machine_description
from hqp_fx.models import build_model
from hqp_fx.train import evaluate, finetune, paired_drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ and no val/")
    ap.add_argument("--model", required=True, help="SPEC=WEIGHTS, e.g. cifar:resnet20=path.pt")
    ap.add_argument("--remove", nargs="+", required=True, help="residual blocks to remove whole, e.g. layer1.0")
    ap.add_argument("--seed", type=int, default=0, help="the fine-tunes' data order")
    args = ap.parse_args()

    folders = find_splits(args.data)
    if folders.validation is not None:
        raise SystemExit(f"{args.data} has a val/: this script measures the split compress holds out of train/")
    train = load_split(folders.train, size=32)
    test = load_split(folders.test, classes=train.classes, size=32)
    spec, _, weights = args.model.partition("=")
    cli = build_parser().parse_args(["compress", spec, "--data", args.data, "--out", "unused"])
    config = compress_config(cli, lr=cli.lr, augment=True)
    rest, held_out = train.hold_out(config.val_fraction, config.val_max_images, seed=config.prune.seed)
    dense = build_model(spec, weights or None).model.eval().requires_grad_(False)
    loaders = {"held-out": BatchLoader(held_out, 500), "test": BatchLoader(test, 500)}

    def hits(model):
        out = {}
        for split, loader in loaders.items():
            out[split] = []
            evaluate(model, loader, hits=out[split])
        return out

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {machine_description()}, torch {torch.__version__}")
    print(f"{spec} {weights.rsplit('/', 1)[-1]}: fine-tune on {len(rest)}, held out {len(held_out)}, test "
          f"{len(test)}; lr {config.finetune.lr:g}, distill {config.finetune.distill:g}, "
          f"{config.finetune.epochs:g} epoch(s), seed {args.seed}; cut: {' '.join(args.remove)}")
    base = hits(dense)
    models = {"control (the dense model)": copy.deepcopy(dense),
              "the cut": remove_blocks(dense, torch.randn(1, 3, 32, 32), args.remove)}
    after = {}
    print("| model after the fine-tune | drop on the held-out split | drop on test | minutes |")
    print("|---|---|---|---|")
    for name, model in models.items():
        start = time.perf_counter()
        finetune(model.requires_grad_(True), BatchLoader(rest, cli.batch_size, shuffle=True, augment=True,
                                                         seed=args.seed), config.finetune, teacher=dense)
        after[name] = hits(model.eval())
        cells = [f"{d:.2f} ± {se:.2f}" for d, se in (paired_drop(base[s], after[name][s]) for s in loaders)]
        print(f"| {name} | {' | '.join(cells)} | {(time.perf_counter() - start) / 60:.1f} |", flush=True)
    control, cut = after.values()
    cells = [f"{d:.2f} ± {se:.2f}" for d, se in (paired_drop(control[s], cut[s]) for s in loaders)]
    print(f"| the cut against the control | {' | '.join(cells)} | – |")


if __name__ == "__main__":
    main()
