"""The engine latency model on a real CIFAR ResNet: how well it predicts, and what selecting by it buys, one shot.

The model (``hqp_fx.latency``) is timed on this machine (every conv/linear layer as an int8 Q/DQ layer in ONNX
Runtime on a grid of channel counts). Then, for each step, two
plans come from the same fisher scores: ``select_channels`` (a share of the channels, ``--select channels``) and
``select_for_latency`` (a share of the predicted latency, ``--select latency``). Every pruned variant is quantized
with the onnxruntime preset and exported; every file (the dense one too) is timed in ONNX Runtime in its own process
(``measure_onnx``) in ``--rounds`` alternating rounds, and the model is calibrated on the dense file's median.
Variants are scored in FP32 without fine-tuning on ``--images`` test images: a one-shot view of accuracy at equal
latency, not a loop.

    python benchmarks/latency_model.py --model cifar:resnet20 --steps 0.1 0.2 0.3 --out /tmp/latency_model.json
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import hqp_fx  # noqa: E402
from hqp_fx import meta  # noqa: E402
from hqp_fx.data import BatchLoader  # noqa: E402
from hqp_fx.artifacts import write_json  # noqa: E402
from hqp_fx.measure import machine_description, measure_onnx, versions  # noqa: E402
from hqp_fx.latency import LatencyModel, select_for_latency  # noqa: E402
from hqp_fx.models import build_model  # noqa: E402
from hqp_fx.passes import AlignChannelsPass, ChannelDependencyPass, PruneChannelsPass, score_channels  # noqa: E402
from hqp_fx.passes import select_channels  # noqa: E402
from hqp_fx.compress import onnx_latency  # noqa: E402
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
    ap.add_argument("--batch", type=int, default=1, help="the batch the model is traced, timed and deployed at")
    ap.add_argument("--criterion", default="fisher", help="the importance both selectors rank by")
    ap.add_argument("--flops-normalize", action="store_true", help="taylor / group-fisher: per MAC (select_channels)")
    ap.add_argument("--ignore", nargs="*", default=[], help="modules never pruned, e.g. conv1 (the residual stream)")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per file; the median is kept")
    ap.add_argument("--images", type=int, default=2000, help="test images scored per variant")
    ap.add_argument("--out", default="/tmp/latency_model.json")
    args = ap.parse_args()
    log = logger()

    model = build_model(args.model, str(SHARED / "models/cifar-resnet" / WEIGHTS[args.model])).model
    train, test = cifar_splits(Path(args.data))
    test_loader = list(BatchLoader(test.subset(args.images // 10), 500))
    calib = list(BatchLoader(train.subset(50), 64, shuffle=True, seed=1))[:8]
    example = torch.zeros(args.batch, 3, 32, 32)
    quant = QuantConfig(backend="onnxruntime", calibration="histogram", num_samples=256)
    work = Path(args.out).with_suffix("")
    work.mkdir(parents=True, exist_ok=True)

    latency_file = onnx_latency(example, args.threads, quant=quant, calibration=calib).export  # as the loop times

    def int8_file(m, name: str) -> Path:
        return latency_file(m, work / f"{name}.onnx")

    gm = hqp_fx.trace(model, example)
    ChannelDependencyPass()(gm)
    engine = LatencyModel.measure(gm, threads=args.threads, align=args.align, reduce_range=bool(quant.reduce_range),
                                  progress=log)
    scores = score_channels(gm, args.criterion, calib, num_batches=8, seed=0, flops_normalize=args.flops_normalize)
    dense_top1 = evaluate(gm, test_loader)["top1"]
    files = {"dense": int8_file(gm, "dense")}
    calibration_ms = statistics.median(measure_onnx(files["dense"], tuple(example.shape), threads=args.threads,
                                                    runs=args.runs)["median_ms"] for _ in range(args.rounds))
    engine.calibrate(gm, calibration_ms)  # as the loop does, before any selection
    log(f"dense INT8 {calibration_ms:.3f} ms; residual (ops the table does not hold) {engine.residual:.3f} ms")
    rows = []
    for step in args.steps:
        plans = {"channels": select_channels(meta.channel_groups(gm), scores, step, min_keep=args.align,
                                             unit=args.align, ignore=args.ignore),
                 "latency": select_for_latency(gm, scores, engine, step, align=args.align, min_keep=args.align,
                                               ignore=tuple(args.ignore))}
        for selector, plan in plans.items():
            AlignChannelsPass(plan, args.align, scores)(gm)
            aligned = gm.meta[meta.ALIGN]["plan"]
            pruned = PruneChannelsPass(aligned)(gm).graph_module
            name = f"{selector}-{step:.2f}"
            files[name] = int8_file(pruned, name)
            rows.append({"selector": selector, "step": step, "name": name, "macs": hqp_fx.count_macs(pruned, example),
                         "predicted_ms": engine.predict(gm, aligned),
                         "top1_fp32_no_finetune": evaluate(pruned, test_loader)["top1"],
                         "removed": {k: len(v) for k, v in aligned.items()}})
            log(f"{name}: top-1 {rows[-1]['top1_fp32_no_finetune']:.2f}, MACs {rows[-1]['macs'] / 1e6:.1f}M")
    # every file timed in its own process, in alternating rounds (ORT's spinning threads make interleaved
    # in-process runs pay for each other); the median over rounds
    times = {name: [] for name in files}
    for r in range(args.rounds):
        for name, path in files.items():
            stats = measure_onnx(path, tuple(example.shape), threads=args.threads, runs=args.runs)
            times[name].append(stats["median_ms"])
        log(f"timing round {r + 1}/{args.rounds} done")
    measured = {name: statistics.median(t) for name, t in times.items()}
    dense_ms = measured["dense"]
    for row in rows:
        row["measured_ms"], row["rounds_ms"] = measured[row["name"]], times[row["name"]]
        row["error"] = (row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"]
    errors = [abs(r["error"]) for r in rows]
    result = {"model": args.model, "dense_int8_ms": dense_ms, "calibration_ms": calibration_ms,
              "residual_ms": engine.residual, "dense_top1_fp32": dense_top1, "rows": rows,
              "mean_abs_error": sum(errors) / len(errors), "max_abs_error": max(errors),
              "machine": machine_description(), "vnni": not cpu_lacks_vnni(), "cpu": platform.processor(),
              "threads": args.threads, "batch": args.batch, "align": args.align, "criterion": args.criterion,
              "flops_normalize": args.flops_normalize, "ignore": args.ignore, "versions": versions(),
              "command": " ".join(sys.argv)}
    write_json(Path(args.out), result)
    print(f"\n{args.model} batch {args.batch}, {args.criterion}{' per MAC' if args.flops_normalize else ''}, "
          f"ignore {args.ignore}: dense INT8 {dense_ms:.3f} ms, FP32 top-1 {dense_top1:.2f} ({args.images} test "
          "images); "
          f"prediction error mean {100 * result['mean_abs_error']:.1f}%, max {100 * result['max_abs_error']:.1f}%")
    print("| selector | step | predicted ms | measured ms | error | vs dense INT8 | MACs M | top-1 (no fine-tune) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['selector']} | {r['step']:.2f} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} | "
              f"{100 * r['error']:+.1f}% | {dense_ms / r['measured_ms']:.2f}x | {r['macs'] / 1e6:.1f} | "
              f"{r['top1_fp32_no_finetune']:.2f} |")


if __name__ == "__main__":
    main()
