"""Channel-wise layers: batch, instance, layer, RMS and group norm, PReLU, local response norm.

Channels pass through and the per-channel parameters and statistics follow them. Statistics over channels
(LayerNorm over the channel dim, GroupNorm within a group) mark the group cross-channel: removing a channel
changes the others' values, which the sensitivity criteria account for. GroupNorm channels are removed whole
groups at a time, so every other group's statistics stay exact.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .base import NodeEdit, OpRule, arg, weight_name

_STATS_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _module_params(p, node: fx.Node) -> list[str]:
    mod = p.modules[node.target]
    return [f"{node.target}.{n}" for n, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
            if t is not None and t.ndim >= 1]


def _named_params(node: fx.Node, specs: list[tuple[int, str]]) -> list[str | None] | None:
    names = []
    for idx, key in specs:
        name = weight_name(arg(node, idx, key))
        if name == "":
            return None
        names.append(name)
    return names


def _stats_norm_module(p, node: fx.Node):
    return p.channelwise(node, node.args[0], _module_params(p, node))


def _stats_norm_function(p, node: fx.Node):
    """F.batch_norm / F.instance_norm: (input, running_mean, running_var, weight, bias, ...)."""
    names = _named_params(node, [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")])
    if names is None:
        return p.unknown(node, f"{node.name} normalises with computed statistics")
    return p.channelwise(node, node.args[0], names)


def _num_features_fix(mod, node: fx.Node, kept) -> dict:
    return {"num_features": kept.new_shape(node.args[0].name)[1]}


def _layer_norm_module(p, node: fx.Node):
    mod = p.modules[node.target]
    return p.channelwise(node, node.args[0], _module_params(p, node), norm_dims=len(mod.normalized_shape))


def _layer_norm_function(p, node: fx.Node):
    names = _named_params(node, [(2, "weight"), (3, "bias")])
    shape = arg(node, 1, "normalized_shape")
    if names is None or not isinstance(shape, (tuple, list)):
        return p.unknown(node, f"{node.name} normalises with computed parameters")
    return p.channelwise(node, node.args[0], names, norm_dims=len(shape))


def _layer_norm_rewrite(node: fx.Node, kept) -> NodeEdit:
    dims = len(arg(node, 1, "normalized_shape"))
    return NodeEdit.of(node).set(1, "normalized_shape", tuple(kept.new_shape(node.name)[-dims:]))


def _layer_norm_fix(mod, node: fx.Node, kept) -> dict:
    return {"normalized_shape": tuple(kept.new_shape(node.args[0].name)[-len(mod.normalized_shape):])}


def _rms_norm_function(p, node: fx.Node):
    names = _named_params(node, [(2, "weight")])
    shape = arg(node, 1, "normalized_shape")
    if names is None or not isinstance(shape, (tuple, list)):
        return p.unknown(node, f"{node.name} normalises with computed parameters")
    return p.channelwise(node, node.args[0], names, norm_dims=len(shape))


def _group_norm_module(p, node: fx.Node):
    return p.channelwise(node, node.args[0], _module_params(p, node), groups=p.modules[node.target].num_groups)


def _group_norm_function(p, node: fx.Node):
    names = _named_params(node, [(2, "weight"), (3, "bias")])
    groups = arg(node, 1, "num_groups")
    if names is None or not isinstance(groups, int):
        return p.unknown(node, f"{node.name} normalises with computed parameters")
    return p.channelwise(node, node.args[0], names, groups=groups)


def _group_norm_rewrite(node: fx.Node, kept) -> NodeEdit | None:
    if node.name not in kept.analysis.grouped:
        return None
    return NodeEdit.of(node).set(1, "num_groups", kept.new_shape(node.name)[1] // kept.analysis.grouped[node.name][1])


def _group_norm_fix(mod, node: fx.Node, kept) -> dict:
    channels = kept.new_shape(node.args[0].name)[1]
    fix = {"num_channels": channels}
    if node.name in kept.analysis.grouped:
        fix["num_groups"] = channels // kept.analysis.grouped[node.name][1]
    return fix


def _prelu_module(p, node: fx.Node):
    if p.modules[node.target].num_parameters == 1:
        return p.elementwise(node)
    return p.channelwise(node, node.args[0], _module_params(p, node))


def _prelu_function(p, node: fx.Node):
    w = arg(node, 1, "weight")
    if p.shape_of(w) in ((), (1,)):
        return p.elementwise(node)
    names = _named_params(node, [(1, "weight")])
    if names is None:
        return p.unknown(node, f"{node.name} uses a computed slope")
    return p.channelwise(node, node.args[0], names)


def _prelu_fix(mod, node: fx.Node, kept) -> dict:
    if mod.num_parameters == 1:
        return {}
    return {"num_parameters": kept.new_shape(node.args[0].name)[1]}


def _local_response_norm(p, node: fx.Node):
    return p.softmax(node, node.args[0], None)  # mixes neighbouring channels: cross-channel


RULES = (
    OpRule("batch/instance norm", _stats_norm_module, modules=_STATS_NORMS, fix_module=_num_features_fix),
    OpRule("batch/instance norm (functional)", _stats_norm_function,
           functions=frozenset({F.batch_norm, F.instance_norm})),
    OpRule("layer norm", _layer_norm_module, modules=(nn.LayerNorm,), fix_module=_layer_norm_fix),
    OpRule("layer norm (functional)", _layer_norm_function, functions=frozenset({F.layer_norm}),
           rewrite=_layer_norm_rewrite),
    OpRule("rms norm", _layer_norm_module, modules=(nn.RMSNorm,), fix_module=_layer_norm_fix),
    OpRule("rms norm (functional)", _rms_norm_function, functions=frozenset({F.rms_norm}), rewrite=_layer_norm_rewrite),
    OpRule("group norm", _group_norm_module, modules=(nn.GroupNorm,), fix_module=_group_norm_fix),
    OpRule("group norm (functional)", _group_norm_function, functions=frozenset({F.group_norm}),
           rewrite=_group_norm_rewrite),
    OpRule("prelu", _prelu_module, modules=(nn.PReLU,), fix_module=_prelu_fix),
    OpRule("prelu (functional)", _prelu_function, functions=frozenset({F.prelu})),
    OpRule("local response norm", _local_response_norm, modules=(nn.LocalResponseNorm,),
           functions=frozenset({F.local_response_norm})),
)
