"""How steady is the loop's latency ratio (candidate over dense, timed alongside) from one measurement to the next?

    python benchmarks/paired_timing.py --model cifar:resnet20=PATH --remove layer1.0 \
        [--trials 20] [--rounds 9] [--runs 100 400] [--batch 1]

Every accepted round of ``hqp compress`` times its candidate and the dense model as INT8 ONNX files in alternating
rounds (each round: a fresh ONNX Runtime process per file, the median of ``runs`` runs) and judges the latency
target, and the latency model's error, on their ratio. A ResNet-20 round that removed a whole block was once
timed at 1.10 of the dense model, which a spell of the VM, not the cut, explains. This script holds one cut fixed
(the residual blocks named by ``--remove``, removed whole through ``PruneChannelsPass``), quantizes both models as
the loop does (the onnxruntime preset), and measures the pair ``--trials`` times in ``--rounds`` alternating
rounds for each ``--runs`` setting (the settings alternate within a trial). From the raw rounds it computes each
estimate the loop could use, on the first k rounds for each k in ``--use``:

- ``medians``: the median round of each file, then their ratio (the loop's estimate before this script);
- ``paired``: the median of the per-round ratios (the report's estimate: a spell hitting both files in one round
  cancels);
- ``minima``: the fastest round of each file, then their ratio (noise on a quiet machine only adds time).

It prints, per setting and estimate, the spread of the estimates over the trials against the pooled median of
every per-round ratio: how far the worst trial was off, and how many were more than 5% off. The weights do not
change the timing; pass them anyway so the INT8 ranges are the checkpoint's. ``--busy`` trains for a while before
each trial, as the loop fine-tunes before it times a round.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from finetune_recipe import remove_blocks  # same folder: the fixed cut, removed as the loop removes a block
from hqp_fx.compress import onnx_latency
from hqp_fx.measure import machine_description, measure_alternating, paired_ratio, versions
from hqp_fx.models import build_model
from hqp_fx.passes.quantize import QuantConfig

ESTIMATES = {
    "medians": lambda ref, cand: statistics.median(cand) / statistics.median(ref),
    "paired": lambda ref, cand: paired_ratio(cand, ref),  # the loop's estimate since this script
    "minima": lambda ref, cand: min(cand) / min(ref),
}


def busy(model: torch.nn.Module, seconds: float) -> None:
    """Train a copy of ``model`` for ``seconds`` on random data: the state the loop's timing starts from."""
    if seconds <= 0:
        return
    net = copy.deepcopy(model).train().requires_grad_(True)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        loss = net(torch.randn(128, 3, 32, 32)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="SPEC[=WEIGHTS], e.g. cifar:resnet20=path.pt")
    ap.add_argument("--remove", nargs="+", required=True, help="residual blocks to remove whole, e.g. layer1.0")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=9, help="alternating rounds per measurement")
    ap.add_argument("--use", type=int, nargs="+", default=[3, 5, 9], help="estimate from the first k rounds")
    ap.add_argument("--runs", type=int, nargs="+", default=[100, 400], help="runs per file per round")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=float, default=0.0, help="seconds of torch training before each trial, as the "
                    "loop fine-tunes before it times a round")
    args = ap.parse_args()
    if max(args.use) > args.rounds:
        raise SystemExit(f"--use {max(args.use)} needs --rounds >= {max(args.use)}")

    spec, _, weights = args.model.partition("=")
    dense = build_model(spec, weights or None).model.eval().requires_grad_(False)
    example = torch.randn(args.batch, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    calibration = [(torch.randn(64, 3, 32, 32, generator=gen), torch.zeros(64, dtype=torch.long)) for _ in range(4)]
    cut = remove_blocks(dense, example[:1], args.remove)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {machine_description()}, {versions()}")
    print(f"{spec}: removed {' '.join(args.remove)}; batch {args.batch}, {args.threads} threads; {args.trials} "
          f"trials of {args.rounds} alternating rounds for each of runs {args.runs}; {args.busy:g} s of training "
          "before each trial")
    raw: dict[int, list[tuple[list[float], list[float], float]]] = {runs: [] for runs in args.runs}
    # the files as the loop times them: quantized with the onnxruntime preset, exported at the example's shape
    quant = QuantConfig(backend="onnxruntime", calibration="histogram", num_samples=sum(len(b) for b in calibration))
    int8_file = onnx_latency(example, args.threads, quant=quant, calibration=calibration).export
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"reference": int8_file(dense, Path(tmp) / "dense.onnx"),
                 "candidate": int8_file(cut, Path(tmp) / "cut.onnx")}
        for trial in range(args.trials):
            busy(dense, args.busy)
            order = args.runs if trial % 2 == 0 else args.runs[::-1]
            for runs in order:
                start = time.perf_counter()
                lat = measure_alternating(paths, tuple(example.shape), threads=args.threads, runs=runs,
                                          rounds=args.rounds)
                raw[runs].append((lat["reference"]["rounds_ms"], lat["candidate"]["rounds_ms"],
                                  time.perf_counter() - start))
            print(f"trial {trial}: " + "; ".join(
                f"runs {runs}: ratios " + " ".join(f"{c / r:.3f}" for r, c in zip(*raw[runs][-1][:2]))
                for runs in args.runs), flush=True)

    pooled = statistics.median(c / r for trials in raw.values() for ref, cand, _ in trials
                               for r, c in zip(ref, cand))
    print(f"\npooled median of every per-round ratio: {pooled:.3f}\n")
    print("| runs per round | rounds used | estimate | median | worst trial off the pooled median | trials > 5% off "
          "| seconds per measurement |")
    print("|---|---|---|---|---|---|---|")
    for runs, trials in raw.items():
        seconds = statistics.fmean(s for *_, s in trials)
        for k in args.use:
            for name, estimate in ESTIMATES.items():
                values = [estimate(ref[:k], cand[:k]) for ref, cand, _ in trials]
                off = [abs(v / pooled - 1) for v in values]
                print(f"| {runs} | {k} | {name} | {statistics.median(values):.3f} | {100 * max(off):.1f}% | "
                      f"{sum(o > 0.05 for o in off)} of {len(values)} | {seconds * k / args.rounds:.1f} |")


if __name__ == "__main__":
    main()
