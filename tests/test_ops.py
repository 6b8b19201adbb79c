"""The op-rule registry: one rule per op, found by node; and each rule's pruning is exact (pruned == masked).

Every equivalence check here first shows that masking the plan's channels moves the output well above the
tolerance, so it could fail if pruning did the wrong thing.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hqp_fx
from hqp_fx import meta, ops
from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass

from helpers import assert_close, masked_copy


def analyse(model, x):
    gm = hqp_fx.trace(model.eval(), x)
    ChannelDependencyPass()(gm)
    return gm, {g.id: g for g in meta.channel_groups(gm)}


def assert_prunes_exactly(gm, x, plan, rtol=1e-5):
    """pruned == masked original, and masking is visible at this tolerance (the check can fail)."""
    with torch.no_grad():
        original, masked = gm(x), masked_copy(gm, plan)(x)
        moved = float((original - masked).abs().max())
        assert moved > 100 * rtol * float(masked.abs().max()), f"masking {plan} barely moves the output ({moved:.3g})"
        pruned = PruneChannelsPass(plan)(gm).graph_module
        assert_close(pruned(x), masked, rtol, "pruned vs masked")
    return pruned


def test_registry_finds_one_rule_per_op():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return torch.cat([y, y.relu()], 1).flatten(1).sum(1)

    gm = hqp_fx.trace(Net(), torch.randn(1, 3, 6, 6))
    modules = dict(gm.named_modules())
    found = {n.name: ops.rule_for(n, modules) for n in gm.graph.nodes}
    assert found["conv"].name == "conv" and found["conv"].branch == "consumer"
    assert found["bn"].name == "batch/instance norm" and found["bn"].fix_module is not None
    assert found["relu"].name == "elementwise" and found["cat"].moves_data and found["flatten"].moves_data
    assert found["sum_1"].name == "reduction"
    assert found["x"] is None and found["output"] is None
    assert [r.name for r in ops.RULES if r.branch == "meeting"] == ["add/sub/mul"]
    # no two rules claim one target (checked at import), and every rule matches something
    assert all(r.functions or r.methods or r.modules for r in ops.RULES)
    assert len({r.name for r in ops.RULES}) == len(ops.RULES)


class ClassToken(nn.Module):
    """A ViT's class token: a bare parameter expanded over the batch, concatenated with the patch tokens."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, 8))
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        n = x.shape[0]
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(n, -1, -1), tokens], dim=1)
        tokens = tokens + self.fc2(F.gelu(self.fc1(tokens)))
        return self.head(tokens[:, 0])


def test_class_token_expand_does_not_block_mlp_pruning():
    """The expand of the class token is re-run on its labels, not on its float values, when pruning checks
    its data movement. The token width itself stays pinned: the class token and the patch channels share the
    channel positions without being one channel (see the transformer issue)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm, groups = analyse(ClassToken(), x)
    assert groups["fc1"].prunable and not groups["patch"].prunable
    pruned = assert_prunes_exactly(gm, x, {"fc1": [0, 3, 9, 15]})
    assert pruned.fc1.out_features == 12 and pruned.fc2.in_features == 12


class LayerScale(nn.Module):
    """timm's layer scale: a bare per-channel parameter reshaped to broadcast over the map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        y = y + self.pw(y).mul(self.gamma.reshape(1, -1, 1, 1))
        return self.head(F.relu(y))


def test_layer_scale_reshape_of_a_bare_parameter():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6)
    gm, groups = analyse(LayerScale(), x)
    pruned = assert_prunes_exactly(gm, x, {"conv": [0, 5]})
    assert pruned.gamma.shape == (6,)


