"""From a float model to shipped, verified artifacts: FP32 + INT8 ONNX, Polygraphy verification, the TensorRT
engine where TensorRT exists, accuracy, ONNX Runtime latency, file size and peak memory.

Everything is written into a staging folder next to ``out`` and renamed into place at the end, so an
interrupted or failed run never leaves a half-written output folder.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .core import HQPError, atomic_write_text
from .passes.onnx import check_tensorrt_rules, export_onnx
from .passes.quantize import QuantConfig, QuantizeResult, hybrid_quantize, quantize, take_samples
from .passes.tensorrt import build_tensorrt_engine, verify_onnx
from .train import evaluate

__all__ = ["OrtModel", "measure_onnx", "measure_alternating", "ship_quantized", "ShipResult", "machine_description",
           "stage_output"]


class OrtModel(torch.nn.Module):
    """An ONNX file behind the nn.Module call interface, so ``train.evaluate`` scores what actually ships.

    A static-batch model is fed in slices of its batch size, the last one padded.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 2):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        dim0 = self.session.get_inputs()[0].shape[0]
        self.batch = dim0 if isinstance(dim0, int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for piece in (x.split(self.batch) if self.batch else (x,)):
            n = len(piece)
            if self.batch and n < self.batch:  # the last slice: padded to the static batch, the padding dropped
                piece = torch.cat([piece, piece.new_zeros((self.batch - n, *piece.shape[1:]))])
            outs.append(self.session.run(None, {self.input_name: piece.numpy()})[0][:n])
        return torch.from_numpy(np.concatenate(outs))


_MEASURE = """
import json, sys, time
import numpy as np, onnxruntime as ort

def status(key):  # kB from /proc/self/status (Linux)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

path, shape, threads, warmup, runs = json.loads(sys.argv[1])
# the peak RSS counter survives fork+exec from the (large) parent; reset it to this process's own pages first
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
options = ort.SessionOptions(); options.intra_op_num_threads = threads; options.inter_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
for _ in range(warmup):
    session.run(None, feed)
times = []
for _ in range(runs):
    t = time.perf_counter(); session.run(None, feed); times.append(time.perf_counter() - t)
peak = status("VmHWM:")
print(json.dumps({"median_ms": 1e3 * float(np.median(times)), "p90_ms": 1e3 * float(np.percentile(times, 90)),
                  "peak_rss_mb": peak / 1024, "session_rss_mb": (peak - before) / 1024}))
"""


def measure_onnx(path: str | os.PathLike, input_shape: tuple[int, ...], *, threads: int = 2, warmup: int = 10,
                 runs: int = 100) -> dict:
    """ONNX Runtime CPU latency (median of ``runs`` after ``warmup``, fixed threads), file size and peak memory.

    Runs in a fresh process so the peak resident memory (Linux VmHWM) is this model's alone: ``session_rss_mb`` is
    the growth from loading and running the session, ``peak_rss_mb`` includes Python and ONNX Runtime themselves.
    """
    args = json.dumps([str(path), list(input_shape), threads, warmup, runs])
    proc = subprocess.run([sys.executable, "-c", _MEASURE, args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HQPError(f"measuring {path} in ONNX Runtime failed: {proc.stderr.strip().splitlines()[-1:]}")
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    stats.update(size_mb=Path(path).stat().st_size / 2**20, threads=threads, runs=runs, warmup=warmup)
    return stats


def measure_alternating(paths: dict[str, Path], input_shape: tuple[int, ...], *, threads: int = 2, runs: int = 100,
                        rounds: int = 3) -> dict[str, dict]:
    """``measure_onnx`` of every file, in ``rounds`` rounds alternating between them; per file the stats of its
    median round, plus ``rounds_ms``. On a shared 2-core VM one measurement of an unchanged file moved by 20-40%
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


class stage_output:  # noqa: N801 - used as a context manager, reads like a function
    """A staging folder renamed to ``out`` on success and removed on failure; refuses a non-empty ``out``.

    The staging folder ``.<out>.partial-*`` records its process id, so a later run for the same ``out`` removes
    the ones a killed run left (and leaves a live run's alone). It gets the mode a plain ``mkdir`` would (umask).
    """

    OWNER = ".hqp_owner"

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)

    def __enter__(self) -> Path:
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise HQPError(f"output folder {self.out} already exists and is not empty; pick a new --out or remove it")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._remove_abandoned()
            self.stage = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.stage, 0o777 & ~umask)
            (self.stage / self.OWNER).write_text(str(os.getpid()))
        except OSError as exc:  # permission, read-only file system, full disk
            raise HQPError(f"cannot write the output folder {self.out}: {exc.strerror} ({exc.filename}); pick an "
                           "--out in a folder you can write to") from None
        return self.stage

    def _remove_abandoned(self) -> None:
        for old in self.out.parent.glob(f".{glob.escape(self.out.name)}.partial-*"):
            try:
                os.kill(int((old / self.OWNER).read_text()), 0)  # signal 0 only asks whether the process exists
            except PermissionError:  # it exists, under another user
                continue
            except (OSError, ValueError):  # no owner file, or its process is gone: a killed run's leftovers
                shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            return
        (self.stage / self.OWNER).unlink(missing_ok=True)
        try:
            if self.out.exists():
                self.out.rmdir()  # an empty folder we were allowed to fill; a non-empty one raises
            os.replace(self.stage, self.out)
        except OSError:
            raise HQPError(f"{self.out} was created by something else while this run was going, so the results "
                           f"were left in {self.stage}; move them into place yourself") from None


@dataclass
class ShipResult:
    quantized: QuantizeResult
    report: dict


def _verification_dict(v) -> dict:
    return {"passed": v.passed, "max_abs_error": v.max_abs_error, "max_rel_error": v.max_rel_error, "atol": v.atol,
            "rtol": v.rtol, "top1_agreement": v.top1_agreement, "samples": v.samples, "summary": v.summary()}


def onnxruntime_top1(example: torch.Tensor, evaluation: Iterable, threads: int = 2,
                     dynamic_batch: bool = False) -> Callable[[torch.nn.Module], float]:
    """Top-1 of a model exported to ONNX and run in ONNX Runtime: how the hybrid fallback judges a candidate.

    PyTorch's reference INT8 model is not what ships: on a ResNet-56 it scored 88.38 where ORT ran the same
    file at 88.28 (benchmarks/RESULTS.md), enough to let an over-budget model through.
    """
    evaluation = [(x, y) for x, y in evaluation]

    def top1(model: torch.nn.Module) -> float:
        with tempfile.TemporaryDirectory(prefix="hqp_candidate_") as tmp:
            path = Path(tmp) / "candidate.onnx"
            export_onnx(model, (example,), path, dynamic_batch=dynamic_batch)
            return evaluate(OrtModel(path, threads), evaluation)["top1"]
    return top1


def ship_quantized(model: torch.nn.Module, example: torch.Tensor, calibration: Iterable, evaluation: Iterable,
                   config: QuantConfig, stage: Path, *, max_drop: float | None = None,
                   validation: Iterable | None = None, dynamic_batch: bool = False, threads: int = 2, runs: int = 100,
                   progress: Callable[[str], None] = lambda msg: None) -> ShipResult:
    """Quantize ``model`` and write model_fp32.onnx, model_int8.onnx (+ engine) and measurements into ``stage``.

    ``max_drop`` (top-1 points) turns on the hybrid fallback: the most sensitive layers stay in floating point
    until the INT8 top-1 on ``validation``, run in ONNX Runtime like the shipped file, is within ``max_drop`` of
    FP32. ``evaluation`` (the test split) is only reported; the report gives both splits' accuracies. Without
    ``validation`` the fallback judges on ``evaluation``, which then is not an independent test.
    """
    model = model.eval()
    calibration = take_samples(calibration, config.num_samples)
    evaluation = list(evaluation)
    validation = list(validation) if validation is not None else None
    progress("evaluating the FP32 model")
    fp32_acc = evaluate(model, evaluation)
    progress(f"calibrating ({config.calibration}, {config.num_samples} samples, backend {config.backend})")
    if max_drop is not None:
        judged = validation if validation is not None else evaluation
        result = hybrid_quantize(model, example, calibration, config, max_drop=max_drop,
                                 evaluate=onnxruntime_top1(example, judged, threads, dynamic_batch))
    else:
        result = quantize(model, example, calibration, config)
    progress("exporting ONNX (FP32 and INT8 Q/DQ)")
    fp32_path, int8_path = stage / "model_fp32.onnx", stage / "model_int8.onnx"
    export_onnx(model, (example,), fp32_path, dynamic_batch=dynamic_batch)
    export_onnx(result.model, (example,), int8_path, dynamic_batch=dynamic_batch)
    probe = [x[: example.shape[0]] for x in calibration[:4]] if not dynamic_batch else calibration[:4]
    progress("verifying with Polygraphy (ONNX Runtime vs PyTorch)")
    verification = {"fp32": _verification_dict(verify_onnx(fp32_path, model, probe, kind="fp32")),
                    "int8": _verification_dict(verify_onnx(int8_path, result.model, probe, kind="int8-onnxruntime"))}
    violations = check_tensorrt_rules(int8_path, allow_dynamic_batch=dynamic_batch)
    progress("TensorRT engine")
    trt = build_tensorrt_engine(int8_path, stage / "model_int8.engine", probe)
    progress("scoring the shipped INT8 ONNX model and measuring latency")
    int8_acc = evaluate(OrtModel(int8_path, threads), evaluation)
    on_validation = None if validation is None else {
        "fp32": evaluate(model, validation), "int8_onnxruntime": evaluate(OrtModel(int8_path, threads), validation)}
    shape = tuple(example.shape)
    latency = {"fp32": measure_onnx(fp32_path, shape, threads=threads, runs=runs),
               "int8": measure_onnx(int8_path, shape, threads=threads, runs=runs)}
    report = {
        "backend": config.backend, "calibration": config.calibration, "calibration_samples": result.samples,
        "accuracy": {"fp32": fp32_acc, "int8_onnxruntime": int8_acc,
                     "top1_drop": fp32_acc["top1"] - int8_acc["top1"],
                     **({"validation": on_validation} if on_validation else {})},
        "quantization": result.report(),
        "verification": verification,
        "tensorrt_rules": [vars(v) for v in violations] if config.backend == "tensorrt" else "not checked "
                          f"(backend {config.backend} does not target TensorRT)",
        "tensorrt": {"ran": trt.ran, "reason": trt.reason,
                     "engine": trt.engine_path.name if trt.engine_path else None,
                     "verification": _verification_dict(trt.verification) if trt.verification else None},
        "latency_onnxruntime_cpu": latency,
        "speedup_int8_vs_fp32": latency["fp32"]["median_ms"] / latency["int8"]["median_ms"],
        "input_shape": list(shape), "dynamic_batch": dynamic_batch, "machine": machine_description(),
        "versions": versions(),
    }
    lines = [verification["fp32"]["summary"], verification["int8"]["summary"],
             trt.verification.summary() if trt.verification else trt.reason]
    if config.backend == "tensorrt":
        lines.append(f"TensorRT explicit-quantization rules: {len(violations)} violation(s)")
        lines += [f"  {v.node} ({v.op_type}) {v.rule}: {v.detail}" for v in violations]
    atomic_write_text(stage / "verification.txt", "\n".join(lines) + "\n")
    return ShipResult(result, report)


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torchao

    import hqp_fx

    return {"hqp_fx": getattr(hqp_fx, "__version__", "0.1.0"), "torch": torch.__version__,
            "torchao": torchao.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def write_json(path: Path, data: dict) -> None:
    """Valid JSON or nothing: a NaN or infinity is refused rather than written as the non-JSON ``NaN``."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")
