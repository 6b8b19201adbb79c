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

from helpers import assert_close, masked_copy, realistic_random


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
    its data movement."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm, groups = analyse(ClassToken(), x)
    assert groups["fc1"].prunable
    pruned = assert_prunes_exactly(gm, x, {"fc1": [0, 3, 9, 15]})
    assert pruned.fc1.out_features == 12 and pruned.fc2.in_features == 12


def test_the_class_token_and_the_patch_embedding_share_their_channels():
    """Concatenated along the tokens, channel c of the class token and channel c of every patch token are one
    channel: the patch embedding's width prunes, taking the class token's entries with it. Before, the token
    width was pinned ("mixes several channels")."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm, groups = analyse(ClassToken(), x)
    assert groups["patch"].prunable and groups["patch"].size == 8
    pruned = assert_prunes_exactly(gm, x, {"patch": [1, 4, 6]})
    assert pruned.class_token.shape == (1, 1, 5) and pruned.patch.out_channels == 5 and pruned.fc1.in_features == 5


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
    attention scores. The read goes along the tokens, so the table's rows follow their heads; pruning the channels
    around it must not re-run that read on labels (the index buffer holds positions, not labels)."""

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
    # the heads (a pair of q/k channels each) prune too, the table's row of a removed head with them
    assert groups["qk"].prunable and groups["qk"].size == 2
    pruned = assert_prunes_exactly(gm, x, {"qk": [0]}, rtol=1e-5)
    assert pruned.biases.shape == (1, 5) and pruned.qk.out_channels == 2


class FusedQKVAttention(nn.Module):
    """timm's Attention: one qkv linear reshaped to (3, heads, head_dim), F.scaled_dot_product_attention, the
    heads merged back with the token width read from the input's shape, then the projection."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, C))
        return self.head(x.mean(1))


class SeparateQKVAttention(nn.Module):
    """Separate q, k, v linears viewed into heads and transposed (the layout of many detectors' and LLMs'
    attention), with an explicit scale; the output merged with a computed head count times head size."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        B, N, _ = x.shape
        q, k, v = (f(x).view(B, N, self.heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))
        return self.head(x.mean(1))


class MatmulAttention(nn.Module):
    """ultralytics' C2PSA attention: a 1x1 conv viewed to (heads, 2 * key_dim + head_dim, tokens) and split,
    q^T k scaled and softmaxed, v @ attn^T viewed back to the map, plus a depthwise conv of v."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.heads, self.head_dim, self.key_dim = heads, dim // heads, dim // heads // 2
        self.qkv = nn.Conv2d(dim, dim + 2 * self.key_dim * heads, 1)
        self.pe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.head = nn.Conv2d(dim, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.heads, 2 * self.key_dim + self.head_dim, H * W).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q.transpose(-2, -1) @ k) * self.key_dim ** -0.5).softmax(dim=-1)
        y = (v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
        return self.head(x + self.proj(y))


class ChannelAttention(nn.Module):
    """EdgeNeXt's cross-covariance attention: per head a channels-by-channels attention, scaled by a learned
    per-head temperature of shape [heads, 1, 1]."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 4, 1).unbind(0)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        y = (attn.softmax(dim=-1) @ v).permute(0, 3, 1, 2).reshape(B, N, C)
        return self.head((x + self.proj(y)).mean(1))


@pytest.mark.parametrize("build, group", [(FusedQKVAttention, "qkv"), (SeparateQKVAttention, "q"),
                                          (ChannelAttention, "qkv"), (MatmulAttention, "qkv")])
