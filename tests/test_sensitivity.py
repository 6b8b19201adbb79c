"""Sensitivity criteria against hand-computed values, and global channel selection."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hqp_fx
from hqp_fx import meta
from hqp_fx.passes import ChannelDependencyPass, SensitivityPass, score_channels, select_channels


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Coupled(nn.Module):
    """Two layers produce the same channels (a residual add): group-fisher sums them before squaring."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(5, 4)
        self.lin2 = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h1 = self.lin1(x)
        return self.head(torch.relu(h1 + self.lin2(torch.relu(h1))))


def batches(n=3, bs=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 5, generator=gen), torch.randint(0, 3, (bs,), generator=gen)) for _ in range(n)]


def prepared(model):
    torch.manual_seed(0)
    gm = hqp_fx.trace(model.eval(), torch.randn(2, 5))
    ChannelDependencyPass()(gm)
    return gm


def hand_gradients(model, data):
    out = []
    for x, y in data:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def test_fisher_taylor_l1_l2_match_hand_computation():
    gm = prepared(MLP())
    data = batches()
    W1, b1, W2 = gm.fc1.weight.detach(), gm.fc1.bias.detach(), gm.fc2.weight.detach()
    fisher = torch.zeros(4, dtype=torch.float64)
    taylor = torch.zeros(4, dtype=torch.float64)
    for g in hand_gradients(gm, data):
        fisher += (g["fc1.weight"].square().sum(1) + g["fc1.bias"].square() + g["fc2.weight"].square().sum(0)).double()
        taylor += ((W1 * g["fc1.weight"]).sum(1) + b1 * g["fc1.bias"] + (W2 * g["fc2.weight"]).sum(0)).abs().double()
    for p in gm.parameters():
        p.grad = None
    got = {c: score_channels(gm, c, data, normalize="none")["fc1"] for c in ("fisher", "taylor", "l1", "l2")}
    torch.testing.assert_close(got["fisher"], fisher, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got["taylor"], taylor, rtol=1e-5, atol=1e-12)
    # FLOPs normalisation: an fc1 channel costs its fc1 row (5 MACs) and its fc2 column (3 MACs) per sample
    per_mac = score_channels(gm, "taylor", data, normalize="none", flops_normalize=True)["fc1"]
    torch.testing.assert_close(per_mac, taylor / 8, rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="flops_normalize divides an estimated loss change"):
        score_channels(gm, "l1", data, flops_normalize=True)
    l1 = (W1.abs().sum(1) + b1.abs() + W2.abs().sum(0)).double()
    l2 = (W1.square().sum(1) + b1.square() + W2.square().sum(0)).sqrt().double()
    torch.testing.assert_close(got["l1"], l1, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got["l2"], l2, rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in gm.parameters())  # scoring leaves no gradients behind


def test_layer_normalisation_puts_each_coupled_layer_on_one_scale():
    """The default for fisher/l1/l2: every coupled layer's term over its mean, then summed over the layers."""
    gm = prepared(MLP())
    data = batches()
    W1, b1, W2 = gm.fc1.weight.detach(), gm.fc1.bias.detach(), gm.fc2.weight.detach()
    terms = [torch.zeros(4, dtype=torch.float64) for _ in range(3)]
    for g in hand_gradients(gm, data):
        for t, v in zip(terms, (g["fc1.weight"].square().sum(1), g["fc1.bias"].square(), g["fc2.weight"].square().sum(0))):
            t += v.double()
    for p in gm.parameters():
        p.grad = None
    fisher = sum(t / t.mean() for t in terms)
    torch.testing.assert_close(score_channels(gm, "fisher", data)["fc1"], fisher, rtol=1e-5, atol=1e-12)
    l1 = sum(t / t.mean() for t in (W1.abs().sum(1).double(), b1.abs().double(), W2.abs().sum(0).double()))
    torch.testing.assert_close(score_channels(gm, "l1", data)["fc1"], l1, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="normalize='layer' needs a per-layer sum"):
        score_channels(gm, "taylor", data, normalize="layer")
    with pytest.raises(ValueError, match="normalize must be"):
        score_channels(gm, "l1", data, normalize=True)


def test_group_fisher_sums_coupled_mask_gradients_before_squaring():
    gm = prepared(Coupled())
    data = batches()
    expected = torch.zeros(4, dtype=torch.float64)
    count = 0
    for x, y in data:
        # one explicit mask per sample and channel after each producing layer: d loss / d mask[n]
        # is sample n's mask gradient; the paper sums it over coupled layers, then squares
        m1 = torch.ones(x.shape[0], 4, requires_grad=True)
        m2 = torch.ones(x.shape[0], 4, requires_grad=True)
        h1 = gm.lin1(x) * m1
        h2 = gm.lin2(torch.relu(h1)) * m2
        g1, g2 = torch.autograd.grad(F.cross_entropy(gm.head(torch.relu(h1 + h2)), y), (m1, m2))
        expected += ((g1 + g2).double() ** 2 / 2).sum(0)
        count += x.shape[0]
    expected /= count
    got = score_channels(gm, "group-fisher", data, normalize="none")["lin1"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-14)
    # FLOPs normalisation divides by the MACs a channel costs: lin1 row (5) + lin2 row (4) + lin2 column (4) + head column (3)
    flops = score_channels(gm, "group-fisher", data, normalize="none", flops_normalize=True)["lin1"]
    torch.testing.assert_close(flops, expected / 16, rtol=1e-5, atol=1e-14)


