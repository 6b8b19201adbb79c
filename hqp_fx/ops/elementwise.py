"""Elementwise ops: arithmetic, activations, dropout, casts. Operands meeting at one position are the same
channel (a residual add ties both sides); an operand broadcast over the other's channels (an SE gate's
per-channel scale against a spatial map, a scalar) ties nothing."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import OpRule

# the ops a removed branch's constant can join the live net through (depth pruning). In-place forms are left
# out: they would write into the stored constant when it is their first operand.
_MEETING_FUNCTIONS = frozenset({operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul})
_MEETING_METHODS = frozenset({"add", "sub", "mul"})

_METHODS = frozenset({
    "div", "add_", "sub_", "mul_", "div_", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "exp", "abs", "neg", "sqrt", "rsqrt", "clamp", "clamp_", "clamp_min", "clamp_max", "pow",
    "to", "float", "half", "double", "type", "type_as", "detach", "clone", "masked_fill", "maximum", "minimum",
})
_FUNCTIONS = {
    operator.truediv, operator.floordiv, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.neg, operator.pow, torch.subtract, torch.multiply, torch.div, torch.true_divide,
    torch.maximum, torch.minimum, torch.where, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.clamp, torch.clamp_min, torch.clamp_max,
    torch.pow, torch.erf, torch.square, torch.zeros_like, torch.ones_like, torch.full_like,
    F.relu, F.relu_, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.elu, F.selu,
    F.celu, F.leaky_relu, F.mish, F.softplus, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
}
try:  # torchvision's stochastic depth is fx-wrapped: elementwise on its input
    from torchvision.ops import stochastic_depth as _stochastic_depth

    _FUNCTIONS.add(_stochastic_depth)
except ImportError:  # pragma: no cover - torchvision is a dependency, but the analysis does not need it
    pass
_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)


def _elementwise(p, node):
    return p.elementwise(node)


RULES = (
    OpRule("add/sub/mul", _elementwise, functions=_MEETING_FUNCTIONS, methods=_MEETING_METHODS, branch="meeting"),
    OpRule("elementwise", _elementwise, functions=frozenset(_FUNCTIONS), methods=_METHODS, modules=_MODULES),
)
