"""Trace + dependency analysis + pruning of 30% of every prunable group: hqp_fx vs Torch-Pruning.

Both tools run in this one process on the same models, input and random-index policy.
hqp_fx's time includes its own deep copy of the model (it never mutates the input);
Torch-Pruning prunes in place, so it gets a fresh copy outside its timer.

    python benchmarks/analysis_speed.py [--repeats 5] [--size 224] [--models resnet50 ...]

Needs the bench extra: pip install -e '.[dev,bench]'.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings

import torch
import torchvision

import hqp_fx
from hqp_fx import meta
from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass

MODELS = ["resnet50", "densenet121", "efficientnet_b0", "mobilenet_v3_large"]
FRACTION = 0.3


def hqp_once(model, x, seed):
    t0 = time.perf_counter()
    gm = hqp_fx.trace(model, x)
    t1 = time.perf_counter()
    ChannelDependencyPass()(gm)
    t2 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    plan = {g.id: torch.randperm(g.size, generator=gen)[: int(FRACTION * g.size)].tolist()
            for g in meta.channel_groups(gm) if g.prunable and int(FRACTION * g.size) > 0}
    pruned = PruneChannelsPass(plan)(gm).graph_module
    t3 = time.perf_counter()
    return (t1 - t0, t2 - t1, t3 - t2), pruned


def tp_once(model, x, seed, classifier):
    import torch_pruning as tp

    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    t1 = time.perf_counter()
    for group in dg.get_all_groups(ignored_layers=[classifier]):
        n = len(group[0].idxs)
        k = int(FRACTION * n)
        if k > 0:
            group.prune(idxs=torch.randperm(n, generator=gen)[:k].tolist())
    t2 = time.perf_counter()
    return (t1 - t0, t2 - t1), model


def classifier_of(model):
    last = None
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    return last


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--models", nargs="*", default=MODELS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    x = torch.randn(1, 3, args.size, args.size)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"input {tuple(x.shape)}, median of {args.repeats} after 1 warm-up")
    print("| model | hqp_fx trace | analysis | prune | hqp_fx total | TP build_dependency | TP prune | TP total | hqp_fx / TP | params left hqp_fx / TP |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = torchvision.models.get_model(name, weights=None).eval()
        n_params = sum(p.numel() for p in base.parameters())
        hqp_times, tp_times = [], []
        for r in range(args.repeats + 1):
            (tt, ta, tpn), pruned = hqp_once(base, x, r)
            m = copy.deepcopy(base)
            (tb, tpp), tp_model = tp_once(m, x, r, classifier_of(m))
            if r:
                hqp_times.append((tt, ta, tpn))
                tp_times.append((tb, tpp))
        with torch.no_grad():
            assert pruned(x).shape == base(x).shape and tp_model(x).shape == base(x).shape
        med = lambda rows, i: statistics.median(row[i] for row in rows)  # noqa: E731
        h = [med(hqp_times, i) for i in range(3)]
        t = [med(tp_times, i) for i in range(2)]
        left_h = sum(p.numel() for p in pruned.parameters()) / n_params
        left_t = sum(p.numel() for p in tp_model.parameters()) / n_params
        print(f"| {name} | {h[0]:.3f}s | {h[1]:.3f}s | {h[2]:.3f}s | {sum(h):.3f}s | {t[0]:.3f}s | {t[1]:.3f}s | "
              f"{sum(t):.3f}s | {sum(h) / sum(t):.2f}x | {left_h:.1%} / {left_t:.1%} |", flush=True)


if __name__ == "__main__":
    main()
