"""Global pooling and zero-padding shortcuts in int8: ONNX Runtime time and accuracy before and after the change.

    python benchmarks/int8_pool_pad.py --data /tmp/cifar_full \
        --model cifar:resnet20=../shared/models/cifar-resnet/resnet20_cifar10jpeg.pt \
        --model cifar:resnet56=../shared/models/cifar-resnet/resnet56_cifar10jpeg.pt [--remove layer1.0 layer1.1]

The dynamo exporter writes ``adaptive_avg_pool2d(1)`` as a float ``ReduceMean`` and a zero-padding shortcut as a
float ``Pad`` between its Q/DQ; ``lower_onnx`` now writes a ``GlobalAveragePool`` (ORT fuses it to
``QLinearGlobalAveragePool``) and pads the int8 tensor when the ``onnxruntime`` preset shares the scale through
the shortcut. "before" is the same code with both rewrites and the sharing through slice and pad switched off.

Per model (and, with ``--remove``, a cut of it with those residual blocks removed, as the loop removes them):
- the ``onnxruntime`` preset's file before and after, and ORT ``quantize_static`` (U8/S8 QDQ per-channel, MinMax;
  with and without reduce_range) on the FP32 file before and after (the FP32 file takes the pooling rewrite too,
  so the baseline gains what it can);
- all timed in ONNX Runtime run by run on one thread pool (``measure_interleaved``), batch 1 and 32, ratios paired
  by round;
- top-1 on the 10,000 test images in ORT, the difference after − before with its standard error paired over the
  images. Calibration: 512 training images.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from finetune_recipe import remove_blocks  # same folder: a fixed cut as the loop makes it
from hqp_fx import lower_onnx, quantizers
from hqp_fx.data import BatchLoader
from hqp_fx.engines.ort import OrtModel
from hqp_fx.lower_onnx import export_onnx
from hqp_fx.measure import machine_description, measure_interleaved, paired_ratio, versions
from hqp_fx.models import build_model
from hqp_fx.passes.quantize import QuantConfig, quantize, take_samples
from hqp_fx.train import evaluate, paired_drop
from quantize_speed import cifar_splits, ort_quantize_static  # same folder: the data and the ORT baseline

aten = torch.ops.aten
_SHARED_SINCE = {aten.slice.Tensor, aten.pad.default, aten.constant_pad_nd.default}


@contextlib.contextmanager
def before_the_change():
    """The preset and the lowering as they were: no scale shared through slice and pad, no rewrites."""
    pool, pad = lower_onnx._global_pool, lower_onnx._int8_pad
    quantizers._PASS_THROUGH.difference_update(_SHARED_SINCE)
    lower_onnx._global_pool = lower_onnx._int8_pad = lambda *args: None
    try:
        yield
    finally:
        quantizers._PASS_THROUGH.update(_SHARED_SINCE)
        lower_onnx._global_pool, lower_onnx._int8_pad = pool, pad


def files(name: str, model: torch.nn.Module, samples: list[torch.Tensor], folder: Path, baseline: bool) -> dict:
    """{label: path} of the preset's INT8 file before and after, and (``baseline``) quantize_static's."""
    example = samples[0][:1]
    out = {}
    for when in ("before", "after"):
        with before_the_change() if when == "before" else contextlib.nullcontext():
            q = quantize(model, (example,), samples, QuantConfig(backend="onnxruntime", calibration="histogram",
                                                                  num_samples=sum(len(s) for s in samples)))
            out[f"{name} hqp {when}"] = folder / f"{name}-hqp-{when}.onnx"
            export_onnx(q.model, (example,), out[f"{name} hqp {when}"], dynamic_batch=True)
            if baseline:
                fp32 = folder / f"{name}-fp32-{when}.onnx"
                export_onnx(model, (example,), fp32, dynamic_batch=True)
                for rr in (False, True):
                    label = f"{name} quantize_static{' rr' if rr else ''} {when}"
                    out[label] = folder / f"{name}-ort{'-rr' if rr else ''}-{when}.onnx"
                    ort_quantize_static(fp32, out[label], samples, rr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/tmp/cifar_full", help="CIFAR-10 with train/ and test/")
    ap.add_argument("--model", action="append", required=True, help="SPEC=WEIGHTS; repeat for more models")
    ap.add_argument("--remove", nargs="*", default=[], help="also a cut without these residual blocks")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (fresh processes) per batch size")
    args = ap.parse_args()
    train, test = cifar_splits(Path(args.data))
    samples = take_samples(BatchLoader(train, 64, shuffle=True, seed=0), 512)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {machine_description()}, {versions()}")
    with tempfile.TemporaryDirectory() as tmp:
        for arg in args.model:
            spec, _, weights = arg.partition("=")
            dense = build_model(spec, weights or None).model.eval()
            paths = files("dense", dense, samples, Path(tmp), baseline=True)
            if args.remove:
                cut = remove_blocks(dense, samples[0][:1], args.remove, drop_bias=True)
                paths.update(files("cut", cut, samples, Path(tmp), baseline=False))
            print(f"\n{spec} {Path(weights).name}" + (f"; the cut removes {' '.join(args.remove)}" if args.remove
                                                      else ""))
            loader = BatchLoader(test, 500)
            hits = {}
            for label, path in paths.items():
                hits[label] = []
                top1 = evaluate(OrtModel(path, 2), loader, hits=hits[label])["top1"]
                print(f"  test top-1 in ORT, {label}: {top1:.2f}", flush=True)
            for who in ["dense"] + (["cut"] if args.remove else []):
                drop, se = paired_drop(hits[f"{who} hqp before"], hits[f"{who} hqp after"])
                print(f"  {who} hqp: after − before {-drop:+.2f} ± {se:.2f} points")
            print("| batch | file | ms (median round) | after / before | against quantize_static after (rr / "
                  "defaults) |")
            print("|---|---|---|---|---|")
            for batch in (1, 32):
                ms = measure_interleaved(paths, (batch, 3, 32, 32), runs=200 if batch == 1 else 30,
                                         rounds=args.rounds)
                for label in paths:
                    if not label.endswith(" after"):
                        continue
                    stem = label[:-len(" after")]
                    against = " / ".join(f"{paired_ratio(ms[f'dense quantize_static{rr} after'], ms[label]):.3f}x"
                                         for rr in (" rr", ""))
                    print(f"| {batch} | {stem} | {statistics.median(ms[label]):.3f} | "
                          f"{paired_ratio(ms[label], ms[stem + ' before']):.3f} | {against} |", flush=True)


if __name__ == "__main__":
    main()
