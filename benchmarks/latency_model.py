"""The engine latency model on a real CIFAR ResNet: how well it predicts, and what selecting by it buys, one shot.

The model (``hqp_fx.latency``) is timed on this machine (every conv/linear layer as an int8 Q/DQ layer in ONNX
Runtime on a grid of channel counts) and calibrated on the dense model's INT8 file. Then, for each step, two
plans come from the same fisher scores: ``select_channels`` (a share of the channels, ``--select channels``) and
``select_for_latency`` (a share of the predicted latency, ``--select latency``). Every pruned variant is quantized
with the onnxruntime preset, exported, timed in ONNX Runtime in its own process (``measure_onnx``), and scored in
FP32 without fine-tuning on ``--images`` test images: a one-shot view of accuracy at equal latency, not a loop.

    python benchmarks/latency_model.py --model cifar:resnet20 --steps 0.1 0.2 0.3 --out /tmp/latency_model.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import hqp_fx  # noqa: E402
from hqp_fx import meta  # noqa: E402
from hqp_fx.compress import onnx_latency  # noqa: E402
from hqp_fx.data import BatchLoader  # noqa: E402
from hqp_fx.deploy import machine_description, versions, write_json  # noqa: E402
from hqp_fx.latency import LatencyModel, select_for_latency  # noqa: E402
from hqp_fx.models import build_model  # noqa: E402
from hqp_fx.passes import AlignChannelsPass, ChannelDependencyPass, PruneChannelsPass, score_channels  # noqa: E402
from hqp_fx.passes import select_channels  # noqa: E402
from hqp_fx.passes.quantize import QuantConfig, cpu_lacks_vnni  # noqa: E402
from hqp_fx.train import evaluate  # noqa: E402
from quantize_speed import SHARED, cifar_splits, logger  # noqa: E402

WEIGHTS = {"cifar:resnet20": "resnet20_cifar10jpeg.pt", "cifar:resnet56": "resnet56_cifar10jpeg.pt"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cifar:resnet20", choices=sorted(WEIGHTS))
    ap.add_argument("--data", default="/tmp/cifar_full", help="folder with CIFAR-10 train/ and test/ (else ../shared)")
    ap.add_argument("--steps", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--align", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--images", type=int, default=2000, help="test images scored per variant")
    ap.add_argument("--out", default="/tmp/latency_model.json")
    args = ap.parse_args()
    log = logger()

    model = build_model(args.model, str(SHARED / "models/cifar-resnet" / WEIGHTS[args.model])).model
    train, test = cifar_splits(Path(args.data))
    test_loader = list(BatchLoader(test.subset(args.images // 10), 500))
    calib = list(BatchLoader(train.subset(50), 64, shuffle=True, seed=1))[:8]
    example = torch.zeros(1, 3, 32, 32)
    quant = QuantConfig(backend="onnxruntime", calibration="histogram", num_samples=256)
    measure = onnx_latency(example, args.threads, args.runs, quant=quant, calibration=calib)

    gm = hqp_fx.trace(model, example)
    ChannelDependencyPass()(gm)
    engine = LatencyModel.measure(gm, threads=args.threads, align=args.align, reduce_range=bool(quant.reduce_range),
                                  progress=log)
    dense_ms = measure(gm)
    engine.calibrate(gm, dense_ms)
    log(f"dense INT8 {dense_ms:.3f} ms; residual (ops the table does not hold) {engine.residual:.3f} ms")
    scores = score_channels(gm, "fisher", calib, num_batches=8, seed=0)
    dense_top1 = evaluate(gm, test_loader)["top1"]

    rows = []
    for step in args.steps:
        plans = {"channels": select_channels(meta.channel_groups(gm), scores, step, min_keep=args.align,
                                             unit=args.align),
                 "latency": select_for_latency(gm, scores, engine, step, align=args.align, min_keep=args.align)}
        for selector, plan in plans.items():
            AlignChannelsPass(plan, args.align, scores)(gm)
            aligned = gm.meta[meta.ALIGN]["plan"]
            pruned = PruneChannelsPass(aligned)(gm).graph_module
            predicted, measured = engine.predict(gm, aligned), measure(pruned)
            row = {"selector": selector, "step": step, "predicted_ms": predicted, "measured_ms": measured,
                   "error": (predicted - measured) / measured, "macs": hqp_fx.count_macs(pruned, example),
                   "top1_fp32_no_finetune": evaluate(pruned, test_loader)["top1"],
                   "removed": {k: len(v) for k, v in aligned.items()}}
            rows.append(row)
            log(f"{selector:8s} step {step:.2f}: predicted {predicted:.3f} ms, measured {measured:.3f} ms "
                f"({100 * row['error']:+.1f}%), top-1 {row['top1_fp32_no_finetune']:.2f}, MACs {row['macs'] / 1e6:.1f}M")
    errors = [abs(r["error"]) for r in rows]
    result = {"model": args.model, "dense_int8_ms": dense_ms, "dense_top1_fp32": dense_top1, "rows": rows,
              "mean_abs_error": sum(errors) / len(errors), "max_abs_error": max(errors),
              "machine": machine_description(), "vnni": not cpu_lacks_vnni(), "cpu": platform.processor(),
              "threads": args.threads, "align": args.align, "versions": versions(), "command": " ".join(sys.argv)}
    write_json(Path(args.out), result)
    print(f"\n{args.model}: dense INT8 {dense_ms:.3f} ms, FP32 top-1 {dense_top1:.2f} ({args.images} test images); "
          f"prediction error mean {100 * result['mean_abs_error']:.1f}%, max {100 * result['max_abs_error']:.1f}%")
    print("| selector | step | predicted ms | measured ms | error | vs dense INT8 | MACs M | top-1 (no fine-tune) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['selector']} | {r['step']:.2f} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} | "
              f"{100 * r['error']:+.1f}% | {dense_ms / r['measured_ms']:.2f}x | {r['macs'] / 1e6:.1f} | "
              f"{r['top1_fp32_no_finetune']:.2f} |")


if __name__ == "__main__":
    main()
