"""The timing program ``hqp_fx.measure.measure_onnx`` runs as a script in a fresh process.

It imports only numpy and onnxruntime (not hqp_fx or torch), so the peak resident memory it reports is the
session's and ONNX Runtime's alone. Argument: a JSON list [path, input shape, threads, warmup, runs]; output: one
JSON line.
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def status(key):  # kB from /proc/self/status (Linux)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])


def main() -> None:
    path, shape, threads, warmup, runs = json.loads(sys.argv[1])
    # the peak RSS counter survives fork+exec from the (large) parent; reset it to this process's own pages first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    peak = status("VmHWM:")
    print(json.dumps({"median_ms": 1e3 * float(np.median(times)), "p90_ms": 1e3 * float(np.percentile(times, 90)),
                      "peak_rss_mb": peak / 1024, "session_rss_mb": (peak - before) / 1024}))


if __name__ == "__main__":
    main()
