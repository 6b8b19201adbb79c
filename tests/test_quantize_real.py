"""Real weights, real images: INT8 ResNet-56 keeps its CIFAR-10 accuracy, in PyTorch and in ONNX Runtime.

500 test images (50 per class) are scored; 500 other test images (the next 50 per class) calibrate, so the
two sets are disjoint and nothing is unpacked. The full 10,000-image figures are in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import pytest
import torch

from hqp_fx.engines.ort import OrtModel
from hqp_fx.models import build_model
from hqp_fx.lower_onnx import export_onnx
from hqp_fx.passes.quantize import QuantConfig, quantize
from hqp_fx.train import evaluate

from helpers import cifar_test_subset


@pytest.fixture(scope="module")
def resnet56_and_data(shared_dir):
    x, y = cifar_test_subset(shared_dir, per_class=100)
    first = torch.cat([torch.arange(c * 100, c * 100 + 50) for c in range(10)])
    second = torch.cat([torch.arange(c * 100 + 50, c * 100 + 100) for c in range(10)])
    model = build_model("cifar:resnet56", str(shared_dir / "models/cifar-resnet/resnet56_cifar10jpeg.pt")).model
    return model, (x[first], y[first]), x[second]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_int8_resnet56_within_half_a_point(resnet56_and_data, backend, tmp_path):
    model, (x, y), calibration = resnet56_and_data
    batches = [(x[i:i + 100], y[i:i + 100]) for i in range(0, len(y), 100)]
    fp32 = evaluate(model, batches)["top1"]
    result = quantize(model, x[:1], calibration.split(50), QuantConfig(backend=backend, num_samples=500))
    int8_torch = evaluate(result.model, batches)["top1"]
    export_onnx(result.model, (x[:1],), tmp_path / "int8.onnx")
    int8_ort = evaluate(OrtModel(tmp_path / "int8.onnx"), batches)["top1"]
    assert fp32 > 85, f"the checkpoint scores {fp32:.1f}% on these images; the data or weights are wrong"
    assert abs(fp32 - int8_torch) <= 0.5 and abs(fp32 - int8_ort) <= 0.5, (
        f"{backend}: FP32 {fp32:.1f}%, INT8 PyTorch {int8_torch:.1f}%, INT8 ONNX Runtime {int8_ort:.1f}%")
