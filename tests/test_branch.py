"""Whole-group removal (depth pruning): a group whose every channel goes takes its residual or gating branch."""
from __future__ import annotations

import operator

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hqp_fx
from hqp_fx import meta
from hqp_fx.compress import _channels_per_layer
from hqp_fx.engines.ort import OrtModel
from hqp_fx.lower_onnx import export_onnx
from hqp_fx.prune_loop import PruneLoopConfig, _floor
from hqp_fx.passes import AlignChannelsPass, ChannelDependencyPass, PruneChannelsPass, select_channels
from hqp_fx.passes.quantize import BACKENDS, QuantConfig, QuantizePass

from helpers import assert_close, build_zoo_model, layer_macs, masked_copy, random_plan
from test_quantize import _calibration, check_layers_within_one_step, folded_weights


def _analysed(name):
    model, x = build_zoo_model(name)
    gm = ChannelDependencyPass()(hqp_fx.trace(model, x)).graph_module
    return gm, x


# every residual block's inner group; MobileNetV3's SE hidden groups and the expansions of its residual blocks
@pytest.mark.parametrize("name, removable", [
    ("cifar:resnet20", [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]),
    ("resnet18", [f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in range(2)]),
    ("mobilenet_v3_small", None),
])
def test_removing_whole_groups_equals_the_masked_original(name, removable):
    gm, x = _analysed(name)
    groups = meta.channel_groups(gm)
    found = [g.id for g in groups if g.removable]
    if removable is not None:
        assert found == removable
    else:  # SE hidden layers (fc1) and residual-block expansions, never a block without a residual add
        assert {g.split(".block.")[1] for g in found} == {"1.fc1", "2.fc1", "0.0"}
        assert "features.2.block.0.0" not in found  # stride-2 block: no residual add, so nothing to fall back to
    whole = {gid: list(range(next(g.size for g in groups if g.id == gid))) for gid in found[::2]}
    partial = random_plan(groups, 0.3, seed=0, include=lambda g: g.id not in whole and not g.cross_channel)
    plan = {**partial, **whole}
    pruned = PruneChannelsPass(plan)(gm).graph_module
    pruned.graph.lint()
    with torch.no_grad():
        assert_close(pruned(x), masked_copy(gm, plan)(x), 1e-4, f"{name}: pruned vs masked")
    modules = dict(pruned.named_modules())
    for gid in whole:  # the producing layer is gone, not narrowed to nothing
        assert gid not in modules and not any(n.target == gid for n in pruned.graph.nodes)
    assert layer_macs(pruned, x) < layer_macs(PruneChannelsPass(partial)(gm).graph_module, x)


