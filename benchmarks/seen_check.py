"""Does ``hqp compress``'s check before the rounds tell a validation split the checkpoint trained on from a clean one?

    python benchmarks/seen_check.py --data <cifar10-jpeg> --model cifar:resnet20=PATH [--model SPEC=PATH ...]

For each checkpoint, two validation splits go through ``hqp_fx.compress.seen_check`` exactly as ``compress`` holds
one out when the data has no ``val/``:

- ``held out of train``: the stratified 10% (at most 5,000) of train that ``compress`` carves (seed 0), checked
  against as many of the remaining training images;
- ``half of test``: a stratified half of the test images (seed 0), which no checkpoint trained on, checked against
  the same training images; the clean control.

Beside each, the dense model's top-1 on the other half of test (never a validation split here), so the row shows
what the check cannot see: how much higher the split scores than unseen images. Nothing is decided from test.
"""
from __future__ import annotations

import argparse
import time

from hqp_fx.compress import CompressConfig, seen_check
from hqp_fx.data import BatchLoader, find_splits, load_split
from hqp_fx.measure import machine_description
from hqp_fx.models import build_model
from hqp_fx.train import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="ImageFolder root with train/ and test/")
    ap.add_argument("--model", action="append", required=True, help="SPEC=WEIGHTS, e.g. cifar:resnet20=path.pt")
    args = ap.parse_args()
    config = CompressConfig()
    folders = find_splits(args.data)
    train = load_split(folders.train, size=32)
    test = load_split(folders.test, classes=train.classes, size=32)
    rest, held = train.hold_out(config.val_fraction, config.val_max_images, seed=0)
    other_half, clean = test.hold_out(0.5, len(test), seed=0)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {machine_description()}; train {len(rest)} + held out {len(held)}, "
          f"test halves {len(clean)} (clean validation) / {len(other_half)} (unseen reference)")
    print("| checkpoint | validation split | top-1 there | top-1 on training images | train − val (± se) | "
          "flagged as seen | top-1 on the other test half |")
    print("|---|---|---|---|---|---|---|")
    for item in args.model:
        spec, _, weights = item.partition("=")
        model = build_model(spec, weights or None).model.eval()
        unseen = evaluate(model, BatchLoader(other_half, 500))["top1"]
        for name, split in (("held out of train", held), ("half of test", clean)):
            s = seen_check(model, rest, split, seed=0)
            print(f"| `{spec}` {weights.rsplit('/', 1)[-1]} | {name} | {s['validation_top1']:.2f} | "
                  f"{s['train_top1']:.2f} ({s['train_images']}) | {s['gap']:+.2f} ± {s['gap_se']:.2f} | "
                  f"{'yes' if s['likely_seen'] else 'no'} | {unseen:.2f} |", flush=True)


if __name__ == "__main__":
    main()
