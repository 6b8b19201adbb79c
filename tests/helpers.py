"""Shared test helpers: realistic random weights, random plans, the masked reference model."""
from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

from hqp_fx import meta
from hqp_fx.count import macs_by_module
from hqp_fx.models import CifarResNet


def realistic_random(model: nn.Module, example: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random weights with BN statistics calibrated on random data, then random BN affine.

    Calibrated statistics keep activations O(1) through deep nets (so a float tolerance
    means something); the random affine makes every channel matter, and so does re-drawing the
    parameters a model starts near zero (heads, layer scales).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # zero-initialised heads (ViT) and 1e-6 layer scales (ConvNeXt) would hide any pruning error
            if p.numel() > 1 and not name.endswith("bias") and float(p.abs().max()) < 1e-4:
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
                else:
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.eval()  # only BN in train mode: training-only branches (aux heads) stay off
    for m in norms:
        m.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(example.shape, generator=gen).repeat(4, *([1] * (example.ndim - 1))))
    model.eval()
    with torch.no_grad():
        for m in norms:
            if m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.4 - 0.2)
    return model


def random_plan(groups, fraction: float, seed: int = 0, *, include=lambda g: True) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    plan = {}
    for g in groups:
        if g.prunable and include(g):
            n = int(fraction * g.size)
            if 0 < n < g.size:
                plan[g.id] = torch.randperm(g.size, generator=gen)[:n].tolist()
    return plan


def masked_copy(gm: fx.GraphModule, plan: dict[str, list[int]]) -> fx.GraphModule:
    """The original model with the removed channels' "out" slices set to zero."""
    groups = {g.id: g for g in meta.channel_groups(gm)}
    masked = copy.deepcopy(gm)
    tensors = dict(masked.named_parameters())
    tensors.update(dict(masked.named_buffers()))
    with torch.no_grad():
        for gid, idx in plan.items():
            for s in groups[gid].slices(idx):
                if s.role == "out":
                    tensors[s.param].index_fill_(s.dim, s.index, 0.0)
    return masked


def expected_counts(gm: fx.GraphModule, plan: dict[str, list[int]], example) -> tuple[int, int]:
    """Params and MACs that the plan's slices imply for the pruned model."""
    groups = {g.id: g for g in meta.channel_groups(gm)}
    removed: dict[str, dict[int, set[int]]] = {}
    for gid, idx in plan.items():
        for s in groups[gid].slices(idx):
            removed.setdefault(s.param, {}).setdefault(s.dim, set()).update(s.index.tolist())
    params = dict(gm.named_parameters())
    new_numel = {}
    for name, p in params.items():
        shape = list(p.shape)
        for d, idx in removed.get(name, {}).items():
            shape[d] -= len(idx)
        new_numel[name] = int(np.prod(shape)) if shape else 1
    exp_params = sum(new_numel.values())
    exp_macs = 0
    for name, macs in macs_by_module(gm, example).items():
        mod = gm.get_submodule(name) if name else gm
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            w = f"{name}.weight"
            exp_macs += macs * new_numel[w] // params[w].numel()
    return exp_params, exp_macs


def layer_macs(model: nn.Module, example) -> int:
    """MACs of conv/linear modules only (what pruning scales)."""
    return sum(m for name, m in macs_by_module(model, example).items()
               if isinstance(model.get_submodule(name), (nn.modules.conv._ConvNd, nn.Linear)))


def onnx_roundtrip(model: nn.Module, example: torch.Tensor, tmp_path, *, every_output: bool = False):
    """Export with torch.onnx (dynamo) and run in ONNX Runtime on the CPU: the first output, or all of them."""
    import onnxruntime as ort

    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})
    return outputs if every_output else outputs[0]


