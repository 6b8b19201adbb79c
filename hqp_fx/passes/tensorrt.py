"""Numerical verification of exported models with Polygraphy, and the TensorRT INT8 engine.

An exported model is only worth shipping if it computes what the PyTorch model computes, so
``verify_onnx`` runs both on the same real inputs through Polygraphy's ``Comparator``: the
PyTorch module on CPU (our own runner; Polygraphy's ``PytRunner`` moves everything to CUDA) and
ONNX Runtime at the optimisation level deployment uses. ``build_tensorrt_engine`` builds an
explicitly quantized INT8 engine from the Q/DQ ONNX (TensorRT reads the scales from the graph,
so no calibrator) and compares it against ONNX Runtime. TensorRT is optional: every ``tensorrt``
import is inside a function, and without TensorRT or a CUDA GPU the engine step reports why it
did not run instead of failing.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import HQPError, atomic_write_bytes

__all__ = [
    "TOLERANCES",
    "TensorRTResult",
    "Verification",
    "VerificationError",
    "build_tensorrt_engine",
    "tensorrt_unavailable_reason",
    "verify_onnx",
]

# backend kind -> (atol as a fraction of the reference output's max |value|, rtol).
# The check is Polygraphy's element-wise one: an element fails when it is off by more than atol AND by more
# than rtol * |reference element|. Since |reference element| <= max |reference|, an rtol no larger than the
# atol fraction never loosens the check: atol governs, and it scales with the output's range.
#
# Measured on this machine (2-core x86 CPU, torch 2.14.1, onnxruntime 1.32.0, polygraphy 0.53.6, dynamo export at
# opset 18) as max |ORT - PyTorch| / max |PyTorch| over all logits of all samples:
#   fp32:  trained CIFAR ResNet-20 (resnet20-12fca82f.th): 6.3e-7 (2048 random-normal samples), 4.3e-7 (512 CIFAR
#          test images); trained ResNet-56: 6.8e-7 (512 random normal); random-weight torchvision ResNet-18 1.5e-6,
#          ResNet-50 9.7e-7, MobileNetV2 3.8e-6 (224x224, 16-32 random-normal samples). Worst 3.8e-6.
#   int8-onnxruntime: torchao pt2e INT8 (per-tensor symmetric activations, per-channel symmetric weights, MinMax
#          observers) of the trained ResNet-20. ORT with all optimisations runs integer kernels whose float
#          accumulation order differs from PyTorch's simulated quantization, so values near a rounding boundary land
#          on the neighbouring int8 level and the flips propagate through the net. Random-normal inputs, five
#          calibrations of 64-512 samples, 512 samples each: 2.3%-3.4% (top-1 agreement 97.7%-98.8%); 2048 samples:
#          2.7%; CIFAR test images (calibrated on other test images): 2.1% (resnet20_cifar10jpeg.pt: 1.5%), top-1
#          agreement 99.2%-99.4%; random-weight ResNet-18 at 224x224: 2.6%. Worst 3.4%. (ORT with optimisations off,
#          i.e. float Q/DQ simulation, gives 0 to 2.3%: the same flips, from float summation order alone; more
#          calibration data widens the ranges, coarsens the steps and raises the error.)
#   int8-tensorrt: NOT measured (no TensorRT and no GPU here). TensorRT's integer kernels are compared with ORT without
#          graph optimisations (the Q/DQ graph as written), the same situation as ORT's integer kernels against
#          PyTorch above, so it gets the same tolerance; remeasure on a GPU machine.
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (2e-5, 2e-5),              # ~5x the worst of 3.8e-6 (float kernels differ across CPUs)
    "int8-onnxruntime": (0.08, 0.08),  # ~2.4x the worst of 3.4%; a wrong weight or scale gives tens of %
    "int8-tensorrt": (0.08, 0.08),     # unmeasured; see above
}

# Which ONNX Runtime optimisation level plays each role. verify_onnx checks what deployment runs, and ORT's
# default (ORT_ENABLE_ALL) is what an InferenceSession uses unless told otherwise; for INT8 that means the
# integer kernels. As the reference for TensorRT, ORT runs with no optimisations: the Q/DQ graph as written.
_ORT_LEVEL = {"fp32": "ORT_ENABLE_ALL", "int8-onnxruntime": "ORT_ENABLE_ALL", "int8-tensorrt": "ORT_DISABLE_ALL"}


class VerificationError(HQPError):
    """Verification cannot run on these arguments; the message names the problem and the fix."""


@dataclass
class Verification:
    """Outcome of one candidate-vs-reference comparison over every sample of every batch.

    ``max_abs_error`` is max |candidate - reference| over all outputs and samples; ``max_rel_error`` is that
    divided by max |reference| over the same (a relative error of the output's range, not per element, which
    would explode near zero). ``atol`` is the absolute tolerance actually applied (the TOLERANCES fraction
    times max |reference|). ``top1_agreement`` is the fraction of samples whose argmax agrees, for a first
    output shaped [N, C] with C > 1, else None.
    """

    reference: str
    candidate: str
    passed: bool
    max_abs_error: float
    max_rel_error: float
    atol: float
    rtol: float
    top1_agreement: float | None
    samples: int

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.2%}"
        return (f"{self.candidate} vs {self.reference}: {verdict} max abs {self.max_abs_error:.2g} "
                f"(atol {self.atol:.2g}), max rel {self.max_rel_error:.2g} (rtol {self.rtol:.2g}){top1}, "
                f"{self.samples} samples")


@dataclass
class TensorRTResult:
    """What the TensorRT step did: ``ran`` False with ``reason`` when TensorRT or a GPU is missing."""

    ran: bool
    reason: str
    engine_path: Path | None
    verification: Verification | None


def tensorrt_unavailable_reason() -> str | None:
    """None when `import tensorrt` works and torch.cuda.is_available(); else the reason string."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 -- ImportError, or a broken install failing to load its libraries
        return f"TensorRT: not run (import tensorrt failed: {exc})"
    if not torch.cuda.is_available():
        return "TensorRT: not run (no CUDA GPU: torch.cuda.is_available() is False)"
    return None


