"""The timing program ``hqp_fx.measure`` runs as a script in a fresh process.

It imports only numpy and onnxruntime (not hqp_fx or torch), so the peak resident memory it reports is the
session's and ONNX Runtime's alone. Argument: a JSON list [path, input shape, threads, warmup, runs]; output: one
JSON line. With a list of paths in place of one path, it times the files against each other run by run (see
``interleaved``) and reports each file's median.
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


def feed_for(session, shape):
    return {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def timed_run(session, feed):
    t = time.perf_counter()
    session.run(None, feed)
    return 1e3 * (time.perf_counter() - t)


def alone(path, shape, threads, warmup, runs):
    # the peak RSS counter survives fork+exec from the (large) parent; reset it to this process's own pages first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = feed_for(session, shape)
    for _ in range(warmup):
        session.run(None, feed)
    times = [timed_run(session, feed) for _ in range(runs)]
    peak = status("VmHWM:")
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
            "peak_rss_mb": peak / 1024, "session_rss_mb": (peak - before) / 1024}


def interleaved(paths, shape, threads, warmup, runs):
    """Every file's session runs once per step, the order reversed after each step, all on one global thread pool.

    Runs a millisecond apart share the machine's state, which on a shared VM jumps between levels within seconds.
    Separate per-session pools would make each session pay for the other's threads, which spin after a run; one
    pool that every session uses is what a single deployed session has.
    """
    ort.set_global_thread_pool_sizes(threads, 1)  # before the first session creates the environment
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    sessions = [ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]) for path in paths]
    feeds = [feed_for(session, shape) for session in sessions]
    order = list(range(len(sessions)))
    for _ in range(warmup):
        for i in order:
            sessions[i].run(None, feeds[i])
    times = [[] for _ in sessions]
    for _ in range(runs):
        for i in order:
            times[i].append(timed_run(sessions[i], feeds[i]))
        order.reverse()
    return {"median_ms": [float(np.median(t)) for t in times]}


def main() -> None:
    path, shape, threads, warmup, runs = json.loads(sys.argv[1])
    stats = (interleaved if isinstance(path, list) else alone)(path, shape, threads, warmup, runs)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
