"""Selection by channels vs by predicted latency in the whole HQP job (``hqp_fx.compress.compress``), to one
measured latency target, on a real CIFAR ResNet: which one ends more accurate at equal engine time?

Both runs get the same settings but ``PruneLoopConfig.select``; each decides on a validation split held out from the
training images and reports on the test split. The target is a fraction of the quantize-only INT8 latency in ONNX
Runtime at ``--batch`` (batch 1 is too noisy on a 2-core VM to judge a 20% target). Run one selector per process
(``--select``) so that the two runs do not share ORT's threads; a second call appends to the same JSON.

    python benchmarks/latency_loop.py --select channels --out /tmp/latency_loop.json
    python benchmarks/latency_loop.py --select latency --out /tmp/latency_loop.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from hqp_fx.compress import CompressConfig, compress  # noqa: E402
from hqp_fx.artifacts import write_json  # noqa: E402
from hqp_fx.prune_loop import PruneLoopConfig  # noqa: E402
from hqp_fx.models import build_model  # noqa: E402
from hqp_fx.passes.quantize import QuantConfig  # noqa: E402
from hqp_fx.train import FinetuneConfig  # noqa: E402
from quantize_speed import SHARED, cifar_splits, logger  # noqa: E402

WEIGHTS = {"cifar:resnet20": "resnet20_cifar10jpeg.pt", "cifar:resnet56": "resnet56_cifar10jpeg.pt"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--select", required=True, choices=("channels", "latency"))
    ap.add_argument("--model", default="cifar:resnet20", choices=sorted(WEIGHTS))
    ap.add_argument("--data", default="/tmp/cifar_full", help="folder with CIFAR-10 train/ and test/ (else ../shared)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--target-latency", type=float, default=0.8)
    ap.add_argument("--criterion", default="taylor")
    ap.add_argument("--ignore", nargs="*", default=["conv1"])
    ap.add_argument("--finetune-epochs", type=float, default=0.2)
    ap.add_argument("--max-rounds", type=int, default=12)
    ap.add_argument("--distill", type=float, default=0.0, help="distillation weight from the dense model")
    ap.add_argument("--delta-max", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/latency_loop.json")
    args = ap.parse_args()
    log = logger()

    model = build_model(args.model, str(SHARED / "models/cifar-resnet" / WEIGHTS[args.model])).model
    train, test = cifar_splits(Path(args.data))
    config = CompressConfig(
        prune=PruneLoopConfig(delta_max=args.delta_max, criterion=args.criterion, align=16, target_latency=args.target_latency,
                        select=args.select, ignore=tuple(args.ignore), max_rounds=args.max_rounds),
        finetune=FinetuneConfig(epochs=args.finetune_epochs, lr=0.01, distill=args.distill),
        quant=QuantConfig(backend="onnxruntime", calibration="histogram", num_samples=256),
        ablation=True, threads=args.threads)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="hqp_latency_loop_") as stage:
        report = compress(model, torch.zeros(args.batch, 3, 32, 32), train, test, config, Path(stage),
                          progress=log, on_round=lambda r: log(f"round {r.round}: accepted {r.accepted}, val top-1 "
                                                               f"{r.top1:.2f}, latency {r.latency}, predicted "
                                                               f"{r.predicted_latency}"))
    var, acc = report["variants"], report["accuracy"]
    row = {"select": args.select, "model": args.model, "batch": args.batch, "target_latency": args.target_latency,
           "criterion": args.criterion, "ignore": args.ignore, "finetune_epochs": args.finetune_epochs,
           "distill": args.distill, "delta_max": args.delta_max, "rounds_ms": {k: v["rounds_ms"] for k, v in var.items()},
           "seconds": time.time() - start, "stop_reason": report["stop_reason"], "rounds": report["rounds"],
           "test_top1": {k: v["top1"] for k, v in var.items()}, "val_top1": {k: v["val_top1"] for k, v in var.items()},
           "latency_ms": {k: v["latency_ms"] for k, v in var.items()},
           "hqp_vs_quantize_only": var["quantize_only_int8"]["latency_ms"] / var["hqp_int8"]["latency_ms"],
           "final_drop_test": acc["final_drop"], "final_drop_val": acc["validation"]["final_drop"],
           "macs_reduction": report["compression"]["macs_reduction"], "latency_model": report["latency_model"],
           "float_layers": report["quantization"]["float_layers"], "machine": report["machine"],
           "versions": report["versions"], "command": " ".join(sys.argv)}
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    write_json(out, rows + [row])  # a list: one entry per run
    log(f"{args.select}: {len([r for r in report['rounds'] if r['accepted']])} accepted rounds, stop: "
        f"{report['stop_reason']}; HQP INT8 {var['hqp_int8']['latency_ms']:.3f} ms vs quantize-only "
        f"{var['quantize_only_int8']['latency_ms']:.3f} ms ({row['hqp_vs_quantize_only']:.2f}x), test top-1 "
        f"{var['hqp_int8']['top1']:.2f} (dense {var['dense_fp32']['top1']:.2f}, quantize-only "
        f"{var['quantize_only_int8']['top1']:.2f}), MACs {row['macs_reduction']:.2f}x fewer")


if __name__ == "__main__":
    main()
