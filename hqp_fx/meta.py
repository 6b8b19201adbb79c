"""Every ``hqp.*`` metadata key hqp_fx reads or writes, defined once.

Torch's own keys (``tensor_meta``, ``val``, ``stack_trace``, ``nn_module_stack``) are read,
never written, except ``tensor_meta`` which torch's own ``ShapeProp`` refreshes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx as fx

if TYPE_CHECKING:  # pragma: no cover
    from .groups import ChannelAnalysis, ChannelGroup

# gm.meta keys
CHANNEL_GROUPS = "hqp.channel_groups"  # tuple[ChannelGroup, ...], written by ChannelDependencyPass
CHANNEL_ANALYSIS = "hqp.channel_analysis"  # ChannelAnalysis behind the groups (element-level maps)
ALIGN = "hqp.align"  # dict: multiple + per-group rounding record, written by AlignChannelsPass
SENSITIVITY = "hqp.sensitivity"  # {"criterion": str, "scores": {group id: Tensor[size]}}, by SensitivityPass
PRUNE_PLAN = "hqp.prune_plan"  # dict[group id, list[int]] actually applied by PruneChannelsPass
EXAMPLE_INPUTS = "hqp.example_inputs"  # tuple of tensors used for tracing / shape propagation
SOURCE_NAMES = "hqp.source_names"  # qualified module names of the user's original model
LEAVES = "hqp.leaves"  # dict[leaf_key, why it is opaque]: the user's and hqp_fx.trace's own leaf modules and methods
QUANTIZATION = "hqp.quantization"  # QuantizeResult.report() of the converted model, by QuantizePass

# node.meta keys
NODE_CHANNEL_GROUP = "hqp.channel_group"  # tuple[str, ...]: ids of the groups this node's output carries


def channel_groups(gm: fx.GraphModule) -> tuple[ChannelGroup, ...]:
    """The groups ChannelDependencyPass stored, or a clear error if it has not run."""
    try:
        return gm.meta[CHANNEL_GROUPS]
    except KeyError:
        raise KeyError(
            f"gm.meta[{CHANNEL_GROUPS!r}] is missing: run hqp_fx.passes.ChannelDependencyPass first"
        ) from None


def channel_analysis(gm: fx.GraphModule) -> ChannelAnalysis:
    try:
        return gm.meta[CHANNEL_ANALYSIS]
    except KeyError:
        raise KeyError(
            f"gm.meta[{CHANNEL_ANALYSIS!r}] is missing: run hqp_fx.passes.ChannelDependencyPass first"
        ) from None


def example_inputs(gm: fx.GraphModule) -> tuple[Any, ...]:
    try:
        return gm.meta[EXAMPLE_INPUTS]
    except KeyError:
        raise KeyError(
            f"gm.meta[{EXAMPLE_INPUTS!r}] is missing: build the GraphModule with hqp_fx.trace(model, example_inputs)"
        ) from None


def method_owner(node: fx.Node) -> str | None:
    """For a ``call_method`` on an attribute read whole (``get_attr``), that attribute's name: a module whose own
    method ``hqp_fx.trace`` kept as one opaque call when it names a module (else a parameter's tensor method)."""
    if node.op == "call_method" and node.args and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
        return node.args[0].target
    return None


def leaf_key(node: fx.Node) -> str | None:
    """The key of ``LEAVES`` a node would be recorded under: a ``call_module``'s module name, or
    ``"<module>.<method>"`` for a module's own method that ``hqp_fx.trace`` kept as one opaque call."""
    if node.op == "call_module":
        return node.target
    owner = method_owner(node)
    return None if owner is None else f"{owner}.{node.target}"
