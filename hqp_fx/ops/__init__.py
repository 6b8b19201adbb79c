"""The op-rule registry: everything hqp_fx knows about an op, one module per op family.

Each ``OpRule`` (see ``base``) holds one op's analysis rule (how its channels couple), its pruning rewrite
(the new call, or the module attributes, once channels are removed) and its part in depth pruning.
``ChannelDependencyPass``, ``PruneChannelsPass`` and ``hqp_fx.branches`` look ops up here and name none.

Families: ``conv_linear`` (producers), ``norms``, ``elementwise``, ``data_movement`` (views, cat, split,
getitem, padding), ``pooling`` (spatial ops, reductions, softmax), ``attention`` (whole heads).

How to add an op: add an ``OpRule`` to the ``RULES`` tuple of its family module. Its ``label`` calls one of the
propagator's rules (``p.elementwise``, ``p.producer``, ``p.channelwise``, ``p.move``, ``p.spatial``,
``p.reduce``, ``p.softmax``, ``p.pad``, ``p.attention``, ``p.unknown``); give it a ``rewrite`` when one of its arguments
counts channels (a shape, a split size, a group count) and a ``fix_module`` when a module attribute does. Then
add a test to ``tests/test_ops.py``: a tiny model using the op, pruned with ``assert_prunes_exactly`` (which first
shows that masking moves the output, so the check can fail), and the model added to
``test_every_prunable_group_prunes_alone``. An op without a rule pins its channels, with the node named: never
silently wrong.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .. import meta
from . import attention, conv_linear, data_movement, elementwise, norms, pooling
from .base import NodeEdit, OpRule, arg, index_dims, run_call, weight_name

__all__ = ["OpRule", "NodeEdit", "RULES", "rule_for", "moves_data", "arg", "index_dims", "weight_name", "run_call",
           "functions", "methods"]

RULES: tuple[OpRule, ...] = (conv_linear.RULES + norms.RULES + elementwise.RULES + data_movement.RULES
                             + pooling.RULES + attention.RULES)

_BY_FUNCTION: dict = {}
_BY_METHOD: dict[str, OpRule] = {}
for _rule in RULES:
    for _f in _rule.functions:
        if _f in _BY_FUNCTION:
            raise RuntimeError(f"op rules {_BY_FUNCTION[_f].name!r} and {_rule.name!r} both claim {_f}")
        _BY_FUNCTION[_f] = _rule
    for _m in _rule.methods:
        if _m in _BY_METHOD:
            raise RuntimeError(f"op rules {_BY_METHOD[_m].name!r} and {_rule.name!r} both claim .{_m}()")
        _BY_METHOD[_m] = _rule
_MODULE_RULES = tuple(r for r in RULES if r.modules)


def rule_for(node: fx.Node, modules: dict[str, nn.Module]) -> OpRule | None:
    """The rule of a call node (None for other nodes and for ops hqp_fx does not know)."""
    if node.op == "call_function":
        return _BY_FUNCTION.get(node.target)
    if node.op == "call_method":
        if meta.method_owner(node) in modules:
            return None  # a module's own method hqp_fx.trace kept opaque (``self.flatten(x)`` is not Tensor.flatten)
        return _BY_METHOD.get(node.target)
    if node.op == "call_module":
        mod = modules[node.target]
        for rule in _MODULE_RULES:  # in registration order: a family lists subclasses before their bases
            if isinstance(mod, rule.modules):
                return rule
    return None


def moves_data(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a node's output is a rearranged copy of its input (its rule's ``moves_data``)."""
    rule = rule_for(node, modules)
    return rule is not None and rule.moves_data


def functions() -> frozenset:
    """Every call_function target some rule knows."""
    return frozenset(_BY_FUNCTION)


def methods() -> frozenset[str]:
    """Every call_method name some rule knows."""
    return frozenset(_BY_METHOD)