def test_attention_heads_prune_whole(build, group):
    """One channel per head: its q, k and v channels go together, the head count of every reshape follows."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 3, 8, 8)
    gm, groups = analyse(model, x)
    heads = groups[group]
    assert heads.prunable and heads.size == 4 and not heads.cross_channel, heads
    assert groups["stem" if isinstance(model, MatmulAttention) else "patch"].prunable  # the token width: its own group
    pruned = assert_prunes_exactly(gm, x, {group: [1, 3]})

    def widths(m):
        return {n: (l.in_features, l.out_features) if isinstance(l, nn.Linear) else (l.in_channels, l.out_channels)
                for n, l in m.named_modules() if isinstance(l, (nn.Linear, nn.Conv2d))}
    before, after = widths(model), widths(pruned)
    assert after["proj"] == (before["proj"][0] // 2, before["proj"][1])  # half the heads in, the token width out
    qkv = [n for n in ("qkv", "q", "k", "v") if n in before]
    assert all(after[n][1] == before[n][1] // 2 for n in qkv)
    if isinstance(model, ChannelAttention):  # the per-head temperature follows its heads
        assert pruned.temperature.shape == (2, 1, 1)
    with torch.no_grad():  # the pruned graph takes another batch and token count: no size was frozen
        y = torch.randn(3, 3, 12, 12)
        assert_close(pruned(y), masked_copy(gm, {group: [1, 3]})(y), 1e-5, "another input size")


@pytest.mark.parametrize("build, group", [(FusedQKVAttention, "qkv"), (ChannelAttention, "qkv")])
def test_alignment_and_minimums_count_a_heads_channels(build, group):
    """An engine multiple of 16 channels is 1 head of 16 channels, 2 heads of 8; a minimum of 16 channels is 1 such
    head. Counted in heads (as before), a 4-head group never lost one to select_channels at min_keep 16, and
    AlignChannelsPass rounded any removal of heads away."""
    from hqp_fx.passes import AlignChannelsPass
    from hqp_fx.passes.sensitivity import select_channels

    torch.manual_seed(0)
    model = build(dim=64, heads=4)
    x = torch.randn(2, 3, 8, 8)
    gm, groups = analyse(model, x)
    heads, tokens = groups[group], groups["patch"]
    assert (heads.width, heads.unit(16), heads.unit(32), heads.unit(8)) == (48, 1, 2, 1)  # q, k and v rows
    assert (tokens.width, tokens.unit(16)) == (1, 16)
    scores = {g.id: torch.rand(g.size) for g in groups.values() if g.prunable}
    plan = select_channels(groups.values(), scores, 0.5, min_keep=16, unit=16)
    assert 1 <= len(plan.get(group, [])) <= 3, plan  # whole heads go; at least one stays
    for multiple, removed, kept in ((16, [2], 3), (32, [2], 4), (32, [2, 0], 2), (64, [2, 0, 1], 4)):
        AlignChannelsPass({group: removed}, multiple, scores)(gm)
        assert gm.meta[meta.ALIGN]["rounding"][group][2] == kept, (multiple, gm.meta[meta.ALIGN])
    AlignChannelsPass({group: [2]}, 16, scores)(gm)
    pruned = assert_prunes_exactly(gm, x, gm.meta[meta.ALIGN]["plan"])
    assert pruned.get_submodule("qkv").out_features == 3 * 48


class MaskedAttention(FusedQKVAttention):
    """An additive attention mask: a learned bias per head, one shared by every head, a per-head relative
    position table read through an index buffer (CoAtNet, Swin), or one whose index buffer picks the heads."""

    def __init__(self, mask: str):
        super().__init__()
        self.mask = mask
        self.bias = nn.Parameter(torch.randn(1, self.heads if mask == "per-head" else 1, 4, 4))
        self.table = nn.Parameter(torch.randn(self.heads, 7))
        self.register_buffer("index", (torch.arange(4).view(4, 1) - torch.arange(4).view(1, 4) + 3))
        self.register_buffer("order", torch.tensor([1, 0, 3, 2]))

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.mask == "indexed":
            mask = self.table[:, self.index].unsqueeze(0)
        elif self.mask == "flat-indexed":  # timm's Swin: the index buffer is flattened in forward
            mask = self.table.t()[self.index.view(-1)].view(4, 4, -1).permute(2, 0, 1).unsqueeze(0)
        elif self.mask == "head-indexed":  # the index reorders the heads: the rewrite could not follow it
            mask = self.table[self.order][:, self.index].unsqueeze(0)
        else:
            mask = self.bias
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.head((x + self.proj(y.transpose(1, 2).reshape(B, N, C))).mean(1))


@pytest.mark.parametrize("mask", ["per-head", "shared", "indexed", "flat-indexed", "head-indexed"])
def test_an_attention_mask_goes_with_its_heads(mask):
    """A per-head mask loses the removed heads' rows, a shared one stays whole, and a table read through an index
    buffer loses the removed heads' rows of the table (the index reads along the tokens), also when forward
    flattens the buffer first (fx records the result as a constant). An index buffer that reads along the heads
    keeps them, with the reason."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm, groups = analyse(MaskedAttention(mask), x)
    if mask == "head-indexed":
        assert not groups["qkv"].prunable and "index tensor along a channel dim" in groups["qkv"].reason
        assert groups["patch"].prunable
        return
    assert groups["qkv"].prunable and groups["qkv"].size == 4
    pruned = assert_prunes_exactly(gm, x, {"qkv": [0, 3]})
    if mask == "indexed":
        assert pruned.table.shape == (2, 7) and torch.equal(pruned.index, gm.index)
    elif mask == "flat-indexed":
        assert pruned.table.shape == (2, 7)
    else:
        assert pruned.bias.shape == ((1, 2, 4, 4) if mask == "per-head" else (1, 1, 4, 4))


