"""Which channel multiple does ONNX Runtime's CPU convolution reward? (the alignment behind ``--align auto``)

    python benchmarks/ort_channel_steps.py [--batch-sizes 1 32] [--rounds 3] [--runs 30] [--threads 2]
        [--out /tmp/ort_channel_steps.json]

For each stage of the CIFAR ResNet-56 (stream width C at spatial size S: 16@32x32, 32@16x16, 64@8x8) and each
inner width c = 8, 16, ..., C, a chain of four residual-branch pairs ``C -> c -> C`` (3x3, padding 1) is built
straight as ONNX, twice:

* ``int8``: ``QLinearConv`` nodes (uint8 activations, per-channel int8 weights), the kernels ORT runs for the
  quantized models of ``cifar_resnet56.py deploy`` (its op counts: 55 QLinearConv);
* ``fp32``: ``Conv`` nodes, what the prune-only FP32 variant runs.

Each chain runs in its own ORT session (CPU EP, ``--threads`` intra-op threads, all graph optimisations, so
ORT's own NHWC/NCHWc rewrites apply) with ORT's profiler on; a convolution's time is the median of its
per-node kernel times over ``--runs`` runs after 5 warm-ups, taken over the chain's four identical nodes.
``--rounds`` rounds interleave all configurations; the table gives the median of the round figures.

What to read: ``C -> c`` times that stay flat from c = 8 to 16 (or 24 to 32) mean the kernel computes output
channels in blocks of 16, so a pruned width that is not a multiple of 16 pays for the padding. The inputs are
random: kernel time does not depend on the values. The JSON (``--out``, written atomically) holds every figure.
"""
from __future__ import annotations

import argparse
import collections
import re
import statistics
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from hqp_fx.artifacts import write_json
from hqp_fx.measure import machine_description, versions
from ort_profile import kernel_times  # same folder

STAGES = ((16, 32), (32, 16), (64, 8))  # (stream channels C, spatial size S) of the CIFAR ResNet-56 stages
PAIRS = 4


def conv_chain(precision: str, C: int, c: int, S: int):
    """``C -> c -> C`` repeated PAIRS times; names carry (layer, in, out) so the profile can be read back."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(array, name))
        return name

    widths = [C] + [c, C] * PAIRS
    prev = "x"
    if precision == "int8":
        scale, zero = const("scale", np.array(0.05, np.float32)), const("zero", np.array(0, np.uint8))
    for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        name = out = f"conv{i}_{cin}_{cout}"  # fp32 nodes come back named after their output ("..._nchwc")
        if precision == "int8":
            w = const(f"w{i}", rng.integers(-64, 64, (cout, cin, 3, 3)).astype(np.int8))
            w_scale = const(f"ws{i}", np.full(cout, 0.01, np.float32))
            w_zero = const(f"wz{i}", np.zeros(cout, np.int8))
            bias = const(f"b{i}", np.zeros(cout, np.int32))
            inputs = [prev, scale, zero, w, w_scale, w_zero, scale, zero, bias]
            nodes.append(helper.make_node("QLinearConv", inputs, [out], pads=[1, 1, 1, 1], name=name))
        else:
            w = const(f"w{i}", rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.05)
            bias = const(f"b{i}", np.zeros(cout, np.float32))
            nodes.append(helper.make_node("Conv", [prev, w, bias], [out], pads=[1, 1, 1, 1], name=name))
        prev = out
    elem = TensorProto.UINT8 if precision == "int8" else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", elem, ["n", C, S, S])],
                              [helper.make_tensor_value_info(prev, elem, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def node_times(model, x: np.ndarray, threads: int, runs: int) -> dict[tuple[int, int], float]:
    """Median kernel time (ms) per (in, out) channel pair, from ORT's per-node profile."""
    by_pair = collections.defaultdict(list)
    for name, _, durations in kernel_times(model.SerializeToString(), {"x": x}, threads, runs):
        m = re.match(r"conv\d+_(\d+)_(\d+)", name)
        if m:
            by_pair[(int(m[1]), int(m[2]))].append(statistics.median(durations))
    return {pair: statistics.median(v) for pair, v in by_pair.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["int8", "fp32"], choices=("int8", "fp32"))
    ap.add_argument("--out", default="/tmp/ort_channel_steps.json")
    args = ap.parse_args()

    configs = [(p, b, C, c, S) for p in args.precisions for b in args.batch_sizes for C, S in STAGES
               for c in range(8, C + 1, 8)]
    rounds: dict[tuple, list[dict]] = collections.defaultdict(list)
    start = time.time()
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]  # rotate so no config always goes first
        for precision, batch, C, c, S in order:
            dtype = np.uint8 if precision == "int8" else np.float32
            x = np.random.default_rng(r).integers(0, 255, (batch, C, S, S)).astype(dtype)
            t = node_times(conv_chain(precision, C, c, S), x, args.threads, args.runs)
            rounds[(precision, batch, C, c, S)].append({"down": t[(C, c)], "up": t[(c, C)]})
        print(f"round {r + 1}/{args.rounds} done after {time.time() - start:.0f} s", flush=True)

    rows = []
    for (precision, batch, C, c, S), rs in rounds.items():
        rows.append({"precision": precision, "batch": batch, "stream": C, "inner": c, "spatial": S,
                     "down_ms": statistics.median(r["down"] for r in rs), "up_ms": statistics.median(r["up"] for r in rs),
                     "down_rounds": [r["down"] for r in rs], "up_rounds": [r["up"] for r in rs],
                     "macs_per_conv": batch * S * S * 9 * C * c})
    write_json(args.out, {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_description(),
                          "versions": versions(), "threads": args.threads, "runs": args.runs, "rounds": args.rounds,
                          "rows": rows})
    for precision in args.precisions:
        for batch in args.batch_sizes:
            print(f"\n{precision}, batch {batch}: ms per convolution (median of {args.rounds} rounds)")
            print("| stage C@S | inner c | C -> c | c -> C | C -> c per MAC vs c = C |")
            print("|---|---|---|---|---|")
            for C, S in STAGES:
                sel = [r for r in rows if (r["precision"], r["batch"], r["stream"]) == (precision, batch, C)]
                full = next(r for r in sel if r["inner"] == C)
                for r in sorted(sel, key=lambda r: r["inner"]):
                    per_mac = (r["down_ms"] / r["inner"]) / (full["down_ms"] / C)
                    print(f"| {C}@{S}x{S} | {r['inner']} | {r['down_ms']:.3f} | {r['up_ms']:.3f} | {per_mac:.2f}x |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
