"""ONNX lowering: export a float or pt2e-quantized model to a clean single-file ONNX.

``export_onnx`` runs torch's dynamo exporter, checks the result with ``onnx.checker`` (full check), tidies it with
onnx-graphsurgeon (constant folding that never touches Q/DQ, dead-node cleanup, topological sort), checks again and
saves atomically.

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
