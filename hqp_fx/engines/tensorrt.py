"""TensorRT: its explicit-quantization rules as a lint of the Q/DQ ONNX, and the INT8 engine build.

``check_tensorrt_rules`` enforces the rules TensorRT's ONNX parser applies to QuantizeLinear/DequantizeLinear, so a
bad model fails here instead of inside trtexec. ``build_tensorrt_engine`` builds an explicitly quantized INT8 engine
from the Q/DQ ONNX through Polygraphy (TensorRT reads the scales from the graph, so no calibrator) and compares it
against ONNX Runtime. TensorRT is optional: every ``tensorrt`` import is inside a function, and without TensorRT or
a CUDA GPU the engine step reports why it did not run instead of failing.
"""
from __future__ import annotations

import os
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..core import atomic_write_bytes
from ..lower_onnx import QDQ_OPS
from ..verify import (ORT_LEVEL, TOLERANCES, OnnxSignature, Verification, VerificationError, compare, feeds_for,
                      ort_runner, quiet, read_signature)

__all__ = ["TENSORRT_OPS", "RuleViolation", "check_tensorrt_rules", "TensorRTResult", "tensorrt_unavailable_reason",
           "build_tensorrt_engine"]

# ONNX ops TensorRT's ONNX parser imports (onnx-tensorrt docs/operators.md, TensorRT 8.5 - 10.x), default domain only.
TENSORRT_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu",
    "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu",
    "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
    "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Identity", "If", "InstanceNormalization", "IsNaN",
    "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization",
    "LpPool", "LRN", "LSTM", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod",
    "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "Pow", "PRelu", "QuantizeLinear",
    "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "RNN", "RoiAlign",
    "Round", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size",
    "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan",
    "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
})


@dataclass(frozen=True)
class RuleViolation:
    """One broken TensorRT rule at one node (or graph input/output)."""

    node: str
    op_type: str
    rule: str
    detail: str


# --------------------------------------------------------------------------------------------------- export


def check_tensorrt_rules(model: onnx.ModelProto | str | os.PathLike, *, allow_dynamic_batch: bool = False) -> list[RuleViolation]:
    """Structural check that a QDQ model meets TensorRT's explicit-quantization rules.

    Rule ids: static-shape, unsupported-op, zero-point, scale, per-tensor-activation, weight-axis, dtype, qdq-pair.
    An empty list means the model should parse and build as an explicitly quantized TensorRT network.
    """
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    graph = proto.graph
    init_types = {t.name: t.data_type for t in graph.initializer}
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers[name].append((node, i))
    graph_outputs = {o.name for o in graph.output}

    found = _shape_violations(graph, set(init_types), allow_dynamic_batch)
    for k, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{k}"

        def bad(rule: str, detail: str, node=node, name=name) -> None:
            found.append(RuleViolation(name, node.op_type, rule, detail))

        if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_OPS:
            domain = f" (domain {node.domain!r})" if node.domain not in ("", "ai.onnx") else ""
            bad("unsupported-op", f"{node.op_type}{domain} is not an op TensorRT's ONNX parser imports; "
                                  "replace it or provide a TensorRT plugin")
            continue
        if node.op_type not in QDQ_OPS:
            continue
        _check_qdq(node, consts, bad)
        x = node.input[0]
        is_weight = x in consts or (
            x in producer and producer[x].op_type == "QuantizeLinear" and producer[x].input[0] in consts
        )
        scale = consts.get(node.input[1]) if len(node.input) > 1 else None
        if is_weight and node.op_type == "DequantizeLinear":
            if x in init_types and init_types[x] != onnx.TensorProto.INT8:
                bad("dtype", f"weight {x!r} is {onnx.TensorProto.DataType.Name(init_types[x])}; TensorRT needs int8")
            _check_weight_axis(node, consts, producer, consumers, bad)
        elif not is_weight and scale is not None and scale.size != 1:
            bad("per-tensor-activation", f"activation {x!r} has a per-channel scale of {scale.size} values; "
                                         "TensorRT quantizes activations per tensor (one scalar scale)")
        if node.op_type == "QuantizeLinear":
            users = consumers.get(node.output[0], [])
            if not users or node.output[0] in graph_outputs or any(u.op_type != "DequantizeLinear" for u, _ in users):
                bad("qdq-pair", f"output {node.output[0]!r} must feed only DequantizeLinear nodes; "
                                "TensorRT needs every QuantizeLinear paired with a DequantizeLinear")
    return found


