"""Where does ONNX Runtime spend an ONNX model's time? Kernel time per op type (and per node), from ORT's profiler.

    python benchmarks/ort_profile.py MODEL.onnx [MODEL2.onnx ...] [--batch 32] [--runs 20] [--threads 2] [--nodes]

Each file runs in its own CPU session (``--threads`` intra-op threads, all graph optimisations) on random input
of shape ``(--batch, *the file's other input dims)``: 5 warm-ups, then ``--runs`` profiled runs. The table gives
each op type's kernel time per run (ms) and its share; ``--nodes`` adds the median time of every node. Kernel
times leave out the executor's overhead between nodes, so they add up to a little less than the wall time.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

WARMUP = 5


def kernel_times(model, feeds: dict[str, np.ndarray], threads: int, runs: int) -> list[tuple[str, str, list[float]]]:
    """(node name, op type, kernel ms of each profiled run) for every node ORT ran, after WARMUP warm-up runs.

    ``model``: a path or serialised ModelProto. ORT renames fused or layout-converted nodes "<name>_token_<k>".
    """
    with tempfile.TemporaryDirectory(prefix="ort_profile_") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        for _ in range(WARMUP + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[(e["name"].removesuffix("_kernel_time"), e["args"]["op_name"])].append(e["dur"] / 1000)
    return [(name, op, durations[WARMUP:]) for (name, op), durations in per_node.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nodes", action="store_true", help="also list every node's median kernel time")
    args = ap.parse_args()
    for path in args.models:
        inp = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0]
        x = np.random.default_rng(0).random((args.batch, *inp.shape[1:]), dtype=np.float32)
        nodes = kernel_times(str(path), {inp.name: x}, args.threads, args.runs)
        by_op: dict[str, float] = collections.Counter()
        for _, op, durations in nodes:
            by_op[op] += sum(durations) / args.runs
        total = sum(by_op.values())
        print(f"\n{path} (batch {args.batch}): kernel time {total:.2f} ms per run")
        print("| op type | ms per run | share |\n|---|---|---|")
        for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1]):
            print(f"| {op} | {ms:.3f} | {100 * ms / total:.1f}% |")
        if args.nodes:
            print("\n| node | op type | median ms |\n|---|---|---|")
            for name, op, durations in nodes:
                print(f"| {name} | {op} | {statistics.median(durations):.3f} |")


if __name__ == "__main__":
    main()