def test_scoring_is_deterministic_normalised_and_keeps_bn_and_mode():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    gm = hqp_fx.trace(model, torch.randn(1, 3, 8, 8))
    ChannelDependencyPass()(gm)
    gm.train()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(2)]
    stats = {k: v.clone() for k, v in gm.named_buffers()}
    for criterion in ("fisher", "group-fisher", "taylor", "l1", "l2", "random"):
        a = score_channels(gm, criterion, data, normalize="group")
        b = score_channels(gm, criterion, data, normalize="group")
        assert a.keys() == {g.id for g in meta.channel_groups(gm) if g.prunable}
        for k in a:
            assert torch.equal(a[k], b[k]), f"{criterion} is not deterministic"
            assert torch.isclose(a[k].mean(), torch.tensor(1.0, dtype=torch.float64)), "normalised to mean 1"
        assert all(torch.equal(score_channels(gm, criterion, data)[k], v)
                   for k, v in score_channels(gm, criterion, data).items()), f"{criterion} default is not deterministic"
    assert gm.training  # mode restored
    assert all(torch.equal(v, stats[k]) for k, v in gm.named_buffers())  # BN ran in eval mode
    assert not torch.equal(score_channels(gm, "random", seed=0)["0"], score_channels(gm, "random", seed=1)["0"])


def test_bad_criterion_inputs():
    gm = prepared(MLP())
    with pytest.raises(ValueError, match="unknown criterion 'hessian'"):
        score_channels(gm, "hessian")
    with pytest.raises(ValueError, match="criterion 'fisher' needs calibration data"):
        score_channels(gm, "fisher")


def test_sensitivity_pass_writes_metadata():
    gm = prepared(MLP())
    res = SensitivityPass("l1")(gm)
    assert res.modified is False
    assert gm.meta[meta.SENSITIVITY]["criterion"] == "l1" and set(gm.meta[meta.SENSITIVITY]["scores"]) >= {"fc1"}


def test_select_channels_ranks_globally_with_caps_and_ignores():
    gm = prepared(Coupled())
    groups = meta.channel_groups(gm)
    g = {x.id: x for x in groups}
    assert g["lin1"].prunable and not g["head"].prunable
    scores = {"lin1": torch.tensor([0.1, 5.0, 0.2, 0.05], dtype=torch.float64), "head": torch.zeros(3, dtype=torch.float64)}
    assert select_channels(groups, scores, 0.5, min_keep=1) == {"lin1": [3, 0]}  # unprunable head never chosen
    assert select_channels(groups, scores, 0.75, min_keep=2) == {"lin1": [3, 0]}  # capped at size - min_keep
    assert select_channels(groups, scores, 0.5, min_keep=1, ignore=["lin2"]) == {}
    with pytest.raises(ValueError, match="fraction must be in"):
        select_channels(groups, scores, 1.0)


def test_selection_never_empties_a_tensor_inside_a_wide_group():
    from hqp_fx.models import CifarResNet
    from hqp_fx.passes import PruneChannelsPass

    gm = hqp_fx.trace(CifarResNet(20).eval(), torch.randn(1, 3, 32, 32))
    ChannelDependencyPass()(gm)
    groups = meta.channel_groups(gm)
    stream = next(g for g in groups if g.id == "conv1")  # the option-A residual stream: 64 channels, 16 in stage 1
    scores = {g.id: torch.full((g.size,), 100.0, dtype=torch.float64) for g in groups if g.prunable}
    scores["conv1"] = torch.arange(stream.size, dtype=torch.float64)  # stage-1 channels (first 16) look least sensitive
    plan = select_channels(groups, scores, 0.5, min_keep=4)
    assert 16 - sum(1 for i in plan["conv1"] if i < 16) == 4  # stage 1 keeps exactly min_keep, not zero
    pruned = PruneChannelsPass(plan)(gm).graph_module
    assert pruned.conv1.out_channels == 4


def test_select_in_alignment_blocks_survives_rounding():
    from hqp_fx.models import CifarResNet
    from hqp_fx.passes import AlignChannelsPass

    gm = hqp_fx.trace(CifarResNet(20).eval(), torch.randn(1, 3, 32, 32))
    ChannelDependencyPass()(gm)
    groups = meta.channel_groups(gm)
    gen = torch.Generator().manual_seed(0)
    scores = {g.id: torch.rand(g.size, generator=gen, dtype=torch.float64) for g in groups if g.prunable}
    per_channel = select_channels(groups, scores, 0.05, min_keep=8)
    blocks = select_channels(groups, scores, 0.05, min_keep=8, unit=8)
    assert blocks and all(len(v) % 8 == 0 for v in blocks.values())
    AlignChannelsPass(per_channel, 8)(gm)
    assert sum(map(len, gm.meta[meta.ALIGN]["plan"].values())) < sum(map(len, per_channel.values()))  # rounding eats it
    AlignChannelsPass(blocks, 8)(gm)
    assert gm.meta[meta.ALIGN]["plan"] == {k: sorted(v) for k, v in blocks.items()}  # nothing to round
    assert select_channels(groups, scores, 0.001, min_keep=8, unit=8)  # a tiny step still takes one block
    with pytest.raises(ValueError, match="unit must be a positive"):
        select_channels(groups, scores, 0.1, unit=0)
