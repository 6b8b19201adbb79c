"""Cost of Fisher scoring relative to a plain forward+backward pass over the same batches.

    python benchmarks/scoring_cost.py [--batches 10] [--batch-size 128]

Target (issue #4): every criterion at most ~1.3x a plain forward+backward over the same batches.
Both loops run in this process, interleaved, on the same GraphModule and the same tensors.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import hqp_fx
from hqp_fx.models import build_model
from hqp_fx.passes import ChannelDependencyPass, score_channels


def plain(gm, data):
    gm.eval()
    for x, y in data:
        gm.zero_grad(set_to_none=True)
        F.cross_entropy(gm(x), y).backward()
    gm.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=["cifar:resnet56", "torchvision:resnet18"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"# {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.batches} batches of {args.batch_size}, median of {args.repeats}")
    print("| model | input | plain fwd+bwd | fisher | group-fisher | taylor | fisher / plain | group-fisher / plain | taylor / plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec_name in args.models:
        spec = build_model(spec_name)
        size = 32 if spec_name.startswith("cifar") else 64
        gen = torch.Generator().manual_seed(0)
        data = [(torch.randn(args.batch_size, 3, size, size, generator=gen),
                 torch.randint(0, 10, (args.batch_size,), generator=gen)) for _ in range(args.batches)]
        gm = hqp_fx.trace(spec.model, data[0][0][:1])
        ChannelDependencyPass()(gm)
        runs = {"plain": lambda gm=gm, data=data: plain(gm, data)}
        for c in ("fisher", "group-fisher", "taylor"):
            runs[c] = lambda c=c, gm=gm, data=data: score_channels(gm, c, data)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats + 1):  # first round is warm-up
            for k, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        print(f"| {spec_name} | {size}x{size} | {med['plain']:.2f}s | {med['fisher']:.2f}s | {med['group-fisher']:.2f}s | "
              f"{med['taylor']:.2f}s | {med['fisher'] / med['plain']:.2f}x | {med['group-fisher'] / med['plain']:.2f}x | "
              f"{med['taylor'] / med['plain']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
