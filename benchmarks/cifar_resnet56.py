"""HQP pruning of the real CIFAR-10 ResNet-56 on the shared JPEG data (prune stage only so far).

    python benchmarks/cifar_resnet56.py [--shared ../shared] [--criterion fisher] [--finetune-epochs 0.2]
        [--delta-max 1.0] [--target-macs 0.5] [--out DIR]

Budget stated on the command line; the defaults are CPU-affordable: each round fine-tunes for
0.2 epoch (10,000 training images, SGD lr 0.01, cosine, crop+flip) and validates on all
10,000 test images. INT8 quantization and ORT latency (issue #3) are not part of this script yet.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import hqp_fx
from hqp_fx.core import atomic_write_text
from hqp_fx.data import BatchLoader, load_split, unpack_once
from hqp_fx.hqp import HQPConfig, prune_loop
from hqp_fx.models import build_model
from hqp_fx.train import FinetuneConfig, evaluate, finetune


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--criterion", default="fisher")
    ap.add_argument("--finetune-epochs", type=float, default=0.2)
    ap.add_argument("--delta-max", type=float, default=1.0)
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--steps", type=float, nargs="+", default=[0.05, 0.02, 0.01])
    ap.add_argument("--out", default="out/cifar_resnet56")
    args = ap.parse_args()
    torch.set_num_threads(2)
    shared = Path(args.shared)
    train = load_split(unpack_once(shared / "data/cifar10-jpeg/train.tar.gz") / "train")
    test = load_split(unpack_once(shared / "data/cifar10-jpeg/test.tar.gz") / "test", classes=train.classes)
    model = build_model("cifar:resnet56", str(shared / "models/cifar-resnet/resnet56_cifar10jpeg.pt")).model
    calib = list(BatchLoader(train.subset(50), 64, shuffle=True, seed=1))[:8]
    test_loader = BatchLoader(test, 500)

    def ft(m, rnd):
        finetune(m, BatchLoader(train, 128, shuffle=True, augment=True, seed=rnd),
                 FinetuneConfig(epochs=args.finetune_epochs, lr=0.01))

    def ev(m):
        return evaluate(m, test_loader, num_classes=10)

    start = time.time()

    def log(r):
        print(f"round {r.round:2d} step {r.step:.2f} {'accept' if r.accepted else 'REJECT'} top1 {r.top1:.2f} "
              f"drop {r.drop:+.2f} MACs {r.macs / 1e6:.1f}M params {r.params / 1e3:.1f}K ({time.time() - start:.0f}s)",
              flush=True)

    config = HQPConfig(delta_max=args.delta_max, steps=tuple(args.steps), criterion=args.criterion, align=8,
                       target_macs=args.target_macs)
    res = prune_loop(model, torch.randn(1, 3, 32, 32), calibration=calib, finetune_fn=ft, evaluate_fn=ev,
                     config=config, checkpoint_dir=Path(args.out) / "checkpoints", on_round=log)
    final = ev(res.model)
    macs = hqp_fx.count_macs(res.model)
    summary = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "criterion": args.criterion, "finetune_epochs_per_round": args.finetune_epochs, "delta_max": args.delta_max,
        "baseline_top1": res.baseline["top1"], "final_top1": final["top1"], "drop": res.baseline["top1"] - final["top1"],
        "baseline_macs": res.baseline_macs, "final_macs": macs, "macs_reduction": res.baseline_macs / macs,
        "baseline_params": res.baseline_params, "final_params": hqp_fx.count_params(res.model),
        "rounds": len(res.history), "stop_reason": res.stop_reason, "seconds": time.time() - start,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    hqp_fx.save(res.model, Path(args.out) / "resnet56_pruned.hqp")
    atomic_write_text(Path(args.out) / "summary.json", json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
