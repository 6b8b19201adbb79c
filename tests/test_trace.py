"""hqp_fx.trace: shapes on every node, original names, clear errors."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import hqp_fx
from hqp_fx import meta
from hqp_fx.models import CifarResNet


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = DataDependent()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.gate(self.conv(x)))


def test_shapes_on_every_node_and_names_preserved():
    model = CifarResNet(20)
    gm = hqp_fx.trace(model, torch.randn(2, 3, 32, 32))
    for node in gm.graph.nodes:
        if node.op != "output":
            assert "tensor_meta" in node.meta, node.name
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"conv1", "layer2.0.conv1", "layer3.2.bn2", "linear"} <= targets
    assert set(dict(gm.named_parameters())) <= set(dict(model.named_parameters()))
    assert gm.meta[meta.EXAMPLE_INPUTS][0].shape == (2, 3, 32, 32)


def test_untraceable_model_names_module_code_and_fix():
    with pytest.raises(hqp_fx.TraceError) as info:
        hqp_fx.trace(Net(), torch.randn(1, 3, 4, 4), auto_leaf=False)
    msg = str(info.value)
    assert "'gate' (DataDependent)" in msg
    assert "if x.sum() > 0:" in msg and "test_trace.py" in msg
    assert "leaf_modules=[DataDependent]" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_untraceable_submodules_become_leaves_and_say_why():
    from hqp_fx.passes import ChannelDependencyPass

    model, x = Net().eval(), torch.randn(2, 3, 4, 4)
    gm = hqp_fx.trace(model, x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "gate", "head"]
    why = gm.meta[meta.LEAVES]["gate"]
    assert why.startswith("made a leaf: DataDependent cannot be traced") and "`if x.sum() > 0:`" in why, why
    with torch.no_grad():
        assert torch.equal(gm(x), model(x)) and torch.equal(gm(-x), model(-x))  # both branches still run
    ChannelDependencyPass()(gm)
    conv = next(g for g in meta.channel_groups(gm) if "conv" in g.layers)
    assert not conv.prunable and "opaque DataDependent module gate (made a leaf" in conv.reason, conv.reason


def test_a_decode_method_is_opaque_and_the_head_convs_before_it_prune():
    """Only the method that cannot be traced is opaque, not the whole head: its convolutions stay in the graph,
    their hidden channels prune exactly, and the channels the decode reads are kept, saying why."""
    from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass

    from helpers import DecodeHead, masked_copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DecodeHead()).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = hqp_fx.trace(model, x)
    assert {"1.box.0", "1.box.2", "1.cls.0", "1.cls.2"} <= {n.target for n in gm.graph.nodes if n.op == "call_module"}
    decodes = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "_decode"]
    assert len(decodes) == 2
    why = gm.meta[meta.LEAVES]["1._decode"]
    assert why.startswith("made a leaf: DecodeHead._decode() cannot be traced") and "`if y.shape[-1] > 2 and scale:`" in why
    assert "_decode" not in gm.get_submodule("1").__dict__ and "_decode" not in model[1].__dict__  # no patch left
    with torch.no_grad():
        for a, e in zip(gm(x), model(x)):
            assert torch.equal(a, e)

    ChannelDependencyPass()(gm)
    groups = {g.id: g for g in meta.channel_groups(gm)}
    assert groups["1.box.0"].prunable and groups["1.cls.0"].prunable and groups["0"].prunable
    assert not groups["1.cls.2"].prunable
    assert "opaque DecodeHead method 1._decode() (made a leaf: DecodeHead._decode()" in groups["1.cls.2"].reason
    plan = {"1.box.0": [1, 4, 6], "1.cls.0": [0, 7]}
    pruned = PruneChannelsPass(plan)(gm).graph_module
    assert pruned.get_submodule("1.box.2").in_channels == 5 and pruned.get_submodule("1.cls.2").in_channels == 6
    with torch.no_grad():
        reference, masked, got = gm(x), masked_copy(gm, plan)(x), pruned(x)
    for r, m, g in zip(reference, masked, got):
        assert (m - r).abs().max() > 1e-2  # masking moves every output: the comparison can fail
        torch.testing.assert_close(g, m, rtol=1e-5, atol=1e-5)


def test_an_opaque_method_named_like_a_tensor_method_stays_opaque():
    """``self.flatten(y)`` kept opaque is the module's method, not Tensor.flatten: the analysis must not read it
    with the tensor op's rule (whose first argument would be the module)."""
    from hqp_fx.passes import ChannelDependencyPass

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 1)

        def forward(self, x):
            return self.flatten(self.conv(x))

        def flatten(self, y):
            return y.flatten(1) if y.shape[-1] > 1 else y

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Head()).eval()
    x = torch.randn(1, 3, 4, 4)
    gm = hqp_fx.trace(model, x)
    assert "1.flatten" in gm.meta[meta.LEAVES]
    ChannelDependencyPass()(gm)
    groups = {g.id: g for g in meta.channel_groups(gm)}
    assert groups["0"].prunable and "opaque Head method 1.flatten()" in groups["1.conv"].reason
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_data_dependent_code_in_the_root_forward_is_still_an_error():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(hqp_fx.TraceError, match="'<root>' \\(Root\\).*rewrite the data-dependent part"):
        hqp_fx.trace(Root(), torch.randn(1, 3, 4, 4))


