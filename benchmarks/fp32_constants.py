"""Does a removed block's constant need its add's full shape in an FP32 ONNX file?

    python benchmarks/fp32_constants.py OUT/model_pruned.hqp [--rounds 9]

``hqp_fx.branches`` stores a removed residual block's constant per channel; ``quantize`` expands it to the add's
full shape because ONNX Runtime's int8 add is slow on a per-channel operand. This script exports the FP32 file of a
pruned model both ways (``export_onnx`` as it is: per channel; after ``constants_in_full``: full shape), checks that
ONNX Runtime gives the same outputs, and times the two files in alternating rounds at batch 1 and 32 (the paired
median of the per-round ratios, as the loop reads its rounds).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import hqp_fx
from hqp_fx.branches import constants_in_full
from hqp_fx.lower_onnx import export_onnx
from hqp_fx.measure import machine_description, measure_alternating, paired_ratio, versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pruned", help="a pruned model saved by hqp compress (model_pruned.hqp)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--size", type=int, default=32, help="square input resolution")
    args = ap.parse_args()
    model = hqp_fx.load(args.pruned).eval()
    print(f"{machine_description()}, {versions()}")
    with tempfile.TemporaryDirectory() as tmp:
        for batch, runs in ((1, 100), (32, 20)):
            x = torch.randn(batch, 3, args.size, args.size)
            files = {"per_channel": Path(tmp) / f"per_channel_{batch}.onnx", "full": Path(tmp) / f"full_{batch}.onnx"}
            export_onnx(model, (x,), files["per_channel"])
            export_onnx(constants_in_full(model, (x,)), (x,), files["full"])
            out = {k: ort.InferenceSession(str(p)).run(None, {"input": x.numpy()})[0] for k, p in files.items()}
            stats = measure_alternating(files, tuple(x.shape), threads=2, runs=runs, rounds=args.rounds)
            ratio = paired_ratio(stats["per_channel"]["rounds_ms"], stats["full"]["rounds_ms"])
            sizes = {k: p.stat().st_size / 2**20 for k, p in files.items()}
            print(f"batch {batch}: max |per channel - full| {np.abs(out['per_channel'] - out['full']).max():.1e}; "
                  f"MiB per channel {sizes['per_channel']:.2f}, full {sizes['full']:.2f}; time per channel / full "
                  f"{ratio:.3f} (paired median of {args.rounds} rounds of {runs} runs; medians "
                  f"{stats['per_channel']['median_ms']:.3f} / {stats['full']['median_ms']:.3f} ms)")


if __name__ == "__main__":
    main()