# ----------------------------------------------------------------------------------------------------------
# Inputs and the ONNX signature


@dataclass(frozen=True)
class _Signature:
    input_name: str
    input_shape: tuple[int | str | None, ...]  # int, or a dim_param name / None where dynamic
    input_dtype: np.dtype
    output_names: tuple[str, ...]


def _read_signature(onnx_path: Path) -> _Signature:
    import onnx

    if not onnx_path.is_file():
        raise VerificationError(f"ONNX file {onnx_path} does not exist; export the model first "
                                "(hqp_fx.passes.onnx.export_onnx or torch.onnx.export) and pass its path")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 -- protobuf's DecodeError, or OSError; both mean: not usable
        raise VerificationError(f"{onnx_path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
                                "re-export it") from None
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(graph_inputs) != 1:
        raise VerificationError(f"{onnx_path} has inputs {[i.name for i in graph_inputs]}; verification feeds one "
                                "input tensor per batch, so export the model with exactly one input")
    inp = graph_inputs[0]
    tensor_type = inp.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    return _Signature(inp.name, shape, dtype, tuple(o.name for o in model.graph.output))


def _feeds(sig: _Signature, inputs: Sequence[torch.Tensor], onnx_path: Path) -> list[OrderedDict[str, np.ndarray]]:
    """One ``{input_name: array}`` feed per batch, after checking every batch against the ONNX input."""
    if isinstance(inputs, torch.Tensor):
        raise VerificationError("inputs must be a sequence of batch tensors, got one tensor; pass [x]")
    if len(inputs) == 0:
        raise VerificationError("inputs is empty; pass at least one batch tensor shaped like the ONNX input "
                                f"{sig.input_name} {list(sig.input_shape)}")
    feeds = []
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise VerificationError(f"inputs[{i}] is a {type(x).__name__}, not a torch.Tensor")
        ok = x.ndim == len(sig.input_shape) and all(
            not isinstance(d, int) or d == s for d, s in zip(sig.input_shape, x.shape))
        if not ok:
            raise VerificationError(
                f"inputs[{i}] has shape {list(x.shape)} but {onnx_path.name} input {sig.input_name!r} expects "
                f"{list(sig.input_shape)} (names/None are dynamic); pass batches of that shape, or re-export "
                "with a dynamic batch dimension")
        array = np.ascontiguousarray(x.detach().cpu().numpy().astype(sig.input_dtype, copy=False))
        feeds.append(OrderedDict([(sig.input_name, array)]))
    return feeds


