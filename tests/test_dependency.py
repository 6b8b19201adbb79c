"""Exact group membership for a small hand-built model of each coupling kind."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hqp_fx
from hqp_fx import meta
from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass

from helpers import assert_close, masked_copy


def analyse(model, shape=(1, 3, 8, 8)):
    torch.manual_seed(0)
    x = torch.randn(shape)
    gm = hqp_fx.trace(model.eval(), x)
    ChannelDependencyPass()(gm)
    return gm, {g.id: g for g in meta.channel_groups(gm)}, x


def slices_of(group, idx):
    return {(s.param, s.dim, s.role): s.index.tolist() for s in group.slices(idx)}


def check_exact(gm, x, plan):
    pruned = PruneChannelsPass(plan)(gm).graph_module
    with torch.no_grad():
        assert_close(pruned(x), masked_copy(gm, plan)(x), 1e-5, "pruned vs masked")
    return pruned


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv1(x))))


def test_chain_producer_norm_consumer():
    gm, groups, x = analyse(Chain())
    g = groups["conv1"]
    assert (g.size, g.prunable, g.cross_channel, g.layers) == (6, True, False, ("conv1",))
    assert slices_of(g, [1, 4]) == {
        ("conv1.weight", 0, "out"): [1, 4], ("conv1.bias", 0, "out"): [1, 4],
        ("bn.weight", 0, "out"): [1, 4], ("bn.bias", 0, "out"): [1, 4],
        ("bn.running_mean", 0, "out"): [1, 4], ("bn.running_var", 0, "out"): [1, 4],
        ("conv2.weight", 1, "in"): [1, 4],
    }
    assert not groups["conv2"].prunable and "network output" in groups["conv2"].reason
    assert not groups["x"].prunable and "network input" in groups["x"].reason
    pruned = check_exact(gm, x, {"conv1": [1, 4]})
    assert (pruned.conv1.out_channels, pruned.bn.num_features, pruned.conv2.in_channels) == (4, 4, 4)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.body(y)
        return self.head(torch.relu(y))


def test_residual_add_couples_both_producers():
    gm, groups, x = analyse(Residual())
    g = groups["stem"]
    assert g.size == 4 and g.layers == ("stem", "body")
    assert slices_of(g, [2]) == {
        ("stem.weight", 0, "out"): [2], ("stem.bias", 0, "out"): [2],
        ("body.weight", 1, "in"): [2], ("body.weight", 0, "out"): [2], ("body.bias", 0, "out"): [2],
        ("head.weight", 1, "in"): [2],
    }
    check_exact(gm, x, {"stem": [0, 2]})


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1, bias=False)
        self.b = nn.Conv2d(3, 5, 1, bias=False)
        self.c = nn.Conv2d(8, 2, 1, bias=False)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


def test_concat_offsets():
    gm, groups, x = analyse(Concat())
    assert groups["a"].size == 3 and groups["b"].size == 5
    assert slices_of(groups["b"], [0, 4]) == {("b.weight", 0, "out"): [0, 4], ("c.weight", 1, "in"): [3, 7]}
    assert slices_of(groups["a"], [1]) == {("a.weight", 0, "out"): [1], ("c.weight", 1, "in"): [1]}
    check_exact(gm, x, {"a": [1], "b": [0, 4]})


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1, bias=False)
        self.b = nn.Conv2d(4, 2, 1, bias=False)
        self.c = nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x):
        y1, y2 = torch.chunk(self.a(x), 2, dim=1)
        z1, z2 = self.a(x).split([4, 4], dim=1)
        return self.b(y1 + z1) + self.c(y2 * z2)


def test_split_chunk_offsets_and_uneven_pruning():
    gm, groups, x = analyse(Split())
    g = groups["a"]
    assert g.size == 8
    assert slices_of(g, [1, 6]) == {("a.weight", 0, "out"): [1, 6], ("b.weight", 1, "in"): [1], ("c.weight", 1, "in"): [2]}
    pruned = check_exact(gm, x, {"a": [0, 1, 2, 6]})  # 3 from the first half, 1 from the second
    assert pruned.b.in_channels == 1 and pruned.c.in_channels == 3


class Depthwise(nn.Module):
    def __init__(self, groups=8):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.bn(self.dw(torch.relu(self.pw(x)))))


def test_depthwise_ties_input_to_output():
    gm, groups, x = analyse(Depthwise())
    g = groups["pw"]
    assert g.size == 8 and g.layers == ("pw", "dw")
    s = slices_of(g, [3])
    assert s[("dw.weight", 0, "out")] == [3] and s[("pw.weight", 0, "out")] == [3] and s[("out.weight", 1, "in")] == [3]
    pruned = check_exact(gm, x, {"pw": [3, 5]})
    assert pruned.dw.groups == pruned.dw.in_channels == pruned.dw.out_channels == 6


def test_grouped_conv_removes_whole_conv_groups():
    gm, groups, x = analyse(Depthwise(groups=2))
    g = groups["pw"]
    assert g.size == 2  # two conv groups of 4 channels each, removed whole
    assert slices_of(g, [1]) == {
        ("pw.weight", 0, "out"): [4, 5, 6, 7], ("pw.bias", 0, "out"): [4, 5, 6, 7],
        ("dw.weight", 0, "out"): [4, 5, 6, 7], ("dw.bias", 0, "out"): [4, 5, 6, 7],
        ("bn.weight", 0, "out"): [4, 5, 6, 7], ("bn.bias", 0, "out"): [4, 5, 6, 7],
        ("bn.running_mean", 0, "out"): [4, 5, 6, 7], ("bn.running_var", 0, "out"): [4, 5, 6, 7],
        ("out.weight", 1, "in"): [4, 5, 6, 7],
    }
    pruned = check_exact(gm, x, {"pw": [0]})
    assert (pruned.dw.groups, pruned.dw.in_channels, pruned.dw.out_channels) == (1, 4, 4)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head((y * s).mean((2, 3)))


def test_se_gate_broadcast_couples_gate_to_features():
    gm, groups, x = analyse(SqueezeExcite())
    g = groups["conv"]
    assert g.layers == ("conv", "fc2") and g.size == 8 and not g.cross_channel
    s = slices_of(g, [5])
    assert s[("fc2.weight", 0, "out")] == [5] and s[("fc1.weight", 1, "in")] == [5] and s[("head.weight", 1, "in")] == [5]
    assert groups["fc1"].size == 4
    check_exact(gm, x, {"conv": [0, 5], "fc1": [2]})


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=3)
        self.fc = nn.Linear(4 * 9, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


def test_flatten_maps_channel_to_feature_block():
    gm, groups, x = analyse(FlattenLinear(), (2, 3, 9, 9))
    assert slices_of(groups["conv"], [2])[("fc.weight", 1, "in")] == list(range(18, 27))
    pruned = check_exact(gm, x, {"conv": [2]})
    assert pruned.fc.in_features == 27


class ViewLinear(nn.Module):
    """Flatten spelled as view with a constant size: the constant must be rewritten."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=3)
        self.fc = nn.Linear(4 * 9, 5)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(2, 36))


