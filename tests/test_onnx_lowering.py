"""ONNX lowering: numerics of FP32/INT8 export against ONNX Runtime, QDQ survival, TensorRT rule checks, failures."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from hqp_fx.engines.tensorrt import check_tensorrt_rules
from hqp_fx.lower_onnx import OnnxExportError, _cleanup, _torch_export, export_onnx


class SmallCNN(nn.Module):
    """conv/bn/relu stem, a residual block, global average pool and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(self.body(x)).flatten(1))

    def body(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class PinnedBatch(SmallCNN):
    """The same network with its batch size written into forward: torch.export can only capture it statically."""

    def forward(self, x):
        return self.fc(self.pool(self.body(x)).view(2, 16))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class NoOnnxLowering(nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x).real


def _model(cls=SmallCNN, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = cls()
    with torch.no_grad():  # non-trivial BN statistics so folding BN actually matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _ort(model, *inputs: torch.Tensor, optimize: bool = True) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    if not optimize:  # reference kernels: QDQ runs as float math, exactly what the pt2e model computes
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    path = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)[0]


def _assert_close(got: np.ndarray, want: torch.Tensor, rel: float) -> None:
    want = want.detach().numpy()
    assert got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rel, f"relative error {err:.3g} > {rel:.1g}"


def _weight_dqs(proto: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    inits = {t.name: t for t in proto.graph.initializer}
    return [(n, inits[n.input[0]]) for n in proto.graph.node
            if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
            and inits[n.input[0]].data_type == TensorProto.INT8]


@pytest.fixture(scope="module")
def quantized():
    """(the small CNN with a pinned batch, quantized by the tensorrt preset; example input), built once."""
    from hqp_fx.passes.quantize import QuantConfig, quantize

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    calib = [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(4)]
    result = quantize(_model(PinnedBatch), (x,), calib, QuantConfig(backend="tensorrt", calibration="minmax"))
    return result.model, x


# --------------------------------------------------------------------------------------------------- FP32


def test_fp32_small_cnn_matches_torch_and_leaves_one_file(tmp_path):
    model = _model()
    model.train()  # exported in eval mode and handed back in train mode
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "out" / "small.onnx"
    proto = export_onnx(model, (x,), path)
    assert model.training
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["out", "out/small.onnx"]
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["output"]
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 32, 32]
    with torch.no_grad():
        want = model.eval()(x)
    _assert_close(_ort(path, x), want, 1e-4)


def test_fp32_resnet18_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "resnet18.onnx"
    export_onnx(model, (x,), path)
    assert {n.op_type for n in onnx.load(path).graph.node} >= {"Conv", "Relu", "Add", "MaxPool", "Gemm"}
    with torch.no_grad():
        want = model(x)
    _assert_close(_ort(path, x), want, 1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["resnet18.onnx"]


def test_dynamic_batch_runs_any_batch(tmp_path):
    model = _model()
    path = tmp_path / "dyn.onnx"
    proto = export_onnx(model, (torch.randn(2, 3, 32, 32),), path, dynamic_batch=True)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and dims[0].dim_param
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert check_tensorrt_rules(proto) and not check_tensorrt_rules(proto, allow_dynamic_batch=True)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = model(x)
        _assert_close(_ort(path, x), want, 1e-4)


def test_dynamic_batch_refused_when_forward_pins_the_batch(tmp_path):
    path = tmp_path / "pinned.onnx"
    with pytest.raises(OnnxExportError, match="PinnedBatch cannot be exported with a dynamic batch"):
        export_onnx(_model(PinnedBatch), (torch.randn(2, 3, 32, 32),), path, dynamic_batch=True)
    assert list(tmp_path.iterdir()) == []
    export_onnx(_model(PinnedBatch), (torch.randn(2, 3, 32, 32),), path)  # static export of the same model works
    assert path.exists()


@pytest.mark.parametrize("cls, cause", [(DataDependent, "data-dependent"), (NoOnnxLowering, "linalg_eig")])
def test_export_failure_raises_and_writes_nothing(tmp_path, cls, cause):
    with pytest.raises(OnnxExportError, match=cls.__name__) as info:
        export_onnx(cls(), (torch.randn(2, 4, 4),), tmp_path / "bad.onnx")
    assert cause in str(info.value) and "Fix:" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------- INT8 QDQ


def test_int8_qdq_export_matches_pt2e_model(tmp_path, quantized):
    q, x = quantized
    path = tmp_path / "q.onnx"
    with pytest.raises(OnnxExportError, match="keeps the batch size it was captured with"):
        export_onnx(q, (x,), path, dynamic_batch=True)  # captured by torch.export with a static batch
    proto = export_onnx(q, (x,), path)
    with torch.no_grad():
        want = q(x)
    _assert_close(_ort(path, x, optimize=False), want, 1e-5)
    with torch.no_grad():  # the 1e-5 check means something: quantization moved the output by far more
        gap = (_model(PinnedBatch)(x) - want).abs().max() / want.abs().max()
    assert gap > 1e-3

    weights = _weight_dqs(proto)
    assert len(weights) == 4  # stem, conv1, conv2, fc
    for node, init in weights:
        axis = next(a.i for a in node.attribute if a.name == "axis")
        assert axis == 0 and init.data_type == TensorProto.INT8
        scale = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == node.input[1]))
        assert scale.shape == (init.dims[0],)
    assert not [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 4]
    assert check_tensorrt_rules(path) == []


