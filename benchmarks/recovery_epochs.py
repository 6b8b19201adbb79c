"""How much does a longer recovery fine-tune win back on the cut a run shipped, by its length in epochs?

    python benchmarks/recovery_epochs.py --data <cifar10-jpeg> --model cifar:resnet20=CKPT \
        --pruned OUT/model_pruned.hqp --epochs 1 4 10

``hqp compress`` ends with a recovery fine-tune of the last accepted cut. The rounds accept cuts measured just under
delta_max on a validation split of a few thousand images, after one epoch each, so the cut they ship may sit over
delta_max on other images; the recovery is the one fine-tune that may run long. This script holds the cut, the
dense teacher and the data order fixed and varies only the recovery's length, each length a fresh fine-tune from the
cut with ``compress``'s default recipe (its cosine schedule spans the whole length, as the recovery's does).

``--pruned`` is a run's ``model_pruned.hqp``: the last accepted round's model when the run's own recovery was
discarded (its report says so), else the recovered one. Drops are against the dense model on the validation split
``compress`` decided on (``--data``'s ``val/``, else the same hold-out of ``train/``), paired over the images; the
training images are the rest of ``train/``, as in the run. The test split is printed beside it, not used to choose:
the question is whether the shipped model's test drop comes under delta_max.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch

import hqp_fx
from hqp_fx.cli import build_parser, compress_config
from hqp_fx.data import BatchLoader, find_splits, load_split
from hqp_fx.measure import machine_description
from hqp_fx.models import build_model
from hqp_fx.train import evaluate, finetune, paired_drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="ImageFolder root with train/, test/ and maybe val/")
    ap.add_argument("--model", required=True, help="the dense model the run compressed: SPEC=WEIGHTS")
    ap.add_argument("--pruned", required=True, help="the run's model_pruned.hqp")
    ap.add_argument("--epochs", type=float, nargs="+", default=[1, 4, 10])
    args = ap.parse_args()

    spec, _, weights = args.model.partition("=")
    cli = build_parser().parse_args(["compress", spec, "--data", args.data, "--out", "unused"])
    config = compress_config(cli, lr=cli.lr, augment=True)
    folders = find_splits(args.data)
    train = load_split(folders.train, size=32)
    test = load_split(folders.test, classes=train.classes, size=32)
    if folders.validation is not None:
        val = load_split(folders.validation, classes=train.classes, size=32)
    else:  # the hold-out compress makes with its defaults
        train, val = train.hold_out(config.val_fraction, config.val_max_images, seed=config.prune.seed)
    dense = build_model(spec, weights or None, num_classes=len(train.classes)).model.eval().requires_grad_(False)
    cut = hqp_fx.load(args.pruned)
    splits = {"validation": BatchLoader(val, 500), "test": BatchLoader(test, 500)}

    def hits_of(model) -> dict[str, list[torch.Tensor]]:
        out = {}
        for name, loader in splits.items():
            out[name] = []
            evaluate(model, loader, hits=out[name])
        return out

    dense_hits = hits_of(dense)
    seed = config.prune.seed * 1000 + config.prune.max_rounds  # the data order of compress's own recovery

    def row(label: str, model, minutes: str) -> None:
        hits = hits_of(model)
        cells = [f"{d:.2f} ± {s:.2f}" for d, s in (paired_drop(dense_hits[k], hits[k]) for k in splits)]
        print(f"| {label} | {' | '.join(cells)} | {minutes} |", flush=True)

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {machine_description()}, torch {torch.__version__}")
    print(f"{spec} {weights.rsplit('/', 1)[-1]}, cut {args.pruned}: train {len(train)}, validation {len(val)}, test "
          f"{len(test)}; recipe lr {config.finetune.lr:g}, distill {config.finetune.distill:g}, batch "
          f"{config.batch_size}, data order seed {seed}")
    print("| recovery epochs | drop on validation (± se) | drop on test (± se) | minutes |")
    print("|---|---|---|---|")
    row("0 (the cut)", cut, "–")
    for epochs in args.epochs:
        model = copy.deepcopy(cut).requires_grad_(True)
        start = time.perf_counter()
        torch.manual_seed(seed)
        finetune(model, BatchLoader(train, config.batch_size, shuffle=True, augment=True, seed=seed),
                 replace(config.finetune, epochs=epochs), teacher=dense)
        row(f"{epochs:g}", model, f"{(time.perf_counter() - start) / 60:.1f}")


if __name__ == "__main__":
    main()
