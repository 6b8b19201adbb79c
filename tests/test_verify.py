"""Verification with Polygraphy (PyTorch CPU runner vs ONNX Runtime) and the TensorRT engine step."""
from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import realistic_random
from onnx import numpy_helper
from torch import nn

from hqp_fx.core import HQPError
from hqp_fx.models import CifarResNet, load_weights
from hqp_fx.engines.tensorrt import TensorRTResult, build_tensorrt_engine, tensorrt_unavailable_reason
from hqp_fx.verify import TOLERANCES, Verification, VerificationError, verify_onnx

SHAPE = (8, 3, 16, 16)
RESNET20 = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "cifar-resnet" / "resnet20-12fca82f.th"
TRT_REASON = tensorrt_unavailable_reason()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def batches(n: int, shape=SHAPE, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        # pt2e models are exported GraphModules, which refuse .eval(); their graph is inference-only already.
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=18, verbose=False)
    return path


def quantize_pt2e(model: nn.Module, calib: list[torch.Tensor]) -> torch.fx.GraphModule:
    """INT8 the way TensorRT wants it: the project's tensorrt preset, min-max calibrated on ``calib``."""
    from hqp_fx.passes.quantize import QuantConfig, quantize

    return quantize(model, calib[0], calib, QuantConfig(backend="tensorrt", calibration="minmax",
                                                        num_samples=sum(len(c) for c in calib))).model