def test_graphsurgeon_cleanup_keeps_weight_qdq(quantized):
    q, x = quantized
    raw = _torch_export(q, (x,), False, 18, ["input"], ["output"])
    clean = _cleanup(raw)
    assert len(_weight_dqs(raw)) == len(_weight_dqs(clean)) == 4
    assert len(clean.graph.node) <= len(raw.graph.node)
    assert [n.op_type for n in clean.graph.node].count("DequantizeLinear") == \
        [n.op_type for n in raw.graph.node].count("DequantizeLinear")


def test_cleanup_folds_constants_but_not_weight_dequantize():
    """A hand-made graph with a foldable constant branch: folding runs, and still leaves the weight DQ alone."""
    w = numpy_helper.from_array(np.arange(-8, 8, dtype=np.int8).reshape(2, 2, 2, 2), "w_q")
    inits = [w, numpy_helper.from_array(np.array([0.1, 0.2], np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(2, np.int8), "w_zp"),
             numpy_helper.from_array(np.float32(1.5), "a"), numpy_helper.from_array(np.float32(2.0), "b")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="dq_w", axis=0),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["a", "b"], ["ab"], name="const_add"),
             helper.make_node("Mul", ["c", "ab"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    clean = _cleanup(proto)
    assert [n.name for n in clean.graph.node] == ["dq_w", "conv", "mul"]
    assert len(_weight_dqs(clean)) == 1
    x = torch.randn(1, 2, 4, 4)
    np.testing.assert_allclose(_ort(clean, x, optimize=False), _ort(proto, x, optimize=False), rtol=1e-6)


def _pad_graph(*, mode: str = "constant", value: float | None = 0.37, q_scale: float = 0.05,
               scale=np.float32(0.05)) -> onnx.ModelProto:
    """x -> Q -> DQ -> Pad -> Q -> DQ -> y, int8 with a zero point of -3: the pattern a shared-scale zero-padding
    shortcut exports."""
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
             numpy_helper.from_array(np.asarray(np.full(np.shape(scale), -3), np.int8), "zp"),
             numpy_helper.from_array(np.float32(q_scale), "s_out"),
             numpy_helper.from_array(np.int8(-3), "zp_out"),
             numpy_helper.from_array(np.array([0, 2, 1, 1, 0, 1, 2, 0], np.int64), "pads")]
    pad_inputs = ["xd", "pads"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.float32(value), "value"))
        pad_inputs.append("value")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], axis=1),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], axis=1),
             helper.make_node("Pad", pad_inputs, ["p"], name="pad", mode=mode),
             helper.make_node("QuantizeLinear", ["p", "s_out", "zp_out"], ["pq"]),
             helper.make_node("DequantizeLinear", ["pq", "s_out", "zp_out"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 7, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("knobs, int8", [
    ({}, True),
    ({"value": None}, True),  # the value input left out: zero
    ({"value": 100.0}, True),  # beyond the range: saturates, as the QuantizeLinear would
    ({"mode": "reflect", "value": None}, True),
    ({"q_scale": 0.06}, False),  # another scale after the Pad: it must stay in float
    ({"scale": np.full(3, 0.05, np.float32)}, False),  # per-channel
])
def test_pad_between_equal_qdq_runs_on_int8_with_the_same_output(knobs, int8):
    proto = _pad_graph(**knobs)
    clean = _cleanup(proto)
    onnx.checker.check_model(clean, full_check=True)
    pad = next(n for n in clean.graph.node if n.op_type == "Pad")
    producer = {o: n.op_type for n in clean.graph.node for o in n.output}
    assert producer[pad.input[0]] == ("QuantizeLinear" if int8 else "DequantizeLinear")
    assert [n.op_type for n in clean.graph.node].count("QuantizeLinear") == (1 if int8 else 2)
    x = torch.randn(2, 3, 4, 4) * 3
    for optimize in (False, True):
        np.testing.assert_array_equal(_ort(clean, x, optimize=optimize), _ort(proto, x, optimize=optimize))


def test_global_mean_pools_and_shortcut_pads_run_on_int8_in_onnx_runtime(tmp_path):
    """The CIFAR ResNet's zero-padding shortcuts and its global mean, quantized by the onnxruntime preset: the file
    computes what the pt2e model computes, and ORT runs both on int8 (one Q for the input, one DQ for the logits)."""
    from hqp_fx.models import build_model
    from hqp_fx.passes.quantize import QuantConfig, quantize

    torch.manual_seed(0)
    model = build_model("cifar:resnet20").model.eval()
    x = torch.randn(2, 3, 32, 32)
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    q = quantize(model, (x,), calib, QuantConfig(backend="onnxruntime", calibration="minmax")).model
    path = tmp_path / "q.onnx"
    proto = export_onnx(q, (x,), path, dynamic_batch=True)
    ops = [n.op_type for n in proto.graph.node]
    assert "ReduceMean" not in ops and ops.count("GlobalAveragePool") == 1 and ops.count("Pad") == 2
    raw = _torch_export(q, (x,), True, 18, ["input"], ["output"])
    assert [n.op_type for n in raw.graph.node].count("ReduceMean") == 1
    xb = torch.randn(3, 3, 32, 32)
    got = _ort(path, xb, optimize=False)
    np.testing.assert_array_equal(got, _ort(raw, xb, optimize=False))  # the rewrites are exact
    with torch.no_grad():
        want = q(xb).numpy()
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    step = float(inits[next(n for n in proto.graph.node if n.output[0] == "output").input[1]])
    assert np.abs(got - want).max() <= step * 1.001  # float sums in another order: at most one output step

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert fused.count("QLinearGlobalAveragePool") == 1 and fused.count("Pad") == 2
    assert fused.count("QuantizeLinear") == 1 and fused.count("DequantizeLinear") == 1, fused


def test_quantize_pass_output_exports_and_meets_tensorrt_rules(tmp_path):
    quantize = pytest.importorskip("hqp_fx.passes.quantize")
    model, x = _model(), torch.randn(2, 3, 32, 32)
    calib = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    result = quantize.quantize(model, (x,), calib, quantize.QuantConfig(backend="tensorrt", calibration="minmax"))
    path = tmp_path / "trt.onnx"
    export_onnx(result.model, (x,), path, dynamic_batch=True)  # quantize() captures a dynamic batch
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = result.model(xb)
        _assert_close(_ort(path, xb, optimize=False), want, 1e-5)
    assert len(_weight_dqs(onnx.load(path))) == 4
    assert check_tensorrt_rules(path, allow_dynamic_batch=True) == []


# --------------------------------------------------------------------------------------------------- TensorRT rules


def _qdq_conv(*, act_zp=None, act_scale=None, act_axis=1, w_axis=0, w_scale_len=4,
              w_dtype=np.int8, x_dims=(1, 3, 8, 8), y_dims=(1, 4, 6, 6), relu_op=("Relu", ""),
              dangling_q="", conv_op="Conv") -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(int8 W, per-channel)) -> Relu -> y: valid by default, one knob breaks one rule."""
    act_zp = np.int8(0) if act_zp is None else act_zp
    act_scale = np.float32(0.05) if act_scale is None else act_scale
    w = np.arange(-54, 54).reshape(4, 3, 3, 3).astype(w_dtype)
    inits = [numpy_helper.from_array(np.asarray(act_scale, np.float32), "x_s"),
             numpy_helper.from_array(np.asarray(act_zp), "x_zp"),
             numpy_helper.from_array(w, "w_q"),
             numpy_helper.from_array(np.full(w_scale_len, 0.01, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(w_scale_len, np.int8), "w_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["xq"], name="q_x", axis=act_axis),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_zp"], ["xd"], name="dq_x", axis=act_axis),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="dq_w", axis=w_axis),
             helper.make_node(conv_op, ["xd", "w"], ["c"], name="conv"),
             helper.make_node(relu_op[0], ["c"], ["y"], name="relu", domain=relu_op[1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_dims))]
    if dangling_q:  # "output": Q is a graph output; "identity": Q feeds a non-DQ node
        nodes.append(helper.make_node("QuantizeLinear", ["y", "x_s", "x_zp"], ["yq"], name="q_out"))
        if dangling_q == "identity":
            nodes.append(helper.make_node("Identity", ["yq"], ["yi"], name="ident"))
        name = "yq" if dangling_q == "output" else "yi"
        outputs.append(helper.make_tensor_value_info(name, TensorProto.INT8, list(y_dims)))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_dims))],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])


def test_tensorrt_rules_accept_the_valid_qdq_conv():
    proto = _qdq_conv()
    onnx.checker.check_model(proto, full_check=True)
    assert check_tensorrt_rules(proto) == []


_ZP, _SCALE, _AXIS, _SHAPE = "zero-point", "scale", "weight-axis", "static-shape"


@pytest.mark.parametrize("knobs, expected", [
    ({"act_zp": np.int8(3)}, {("q_x", _ZP), ("dq_x", _ZP)}),
    ({"act_zp": np.uint8(0)}, {("q_x", _ZP), ("dq_x", _ZP)}),
    ({"act_scale": np.float32(0.0)}, {("q_x", _SCALE), ("dq_x", _SCALE)}),
    ({"w_axis": 1, "w_scale_len": 3}, {("dq_w", _AXIS)}),
    ({"w_scale_len": 3}, {("dq_w", _AXIS)}),
    ({"conv_op": "ConvTranspose", "y_dims": (1, 3, 10, 10)}, {("dq_w", _AXIS)}),
    ({"w_dtype": np.int32}, {("dq_w", "dtype")}),
    ({"x_dims": ("N", 3, 8, 8), "y_dims": ("N", 4, 6, 6)}, {("x", _SHAPE), ("y", _SHAPE)}),
    ({"x_dims": (1, 3, "H", 8)}, {("x", _SHAPE)}),
    ({"relu_op": ("MyCustomRelu", "com.example")}, {("relu", "unsupported-op")}),
    ({"relu_op": ("Hardmax", "")}, {("relu", "unsupported-op")}),
    ({"act_scale": np.full(3, 0.05, np.float32)}, {("q_x", "per-tensor-activation"), ("dq_x", "per-tensor-activation")}),
    ({"dangling_q": "output"}, {("q_out", "qdq-pair")}),
    ({"dangling_q": "identity"}, {("q_out", "qdq-pair")}),
])
def test_tensorrt_rules_flag_broken_models(knobs, expected):
    found = check_tensorrt_rules(_qdq_conv(**knobs))
    assert {(v.node, v.rule) for v in found} == expected, found
    assert all(v.detail and v.op_type for v in found)


def test_tensorrt_rules_allow_dynamic_batch_only_on_dim0(tmp_path):
    proto = _qdq_conv(x_dims=("N", 3, 8, 8), y_dims=("N", 4, 6, 6))
    assert check_tensorrt_rules(proto, allow_dynamic_batch=True) == []
    onnx.save(_qdq_conv(x_dims=("N", 3, "H", 8)), tmp_path / "m.onnx")
    found = check_tensorrt_rules(tmp_path / "m.onnx", allow_dynamic_batch=True)
    assert [(v.node, v.rule) for v in found] == [("x", "static-shape")] and "dim 2" in found[0].detail