def test_torchvision_vit_self_attention_is_written_out_and_its_heads_prune():
    """nn.MultiheadAttention derives head_dim from the token width, so trace writes its plain self-attention
    out (projections + scaled_dot_product_attention); its heads then prune whole. A call it cannot write out
    exactly, or a user leaf, stays one opaque module."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    vit = realistic_random(VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=4, hidden_dim=16,
                                             mlp_dim=32, num_classes=3), x).eval()  # its head starts at zero
    gm, groups = analyse(vit, x)
    with torch.no_grad():
        assert_close(gm(x), vit(x), 1e-5, "written out vs nn.MultiheadAttention")
    heads = groups["encoder.layers.encoder_layer_0.self_attention.in_proj"]
    assert heads.prunable and heads.size == 4 and not heads.cross_channel
    pruned = assert_prunes_exactly(gm, x, {heads.id: [0, 2]})
    attn = pruned.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    assert attn.in_proj_weight.shape == (24, 16) and attn.out_proj.weight.shape == (16, 8)

    class NeedsWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, t):
            out, weights = self.attn(t, t, t)
            return out + weights.mean()

    t = torch.randn(2, 5, 8)
    for model, leaves in ((NeedsWeights(), ()), (vit, ("encoder.layers.encoder_layer_0.self_attention",))):
        gm = hqp_fx.trace(model.eval(), t if leaves == () else x, leaf_modules=leaves)
        assert any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)
                   for n in gm.graph.nodes)


def test_padding_by_amounts_computed_from_the_shape_keeps_channels_prunable():
    """timm's Swin pads each window partition by ``(window - H % window) % window``, computed in forward from the
    input's shape, and crops back with ``x[:, :H, :W, :]``: the amounts and bounds are known when the graph is
    analysed (its shapes are fixed), so the channels through them stay prunable."""

    class WindowPad(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.mlp = nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.Linear(8, 12), nn.GELU())
            self.out = nn.Linear(12, 4)

        def forward(self, x):
            x = self.mlp(self.stem(x).permute(0, 2, 3, 1))  # NHWC
            _, height, width, _ = x.shape
            x = F.pad(x, (0, 0, 0, (3 - width % 3) % 3, 0, (3 - height % 3) % 3))
            return self.out(x[:, :height, :width, :]).mean((1, 2))  # cropped back by computed bounds

    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 8)
    gm, groups = analyse(WindowPad(), x)
    assert groups["mlp.0"].prunable and groups["stem"].prunable, {g.id: g.reason for g in groups.values()}
    assert_prunes_exactly(gm, x, {"mlp.0": [0, 5, 7], "stem": [2]})


def test_torchvision_swin_window_attention_is_written_out_and_its_heads_prune(tmp_path):
    """torchvision wraps Swin's window attention and patch merging for fx (their padding, shift and mask depend
    on the image size), which pinned every head and the residual stream. trace writes both out for the traced
    size, exactly; the heads then prune whole with their rows of the relative-position table, and the stream
    (through LayerNorm: cross-channel) prunes too. 20x20 images exercise the padding and both shifted stages."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    x = torch.randn(2, 3, 20, 20)
    swin = realistic_random(SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                            window_size=[3, 3], num_classes=5), x).eval()
    gm, groups = analyse(swin, x)
    assert not gm.meta[meta.LEAVES] and not any("swin_transformer" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        assert_close(gm(x), swin(x), 1e-6, "written out vs torchvision")
        assert_close(gm(x[:1]), swin(x[:1]), 1e-6, "another batch size")
    heads = groups["features.1.1.attn.qkv"]  # a shifted block
    assert heads.prunable and heads.size == 2 and not heads.cross_channel
    pruned = assert_prunes_exactly(gm, x, {heads.id: [1]})
    attn = pruned.get_submodule("features.1.1.attn")
    assert attn.qkv.out_features == 24 and attn.proj.in_features == 8
    assert attn.relative_position_bias_table.shape == (25, 1)
    with torch.no_grad():  # the window count times the batch stays computed (padding's zeros are not channels)
        assert_close(pruned(x[:1]), pruned(x)[:1], 1e-6, "pruned, another batch size")
    streams = [g for g in groups.values() if g.cross_channel and g.prunable]
    assert {g.id for g in streams} == {"features.0.0", "features.2.reduction"}
    for g in groups.values():
        if g.prunable:
            with torch.no_grad():
                out = PruneChannelsPass({g.id: list(range(0, g.size, 2))})(gm).graph_module(x)
            assert out.shape == (2, 5) and torch.isfinite(out).all(), g.id
    hqp_fx.save(pruned, tmp_path / "swin.hqp")  # the shift mask is a buffer: it travels with the file
    with torch.no_grad():
        assert_close(hqp_fx.load(tmp_path / "swin.hqp")(x), pruned(x), 1e-6, "saved and loaded")


@pytest.mark.parametrize("build", [ClassToken, LayerScale, RMSNormNet, AttentionBiasTable, FusedQKVAttention,
                                   SeparateQKVAttention, MatmulAttention, ChannelAttention])
def test_every_prunable_group_prunes_alone(build):
    torch.manual_seed(1)  # built here, not at collection: the weights must not depend on what was imported before
    model = build()
    x = torch.randn(2, 3, 8, 8)
    gm, groups = analyse(model, x)
    exact = [g for g in groups.values() if g.prunable and not g.cross_channel]
    assert exact, "no group to check"
    for g in exact:
        assert_prunes_exactly(gm, x, {g.id: list(range(0, g.size, 3))}, rtol=1e-4)