def max_abs_output(model: nn.Module, inputs: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return max(float(model(x).abs().max()) for x in inputs)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(float model, its ONNX, INT8 model, its Q/DQ ONNX), exported once for the module."""
    folder = tmp_path_factory.mktemp("verify")
    torch.manual_seed(0)  # built at the worker's first use: without a seed its weights depend on what ran before
    model = realistic_random(SmallCNN(), torch.randn(SHAPE)).eval()
    fp_onnx = export(model, torch.randn(SHAPE), folder / "small_fp32.onnx")
    qmodel = quantize_pt2e(model, batches(4, seed=100))
    q_onnx = export(qmodel, torch.randn(SHAPE), folder / "small_int8.onnx")
    return model, fp_onnx, qmodel, q_onnx


# ---------------------------------------------------------------------------------------------------------
# FP32 and INT8 against PyTorch


def test_fp32_onnx_matches_pytorch(small):
    model, fp_onnx, _, _ = small
    inputs = batches(3)
    v = verify_onnx(fp_onnx, model, inputs, kind="fp32")
    scale = max_abs_output(model, inputs)
    assert isinstance(v, Verification)
    assert (v.reference, v.candidate) == ("pytorch", "onnxruntime")
    assert v.passed, v.summary()
    assert v.max_abs_error < 1e-4 * scale
    assert v.max_rel_error == pytest.approx(v.max_abs_error / scale, rel=1e-5)
    assert v.atol == pytest.approx(TOLERANCES["fp32"][0] * scale, rel=1e-5)
    assert v.rtol == TOLERANCES["fp32"][1]
    assert v.top1_agreement == 1.0
    assert v.samples == 3 * SHAPE[0]
    assert v.summary().startswith("onnxruntime vs pytorch: PASS max abs ")


def test_int8_onnx_matches_quantized_pytorch(small):
    model, _, qmodel, q_onnx = small
    inputs = batches(3)
    v = verify_onnx(q_onnx, qmodel, inputs, kind="int8-onnxruntime")
    assert v.passed, v.summary()
    # ORT's integer kernels need not be bit-exact with the simulated quantization (on some weights they are:
    # 2 of 8 seeds gave 0.0), but they are within the tolerance.
    assert v.max_rel_error <= TOLERANCES["int8-onnxruntime"][0]
    assert v.top1_agreement is not None and v.top1_agreement >= 0.9
    # The Q/DQ model really is quantized: it is far from the float model, which the fp32 check would catch.
    vs_float = verify_onnx(q_onnx, model, inputs, kind="fp32")
    assert not vs_float.passed and vs_float.max_rel_error > 100 * TOLERANCES["fp32"][0]


def test_int8_trained_resnet20(tmp_path):
    if not RESNET20.is_file():
        pytest.skip(f"trained ResNet-20 checkpoint not found at {RESNET20} (it lives in the team's shared/ folder)")
    model = CifarResNet(20)
    load_weights(model, RESNET20)
    model.eval()
    shape = (32, 3, 32, 32)
    qmodel = quantize_pt2e(model, batches(4, shape, seed=100))
    q_onnx = export(qmodel, torch.randn(shape), tmp_path / "resnet20_int8.onnx")
    v = verify_onnx(q_onnx, qmodel, batches(4, shape), kind="int8-onnxruntime")
    assert v.passed, v.summary()
    assert 0 < v.max_rel_error <= TOLERANCES["int8-onnxruntime"][0], v.summary()
    assert v.top1_agreement is not None and v.top1_agreement >= 0.9, v.summary()
    assert v.samples == 128


# ---------------------------------------------------------------------------------------------------------
# A wrong model must fail


def perturbed_copy(src: Path, dst: Path, factor: float, channel: int | None = None) -> Path:
    """Scale the first Conv's weight (or one output channel of it) by ``factor``."""
    model = onnx.load(str(src))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(t for t in model.graph.initializer if t.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    if channel is None:
        w *= factor
    else:
        w[channel] *= factor
    init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    onnx.save(model, str(dst))
    return dst


def test_wrong_onnx_fails(small, tmp_path):
    model, fp_onnx, _, _ = small
    inputs = batches(2)
    flipped = perturbed_copy(fp_onnx, tmp_path / "flipped.onnx", -1.0)
    for kind in ("fp32", "int8-onnxruntime"):  # even the looser INT8 tolerance catches a wrong weight
        v = verify_onnx(flipped, model, inputs, kind=kind)
        assert not v.passed, v.summary()
        assert v.max_rel_error > 0.2, v.summary()
        assert "FAIL" in v.summary()
    # A 2% change of a single output channel is far outside the FP32 tolerance.
    nudged = perturbed_copy(fp_onnx, tmp_path / "nudged.onnx", 1.02, channel=0)
    v = verify_onnx(nudged, model, inputs, kind="fp32")
    assert not v.passed and v.max_abs_error > v.atol, v.summary()


def test_onnx_of_a_different_model_fails(small):
    _, fp_onnx, _, _ = small
    other = realistic_random(SmallCNN(), torch.randn(SHAPE), seed=7).eval()
    v = verify_onnx(fp_onnx, other, batches(2), kind="fp32")
    assert not v.passed and v.max_rel_error > 0.1, v.summary()
    assert v.top1_agreement is not None and v.top1_agreement < 1.0


# ---------------------------------------------------------------------------------------------------------
# Misuse gets a helpful error


def test_missing_file_raises(tmp_path):
    with pytest.raises(VerificationError, match=r"does not exist; export the model first"):
        verify_onnx(tmp_path / "nope.onnx", SmallCNN(), batches(1), kind="fp32")
    assert issubclass(VerificationError, HQPError)


def test_shape_mismatch_raises(small):
    model, fp_onnx, _, _ = small
    with pytest.raises(VerificationError, match=r"inputs\[1\] has shape \[8, 3, 32, 32\] but .* expects \[8, 3, 16, 16\]"):
        verify_onnx(fp_onnx, model, [torch.randn(SHAPE), torch.randn(8, 3, 32, 32)], kind="fp32")
    with pytest.raises(VerificationError, match=r"expects \[8, 3, 16, 16\]"):
        verify_onnx(fp_onnx, model, [torch.randn(3, 16, 16)], kind="fp32")


def test_empty_and_bad_arguments_raise(small):
    model, fp_onnx, _, _ = small
    with pytest.raises(VerificationError, match=r"inputs is empty; pass at least one batch"):
        verify_onnx(fp_onnx, model, [], kind="fp32")
    with pytest.raises(VerificationError, match=r"got one tensor; pass \[x\]"):
        verify_onnx(fp_onnx, model, torch.randn(SHAPE), kind="fp32")
    with pytest.raises(VerificationError, match=r"kind must be 'fp32' or 'int8-onnxruntime'"):
        verify_onnx(fp_onnx, model, batches(1), kind="int8")


def test_not_an_onnx_file_raises(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00 definitely not protobuf \xff" * 8)
    with pytest.raises(VerificationError, match=r"re-export"):
        verify_onnx(bad, SmallCNN(), batches(1), kind="fp32")


# ---------------------------------------------------------------------------------------------------------
# TensorRT


def test_unavailable_reason_names_the_cause(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    reason = tensorrt_unavailable_reason()
    assert reason is not None and reason.startswith("TensorRT: not run (import tensorrt failed: ")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tensorrt_unavailable_reason() == "TensorRT: not run (no CUDA GPU: torch.cuda.is_available() is False)"


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT and a CUDA GPU are available on this machine")
def test_tensorrt_not_run_here_writes_nothing(small, tmp_path):
    _, _, _, q_onnx = small
    assert TRT_REASON.startswith("TensorRT: not run (")
    assert "tensorrt" in TRT_REASON or "CUDA" in TRT_REASON
    result = build_tensorrt_engine(q_onnx, tmp_path / "out" / "model.engine", batches(1))
    assert result == TensorRTResult(ran=False, reason=TRT_REASON, engine_path=None, verification=None)
    assert list(tmp_path.iterdir()) == []
    # Arguments are still checked, so a pipeline fails the same way with or without TensorRT.
    with pytest.raises(VerificationError, match="inputs is empty"):
        build_tensorrt_engine(q_onnx, tmp_path / "model.engine", [])


@pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")
def test_tensorrt_int8_engine_matches_onnxruntime(small, tmp_path):
    _, _, _, q_onnx = small
    engine = tmp_path / "engines" / "small_int8.engine"
    result = build_tensorrt_engine(q_onnx, engine, batches(3), int8=True)
    assert result.ran and result.engine_path == engine
    assert engine.is_file() and engine.stat().st_size > 0
    assert [p.name for p in engine.parent.iterdir()] == ["small_int8.engine"]  # no temporary left behind
    v = result.verification
    assert v is not None and (v.reference, v.candidate) == ("onnxruntime", "tensorrt")
    assert v.passed, v.summary()
    assert v.top1_agreement is not None and v.top1_agreement >= 0.9
    assert v.samples == 3 * SHAPE[0]