def _shape_violations(graph: onnx.GraphProto, initializers: set[str], allow_dynamic_batch: bool) -> list[RuleViolation]:
    found = []
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = t.shape.dim if t.HasField("shape") else None
            if dims is None:
                found.append(RuleViolation(v.name, f"graph-{kind}", "static-shape", f"graph {kind} has no shape"))
                continue
            for i, d in enumerate(dims):
                if d.HasField("dim_value") and d.dim_value > 0:
                    continue
                if i == 0 and allow_dynamic_batch and not d.HasField("dim_value"):
                    continue
                shown = d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                found.append(RuleViolation(v.name, f"graph-{kind}", "static-shape",
                                           f"graph {kind} dim {i} is {shown!r}, not a positive int; export with static "
                                           "shapes (or dynamic batch only, with allow_dynamic_batch=True)"))
    return found


def _check_qdq(node: onnx.NodeProto, consts: dict[str, np.ndarray], bad) -> None:
    """zero-point and scale rules shared by QuantizeLinear and DequantizeLinear."""
    zp_name = node.input[2] if len(node.input) > 2 else ""
    if not zp_name:
        bad("zero-point", "zero_point is missing (ONNX then defaults to uint8); give an int8 zero_point of 0")
    elif zp_name not in consts:
        bad("zero-point", f"zero_point {zp_name!r} is not a constant initializer")
    else:
        zp = consts[zp_name]
        if zp.dtype != np.int8:
            bad("zero-point", f"zero_point {zp_name!r} is {zp.dtype}; TensorRT supports int8 only")
        elif np.any(zp != 0):
            bad("zero-point", f"zero_point {zp_name!r} is nonzero ({np.unique(zp)[:4].tolist()}); "
                              "TensorRT needs symmetric quantization (zero_point 0)")
    s_name = node.input[1] if len(node.input) > 1 else ""
    if s_name not in consts:
        bad("scale", f"scale {s_name!r} is not a constant initializer; TensorRT needs build-time scales")
        return
    scale = consts[s_name]
    if not np.issubdtype(scale.dtype, np.floating) or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        bad("scale", f"scale {s_name!r} must be finite and > 0 (min {np.min(scale) if scale.size else 'empty'})")


def _check_weight_axis(dq: onnx.NodeProto, consts, producer, consumers, bad) -> None:
    """Per-channel weight scales must lie along the consumer's output-channel axis (per-tensor is allowed)."""
    scale = consts.get(dq.input[1]) if len(dq.input) > 1 else None
    if scale is None or scale.size == 1:
        return
    x = dq.input[0]
    weight = consts.get(x)
    if weight is None and x in producer:  # float weight -> Q -> DQ
        weight = consts.get(producer[x].input[0])
    if weight is None:
        return
    rank = weight.ndim
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    axis = axis + rank if axis < 0 else axis
    for user, slot in consumers.get(dq.output[0], []):
        expected = _output_channel_axis(user, slot, rank)
        if expected is not None and axis != expected:
            bad("weight-axis", f"per-channel weight scale uses axis {axis}, but {user.op_type} {user.name!r} has its "
                               f"output channels on axis {expected}; quantize the weight along axis {expected}")
            return
    if not 0 <= axis < rank or scale.size != weight.shape[axis]:
        bad("weight-axis", f"per-channel scale has {scale.size} values but weight {x!r} has shape "
                           f"{list(weight.shape)} along axis {axis}")


def _output_channel_axis(user: onnx.NodeProto, slot: int, rank: int) -> int | None:
    if slot != 1:
        return None
    if user.op_type == "Conv":
        return 0
    if user.op_type == "ConvTranspose":
        return 1
    if user.op_type == "Gemm":
        trans_b = next((a.i for a in user.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if user.op_type == "MatMul":
        return rank - 1
    return None


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


def _profile(sig: OnnxSignature, feeds: list[OrderedDict[str, np.ndarray]]) -> list[Any] | None:
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
    sig = read_signature(onnx_path)
    feeds = feeds_for(sig, inputs, onnx_path)
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
    with quiet():
        try:
            engine_bytes = EngineBytesFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config)()
        except PolygraphyException as exc:
            raise VerificationError(f"TensorRT could not build an engine from {onnx_path}: {exc}; see the TensorRT "
                                    "log above for the unsupported layer") from None
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(engine_path, bytes(engine_bytes))

    kind = "int8-tensorrt" if int8 else "fp32"
    candidate = TrtRunner(EngineFromBytes(bytes(engine_bytes)), name="tensorrt")
    reference = ort_runner(onnx_path, ORT_LEVEL["int8-tensorrt"], "onnxruntime")
    verification = compare(candidate, reference, feeds, TOLERANCES[kind])
    return TensorRTResult(ran=True, reason=f"TensorRT: ran ({'INT8' if int8 else 'FP32'} engine)",
                          engine_path=engine_path, verification=verification)