# ----------------------------------------------------------------------------------------------------------
# Polygraphy plumbing


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Polygraphy logs every runner start and iteration at INFO; keep warnings and errors, uncoloured (colouring
    needs the optional `colored` package and otherwise prints a note about it)."""
    from polygraphy.logger import G_LOGGER

    colors = G_LOGGER.colors
    G_LOGGER.colors = False
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            yield
    finally:
        G_LOGGER.colors = colors


def _make_torch_runner(model: torch.nn.Module, sig: _Signature, name: str):
    """A Polygraphy runner for a PyTorch module on CPU (subclassed here so polygraphy imports lazily)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchCpuRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name)

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            meta.add(sig.input_name, dtype=sig.input_dtype, shape=sig.input_shape)
            return meta

        def infer_impl(self, feed_dict):
            x = torch.from_numpy(np.ascontiguousarray(feed_dict[sig.input_name]))
            start = time.perf_counter()
            with torch.no_grad():
                out = model(x)
            self.inference_time = time.perf_counter() - start
            leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            if len(leaves) != len(sig.output_names):
                raise VerificationError(
                    f"the reference model returns {len(leaves)} tensors but the ONNX model has outputs "
                    f"{list(sig.output_names)}; verify the ONNX file against the model it was exported from")
            return OrderedDict((n, t.detach().cpu().numpy()) for n, t in zip(sig.output_names, leaves))

    return TorchCpuRunner()


def _ort_runner(onnx_path: Path, level: str, name: str):
    import onnxruntime
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    try:
        with _quiet():
            session = SessionFromOnnx(str(onnx_path), providers=["cpu"],
                                      graph_optimization_level=getattr(onnxruntime.GraphOptimizationLevel, level))()
    except Exception as exc:  # noqa: BLE001 -- ORT's own exception classes (InvalidGraph, Fail, ...)
        raise VerificationError(f"ONNX Runtime cannot load {onnx_path} ({type(exc).__name__}: {exc}); "
                                "re-export the model with an opset ONNX Runtime supports") from None
    return OnnxrtRunner(session, name=name)


