"""From a float model to shipped, verified artifacts: FP32 + INT8 ONNX, Polygraphy verification, the TensorRT
engine where TensorRT exists, accuracy, ONNX Runtime latency, file size and peak memory.

Everything is written into a staging folder next to ``out`` (``StagedOutput``) and renamed into place at the end,
so an interrupted or failed run never leaves a half-written output folder.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .core import HQPError, atomic_write_text
from .engines.ort import OrtModel, onnxruntime_top1
from .engines.tensorrt import build_tensorrt_engine, check_tensorrt_rules
from .lower_onnx import export_onnx
from .measure import machine_description, measure_onnx, versions
from .passes.quantize import QuantConfig, QuantizeResult, hybrid_quantize, quantize, take_samples
from .train import evaluate
from .verify import verify_onnx

__all__ = ["StagedOutput", "ShipResult", "ship_quantized", "write_json"]


class StagedOutput:
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
    # the shipped INT8 model's per-image top-1 hits ("test"; "validation" when given), for paired statistics
    int8_hits: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def _verification_dict(v) -> dict:
    return {"passed": v.passed, "max_abs_error": v.max_abs_error, "max_rel_error": v.max_rel_error, "atol": v.atol,
            "rtol": v.rtol, "top1_agreement": v.top1_agreement, "samples": v.samples, "summary": v.summary()}


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
    int8_hits: dict[str, list[torch.Tensor]] = {"test": []}
    int8_acc = evaluate(OrtModel(int8_path, threads), evaluation, hits=int8_hits["test"])
    on_validation = None
    if validation is not None:
        int8_hits["validation"] = []
        on_validation = {"fp32": evaluate(model, validation),
                         "int8_onnxruntime": evaluate(OrtModel(int8_path, threads), validation,
                                                      hits=int8_hits["validation"])}
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
    return ShipResult(result, report, int8_hits)


def write_json(path: Path, data: dict) -> None:
    """Valid JSON or nothing: a NaN or infinity is refused rather than written as the non-JSON ``NaN``."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")