def test_view_constant_rewritten():
    gm, groups, x = analyse(ViewLinear(), (2, 3, 9, 9))
    check_exact(gm, x, {"conv": [0, 3]})


class OptionA(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = self.b(y) + F.pad(y[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        return self.head(z)


def test_channel_pad_shortcut_shifts_indices():
    gm, groups, x = analyse(OptionA())
    g = groups["a"]
    assert g.size == 8 and g.layers == ("a", "b")
    # channels 0..3 of the group are a's, living at b's channels 2..5; 4,5 the left pad, 6,7 the right
    assert slices_of(g, [0, 3]) == {("a.weight", 0, "out"): [0, 3], ("b.weight", 1, "in"): [0, 3],
                                     ("b.weight", 0, "out"): [2, 5], ("head.weight", 1, "in"): [2, 5]}
    assert slices_of(g, [4, 7]) == {("b.weight", 0, "out"): [0, 7], ("head.weight", 1, "in"): [0, 7]}
    pruned = check_exact(gm, x, {"a": [1, 4, 5, 6]})
    pad = next(n for n in pruned.graph.nodes if n.target is F.pad)
    assert tuple(pad.args[1]) == (0, 0, 0, 0, 0, 1)


class ChannelsLast(nn.Module):
    """ConvNeXt-style block: permute to channels-last, LayerNorm + Linear, layer scale parameter."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.norm = nn.LayerNorm(6)
        self.pw1 = nn.Linear(6, 12)
        self.pw2 = nn.Linear(12, 6)
        self.gamma = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.stem = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        return (x + self.gamma * y).mean((2, 3))


def test_channels_last_layernorm_and_layer_scale():
    gm, groups, x = analyse(ChannelsLast())
    g = groups["stem"]
    assert g.cross_channel and not groups["pw1"].cross_channel
    s = slices_of(g, [4])
    assert s[("gamma", 0, "out")] == [4] and s[("norm.weight", 0, "out")] == [4] and s[("pw1.weight", 1, "in")] == [4]
    assert s[("pw2.weight", 0, "out")] == [4] and s[("dw.weight", 0, "out")] == [4]
    check_exact(gm, x, {"pw1": [0, 7, 11]})
    with pytest.raises(ValueError, match="stem"):  # the output feeds the network output: pinned
        PruneChannelsPass({"stem": [4]})(gm)


class GroupNormNet(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(groups, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.gn(self.conv(x))))


def test_groupnorm_prunes_whole_norm_groups_exactly():
    gm, groups, x = analyse(GroupNormNet(4))
    g = groups["conv"]
    assert g.size == 4 and not g.cross_channel
    assert slices_of(g, [1])[("gn.weight", 0, "out")] == [2, 3]
    pruned = check_exact(gm, x, {"conv": [1, 2]})
    assert (pruned.gn.num_groups, pruned.gn.num_channels) == (2, 4)


def test_groupnorm_single_group_is_cross_channel():
    gm, groups, x = analyse(GroupNormNet(1))
    g = groups["conv"]
    assert g.size == 8 and g.cross_channel
    pruned = PruneChannelsPass({"conv": [0, 1]})(gm).graph_module
    assert pruned(x).shape == gm(x).shape and pruned.gn.num_channels == 6


class Shuffle(nn.Module):
    """Channel shuffle spelled three ways: view-transpose-view, the module, the function."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.shuffle = nn.ChannelShuffle(2)
        self.c = nn.Conv2d(8, 6, 1)
        self.d = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, ch, h, w = y.size()
        y = y.view(n, 2, ch // 2, h, w).transpose(1, 2).contiguous().view(n, ch, h, w)
        y = self.shuffle(self.c(y))
        return self.d(torch.channel_shuffle(y, 3))


def test_channel_shuffle_is_mapped_and_pruned_exactly():
    gm, groups, x = analyse(Shuffle())
    assert all(groups[k].prunable for k in ("a", "b", "c"))
    # after the shuffle a's channel i sits at c's input 2i, b's at 2i+1
    assert slices_of(groups["a"], [1])[("c.weight", 1, "in")] == [2]
    assert slices_of(groups["b"], [1])[("c.weight", 1, "in")] == [3]
    pruned = check_exact(gm, x, {"a": [0, 1, 2], "c": [1, 4]})  # uneven: no shuffle could stay a shuffle
    assert any(n.target is torch.index_select for n in pruned.graph.nodes)


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        y = torch.fft.fft2(y).real  # something the analysis has no rule for
        return self.c(self.b(y))


def test_unknown_op_pins_with_reason():
    gm, groups, x = analyse(Unsupported())
    assert not groups["a"].prunable and "fft2" in groups["a"].reason
    assert groups["b"].prunable


class Shared(nn.Module):
    """One conv applied twice: its parameters tie both call sites."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.shared = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.shared(self.a(x)), self.shared(self.b(x))], 1))


def test_shared_module_couples_its_call_sites():
    gm, groups, x = analyse(Shared())
    assert groups["a"].id == "a" and "b" not in groups  # a and b feed the same weight columns
    assert groups["a"].layers == ("a", "b")
    check_exact(gm, x, {"a": [1], "shared": [0, 2]})


def test_analysis_is_deterministic_and_reports_unmodified():
    gm, groups, _ = analyse(Residual())
    again = ChannelDependencyPass()(gm)
    assert again.modified is False
    assert [str(g) for g in meta.channel_groups(gm)] == [str(g) for g in groups.values()]


class OtherLayers(nn.Module):
    """ConvTranspose2d, InstanceNorm, per-channel PReLU, Conv1d over a reshaped map, Conv3d."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 5, 2, stride=2)
        self.inorm = nn.InstanceNorm2d(5, affine=True)
        self.act = nn.PReLU(5)
        self.c1 = nn.Conv1d(5, 4, 3, padding=1)
        self.c3 = nn.Conv3d(4, 3, 1)

    def forward(self, x):
        y = self.act(self.inorm(self.up(torch.relu(self.down(x)))))
        n, c, h, w = y.shape
        z = torch.relu(self.c1(y.reshape(n, c, h * w)))
        return self.c3(z.reshape(n, 4, 1, h, w))


def test_transposed_conv_instance_norm_prelu_conv1d_conv3d():
    gm, groups, x = analyse(OtherLayers())
    assert slices_of(groups["down"], [2]) == {("down.weight", 0, "out"): [2], ("down.bias", 0, "out"): [2],
                                              ("up.weight", 0, "in"): [2]}
    s = slices_of(groups["up"], [1])
    assert s[("up.weight", 1, "out")] == [1] and s[("inorm.weight", 0, "out")] == [1]
    assert s[("act.weight", 0, "out")] == [1] and s[("c1.weight", 1, "in")] == [1]
    assert slices_of(groups["c1"], [3]) == {("c1.weight", 0, "out"): [3], ("c1.bias", 0, "out"): [3],
                                            ("c3.weight", 1, "in"): [3]}
    pruned = check_exact(gm, x, {"down": [0, 5], "up": [1, 4], "c1": [3]})
    assert (pruned.up.in_channels, pruned.up.out_channels, pruned.inorm.num_features) == (4, 3, 3)
    assert (pruned.act.num_parameters, pruned.c1.in_channels, pruned.c3.in_channels) == (3, 3, 3)


class ChannelReductions(nn.Module):
    """CBAM-style spatial attention (mean/max over channels) and a softmax over channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.att = nn.Conv2d(2, 1, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        s = torch.sigmoid(self.att(torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)))
        z = self.b(y * s)
        return self.c(torch.softmax(z, dim=1))


def test_channel_reductions_flag_cross_channel_without_coupling():
    gm, groups, x = analyse(ChannelReductions())
    a, b = groups["a"], groups["b"]
    assert a.size == 6 and a.cross_channel and a.layers == ("a",)  # the 1-channel gate is not merged in
    assert b.cross_channel and b.size == 4
    assert not groups["att"].prunable  # a single channel, broadcast over a's channels
    pruned = PruneChannelsPass({"a": [1, 2], "b": [0]})(gm).graph_module
    assert pruned(x).shape == gm(x).shape and pruned.att.in_channels == 2


class Functional(nn.Module):
    """The same layers written with torch.nn.functional and bare parameters."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.register_buffer("mean", torch.randn(8) * 0.1)
        self.register_buffer("var", torch.rand(8) + 0.5)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.beta = nn.Parameter(torch.randn(8) * 0.1)
        self.wdw = nn.Parameter(torch.randn(8, 2, 3, 3) * 0.3)  # grouped conv, 4 groups of 2
        self.gn_w = nn.Parameter(torch.rand(8) + 0.5)
        self.gn_b = nn.Parameter(torch.randn(8) * 0.1)
        self.slope = nn.Parameter(torch.rand(8) * 0.2)
        self.wl = nn.Parameter(torch.randn(4, 8) * 0.3)

    def forward(self, x):
        y = F.conv2d(x, self.w1, self.b1, 1, 1)
        y = F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False)
        y = F.conv2d(F.relu(y), self.wdw, None, 1, 1, 1, 4)
        y = F.prelu(F.group_norm(y, 4, self.gn_w, self.gn_b), self.slope)
        return F.linear(y.mean((2, 3)), self.wl)


def test_functional_layers_with_bare_parameters():
    gm, groups, x = analyse(Functional())
    g = groups["w1"]  # a functional layer's group is named after its weight
    assert g.size == 4 and not g.cross_channel  # grouped conv and GroupNorm both tie channel pairs
    s = slices_of(g, [1])
    assert s[("w1", 0, "out")] == [2, 3] and s[("mean", 0, "out")] == [2, 3] and s[("gamma", 0, "out")] == [2, 3]
    assert s[("wdw", 0, "out")] == [2, 3] and s[("gn_w", 0, "out")] == [2, 3] and s[("slope", 0, "out")] == [2, 3]
    assert s[("wl", 1, "in")] == [2, 3]
    pruned = check_exact(gm, x, {"w1": [1, 3]})
    assert pruned.w1.shape == (4, 3, 3, 3) and pruned.wdw.shape == (4, 2, 3, 3) and pruned.wl.shape == (4, 4)
    conv2 = next(n for n in pruned.graph.nodes if n.name == "conv2d_1")
    group_norm = next(n for n in pruned.graph.nodes if n.target is F.group_norm)
    assert conv2.args[6] == 2 and group_norm.args[1] == 2
