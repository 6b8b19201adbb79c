"""Producers: convolutions (plain, grouped, depthwise, transposed) and linear layers.

A producer consumes its input channels and mints new output channels; a grouped conv ties each conv group's
input and output channels into whole groups, so pruning removes conv groups and keeps ``groups`` consistent.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .base import NodeEdit, OpRule, arg, weight_name

_CONV_FUNCTIONS = {F.conv1d: False, F.conv2d: False, F.conv3d: False,  # function -> transposed
                   F.conv_transpose1d: True, F.conv_transpose2d: True, F.conv_transpose3d: True}


def _groups_index(transposed: bool) -> int:
    return 7 if transposed else 6  # F.conv_transpose*(input, weight, bias, stride, padding, output_padding, groups)


def _conv_module(p, node: fx.Node):
    mod = p.modules[node.target]
    kind = "convT" if isinstance(mod, nn.modules.conv._ConvTransposeNd) else "conv"
    return p.producer(node, node.args[0], f"{node.target}.weight", f"{node.target}.bias" if mod.bias is not None else None,
                      kind=kind, groups=mod.groups, out_channels=mod.out_channels, display=node.target)


def _conv_function(p, node: fx.Node):
    transposed = _CONV_FUNCTIONS[node.target]
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    wname, bname = weight_name(w), weight_name(b)
    if not wname or bname == "":
        return p.unknown(node, f"{node.name} convolves with a computed weight")
    groups = arg(node, _groups_index(transposed), "groups", 1)
    wshape = p.shape_of(w)
    out_channels = wshape[1] * groups if transposed else wshape[0]
    return p.producer(node, node.args[0], wname, bname, kind="convT" if transposed else "conv",
                      groups=groups, out_channels=out_channels, display=_layer_name(wname))


def _conv_function_rewrite(node: fx.Node, kept) -> NodeEdit | None:
    if node.name not in kept.analysis.grouped:
        return None
    per_group = kept.analysis.grouped[node.name][1]
    groups = kept.new_shape(node.args[0].name)[1] // per_group
    return NodeEdit.of(node).set(_groups_index(_CONV_FUNCTIONS[node.target]), "groups", groups)


def _conv_module_fix(mod: nn.Module, node: fx.Node, kept) -> dict:
    in_channels = kept.new_shape(node.args[0].name)[1]
    out_channels = kept.new_shape(node.name)[1]
    fix = {"in_channels": in_channels, "out_channels": out_channels}
    if node.name in kept.analysis.grouped:
        fix["groups"] = in_channels // kept.analysis.grouped[node.name][1]
    return fix


def _linear_module(p, node: fx.Node):
    mod = p.modules[node.target]
    return p.producer(node, node.args[0], f"{node.target}.weight", f"{node.target}.bias" if mod.bias is not None else None,
                      kind="linear", groups=1, out_channels=mod.out_features, display=node.target)


def _linear_function(p, node: fx.Node):
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    wname, bname = weight_name(w), weight_name(b)
    if not wname or bname == "":
        return p.unknown(node, f"{node.name} multiplies by a computed weight")
    return p.producer(node, node.args[0], wname, bname, kind="linear", groups=1,
                      out_channels=p.shape_of(w)[0], display=_layer_name(wname))


def _layer_name(weight: str) -> str:
    """A functional layer is named after its weight, as a module layer after the module: ``blocks.0.fc.weight`` ->
    ``blocks.0.fc``, ``attn.in_proj_weight`` -> ``attn.in_proj``, so ``ignore`` and group ids read as module names."""
    for suffix in (".weight", "_weight"):
        if weight.endswith(suffix):
            return weight[: -len(suffix)]
    return weight


def _linear_module_fix(mod: nn.Module, node: fx.Node, kept) -> dict:
    return {"in_features": kept.new_shape(node.args[0].name)[-1], "out_features": kept.new_shape(node.name)[-1]}


RULES = (
    OpRule("conv", _conv_module, modules=(nn.modules.conv._ConvNd,), fix_module=_conv_module_fix, branch="consumer"),
    OpRule("conv (functional)", _conv_function, functions=frozenset(_CONV_FUNCTIONS), rewrite=_conv_function_rewrite,
           branch="consumer"),
    OpRule("linear", _linear_module, modules=(nn.Linear,), fix_module=_linear_module_fix, branch="consumer"),
    OpRule("linear (functional)", _linear_function, functions=frozenset({F.linear}), branch="consumer"),
)
