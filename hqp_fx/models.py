"""Model specs: ``torchvision:NAME``, ``cifar:resnetN`` and ``path/to/file.py:factory``.

The CIFAR ResNets are our own definition of He et al.'s CIFAR variant with the option-A
shortcut (stride-2 subsampling plus zero channel padding), whose state-dict names match the
published checkpoints in ``shared/models/cifar-resnet``.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CifarResNet", "ModelSpec", "build_model", "load_weights", "CIFAR_DEPTHS"]

CIFAR_DEPTHS = (20, 32, 44, 56, 110)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``planes // 4`` channels on each side."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-{20,32,44,56,110} for 32x32 inputs (16/32/64 channels, option-A shortcuts)."""

    def __init__(self, depth: int = 56, num_classes: int = 10):
        super().__init__()
        if depth not in CIFAR_DEPTHS:
            raise ValueError(f"CIFAR ResNet depth must be one of {CIFAR_DEPTHS}, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, layers = 16, []
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(planes, width, stride))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def _torchvision_model(name: str, hub: str | None, kwargs: dict) -> nn.Module:
    """torchvision's model, with its hub weights when named: an unknown weight name or an unreachable hub is one
    line that lists the names and offers the local-checkpoint alternative."""
    import torchvision

    if hub is None:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    names = ["DEFAULT"] + [w.name for w in torchvision.models.get_model_weights(name)]
    if hub not in names:
        raise ValueError(f"torchvision's {name} has no weights {hub!r}; its weights are {', '.join(names)}, or pass a "
                         "local checkpoint file")
    try:
        return torchvision.models.get_model(name, weights=hub, **kwargs)
    except (OSError, RuntimeError) as exc:  # urllib's URLError is an OSError; a damaged download a RuntimeError
        raise ValueError(f"cannot fetch torchvision's {name} weights {hub!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else ''}): the hub is unreachable from this "
                         "machine or the file is damaged; download the .pth elsewhere and pass it as --weights FILE") from None


@dataclass(frozen=True)
class ModelSpec:
    model: nn.Module
    input_shape: tuple[int, ...]  # one example input, batch 1
    source: str


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict (plain, ``{"state_dict": ...}``, or DataParallel ``module.``-prefixed) safely."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"weights {path} is a folder; pass the checkpoint file inside it (a state dict saved with "
                         "torch.save(model.state_dict(), path))")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a weights-only checkpoint ({type(exc).__name__}); "
                         "re-save it with torch.save(model.state_dict(), path)") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    wrong = [f"{k} {list(v.shape)} in the file, {list(own[k].shape)} in the model" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path} does not fit {type(model).__name__}: {len(wrong)} tensor(s) have other shapes "
                         f"({'; '.join(wrong[:3])}); use a checkpoint of this architecture and class count")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        arch = obj.get("arch") if isinstance(obj, dict) else None
        raise ValueError(
            f"{path} does not fit {type(model).__name__}"
            + (f" (checkpoint arch: {arch})" if arch else "")
            + f": missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def build_model(spec: str, weights: str | None = None, num_classes: int | None = None) -> ModelSpec:
    """Build a model from a spec string; ``weights`` is a local checkpoint path (or, for
    torchvision, a weights enum name such as ``DEFAULT``, downloaded from the hub)."""
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"model spec {spec!r} must look like torchvision:resnet18, cifar:resnet56 or path/to/file.py:factory")
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"torchvision has no classification model {name!r}; see torchvision.models.list_models()")
        hub = weights if weights and not Path(weights).suffix and not Path(weights).exists() else None
        kwargs = {"num_classes": num_classes} if num_classes else {}
        model = _torchvision_model(name, hub, kwargs)
        if weights and hub is None:
            load_weights(model, weights)
        size = 299 if name == "inception_v3" else 224
        return ModelSpec(model.eval(), (1, 3, size, size), spec)
    if kind == "cifar":
        depth = name.removeprefix("resnet")
        if not depth.isdigit() or int(depth) not in CIFAR_DEPTHS:
            raise ValueError(f"unknown CIFAR model {name!r}; use one of " + ", ".join(f"resnet{d}" for d in CIFAR_DEPTHS))
        model = CifarResNet(int(depth), num_classes or 10)
        if weights:
            load_weights(model, weights)
        return ModelSpec(model.eval(), (1, 3, 32, 32), spec)
    if kind.endswith(".py"):
        path = Path(kind)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        factory = getattr(module, name, None)
        if not callable(factory):
            raise ValueError(f"{path} has no callable {name!r}")
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"{path}:{name}() returned {type(model).__name__}, not an nn.Module")
        if weights:
            load_weights(model, weights)
        shape = tuple(getattr(model, "input_shape", getattr(module, "INPUT_SHAPE", (1, 3, 224, 224))))
        return ModelSpec(model.eval(), shape, spec)
    raise ValueError(f"unknown model source {kind!r} in {spec!r}; use torchvision:, cifar: or a .py file")
