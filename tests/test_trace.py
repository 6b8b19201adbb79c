"""hqp_fx.trace: shapes on every node, original names, clear errors."""
from __future__ import annotations

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
        hqp_fx.trace(Net(), torch.randn(1, 3, 4, 4))
    msg = str(info.value)
    assert "'gate' (DataDependent)" in msg
    assert "if x.sum() > 0:" in msg and "test_trace.py" in msg
    assert "leaf_modules=[DataDependent]" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


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
