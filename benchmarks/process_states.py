"""Is a timing's state per process? Three ways to time a pair of ONNX files against each other.

    python benchmarks/process_states.py REFERENCE.onnx CANDIDATE.onnx [--trials 10] [--blocks 5] [--runs 100]

The report times its files as ``measure_alternating`` does, and the loop timed a candidate against the dense model
that way too: each block of ``runs`` runs in a fresh ONNX Runtime process, the files alternating, the ratio read as
the median of the per-block ratios (``paired_ratio``). On one VM a file's time jumped between two levels about 1.8x
apart, and a block's ratio with it, even when the blocks of one round ran seconds apart. If the level is drawn per
process (where the scheduler places its threads, say), pairing two processes cannot cancel it; two sessions in one
process would share it.

``processes`` was the loop's way and is the report's. ``one-process`` loads both files in one fresh process per
trial and alternates blocks of ``runs`` between the two sessions, pausing ``--pause`` s between blocks so the last
session's spinning threads go idle first (ONNX Runtime's threads spin after a run; run-by-run interleaving of two
sessions with their own threads makes each pay for the other). ``interleaved`` is the loop's way now
(``measure_interleaved``): each block is a fresh process that runs the two sessions in turn, run by run, on one
global thread pool that both share, and takes each file's median. For each way it prints every block time, the
per-trial paired ratios and their spread, and the seconds the trials took.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

from hqp_fx.measure import machine_description, measure_alternating, measure_interleaved, paired_ratio, versions


def child(paths: list[str], shape: list[int], threads: int, blocks: int, runs: int, pause: float) -> None:
    """Both sessions in this process; blocks alternate between them; prints the per-block medians as JSON."""
    import onnxruntime as ort

    from hqp_fx.ort_timing_child import feed_for, timed_run  # the loop's timing program: the same feed and clock

    sessions = []
    for path in paths:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    feeds = [feed_for(s, shape) for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    for block in range(blocks + 1):  # block 0 warms both up and is dropped
        for i, (session, f) in enumerate(zip(sessions, feeds)):
            time.sleep(pause)
            runs_ms = [timed_run(session, f) for _ in range(runs if block else 10)]
            if block:
                times[i].append(float(np.median(runs_ms)))
    print(json.dumps(times))


def summary(label: str, ref: list[list[float]], cand: list[list[float]]) -> None:
    ratios = [paired_ratio(c, r) for r, c in zip(ref, cand)]
    pooled = statistics.median(c / r for rs, cs in zip(ref, cand) for r, c in zip(rs, cs))
    flat = lambda xs: [round(x, 3) for row in xs for x in row]  # noqa: E731
    print(f"\n{label}\n  reference block ms: {flat(ref)}\n  candidate block ms: {flat(cand)}")
    print(f"  per-trial paired ratio: {[round(x, 3) for x in ratios]}")
    print(f"  pooled median of every block's ratio {pooled:.3f}; trials' paired ratios {min(ratios):.3f}-"
          f"{max(ratios):.3f}, worst {max(abs(x / pooled - 1) for x in ratios):.1%} off the pooled median, "
          f"{sum(abs(x / pooled - 1) > 0.05 for x in ratios)} of {len(ratios)} trials more than 5% off")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("candidate")
    ap.add_argument("--shape", type=int, nargs="+", default=[1, 3, 32, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=5, help="blocks per file per trial (the loop's rounds)")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--pause", type=float, default=0.1, help="seconds between blocks in one process")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*json.loads(args.child))
        return
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {machine_description()}, {versions()}")
    print(f"{args.trials} trials of {args.blocks} blocks of {args.runs} runs per file, batch shape {args.shape}, "
          f"{args.threads} threads; the three ways alternate trial by trial")
    ways: dict[str, tuple[list, list]] = {"processes": ([], []), "one-process": ([], []), "interleaved": ([], [])}
    seconds = dict.fromkeys(ways, 0.0)
    pair = {"reference": args.reference, "candidate": args.candidate}
    for _ in range(args.trials):
        start = time.perf_counter()
        stats = measure_alternating(pair, tuple(args.shape), threads=args.threads, runs=args.runs, rounds=args.blocks)
        seconds["processes"] += time.perf_counter() - start
        ways["processes"][0].append(stats["reference"]["rounds_ms"])
        ways["processes"][1].append(stats["candidate"]["rounds_ms"])
        start = time.perf_counter()
        rounds_ms = measure_interleaved(pair, tuple(args.shape), threads=args.threads, runs=args.runs,
                                        rounds=args.blocks)
        seconds["interleaved"] += time.perf_counter() - start
        ways["interleaved"][0].append(rounds_ms["reference"])
        ways["interleaved"][1].append(rounds_ms["candidate"])
        start = time.perf_counter()
        spec = json.dumps([[args.reference, args.candidate], args.shape, args.threads, args.blocks, args.runs,
                           args.pause])
        out = subprocess.run([sys.executable, __file__, args.reference, args.candidate, "--child", spec],
                             capture_output=True, text=True, check=True)
        seconds["one-process"] += time.perf_counter() - start
        ref, cand = json.loads(out.stdout.strip().splitlines()[-1])
        ways["one-process"][0].append(ref)
        ways["one-process"][1].append(cand)
    for label, (ref, cand) in ways.items():
        summary(label, ref, cand)
        print(f"  {seconds[label]:.1f} s for the {args.trials} trials")


if __name__ == "__main__":
    main()
