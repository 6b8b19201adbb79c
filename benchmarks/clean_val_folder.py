"""Make a data folder whose ``val/`` no CIFAR checkpoint here trained on: half of the test images.

    python benchmarks/clean_val_folder.py --data <cifar10-jpeg> --out DIR

The shared JPEG checkpoints were fine-tuned on all of ``train/``, so the split ``hqp compress`` holds out of train
is one they memorised (``benchmarks/seen_check.py``). This folder measures what the loop does when its decisions
are made on clean images: ``val/`` is half of each class's test images (``random.Random(0).sample`` of the sorted
file names), ``test/`` the other half, ``train/`` all of train. Everything is a symlink, so nothing is copied.
It is not the issue's data (that has no ``val/``); RESULTS.md says which runs used it.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="ImageFolder root with train/ and test/")
    ap.add_argument("--out", required=True, type=Path, help="folder to create (must not exist)")
    args = ap.parse_args()
    data = args.data.resolve()
    if not (data / "train").is_dir() or not (data / "test").is_dir():
        raise SystemExit(f"{data} needs train/ and test/ (unpack the shared tarballs first)")
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new folder")
    args.out.mkdir(parents=True)
    (args.out / "train").symlink_to(data / "train", target_is_directory=True)
    counts = {"val": 0, "test": 0}
    for cls in sorted(p.name for p in (data / "test").iterdir() if p.is_dir()):
        files = sorted(p.name for p in (data / "test" / cls).iterdir())
        val = set(random.Random(0).sample(files, len(files) // 2))
        for split in counts:
            (args.out / split / cls).mkdir(parents=True)
        for name in files:
            split = "val" if name in val else "test"
            (args.out / split / cls / name).symlink_to(data / "test" / cls / name)
            counts[split] += 1
    print(f"{args.out}: train -> {data / 'train'}, val {counts['val']} and test {counts['test']} images "
          f"(halves of {data / 'test'})")


if __name__ == "__main__":
    main()
