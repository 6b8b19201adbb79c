"""Hypothesis-generated CNNs from every coupling kind, checked against the equivalence property."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import hqp_fx
from hqp_fx import meta
from hqp_fx.count import count_params
from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass

from helpers import assert_close, expected_counts, layer_macs, masked_copy, random_plan, realistic_random

KINDS = ["conv", "dw", "group", "res", "res2", "cat", "split", "se", "shuffle", "pad", "gn", "ln", "pool"]


class Block(nn.Module):
    def __init__(self, kind: str, c: int, w: int):
        super().__init__()
        self.kind = kind
        if kind == "group" and (c % 2 or w % 2):
            self.kind = kind = "conv"
        if kind == "shuffle" and c % 2:
            self.kind = kind = "dw"
        if kind == "conv":
            self.conv, self.bn, self.out_channels = nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), w
        elif kind == "dw":
            self.conv, self.bn, self.out_channels = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), c
        elif kind == "group":
            self.conv, self.bn, self.out_channels = nn.Conv2d(c, w, 1, groups=2), nn.BatchNorm2d(w), w
        elif kind == "res":
            self.conv, self.bn, self.out_channels = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), c
        elif kind == "res2":  # a basic block: its inner group may go whole (depth pruning)
            self.conv, self.conv2, self.bn, self.out_channels = (nn.Conv2d(c, w, 3, padding=1), nn.Conv2d(w, c, 1),
                                                                 nn.BatchNorm2d(c), c)
        elif kind == "cat":
            self.a, self.b, self.out_channels = nn.Conv2d(c, w, 1), nn.Conv2d(c, 3, 3, padding=1), w + 3
        elif kind == "split":
            self.half = c // 2
            self.conv, self.out_channels = nn.Conv2d(c - self.half, c - self.half, 1), c
        elif kind == "se":
            self.fc1, self.fc2, self.out_channels = nn.Conv2d(c, max(2, w // 2), 1), nn.Conv2d(max(2, w // 2), c, 1), c
        elif kind == "pad":
            self.conv, self.out_channels = nn.Conv2d(c, c + 4, 1), c + 4
        elif kind == "gn":
            self.conv, self.gn, self.out_channels = nn.Conv2d(c, 2 * w, 1), nn.GroupNorm(w if w > 1 else 1, 2 * w), 2 * w
        elif kind == "ln":
            self.ln, self.fc, self.out_channels = nn.LayerNorm(c), nn.Linear(c, w), w
        else:  # shuffle, pool
            self.out_channels = c

    def forward(self, x):
        k = self.kind
        if k in ("conv", "dw", "group"):
            return F.relu(self.bn(self.conv(x)))
        if k == "res":
            return F.relu(x + self.bn(self.conv(x)))
        if k == "res2":
            return F.relu(x + self.bn(self.conv2(F.relu(self.conv(x)))))
        if k == "cat":
            return torch.cat([self.a(x), torch.tanh(self.b(x))], 1)  # zero-preserving, so masking = removing
        if k == "split":
            x1, x2 = torch.split(x, [self.half, x.shape[1] - self.half], 1)
            return torch.cat([x1, F.silu(self.conv(x2))], 1)
        if k == "se":
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
            return x * s
        if k == "shuffle":
            n, c, h, w = x.size()
            return x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        if k == "pad":
            return self.conv(x) + F.pad(x, (0, 0, 0, 0, 2, 2))
        if k == "gn":
            return F.gelu(self.gn(self.conv(x)))
        if k == "ln":
            return self.fc(self.ln(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return F.max_pool2d(x, 2)


class RandomNet(nn.Module):
    def __init__(self, kinds, widths, flatten_head: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        blocks, c, spatial = [], 6, 8
        for kind, w in zip(kinds, widths):
            if kind == "pool" and spatial < 4:
                kind = "conv"
            blocks.append(Block(kind, c, w))
            c = blocks[-1].out_channels
            spatial //= 2 if kind == "pool" else 1
        self.blocks = nn.Sequential(*blocks)
        self.flatten_head = flatten_head
        self.head = nn.Linear(c * spatial * spatial if flatten_head else c, 5)

    def forward(self, x):
        y = self.blocks(F.relu(self.stem(x)))
        return self.head(torch.flatten(y, 1) if self.flatten_head else y.mean((2, 3)))


def prune_or_explain(gm, plan):
    """Prune, or confirm the one documented refusal: a random plan that empties a tensor
    (e.g. every channel of one split piece, which spans several groups)."""
    try:
        return PruneChannelsPass(plan)(gm).graph_module
    except ValueError as exc:
        assert "removes every channel that reaches node" in str(exc)
        assume(False)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=6),
    widths=st.lists(st.integers(2, 12), min_size=6, max_size=6),
    flatten_head=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_cnn_equivalence(kinds, widths, flatten_head, seed):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 8, 8)
    model = realistic_random(RandomNet(kinds, widths, flatten_head), x, seed)
    gm = hqp_fx.trace(model, x)
    ChannelDependencyPass()(gm)
    groups = meta.channel_groups(gm)
    assert any(g.prunable for g in groups)
    assert all(g.prunable or g.reason for g in groups)
    with torch.no_grad():
        ref = gm(x)
        exact = random_plan(groups, 0.3, seed, include=lambda g: not g.cross_channel)
        if exact:
            pruned = prune_or_explain(gm, exact)
            assert_close(pruned(x), masked_copy(gm, exact)(x), 1e-4, f"{kinds}: pruned vs masked")
        whole = {g.id: list(range(g.size)) for g in groups if g.removable and not g.cross_channel}
        if whole:  # every removable branch goes, the other groups lose their random share
            plan = {**{k: v for k, v in exact.items() if k not in whole}, **whole}
            pruned = prune_or_explain(gm, plan)
            assert_close(pruned(x), masked_copy(gm, plan)(x), 1e-4, f"{kinds}: branches removed vs masked")
            assert not any(n.target in whole for n in pruned.graph.nodes)
        plan = random_plan(groups, 0.3, seed)
        if plan:
            pruned = prune_or_explain(gm, plan)
            pruned.graph.lint()
            assert pruned(x).shape == ref.shape
            exp_params, exp_macs = expected_counts(gm, plan, x)
            assert count_params(pruned) == exp_params
            assert layer_macs(pruned, x) == exp_macs