class RMSNormNet(nn.Module):
    """Channels-last RMSNorm, as a module and as the functional form."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.RMSNorm(8)
        self.fc = nn.Linear(8, 12)
        self.weight = nn.Parameter(torch.rand(12) + 0.5)
        self.fc2 = nn.Linear(12, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        y = self.norm(self.conv(x).permute(0, 2, 3, 1))
        y = F.rms_norm(F.relu(self.fc(y)), (12,), self.weight, 1e-6)
        return self.head(F.relu(self.fc2(y)))


def test_rms_norm_follows_its_channels_and_is_cross_channel():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 5, 5)
    model = RMSNormNet().eval()
    gm, groups = analyse(model, x)
    assert groups["conv"].cross_channel and groups["fc"].cross_channel  # the norm's statistics span the channels
    assert not groups["fc2"].cross_channel
    assert_prunes_exactly(gm, x, {"fc2": [0, 4]})
    # cross-channel: the pruned norm normalises over the kept channels, so compare with that computed by hand
    drop_conv, drop_fc = [1, 2, 7], [0, 4, 5, 11]
    keep_conv = [c for c in range(8) if c not in drop_conv]
    keep_fc = [c for c in range(12) if c not in drop_fc]
    pruned = PruneChannelsPass({"conv": drop_conv, "fc": drop_fc})(gm).graph_module
    assert pruned.norm.normalized_shape == (5,) and pruned.weight.shape == (8,)
    with torch.no_grad():
        y = model.conv(x).permute(0, 2, 3, 1)[..., keep_conv]
        y = F.rms_norm(y, (5,), model.norm.weight[keep_conv], model.norm.eps)
        y = F.relu(F.linear(y, model.fc.weight[keep_fc][:, keep_conv], model.fc.bias[keep_fc]))
        y = F.rms_norm(y, (8,), model.weight[keep_fc], 1e-6)
        expected = model.head(F.relu(F.linear(y, model.fc2.weight[:, keep_fc], model.fc2.bias)))
        assert_close(pruned(x), expected, 1e-5, "pruned vs the norm over the kept channels")
        assert float((expected - model(x)).abs().max()) > 1e-3  # the check can fail: pruning changed the output


class AttentionBiasTable(nn.Module):
    """LeViT / EfficientFormer / CoAtNet / MaxViT: a learned bias table indexed by an integer buffer, added to the
    attention scores. The tensor-indexed read pins the heads; the channels around it stay prunable, and pruning
    them must not re-run that read on labels (the index buffer holds labels there, not positions)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mlp = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 1))
        self.qk = nn.Conv2d(8, 4, 1)
        self.biases = nn.Parameter(torch.randn(2, 5))
        self.register_buffer("bias_idxs", torch.randint(0, 5, (16, 16)), persistent=False)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.mlp(x)  # the 16 hidden channels: prunable, and the group checked below
        q, k = self.qk(F.adaptive_avg_pool2d(x, 4)).flatten(2).view(x.shape[0], 2, 2, 16).unbind(2)
        attn = q.unsqueeze(-1) * k.unsqueeze(-2) + self.biases[:, self.bias_idxs]
        return x.mean((2, 3)) * attn.softmax(-1).amax((1, 2, 3)).unsqueeze(1)


def test_a_bias_table_read_through_an_index_buffer_does_not_block_pruning():
    """Before, every group of such a model failed in PruneChannelsPass ("not a plain selection") on the table's
    getitem, a node no plan touches (timm levit_128s, efficientformer_l1, coatnet_nano_rw_224, torchvision
    maxvit_t)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    gm, groups = analyse(AttentionBiasTable(), x)
    hidden = next(g for g in groups.values() if "mlp.0" in g.layers)
    assert hidden.prunable and hidden.size == 16
    assert_prunes_exactly(gm, x, {hidden.id: [0, 3, 5, 9, 12]}, rtol=1e-5)


@pytest.mark.parametrize("model", [ClassToken(), LayerScale(), RMSNormNet(), AttentionBiasTable()])
def test_every_prunable_group_prunes_alone(model):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    gm, groups = analyse(model, x)
    exact = [g for g in groups.values() if g.prunable and not g.cross_channel]
    assert exact, "no group to check"
    for g in exact:
        assert_prunes_exactly(gm, x, {g.id: list(range(0, g.size, 3))}, rtol=1e-4)
