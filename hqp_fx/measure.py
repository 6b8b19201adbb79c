"""Measurement: ONNX Runtime latency, file size and peak memory of an ONNX file, and what machine and software
produced a figure."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from .core import HQPError

__all__ = ["measure_onnx", "measure_alternating", "measure_interleaved", "paired_ratio", "machine_description",
           "versions"]

_CHILD = Path(__file__).with_name("ort_timing_child.py")


def measure_onnx(path: str | os.PathLike, input_shape: tuple[int, ...], *, threads: int = 2, warmup: int = 10,
                 runs: int = 100) -> dict:
    """ONNX Runtime CPU latency (median of ``runs`` after ``warmup``, fixed threads), file size and peak memory.

    Runs in a fresh process so the peak resident memory (Linux VmHWM) is this model's alone: ``session_rss_mb`` is
    the growth from loading and running the session, ``peak_rss_mb`` includes Python and ONNX Runtime themselves.
    """
    stats = _run_child(str(path), input_shape, threads, warmup, runs)
    stats.update(size_mb=Path(path).stat().st_size / 2**20, threads=threads, runs=runs, warmup=warmup)
    return stats


def _run_child(path: str | list[str], input_shape: tuple[int, ...], threads: int, warmup: int, runs: int) -> dict:
    args = json.dumps([path, list(input_shape), threads, warmup, runs])
    proc = subprocess.run([sys.executable, str(_CHILD), args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HQPError(f"measuring {path} in ONNX Runtime failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_alternating(paths: dict[str, Path], input_shape: tuple[int, ...], *, threads: int = 2, runs: int = 100,
                        rounds: int = 3) -> dict[str, dict]:
    """``measure_onnx`` of every file, in ``rounds`` rounds alternating between them; per file the stats of its
    median round, plus ``rounds_ms``. On a shared VM one measurement of an unchanged file moves by tens of percent
    (benchmarks/RESULTS.md); alternating spreads a slow spell over every file instead of one."""
    results: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            results[name].append(measure_onnx(path, input_shape, threads=threads, runs=runs))
    out = {}
    for name, stats in results.items():
        middle = sorted(stats, key=lambda st: st["median_ms"])[len(stats) // 2]
        out[name] = {**middle, "rounds_ms": [st["median_ms"] for st in stats]}
    return out


def measure_interleaved(paths: dict[str, Path], input_shape: tuple[int, ...], *, threads: int = 2, warmup: int = 10,
                        runs: int = 100, rounds: int = 3) -> dict[str, list[float]]:
    """Each file's median ms in each of ``rounds`` rounds; a round is one fresh process that runs the files' sessions
    in turn, run by run, on one shared thread pool (``ort_timing_child.interleaved``).

    For judging a ratio, not for reporting a file's own time: the sessions share caches and threads. Blocks of runs
    in separate processes, as ``measure_alternating`` times them, sit seconds apart, and a shared VM can change
    speed in between; timed run by run, a pair's ratio varied about a tenth as much from one measurement to the
    next, and took less time (benchmarks/process_states.py; benchmarks/RESULTS.md, "The loop's pair timed run by
    run on one thread pool")."""
    names = list(paths)
    out: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        stats = _run_child([str(paths[name]) for name in names], input_shape, threads, warmup, runs)
        for name, ms in zip(names, stats["median_ms"]):
            out[name].append(ms)
    return out


def paired_ratio(numerator_ms: list[float], denominator_ms: list[float]) -> float:
    """One file's time over another's, timed in the same rounds (``measure_alternating``'s or
    ``measure_interleaved``'s): the median over the rounds of their ratio in the same round. A slow spell that hits
    both files of a round cancels out; the ratio of the two medians does not pair them, and after a minute of
    training it read one ResNet-56 cut 24.5% off where this stayed within 2.3%
    (benchmarks/paired_timing.py; benchmarks/RESULTS.md, "The loop's latency ratio")."""
    if not numerator_ms or len(numerator_ms) != len(denominator_ms):
        raise ValueError(f"paired_ratio needs one time per round for both files, got {len(numerator_ms)} and "
                         f"{len(denominator_ms)}")
    return statistics.median(n / d for n, d in zip(numerator_ms, denominator_ms))


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torchao

    import hqp_fx

    return {"hqp_fx": getattr(hqp_fx, "__version__", "0.1.0"), "torch": torch.__version__,
            "torchao": torchao.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}
