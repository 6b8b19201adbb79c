"""Real weights, real images: our CIFAR ResNet definition reproduces the shared checkpoints, and
pruning the real ResNet-56 equals masking it on real CIFAR-10 test images."""
from __future__ import annotations

import pytest
import torch

import hqp_fx
from hqp_fx import meta
from hqp_fx.models import build_model
from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass

from helpers import assert_close, cifar_test_subset, masked_copy, random_plan


@pytest.fixture(scope="module")
def subset(shared_dir):
    return cifar_test_subset(shared_dir, per_class=50)


@pytest.mark.parametrize("depth", [20, 56])
def test_checkpoint_accuracy_on_500_test_images(shared_dir, subset, depth):
    ckpt = shared_dir / f"models/cifar-resnet/resnet{depth}_cifar10jpeg.pt"
    recorded = torch.load(ckpt, weights_only=True)["test_acc_cifar10_jpeg"]
    recorded = recorded * 100 if recorded <= 1 else recorded
    model = build_model(f"cifar:resnet{depth}", str(ckpt)).model
    x, y = subset
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item() * 100
    # 500 images: the standard error of a ~85% accuracy is ~1.6 points
    assert abs(acc - recorded) < 6, f"resnet{depth}: {acc:.1f}% on 500 images vs {recorded:.1f}% recorded"


def test_pruned_real_resnet56_equals_masked(shared_dir, subset):
    model = build_model("cifar:resnet56", str(shared_dir / "models/cifar-resnet/resnet56_cifar10jpeg.pt")).model
    x, _ = subset
    gm = hqp_fx.trace(model, x[:8])
    ChannelDependencyPass()(gm)
    plan = random_plan(meta.channel_groups(gm), 0.3, seed=3)
    pruned = PruneChannelsPass(plan)(gm).graph_module
    with torch.no_grad():
        a, b = pruned(x), masked_copy(gm, plan)(x)
    assert_close(a, b, 1e-4, "real resnet56: pruned vs masked")
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert hqp_fx.count_params(pruned) < 0.6 * hqp_fx.count_params(gm)