def _compare(candidate, reference, feeds, tolerance: tuple[float, float]) -> Verification:
    """Run candidate and reference through Polygraphy's Comparator and judge with its element-wise check.

    The candidate runs first so that Polygraphy's relative difference is taken against the reference.
    """
    from polygraphy.comparator import Comparator
    from polygraphy.exception import PolygraphyException

    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:  # polygraphy < 0.53 only has the factory
        from polygraphy.comparator import CompareFunc

        SimpleCompareFunc = CompareFunc.simple

    with _quiet():
        try:
            results = Comparator.run([candidate, reference], data_loader=feeds)
        except PolygraphyException as exc:
            raise VerificationError(f"Polygraphy could not run {candidate.name} vs {reference.name}: {exc}") from None
        cand_out = [dict(it.items()) for it in results[0][1]]
        ref_out = [dict(it.items()) for it in results[1][1]]

        # Our own statistics: max abs error over everything, and argmax agreement of a [N, C] first output.
        max_abs, max_ref, agree, total = 0.0, 0.0, 0, 0
        for c_it, r_it in zip(cand_out, ref_out):
            for i, (name, ref) in enumerate(r_it.items()):
                cand = c_it.get(name)
                if cand is None or cand.shape != ref.shape:
                    raise VerificationError(
                        f"output {name!r}: {candidate.name} gives {None if cand is None else list(cand.shape)}, "
                        f"{reference.name} gives {list(ref.shape)}; the ONNX model does not match the reference model")
                diff = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
                max_abs = max(max_abs, float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)))
                max_ref = max(max_ref, float(np.abs(ref).max(initial=0.0)))
                if i == 0 and ref.ndim == 2 and ref.shape[1] > 1:
                    agree += int((cand.argmax(1) == ref.argmax(1)).sum())
                    total += ref.shape[0]

        frac, rtol = tolerance
        atol = frac * max_ref if max_ref > 0 else frac
        accuracy = Comparator.compare_accuracy(
            results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise"))
        passed = bool(accuracy)

    samples = sum(a.shape[0] if a.ndim else 1 for f in feeds for a in f.values())  # one input per feed
    return Verification(
        reference=reference.name, candidate=candidate.name, passed=passed, max_abs_error=max_abs,
        max_rel_error=max_abs / max_ref if max_ref > 0 else max_abs, atol=atol, rtol=rtol,
        top1_agreement=agree / total if total else None, samples=samples)


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def verify_onnx(onnx_path: str | os.PathLike, reference_model: torch.nn.Module, inputs: Sequence[torch.Tensor], *,
                kind: str) -> Verification:
    """Polygraphy Comparator: a custom PyTorch CPU runner vs polygraphy's ONNX Runtime runner on real inputs.

    ``kind`` is "fp32" (float export vs the float model) or "int8-onnxruntime" (Q/DQ export vs the PyTorch
    pt2e-quantized model); it picks the tolerance from TOLERANCES. Both run ONNX Runtime at its default level,
    all graph optimisations, because that is what deployment runs (for INT8: the integer kernels). Each element
    of ``inputs`` is one batch shaped like the ONNX input. The reference model runs as given, under no_grad:
    put it in eval mode first.
    """
    if kind not in ("fp32", "int8-onnxruntime"):
        raise VerificationError(f"kind must be 'fp32' or 'int8-onnxruntime', got {kind!r} "
                                "(TensorRT is verified by build_tensorrt_engine)")
    onnx_path = Path(onnx_path)
    sig = _read_signature(onnx_path)
    feeds = _feeds(sig, inputs, onnx_path)
    candidate = _ort_runner(onnx_path, _ORT_LEVEL[kind], "onnxruntime")
    reference = _make_torch_runner(reference_model, sig, "pytorch")
    return _compare(candidate, reference, feeds, TOLERANCES[kind])


def _profile(sig: _Signature, feeds: list[OrderedDict[str, np.ndarray]]) -> list[Any] | None:
    """An optimisation profile spanning the given batch shapes when the ONNX input has dynamic dimensions."""
    if all(isinstance(d, int) for d in sig.input_shape):
        return None
    from polygraphy.backend.trt import Profile

    shapes = np.array([f[sig.input_name].shape for f in feeds])
    lo, hi = tuple(int(v) for v in shapes.min(0)), tuple(int(v) for v in shapes.max(0))
    return [Profile().add(sig.input_name, min=lo, opt=hi, max=hi)]


def build_tensorrt_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                          inputs: Sequence[torch.Tensor], *, int8: bool = True) -> TensorRTResult:
    """When TensorRT + GPU exist: build (explicit quantization from the QDQ ONNX, no calibrator) through Polygraphy,
    save the .engine atomically, compare TensorRT against ONNX Runtime on `inputs`. Otherwise ran=False with the reason.

    The arguments are checked first (missing ONNX, empty inputs, wrong shapes raise VerificationError), so a
    pipeline fails the same way on a machine without TensorRT. Without TensorRT or a GPU nothing is written.
    The reference is ONNX Runtime with no graph optimisations, i.e. the Q/DQ graph as written, judged with
    TOLERANCES["int8-tensorrt"] (TOLERANCES["fp32"] for an ``int8=False`` float engine, built without TF32).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    sig = _read_signature(onnx_path)
    feeds = _feeds(sig, inputs, onnx_path)
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        return TensorRTResult(ran=False, reason=reason, engine_path=None, verification=None)

    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        EngineFromBytes,
        NetworkFromOnnxPath,
        TrtRunner,
    )
    from polygraphy.exception import PolygraphyException

    # int8=True only permits INT8 kernels; where they run is fixed by the Q/DQ nodes (explicit quantization).
    config = CreateConfig(int8=int8, profiles=_profile(sig, feeds))
    with _quiet():
        try:
            engine_bytes = EngineBytesFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config)()
        except PolygraphyException as exc:
            raise VerificationError(f"TensorRT could not build an engine from {onnx_path}: {exc}; see the TensorRT "
                                    "log above for the unsupported layer") from None
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(engine_path, bytes(engine_bytes))

    kind = "int8-tensorrt" if int8 else "fp32"
    candidate = TrtRunner(EngineFromBytes(bytes(engine_bytes)), name="tensorrt")
    reference = _ort_runner(onnx_path, _ORT_LEVEL["int8-tensorrt"], "onnxruntime")
    verification = _compare(candidate, reference, feeds, TOLERANCES[kind])
    return TensorRTResult(ran=True, reason=f"TensorRT: ran ({'INT8' if int8 else 'FP32'} engine)",
                          engine_path=engine_path, verification=verification)