def _branch_output_zeroed(gm, plan, whole):
    """The original with ``plan``'s channels masked and, at each add or sub where a whole group's branch meets
    the net, the branch's whole output set to zero: its BatchNorm shift included."""
    analysis = meta.channel_analysis(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    zeroed = {const for gid in whole for const, user in analysis.branches[gid].meeting
              if nodes[user].target in (operator.add, torch.add, "add", operator.sub, torch.sub, "sub")}

    class Zeroed(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            return torch.zeros_like(out) if n.name in zeroed else out

    masked = masked_copy(gm, plan)
    return lambda x: Zeroed(masked).run(x)


@pytest.mark.parametrize("name", ["cifar:resnet20", "resnet18", "mobilenet_v3_small"])
def test_dropping_a_removed_branchs_bias_equals_the_original_with_the_branch_zeroed(name):
    """``drop_branch_bias``: a removed block becomes the identity, its add and the ReLU then applied twice gone;
    an SE gate's multiply keeps its constant."""
    gm, x = _analysed(name)
    groups = meta.channel_groups(gm)
    found = [g.id for g in groups if g.removable]
    whole = {gid: list(range(next(g.size for g in groups if g.id == gid))) for gid in found[::2]}
    partial = random_plan(groups, 0.3, seed=0, include=lambda g: g.id not in whole and not g.cross_channel)
    plan = {**partial, **whole}
    kept = PruneChannelsPass(plan)(gm).graph_module
    dropped = PruneChannelsPass(plan, drop_branch_bias=True)(gm).graph_module
    dropped.graph.lint()
    with torch.no_grad():
        assert_close(dropped(x), _branch_output_zeroed(gm, plan, whole)(x), 1e-4, f"{name}: dropped vs zeroed")
        assert (dropped(x) - kept(x)).abs().max() > 1e-3  # the bias did something: the two models differ

    def count(m, pred):
        return sum(1 for n in m.graph.nodes if pred(n))

    def is_add(n):
        return n.target in (operator.add, torch.add, "add", operator.iadd)

    def is_relu(n):
        return (n.op == "call_module" and "relu" in str(n.target)) or n.target in (torch.relu, F.relu, "relu")

    constants = [n for n in kept.graph.nodes if n.op == "get_attr"]
    gates = [n for n in constants if any(u.target in (operator.mul, torch.mul, "mul") for u in n.users)]
    assert [n.target for n in dropped.graph.nodes if n.op == "get_attr"] == [n.target for n in gates]
    removed_adds = len(constants) - len(gates)
    assert removed_adds > 0 and count(dropped, is_add) == count(kept, is_add) - removed_adds
    if name == "cifar:resnet20":  # relu(shortcut + branch), the shortcut non-negative: one relu fewer per block
        assert count(dropped, is_relu) == count(kept, is_relu) - removed_adds


def test_removed_branch_saves_exports_and_quantizes(tmp_path):
    gm, x = _analysed("cifar:resnet20")
    plan = {"layer1.1.conv1": list(range(16)), "layer2.0.conv1": list(range(32)), "layer3.2.conv1": list(range(64))}
    pruned = PruneChannelsPass(plan)(gm).graph_module
    widths = _channels_per_layer(gm, pruned)  # what report.md and the channel plot show
    assert widths["layer1.1.conv1"] == widths["layer1.1.conv2"] == [16, 0] and widths["layer1.0.conv1"] == [16, 16]
    constants = [n.target for n in pruned.graph.nodes if n.op == "get_attr"]
    # a BatchNorm shift per channel, stored once per channel: the pruned model runs at any input size
    assert [tuple(getattr(pruned, c).shape) for c in constants] == [(1, 16, 1, 1), (1, 32, 1, 1), (1, 64, 1, 1)]
    larger = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        assert_close(pruned(larger), masked_copy(gm, plan)(larger), 1e-4, "pruned vs masked at another size")
        out = pruned(x)
    hqp_fx.save(pruned, tmp_path / "m.hqp")
    with torch.no_grad():
        assert torch.equal(hqp_fx.load(tmp_path / "m.hqp")(x), out)
    full, per_channel = {(1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)}, {(1, 16, 1, 1), (1, 32, 1, 1), (1, 64, 1, 1)}

    def initializers(path):
        return {tuple(i.dims) for i in onnx.load(path).graph.initializer}
    # the FP32 file keeps them per channel (ORT's float add broadcasts them at full speed) and runs at another size
    export_onnx(pruned, (x,), tmp_path / "m.onnx")
    assert per_channel <= initializers(tmp_path / "m.onnx") and not full & initializers(tmp_path / "m.onnx")
    assert_close(OrtModel(tmp_path / "m.onnx")(x), out, 1e-4, "ONNX Runtime vs PyTorch")
    export_onnx(pruned, (larger,), tmp_path / "larger.onnx")
    assert_close(OrtModel(tmp_path / "larger.onnx")(larger), masked_copy(gm, plan)(larger), 1e-4, "ORT at 40x48")
    calib = _calibration(x)
    weights = folded_weights(pruned, x)
    for backend in BACKENDS:
        converted = QuantizePass([calib], QuantConfig(backend=backend, calibration="minmax"))(pruned).graph_module
        assert check_layers_within_one_step(converted, weights, calib) == len(weights)
        # quantized at the add's full shape, and so in the INT8 file ORT runs: its int8 add is slow per channel
        assert full <= {tuple(t.shape) for t in converted.state_dict().values()}, backend
        export_onnx(converted, (x,), tmp_path / f"{backend}.onnx")
        assert full <= initializers(tmp_path / f"{backend}.onnx") and not per_channel & initializers(
            tmp_path / f"{backend}.onnx"), backend
    assert [tuple(getattr(pruned, c).shape) for c in constants][0] == (1, 16, 1, 1)  # the user's model untouched


class _ShiftAndGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("shift", torch.randn(1, 4, 1, 1))
        self.register_buffer("gate", torch.rand(1, 4, 1, 1))

    def forward(self, x):
        return (self.bn(x) + self.shift) * self.gate


def test_constants_in_full_expands_an_adds_constant_in_a_copy_and_leaves_a_gate_per_channel():
    """What the ONNX files get: an add's per-channel constant at the add's shape (ORT's int8 add), a gate's per
    channel; the model itself, its train mode and its BatchNorm statistics untouched."""
    from hqp_fx.branches import constants_in_full

    x = torch.randn(2, 4, 6, 5)
    gm = hqp_fx.trace(_ShiftAndGate(), x[:1]).train()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    full = constants_in_full(gm, (x[:1],))
    assert full is not gm and full.training and gm.training
    assert tuple(full.shift.shape) == (1, 4, 6, 5) and tuple(full.gate.shape) == (1, 4, 1, 1)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())  # shapes and statistics as they were
    with torch.no_grad():
        assert torch.equal(full.eval()(x), gm.eval()(x))
    assert constants_in_full(full, (x[:1],)) is full  # nothing left to expand: no copy


def test_a_group_with_no_branch_to_fall_back_to_is_refused():
    gm, _ = _analysed("cifar:resnet20")
    stream = next(g for g in meta.channel_groups(gm) if g.id == "conv1")  # the residual stream itself
    assert stream.prunable and not stream.removable
    with pytest.raises(ValueError, match="the plan removes all 64 channels, but its channels do not only feed a branch"):
        PruneChannelsPass({"conv1": list(range(64))})(gm)


class _UnevenBranch(nn.Module):
    """The branch's constant varies over space (an average pool counting zero padding)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x + nn.functional.avg_pool2d(self.b(torch.relu(self.a(x))), 3, 1, 1, count_include_pad=True)


def test_a_constant_that_varies_over_space_is_kept_whole():
    x = torch.randn(3, 4, 6, 6)
    gm = ChannelDependencyPass()(hqp_fx.trace(_UnevenBranch().eval(), x[:1])).graph_module
    plan = {"a": [0, 1, 2, 3]}
    pruned = PruneChannelsPass(plan)(gm).graph_module
    constant = pruned.get_buffer("avg_pool2d_constant")
    assert constant.shape == (1, 4, 6, 6) and not torch.equal(constant[..., 0, 0], constant[..., 2, 2])
    with torch.no_grad():
        assert_close(pruned(x), masked_copy(gm, plan)(x), 1e-5, "uneven constant vs masked")


def test_selection_empties_a_removable_group_only_when_asked():
    gm, _ = _analysed("cifar:resnet20")
    groups = meta.channel_groups(gm)
    # layer1.1's inner group is by far the least important: every channel below every other group's channels
    scores = {g.id: torch.ones(g.size) * (1e-3 if g.id == "layer1.1.conv1" else 1.0) for g in groups if g.prunable}
    fraction = 16 / sum(g.size for g in groups if g.prunable)
    kept = select_channels(groups, scores, fraction, min_keep=16, unit=16)
    assert "layer1.1.conv1" not in kept  # at its minimum already: 16 channels, min_keep 16
    plan = select_channels(groups, scores, fraction, min_keep=16, unit=16, remove_branches=True)
    assert plan == {"layer1.1.conv1": list(range(16))}
    AlignChannelsPass(plan, 16, scores)(gm)
    assert gm.meta[meta.ALIGN]["plan"] == plan  # alignment keeps a whole removal at zero


def test_remove_branches_lowers_the_reachable_floor():
    gm, x = _analysed("cifar:resnet20")
    dense = hqp_fx.count_macs(gm, x)
    channels_only, _ = _floor(gm, 16, PruneLoopConfig(align=16), x)
    with_branches, _ = _floor(gm, 16, PruneLoopConfig(align=16, remove_branches=True), x)
    assert with_branches < channels_only < dense


class _InPlaceBranch(nn.Module):
    """The branch meets the stream in an in-place add whose first operand is the branch itself."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).add_(x)


def test_an_in_place_meeting_point_is_not_removable():
    gm = ChannelDependencyPass()(hqp_fx.trace(_InPlaceBranch().eval(), torch.randn(1, 4, 6, 6))).graph_module
    group = next(g for g in meta.channel_groups(gm) if g.id == "a")
    assert group.prunable and not group.removable  # a stored constant would be written into on every call


class _PreNormBlock(nn.Module):
    """A block whose depthwise conv and norm feed only the removable group's layer (ConvNeXt's layout): removing
    the group leaves them feeding nothing, so they go too."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.pw1 = nn.Conv2d(8, 16, 1)
        self.pw2 = nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.pw2(torch.relu(self.pw1(self.bn(self.dw(x))))))


@pytest.mark.parametrize("name", ["pre-norm block", "convnext_tiny"])
def test_layers_feeding_only_a_removed_branch_go_with_it(name):
    if name == "convnext_tiny":
        model, x = build_zoo_model(name)
        with torch.no_grad():  # torchvision starts layer scales at 1e-6: masking would not move the output
            for m in model.modules():
                if hasattr(m, "layer_scale"):
                    m.layer_scale.copy_(torch.rand(m.layer_scale.shape) + 0.5)
        gm = ChannelDependencyPass()(hqp_fx.trace(model, x)).graph_module
        gid = "features.5.3.block.3"
    else:
        torch.manual_seed(0)
        x = torch.randn(1, 3, 6, 6)
        gm = ChannelDependencyPass()(hqp_fx.trace(_PreNormBlock(), x)).graph_module
        gid = "pw1"
    group = next(g for g in meta.channel_groups(gm) if g.id == gid)
    assert group.removable
    plan = {gid: list(range(group.size))}
    with torch.no_grad():
        masked = masked_copy(gm, plan)(x)
        assert float((gm(x) - masked).abs().max()) > 1e-3 * float(masked.abs().max())  # the check can fail
        pruned = PruneChannelsPass(plan)(gm).graph_module
        assert_close(pruned(x), masked, 1e-4, f"{name}: pruned vs masked")
    if name != "convnext_tiny":
        assert not {"dw", "bn", "pw1", "pw2"} & set(dict(pruned.named_modules()))
