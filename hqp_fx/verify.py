"""Numerical verification of exported models with Polygraphy.

An exported model is only worth shipping if it computes what the PyTorch model computes, so ``verify_onnx`` runs
both on the same real inputs through Polygraphy's ``Comparator``: the PyTorch module on CPU (our own runner;
Polygraphy's ``PytRunner`` moves everything to CUDA) and ONNX Runtime at the optimisation level deployment uses.
``hqp_fx.engines.tensorrt`` compares a TensorRT engine the same way.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .core import HQPError

__all__ = ["TOLERANCES", "ORT_LEVEL", "Verification", "VerificationError", "verify_onnx", "compare", "ort_runner",
           "read_signature", "feeds_for", "quiet", "OnnxSignature"]

# backend kind -> (atol as a fraction of the reference output's max |value|, rtol).
# The check is Polygraphy's element-wise one: an element fails when it is off by more than atol AND by more
# than rtol * |reference element|. Since |reference element| <= max |reference|, an rtol no larger than the
# atol fraction never loosens the check: atol governs, and it scales with the output's range.
#
# The values are a few times the worst ORT-vs-PyTorch error measured on trained and random-weight CNNs; the
# measurements are in benchmarks/RESULTS.md ("Figures behind constants"). INT8 differs more than FP32 because ORT's
# integer kernels round a few values near a step boundary to the neighbouring level. TensorRT is unmeasured here.
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (2e-5, 2e-5),              # float kernels differ across CPUs
    "int8-onnxruntime": (0.08, 0.08),  # a wrong weight or scale gives tens of %
    "int8-tensorrt": (0.08, 0.08),     # unmeasured: the same situation as ORT's integer kernels against PyTorch
}

# Which ONNX Runtime optimisation level plays each role. verify_onnx checks what deployment runs, and ORT's
# default (ORT_ENABLE_ALL) is what an InferenceSession uses unless told otherwise; for INT8 that means the
# integer kernels. As the reference for TensorRT, ORT runs with no optimisations: the Q/DQ graph as written.
ORT_LEVEL = {"fp32": "ORT_ENABLE_ALL", "int8-onnxruntime": "ORT_ENABLE_ALL", "int8-tensorrt": "ORT_DISABLE_ALL"}


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



# ----------------------------------------------------------------------------------------------------------
# Inputs and the ONNX signature


@dataclass(frozen=True)
class OnnxSignature:
    input_name: str
    input_shape: tuple[int | str | None, ...]  # int, or a dim_param name / None where dynamic
    input_dtype: np.dtype
    output_names: tuple[str, ...]


def read_signature(onnx_path: Path) -> OnnxSignature:
    import onnx

    if not onnx_path.is_file():
        raise VerificationError(f"ONNX file {onnx_path} does not exist; export the model first "
                                "(hqp_fx.lower_onnx.export_onnx or torch.onnx.export) and pass its path")
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
    return OnnxSignature(inp.name, shape, dtype, tuple(o.name for o in model.graph.output))


def feeds_for(sig: OnnxSignature, inputs: Sequence[torch.Tensor], onnx_path: Path) -> list[OrderedDict[str, np.ndarray]]:
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
def quiet() -> Iterator[None]:
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


def _make_torch_runner(model: torch.nn.Module, sig: OnnxSignature, name: str):
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


def ort_runner(onnx_path: Path, level: str, name: str):
    import onnxruntime
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    try:
        with quiet():
            session = SessionFromOnnx(str(onnx_path), providers=["cpu"],
                                      graph_optimization_level=getattr(onnxruntime.GraphOptimizationLevel, level))()
    except Exception as exc:  # noqa: BLE001 -- ORT's own exception classes (InvalidGraph, Fail, ...)
        raise VerificationError(f"ONNX Runtime cannot load {onnx_path} ({type(exc).__name__}: {exc}); "
                                "re-export the model with an opset ONNX Runtime supports") from None
    return OnnxrtRunner(session, name=name)


def compare(candidate, reference, feeds, tolerance: tuple[float, float]) -> Verification:
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

    with quiet():
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
    sig = read_signature(onnx_path)
    feeds = feeds_for(sig, inputs, onnx_path)
    candidate = ort_runner(onnx_path, ORT_LEVEL[kind], "onnxruntime")
    reference = _make_torch_runner(reference_model, sig, "pytorch")
    return compare(candidate, reference, feeds, TOLERANCES[kind])
