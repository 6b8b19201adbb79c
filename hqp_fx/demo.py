"""The embedded demo: scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside the package) and a
small residual CNN trained on the spot, so ``hqp demo`` shows the whole job with no download.

The scans are upsampled (16x16 by default) and the net is 64 channels wide: at 8x8 with 32 channels a run takes a
few hundredths of a millisecond, all per-op overhead, so neither INT8 nor pruning could show in the latency."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import BatchLoader, ImageSet
from .train import FinetuneConfig, finetune

__all__ = ["digits", "DigitsNet", "train_demo_model"]


def digits(test_fraction: float = 0.2, seed: int = 0, size: int = 16) -> tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets: 8x8 grey levels 0..16 scaled to uint8, upsampled bilinearly to ``size`` x ``size``
    and copied to 3 channels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().mul(255 / 16).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(len(order) * (1 - test_fraction))
    classes = tuple(str(c) for c in range(10))
    return (ImageSet(images[order[:cut]], labels[order[:cut]], classes),
            ImageSet(images[order[cut:]], labels[order[cut:]], classes))


class DigitsNet(nn.Module):
    """Stem, two residual stages (a 1x1 projection on the downsampling one) and a linear head: couplings to prune."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                    nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
                                    nn.ReLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(2 * width))
        self.project = nn.Sequential(nn.Conv2d(width, 2 * width, 1, 2, bias=False), nn.BatchNorm2d(2 * width))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block1(x))
        x = F.relu(self.project(x) + self.block2(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train_demo_model(train: ImageSet, epochs: int = 10, seed: int = 0, width: int = 64) -> DigitsNet:
    """Wide enough that pruning on ONNX Runtime's 16-channel grid has room to buy time."""
    torch.manual_seed(seed)
    model = DigitsNet(width)
    finetune(model, BatchLoader(train, 64, shuffle=True, seed=seed), FinetuneConfig(epochs=epochs, lr=0.05))
    return model.eval()