def assert_close(actual, expected, rtol=1e-4, what=""):
    """Relative to the output's scale: |a - e| <= rtol * max|e| (+ tiny absolute floor)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= rtol * scale + 1e-6, f"{what}: max error {err:.3g} exceeds {rtol} x output scale {scale:.3g}"


def cifar_test_subset(shared, per_class: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` test images of each class (sorted file names), normalised as in training.

    Read straight from the shared tarball so tests never unpack into the tree.
    """
    import tarfile

    from PIL import Image

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    wanted: dict[str, list[tuple[str, bytes]]] = {c: [] for c in classes}
    with tarfile.open(shared / "data/cifar10-jpeg/test.tar.gz") as tf:
        for member in tf:
            parts = member.name.split("/")
            if member.isfile() and len(parts) >= 3 and parts[-2] in wanted:
                wanted[parts[-2]].append((parts[-1], tf.extractfile(member).read()))
    images, labels = [], []
    for label, c in enumerate(classes):
        for _, data in sorted(wanted[c])[:per_class]:
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
            images.append(torch.from_numpy(img).permute(2, 0, 1))
            labels.append(label)
    x = torch.stack(images)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(labels)


ZOO_TORCHVISION = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "alexnet", "squeezenet1_1",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet1_0",
    "efficientnet_b0", "efficientnet_v2_s", "densenet121", "googlenet", "inception_v3",
    "shufflenet_v2_x1_0", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
]
ZOO_CIFAR = [f"cifar:resnet{d}" for d in (20, 32, 44, 56, 110)]
# detectors, segmenters and transformers: dict/tuple outputs, attention, opaque decode heads
ZOO_BEYOND = [
    "seg:lraspp_mobilenet_v3_large", "seg:deeplabv3_mobilenet_v3_large", "det:ssdlite320_mobilenet_v3_large",
    "vit:small", "vit_b_16", "swin_t", "timm:convnext_atto", "timm:tf_efficientnet_b0", "yolo:yolov8n", "yolo:yolo11n",
    "export:resnet18", "export:mobilenet_v3_small",  # captured with torch.export instead of fx
]


class DetectorBody(nn.Module):
    """What a deployment exports of a torchvision SSD: backbone and head; anchors, decoding and NMS run outside."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.backbone, self.head = detector.backbone, detector.head

    def forward(self, x):
        return self.head(list(self.backbone(x).values()))


def _beyond_model(name: str) -> tuple[nn.Module, int]:
    import pytest

    family, _, arch = name.partition(":")
    tv = torchvision.models
    if family == "seg":
        return tv.get_model(arch, weights=None, weights_backbone=None), 64
    if family == "export":
        return tv.get_model(arch, weights=None), 64
    if family == "det":
        return DetectorBody(tv.get_model(arch, weights=None, weights_backbone=None)), 320
    if family == "vit":  # a small VisionTransformer: 2 layers, 2 heads
        return tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64), 32
    if family == "timm":
        timm = pytest.importorskip("timm", reason="timm is a test dependency (pip install -e '.[dev]')")
        return timm.create_model(arch, pretrained=False), 64
    if family == "yolo":  # built from the YAML that ships in the package: random weights, nothing downloaded
        pytest.importorskip("ultralytics", reason="ultralytics is the 'yolo' extra (pip install -e '.[dev]')")
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel(f"{arch}.yaml", verbose=False), 64
    if name == "vit_b_16":  # the full structure at a 32x32 input (4 patches)
        return tv.vit_b_16(weights=None, image_size=32), 32
    return tv.get_model(name, weights=None), 64


def build_zoo_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A zoo model (torchvision name, cifar:resnetN or a ZOO_BEYOND name) with realistic random weights, and its
    example input."""
    torch.manual_seed(0)
    if name.startswith("cifar:"):
        model, size = CifarResNet(int(name.removeprefix("cifar:resnet"))), 32
    elif name in ZOO_BEYOND:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, size = _beyond_model(name)
    else:
        kwargs = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        size = 75 if name == "inception_v3" else 64
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return realistic_random(model, example), example


def output_tensors(out) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or dicts/lists/tuples of them) in ONNX output order."""
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


class DecodeHead(nn.Module):
    """ultralytics' Detect layout: the head's convolutions in ``forward``, then a decode method on ``self`` whose
    Python branches on a shape (``if self.dynamic or self.shape != shape``), called once per output."""

    def __init__(self):
        super().__init__()
        self.box = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1))
        self.cls = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
        self.register_buffer("stride", torch.tensor(8.0))
        self.act = nn.Sigmoid()

    def forward(self, x):
        box, cls = self.box(x), self.cls(x)
        return self._decode(box, scale=True), self._decode(cls, scale=False), box

    def _decode(self, y, scale):
        if y.shape[-1] > 2 and scale:
            return self.act(y) * self.stride
        return self.act(y)