def test_leaf_modules_by_type_or_name():
    x = torch.randn(1, 3, 4, 4)
    for leaf in (DataDependent, "gate"):
        gm = hqp_fx.trace(Net(), x, leaf_modules=[leaf])
        assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)


def test_bad_inputs_are_explained():
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        hqp_fx.trace(Net(), [1, 2, 3])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        hqp_fx.trace(lambda x: x, torch.randn(1))
    with pytest.raises(ValueError, match="leaf_modules names \\['nope'\\]"):
        hqp_fx.trace(Net(), torch.randn(1, 3, 4, 4), leaf_modules=["nope"])
    with pytest.raises(hqp_fx.TraceError, match="shape propagation failed.*Check that example_inputs"):
        hqp_fx.trace(CifarResNet(20), torch.randn(1, 5, 32, 32))


class _VarArgsChunks(nn.Module):
    """ultralytics' layout: ``forward(x, *args, **kwargs)`` delegating to another method, and C2f's
    ``list(self.cv1(x).chunk(2, 1))`` extended in a loop."""

    def __init__(self):
        super().__init__()
        self.cv1 = nn.Conv2d(3, 8, 1)
        self.m = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))
        self.cv2 = nn.Conv2d(16, 6, 1)

    def forward(self, x, *args, **kwargs):
        return self.predict(x, *args, **kwargs)

    def predict(self, x, augment=False):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        first, second = torch.split(self.cv2(torch.cat(y, 1)), [2, 4], 1)  # fx's own tuple unpacking still works
        return torch.cat([first, second], 1) + (2.0 if augment else 0.0)


def test_varargs_forward_and_iterated_chunks_trace_without_workarounds():
    from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass
    from helpers import assert_close, masked_copy

    torch.manual_seed(0)
    model, x = _VarArgsChunks().eval(), torch.randn(2, 3, 6, 6)
    gm = hqp_fx.trace(model, x)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    ChannelDependencyPass()(gm)
    plan = {"cv1": [0, 5]}  # one channel of each chunk
    with torch.no_grad():
        masked = masked_copy(gm, plan)(x)
        assert float((masked - gm(x)).abs().max()) > 1e-3
        assert_close(PruneChannelsPass(plan)(gm).graph_module(x), masked, 1e-5, "pruned vs masked")


def test_iterating_a_split_of_unknown_count_is_refused_by_fx_and_captured_by_export():
    class SplitBySize(nn.Module):
        def forward(self, x):
            return torch.cat(list(x.split(2, 1)), 1)

    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(hqp_fx.TraceError, match="list\\(x.split\\(2, 1\\)\\)"):
        hqp_fx.trace(SplitBySize(), x, capture="fx")
    gm = hqp_fx.trace(SplitBySize(), x)  # torch.export knows the dim's size
    assert torch.split in {n.target for n in gm.graph.nodes} and torch.equal(gm(x), x)


def test_a_trace_error_inside_torchvision_names_the_torchvision_line():
    import torchvision

    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    with pytest.raises(hqp_fx.TraceError) as info:
        hqp_fx.trace(model, torch.randn(1, 3, 320, 320))
    assert os.path.join("torchvision", "models", "detection") in str(info.value)


def test_an_aten_graph_gets_one_clear_error():
    import torchvision
    from hqp_fx.core import PassError
    from hqp_fx.passes import ChannelDependencyPass

    exported = torch.export.export(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 32, 32),)).module()
    with pytest.raises(PassError, match="ATen-level graph .* hqp_fx.trace"):
        ChannelDependencyPass()(exported)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torch_export_capture_gives_the_fx_graph_verdicts(name):
    """The ATen graph is converted to module calls: the same groups, layers and verdicts as fx's."""
    import torchvision
    from hqp_fx.passes import ChannelDependencyPass

    model, x = torchvision.models.get_model(name).eval(), torch.randn(1, 3, 64, 64)
    verdicts = {}
    for capture in ("fx", "export"):
        gm = hqp_fx.trace(model, x, capture=capture)
        with torch.no_grad():
            assert torch.equal(gm(x), model(x))
        ChannelDependencyPass()(gm)
        verdicts[capture] = [(g.id, g.size, g.prunable, g.reason, tuple(g.layers)) for g in meta.channel_groups(gm)]
    assert verdicts["export"] == verdicts["fx"]


def test_export_capture_refuses_an_in_place_op_whose_input_is_read_again():
    class Reread(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            v = y.flatten(1)
            y.relu_()
            return v * 2  # v sees the relu through y: the out-of-place relu would be dropped

    model, x = Reread().eval(), torch.randn(1, 3, 4, 4)
    assert float(model(x).min()) >= 0
    with pytest.raises(hqp_fx.TraceError, match="in-place .*relu_.* on conv2d, which another op reads"):
        hqp_fx.trace(Reread(), torch.randn(1, 3, 4, 4), capture="export")
    with pytest.raises(ValueError, match="capture must be 'auto', 'fx' or 'export'"):
        hqp_fx.trace(Reread(), torch.randn(1, 3, 4, 4), capture="dynamo")
