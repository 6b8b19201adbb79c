"""The equivalence property on every architecture the foundation promises to handle.

For each model: remove a seeded random 30% of every prunable group's channels and check
(a) shapes, (b) pruned == masked original (groups without cross-channel ops), (c) params and
MACs drop exactly by what the slices imply, (d) ONNX Runtime == PyTorch, (e) reasons.
"""
from __future__ import annotations

import pytest
import torch

import hqp_fx
from hqp_fx import meta
from hqp_fx.count import count_params
from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass

from helpers import (ZOO_CIFAR, ZOO_TORCHVISION, assert_close, build_zoo_model, expected_counts, layer_macs, masked_copy,
                     onnx_roundtrip, random_plan)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_TORCHVISION + ZOO_CIFAR)
def test_equivalence_property(name, tmp_path):
    model, x = build_zoo_model(name)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = hqp_fx.trace(model, x)
    result = ChannelDependencyPass()(gm)
    assert result.modified is False and result.graph_module is gm
    groups = meta.channel_groups(gm)

    # (e) something to prune, and every refusal explained
    assert any(g.prunable for g in groups)
    for g in groups:
        assert g.prunable or g.reason, f"group {g.id} is unprunable without a reason"
    out_group = [g for g in groups if "feeds the network output" in g.reason]
    assert out_group, "the classifier's outputs must be pinned"

    with torch.no_grad():
        reference = gm(x)

    # (b) exactness on groups without cross-channel ops
    exact_plan = random_plan(groups, 0.3, seed=0, include=lambda g: not g.cross_channel)
    if exact_plan:
        pruned = PruneChannelsPass(exact_plan)(gm).graph_module
        with torch.no_grad():
            assert_close(pruned(x), masked_copy(gm, exact_plan)(x), 1e-4, f"{name}: pruned vs masked")

    # (a), (c), (d) on every prunable group
    plan = random_plan(groups, 0.3, seed=0)
    res = PruneChannelsPass(plan)(gm)
    pruned = res.graph_module
    assert res.modified and pruned is not gm
    pruned.graph.lint()
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == reference.shape
    exp_params, exp_macs = expected_counts(gm, plan, x)
    assert count_params(pruned) == exp_params < count_params(gm)
    assert layer_macs(pruned, x) == exp_macs < layer_macs(gm, x)
    assert_close(onnx_roundtrip(pruned, x, tmp_path), out, 1e-4, f"{name}: ONNX Runtime vs PyTorch")

    # the user's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k]), f"{name}: trace/prune mutated the user's {k}"
