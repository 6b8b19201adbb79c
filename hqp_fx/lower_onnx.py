"""ONNX lowering: export a float or pt2e-quantized model to a clean single-file ONNX.

``export_onnx`` runs torch's dynamo exporter, checks the result with ``onnx.checker`` (full check), tidies it with
onnx-graphsurgeon (constant folding that never touches Q/DQ, dead-node cleanup, topological sort), checks again and
saves atomically.

Two rewrites in that tidy-up let ONNX Runtime keep more of an int8 graph in int8; both compute exactly what the
exported graph computes. A mean over every spatial axis becomes ``GlobalAveragePool``, which ORT fuses with its
Q/DQ into ``QLinearGlobalAveragePool`` (``ReduceMean``, the exporter's form of ``adaptive_avg_pool2d(1)``, it runs
in float). A ``Pad`` between a DequantizeLinear and a QuantizeLinear of the same scale and zero point (the
``onnxruntime`` preset shares them through a zero-padding shortcut) pads the int8 tensor itself: ORT drops the
Q/DQ around slices and reshapes but not around Pad (benchmarks/RESULTS.md, "Pooling and padding in int8").

A removed residual block's constant (``hqp_fx.branches``) is lowered as the model stores it. In a float file that is
per channel: ONNX Runtime's float add broadcasts it as fast as a full-shape one and the file stays smaller than the
dense model's (benchmarks/RESULTS.md, "A removed block's constant in the FP32 files"). The int8 add is slow on such
an operand, so ``quantize`` stores it at full shape before it captures the model, and the Q/DQ file carries that.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch

from .core import HQPError, atomic_write_bytes

__all__ = ["OnnxExportError", "export_onnx", "QDQ_OPS"]

_PROTO_LIMIT = 2**31 - 1  # protobuf cannot serialize a message of 2 GB or more
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class OnnxExportError(HQPError):
    """The model could not be lowered to a valid ONNX file; the message names the problem and the fix."""



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
    return node.op in QDQ_OPS


def _cleanup(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fold_constants (Q/DQ excluded) -> global pooling and int8 padding rewrites -> cleanup -> toposort."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph.fold_constants(should_exclude_node=_keep_qdq).cleanup()
        for node in list(graph.nodes):
            if node.op == "ReduceMean":
                _global_pool(node)
            elif node.op == "Pad":
                _int8_pad(graph, node)
        graph.cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=True)  # keeps ir_version, opset imports and producer


def _const(tensor):
    """The numpy value of a graphsurgeon constant input, or None."""
    import onnx_graphsurgeon as gs

    return tensor.values if isinstance(tensor, gs.Constant) else None


def _global_pool(node) -> None:
    """ReduceMean over every axis after N and C, dims kept -> GlobalAveragePool (the same mean, one op ORT and
    TensorRT both run on int8 between Q/DQ)."""
    x = node.inputs[0]
    rank = len(x.shape) if x.shape is not None else 0
    axes = _const(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("axes")
    if rank < 3 or axes is None or not node.attrs.get("keepdims", 1):
        return
    if sorted(int(a) % rank for a in list(axes)) != list(range(2, rank)):
        return
    node.op, node.attrs = "GlobalAveragePool", {}
    while len(node.inputs) > 1:  # graphsurgeon's input list takes no slice deletion
        node.inputs.pop()


def _int8_pad(graph, node) -> None:
    """DequantizeLinear -> Pad -> QuantizeLinear with one scale and zero point -> Pad of the quantized tensor, padded
    with the pad value as the QuantizeLinear would store it. Exact: quantizing a dequantized value with the same
    parameters returns it."""
    import numpy as np
    import onnx_graphsurgeon as gs

    x, y = node.inputs[0], node.outputs[0]
    dq = x.inputs[0] if len(x.inputs) == 1 else None
    q = y.outputs[0] if len(y.outputs) == 1 else None
    if dq is None or q is None or dq.op != "DequantizeLinear" or q.op != "QuantizeLinear" or len(dq.inputs) < 3 \
            or len(q.inputs) < 3 or q.outputs[0] in graph.outputs:
        return
    scale, zero = _const(dq.inputs[1]), _const(dq.inputs[2])
    if scale is None or zero is None or scale.size != 1 \
            or not np.array_equal(scale, _const(q.inputs[1])) or not np.array_equal(zero, _const(q.inputs[2])) \
            or zero.dtype != _const(q.inputs[2]).dtype:
        return
    inputs = [dq.inputs[0], node.inputs[1]]
    if node.attrs.get("mode", "constant") == "constant":
        value = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.float32(0)
        if value is None:
            return
        info = np.iinfo(zero.dtype)
        stored = np.clip(np.rint(np.float32(value) / scale.astype(np.float32)) + zero.astype(np.int64), info.min,
                         info.max)
        inputs.append(gs.Constant(f"{node.name}_int8_value", np.asarray(stored, zero.dtype).reshape(())))
    if len(node.inputs) > 3:
        inputs += [gs.Variable.empty()] * (3 - len(inputs)) + [node.inputs[3]]
    out = q.outputs[0]
    q.outputs.clear()
    node.outputs.clear()
    graph.nodes.append(gs.Node("Pad", name=f"{node.name}_int8", attrs=dict(node.attrs), inputs=inputs,
                               outputs=[out]))


def _dim0_is_symbolic(value: onnx.ValueInfoProto) -> bool:
    dims = value.type.tensor_type.shape.dim
    return len(dims) > 0 and not dims[0].HasField("dim_value")


def _save(proto: onnx.ModelProto, path: Path) -> None:
    """Single-file save; readers see the old file or the complete new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, proto.SerializeToString())


# --------------------------------------------------------------------------------------------------- TensorRT rules
