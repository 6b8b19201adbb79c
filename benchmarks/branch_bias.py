"""A removed block's bias: kept as ``x + shift``, or dropped so the block is the identity? Time and accuracy.

    python benchmarks/branch_bias.py --data CLEAN --model cifar:resnet56=PATH \
        --remove layer1.0 layer1.2 layer1.3 layer1.4 layer1.5 layer1.8 layer2.5

Removing a residual block's inner channels leaves ``relu(x + shift)``, the shift of its last BatchNorm: exact,
but an add over the whole feature map in the engine. ``PruneChannelsPass(drop_branch_bias=True)`` drops it, and
the ReLU then applied to a ReLU's output, so the block costs nothing. This script measures both sides on one
fixed cut (the blocks named by ``--remove``):

- time: the dense model, the cut with its biases kept and the cut with them dropped, each quantized with the
  ``onnxruntime`` preset as ``compress`` ships it, timed in ONNX Runtime run by run on one thread pool
  (``measure_interleaved``), at batch 1 and 32; the ratios are paired by round;
- accuracy: both cuts fine-tuned with ``compress``'s default recipe and data order, scored before and after on
  the ``val/`` of ``--data`` (images no checkpoint trained on: ``clean_val_folder.py``); ``test/`` is not read.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from finetune_recipe import clean_data_and_dense, remove_blocks  # same folder: the fixed cut and its data
from hqp_fx.cli import build_parser, compress_config
from hqp_fx.data import BatchLoader
from hqp_fx.lower_onnx import export_onnx
from hqp_fx.measure import machine_description, measure_interleaved, paired_ratio
from hqp_fx.passes.quantize import QuantConfig, quantize
from hqp_fx.train import evaluate, finetune, paired_drop


def timings(models: dict[str, torch.nn.Module], calibration: list[torch.Tensor], batch: int, rounds: int,
            folder: Path) -> dict[str, list[float]]:
    example = calibration[0][:batch]
    paths = {}
    for name, model in models.items():
        q = quantize(model, (example,), [c[:batch] for c in calibration], QuantConfig(backend="onnxruntime"))
        paths[name] = folder / f"{name}_b{batch}.onnx"
        export_onnx(q.model, (example,), paths[name])
    return measure_interleaved(paths, tuple(example.shape), runs=200 if batch == 1 else 30, rounds=rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="ImageFolder root with train/ and val/ (val/: never trained on)")
    ap.add_argument("--model", required=True, help="SPEC=WEIGHTS, e.g. cifar:resnet56=path.pt")
    ap.add_argument("--remove", nargs="+", required=True, help="residual blocks to remove whole, e.g. layer1.0")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (fresh processes) per batch size")
    ap.add_argument("--seed", type=int, default=0, help="the fine-tunes' data order")
    ap.add_argument("--no-finetune", action="store_true", help="time only")
    args = ap.parse_args()

    train, val, dense = clean_data_and_dense(args.data, args.model)
    spec, _, weights = args.model.partition("=")
    example = torch.randn(1, 3, 32, 32)
    cuts = {"kept": remove_blocks(dense, example, args.remove, drop_bias=False),
            "dropped": remove_blocks(dense, example, args.remove, drop_bias=True)}
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {machine_description()}, torch {torch.__version__}")
    print(f"{spec} {weights.rsplit('/', 1)[-1]}: removed {' '.join(args.remove)}")

    calibration = [images for images, _ in BatchLoader(train, 32, shuffle=True, seed=0)][:4]
    print("| batch | dense INT8 ms (median) | kept / dense | dropped / dense | dropped / kept |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (1, 32):
            t = timings({"dense": dense, **cuts}, calibration, batch, args.rounds, Path(tmp))
            print(f"| {batch} | {statistics.median(t['dense']):.3f} | {paired_ratio(t['kept'], t['dense']):.3f} | "
                  f"{paired_ratio(t['dropped'], t['dense']):.3f} | {paired_ratio(t['dropped'], t['kept']):.3f} |",
                  flush=True)
    if args.no_finetune:
        return

    cli = build_parser().parse_args(["compress", spec, "--data", args.data, "--out", "unused"])
    config = compress_config(cli, lr=cli.lr, augment=True)
    loader = BatchLoader(val, 500)
    dense_hits: list[torch.Tensor] = []
    dense_top1 = evaluate(dense, loader, hits=dense_hits)["top1"]
    print(f"\ndense validation top-1 {dense_top1:.2f}; fine-tune: lr {config.finetune.lr:g}, distill "
          f"{config.finetune.distill:g}, {config.finetune.epochs:g} epoch(s), seed {args.seed}")
    print("| the cut's bias | top-1 before the fine-tune | after | drop (± se) | minutes |")
    print("|---|---|---|---|---|")
    hits = {}
    for name, cut in cuts.items():
        before = evaluate(cut, loader)["top1"]
        start = time.perf_counter()
        model = copy.deepcopy(cut).requires_grad_(True)
        finetune(model, BatchLoader(train, cli.batch_size, shuffle=True, augment=True, seed=args.seed),
                 config.finetune, teacher=dense)
        hits[name] = []
        after = evaluate(model.eval(), loader, hits=hits[name])["top1"]
        drop, se = paired_drop(dense_hits, hits[name])
        print(f"| {name} | {before:.2f} | {after:.2f} | {drop:.2f} ± {se:.2f} | "
              f"{(time.perf_counter() - start) / 60:.1f} |", flush=True)
    drop, se = paired_drop(hits["kept"], hits["dropped"])
    print(f"\ndropped against kept, after the fine-tune: {drop:+.2f} ± {se:.2f} points")


if __name__ == "__main__":
    main()
