"""ONNX lowering: export a float or pt2e-quantized model to a clean single-file ONNX, and check TensorRT's QDQ rules.

``export_onnx`` runs torch's dynamo exporter, checks the result with ``onnx.checker`` (full check), tidies it with
onnx-graphsurgeon (constant folding that never touches Q/DQ, dead-node cleanup, topological sort), checks again and
saves atomically. ``check_tensorrt_rules`` is a structural lint for TensorRT explicit quantization (the rules its
ONNX parser enforces on QuantizeLinear/DequantizeLinear), so a bad model fails here instead of inside trtexec.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..core import HQPError, atomic_write_bytes

__all__ = ["TENSORRT_OPS", "OnnxExportError", "RuleViolation", "check_tensorrt_rules", "export_onnx"]

_PROTO_LIMIT = 2**31 - 1  # protobuf cannot serialize a message of 2 GB or more
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_QDQ = ("QuantizeLinear", "DequantizeLinear")

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


class OnnxExportError(HQPError):
    """The model could not be lowered to a valid ONNX file; the message names the problem and the fix."""


@dataclass(frozen=True)
class RuleViolation:
    """One broken TensorRT rule at one node (or graph input/output)."""

    node: str
    op_type: str
    rule: str
    detail: str


# --------------------------------------------------------------------------------------------------- export


def export_onnx(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = False,
    opset: int = 18,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("output",),
) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=True) -> onnx.checker full check -> onnx-graphsurgeon cleanup -> check again -> atomic save.

    ``model`` is a float module or a pt2e-converted GraphModule (its quantize/dequantize ops become QDQ nodes).
    Shapes are static unless ``dynamic_batch``, which makes dim 0 of every input symbolic.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    name = type(model).__name__
    proto = _torch_export(model, example_inputs, dynamic_batch, opset, list(input_names), list(output_names))
    _check(proto, name, "torch.onnx.export")
    proto = _cleanup(proto)
    _check(proto, name, "onnx-graphsurgeon cleanup")
    if dynamic_batch:
        static = [i.name for i in proto.graph.input if not _dim0_is_symbolic(i)]
        if static:
            why = (
                "a torch.export'ed GraphModule keeps the batch size it was captured with; capture it with "
                "dynamic_shapes={0: torch.export.Dim.AUTO} (hqp_fx's quantize does)"
                if isinstance(model, torch.fx.GraphModule)
                else "the forward pins the batch size, e.g. x.view(2, -1) or a shape read as a python int; "
                "use x.flatten(1) or x.view(x.shape[0], -1)"
            )
            raise OnnxExportError(
                f"{name} cannot be exported with a dynamic batch: the exporter fixed dim 0 of inputs {static} "
                f"({why}), or export with dynamic_batch=False"
            )
    _save(proto, Path(path))
    return proto


def _torch_export(model, example_inputs, dynamic_batch, opset, input_names, output_names) -> onnx.ModelProto:
    """Run the dynamo exporter quietly and return its ModelProto (its own file is never written)."""
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in example_inputs)
    chatter = io.StringIO()
    try:
        with _eval_mode(model), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, example_inputs, dynamo=True, opset_version=opset, verbose=False, input_names=input_names,
                output_names=output_names, dynamic_shapes=dynamic_shapes, external_data=False,
            )
    except Exception as e:  # the exporter raises many types; all of them mean "this model does not lower"
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        name, first = type(model).__name__, _first_line(root) or _first_line(e)
        if dynamic_batch and "batch" in _ANSI.sub("", f"{e}\n{root}"):  # the symbolic dim 0 is named "batch"
            raise OnnxExportError(
                f"{name} cannot be exported with a dynamic batch: {type(root).__name__}: {first}. Fix: let forward() "
                "work for any batch size (x.flatten(1), not x.view(2, -1)), or export with dynamic_batch=False"
            ) from e
        raise OnnxExportError(
            f"torch.onnx.export(dynamo=True) failed for {name}: {type(root).__name__}: {first}. "
            "Fix: make forward() traceable by torch.export (no data-dependent python control flow such as "
            "`if x.sum() > 0`, no .item()/.numpy(), only ops with an ONNX lowering); "
            "see https://pytorch.org/docs/stable/generated/exportdb/index.html"
        ) from e
    return program.model_proto


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Export inference graphs: switch a training-mode module to eval for the export and back afterwards.

    torch.export'ed GraphModules refuse .eval()/.train() (they are already fixed graphs), so they are left alone.
    """
    flipped = False
    if model.training:
        try:
            model.eval()
            flipped = True
        except NotImplementedError:
            pass
    try:
        yield
    finally:
        if flipped:
            model.train()


def _first_line(e: BaseException) -> str:
    for line in _ANSI.sub("", str(e)).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _check(proto: onnx.ModelProto, name: str, stage: str) -> None:
    if proto.ByteSize() > _PROTO_LIMIT:
        raise OnnxExportError(
            f"the ONNX model of {name} is {proto.ByteSize() / 2**30:.1f} GiB after {stage}, over protobuf's 2 GB "
            "limit for a single file; prune/shrink the model (external-data export is not supported here)"
        )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # checker and shape inference raise their own error types
        raise OnnxExportError(
            f"onnx.checker rejected the ONNX model of {name} after {stage}: {_first_line(e)}; "
            "this is an exporter bug or an op without a valid lowering at this opset - try another opset"
        ) from e


def _keep_qdq(node) -> bool:
    """graphsurgeon should_exclude_node hook: never fold Q/DQ.

    Folding a weight DequantizeLinear would turn the int8 initializer back into FP32 and erase the explicit
    quantization TensorRT and ONNX Runtime read from the graph. graphsurgeon 0.6.1 already refuses to fold Q/DQ;
    this hook keeps that guarantee on versions that do not.
    """
    return node.op in _QDQ


def _cleanup(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fold_constants (Q/DQ excluded) -> cleanup -> toposort."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph.fold_constants(should_exclude_node=_keep_qdq).cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=True)  # keeps ir_version, opset imports and producer


def _dim0_is_symbolic(value: onnx.ValueInfoProto) -> bool:
    dims = value.type.tensor_type.shape.dim
    return len(dims) > 0 and not dims[0].HasField("dim_value")


def _save(proto: onnx.ModelProto, path: Path) -> None:
    """Single-file save; readers see the old file or the complete new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, proto.SerializeToString())


# --------------------------------------------------------------------------------------------------- TensorRT rules


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
        if node.op_type not in _QDQ:
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
