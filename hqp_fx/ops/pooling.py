"""Spatial ops (pooling, upsampling), reductions and softmax.

Spatial ops keep channels and must not work over a dim that carries them; a reduction or softmax over the
channel dim couples every channel it sees (cross-channel), and a reduction collapses them into a constant.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .base import OpRule, arg

_SPATIAL_FUNCTIONS = frozenset({
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample, F.lp_pool2d,
    torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
})
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.LPPool2d,
)
_REDUCE_METHODS = frozenset({"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod"})
_REDUCE_FUNCTIONS = frozenset({torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.std,
                               torch.var, torch.norm, torch.logsumexp, torch.prod})
_SOFTMAX_FUNCTIONS = frozenset({F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize})


def _spatial(p, node: fx.Node):
    return p.spatial(node, node.args[0])


def _reduce(p, node: fx.Node):
    return p.reduce(node)


def _softmax_call(p, node: fx.Node):
    return p.softmax(node, node.args[0], arg(node, 1, "dim", None))


def _softmax_module(p, node: fx.Node):
    mod = p.modules[node.target]
    return p.softmax(node, node.args[0], -3 if isinstance(mod, nn.Softmax2d) else getattr(mod, "dim", 1))


RULES = (
    OpRule("pooling/upsampling", _spatial, functions=_SPATIAL_FUNCTIONS, modules=_SPATIAL_MODULES),
    OpRule("reduction", _reduce, functions=_REDUCE_FUNCTIONS, methods=_REDUCE_METHODS),
    OpRule("softmax", _softmax_call, functions=_SOFTMAX_FUNCTIONS, methods=frozenset({"softmax", "log_softmax"})),
    OpRule("softmax (module)", _softmax_module, modules=(nn.Softmax, nn.LogSoftmax, nn.Softmax2d)),
)
