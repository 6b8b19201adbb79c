"""hqp quantize end to end on real CIFAR-10 images, and its refusals (nothing half-written on any of them)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hqp_fx.cli import main

from helpers import cifar_test_subset


def _write_folder(root, images, labels, classes):
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")


@pytest.fixture(scope="module")
def cifar_folder(shared_dir, tmp_path_factory):
    """A small ImageFolder: 20 train and 20 test images per class, de-normalised back to uint8 PNGs."""
    x, y = cifar_test_subset(shared_dir, per_class=40)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    pixels = np.clip(np.rint((x.permute(0, 2, 3, 1).numpy() * std + mean) * 255), 0, 255).astype(np.uint8)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    root = tmp_path_factory.mktemp("cifar")
    train = np.concatenate([np.arange(c * 40, c * 40 + 20) for c in range(10)])
    test = np.concatenate([np.arange(c * 40 + 20, c * 40 + 40) for c in range(10)])
    _write_folder(root / "train", pixels[train], y[train].tolist(), classes)
    _write_folder(root / "test", pixels[test], y[test].tolist(), classes)
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HQP_CACHE", str(tmp_path / "cache"))


def test_quantize_writes_every_output(shared_dir, cifar_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["quantize", "cifar:resnet20", "--weights", str(shared_dir / "models/cifar-resnet/resnet20_cifar10jpeg.pt"),
                 "--data", str(cifar_folder), "--backend", "tensorrt", "--samples", "64", "--out", str(out),
                 "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["model_fp32.onnx", "model_int8.onnx", "quantize.json",
                                                      "verification.txt"]
    assert not list(tmp_path.glob(".out.partial-*"))
    report = json.loads((out / "quantize.json").read_text())
    assert report["preprocessing"]["resize"] == [32, 32] and report["input_shape"] == [1, 3, 32, 32]
    assert report["verification"]["fp32"]["passed"] and report["verification"]["int8"]["passed"]
    assert report["tensorrt_rules"] == []
    assert report["tensorrt"]["ran"] is False and report["tensorrt"]["reason"].startswith("TensorRT: not run (")
    assert report["accuracy"]["fp32"]["samples"] == 200 and report["accuracy"]["fp32"]["top1"] > 75
    assert abs(report["accuracy"]["top1_drop"]) <= 3.0  # 200 images: one image is 0.5 points
    assert report["latency_onnxruntime_cpu"]["int8"]["runs"] == 100
    assert len(report["quantization"]["quantized_layers"]) == 20 and not report["quantization"]["float_layers"]
    assert "TensorRT: not run" in (out / "verification.txt").read_text()


def _fails(args, capsys, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_quantize_refusals_leave_nothing_behind(shared_dir, cifar_folder, tmp_path, capsys):
    weights = str(shared_dir / "models/cifar-resnet/resnet20_cifar10jpeg.pt")
    out = tmp_path / "out"
    base = ["quantize", "cifar:resnet20", "--weights", weights, "--out", str(out), "--samples", "16"]
    _fails(base + ["--data", str(tmp_path / "missing")], capsys, "does not exist")
    three = tmp_path / "three"
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (three / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(three / split / c / "0.png")
    _fails(base + ["--data", str(three)], capsys, "predicts 10 classes but")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    _fails(base + ["--data", str(empty)], capsys, "has no class folders")
    with pytest.raises(SystemExit):  # refused by the parser, before any work
        main(base + ["--data", str(cifar_folder), "--max-drop", "-1"])
    assert "argument --max-drop: expected a finite number >= 0" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    _fails(base + ["--data", str(cifar_folder)], capsys, "already exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
