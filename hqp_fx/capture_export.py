"""Capture with torch.export, then turn the ATen graph into the torch-level graph the passes read.

torch.export follows code fx cannot (shape arithmetic, data-dependent Python on static shapes), but it
records ATen calls on bare weights: ``aten.conv2d(x, conv1.weight, ...)``. The op rules are written once,
for torch-level calls and ``nn`` modules, so the ATen graph is converted here, in one place: a call whose
weight belongs to an ``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm2d`` of the user's model with the same
settings becomes a call of that module (so pruning fixes the module's attributes as for a traced graph),
other ATen calls become their ``torch``/``F`` function. An ATen op without a torch form stays as it is and
the channel analysis keeps the channels through it, naming it.
"""
from __future__ import annotations

import operator
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

__all__ = ["capture_with_export", "to_torch_level"]

aten = torch.ops.aten

# ATen overload -> torch-level callable taking the same positional arguments
_SAME_ARGS: dict = {
    aten.relu.default: torch.relu, aten.relu_.default: torch.relu,
    aten.hardswish.default: F.hardswish, aten.hardswish_.default: F.hardswish,
    aten.hardsigmoid.default: F.hardsigmoid, aten.hardsigmoid_.default: F.hardsigmoid,
    aten.hardtanh.default: F.hardtanh, aten.hardtanh_.default: F.hardtanh,
    aten.silu.default: F.silu, aten.silu_.default: F.silu,
    aten.sigmoid.default: torch.sigmoid, aten.sigmoid_.default: torch.sigmoid,
    aten.tanh.default: torch.tanh, aten.gelu.default: F.gelu,
    aten.add.Tensor: operator.add, aten.add_.Tensor: operator.add,
    aten.sub.Tensor: operator.sub, aten.sub_.Tensor: operator.sub,
    aten.mul.Tensor: operator.mul, aten.mul_.Tensor: operator.mul,
    aten.div.Tensor: operator.truediv, aten.div_.Tensor: operator.truediv,
    aten.max_pool2d.default: F.max_pool2d, aten.avg_pool2d.default: F.avg_pool2d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.flatten.using_ints: torch.flatten, aten.cat.default: torch.cat,
    aten.mean.dim: torch.mean, aten.permute.default: torch.permute, aten.transpose.int: torch.transpose,
    aten.reshape.default: torch.reshape, aten.view.default: torch.reshape,
    aten.softmax.int: torch.softmax, aten.split.Tensor: torch.split, aten.split_with_sizes.default: torch.split,
    aten.chunk.default: torch.chunk, aten.conv2d.default: F.conv2d, aten.linear.default: F.linear,
}
_IN_PLACE = {op for op in _SAME_ARGS if op._schema.name.endswith("_")} | {aten.dropout_.default}
_DROPOUT = {aten.dropout.default, aten.dropout_.default}  # eval-mode export: the identity
_ASSERTS = {aten._assert_tensor_metadata.default} if hasattr(aten, "_assert_tensor_metadata") else set()


def capture_with_export(root: nn.Module, inputs: tuple[torch.Tensor, ...]) -> fx.Graph:
    """``torch.export`` the (already copied, eval-mode) ``root`` and convert its graph to torch level."""
    exported = torch.export.export(root, inputs, strict=False).module()
    return to_torch_level(exported, root)


def _owner(weight: fx.Node, root: nn.Module) -> tuple[str, nn.Module] | None:
    if weight.op != "get_attr" or not weight.target.endswith(".weight"):
        return None
    name = weight.target.rpartition(".")[0]
    try:
        return name, root.get_submodule(name)
    except AttributeError:
        return None


def _arg(node: fx.Node, i: int, default):
    return node.args[i] if len(node.args) > i else default


def _as_module_call(node: fx.Node, root: nn.Module) -> str | None:
    """The module of ``root`` this conv/linear/batch-norm call is, when its settings match exactly."""
    t = node.target
    if t not in (aten.conv2d.default, aten.linear.default, aten.batch_norm.default,
                 aten._native_batch_norm_legit_no_training.default):
        return None
    owner = _owner(node.args[1], root)
    if owner is None:
        return None
    name, mod = owner
    bias = _arg(node, 2, None)
    bias_ok = (bias is None and getattr(mod, "bias", None) is None) or (
        isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{name}.bias")
    if t == aten.conv2d.default:
        ok = (type(mod) is nn.Conv2d and mod.padding_mode == "zeros" and bias_ok
              and tuple(_arg(node, 3, (1, 1))) == mod.stride and tuple(_arg(node, 4, (0, 0))) == tuple(mod.padding)
              and tuple(_arg(node, 5, (1, 1))) == mod.dilation and _arg(node, 6, 1) == mod.groups)
    elif t == aten.linear.default:
        ok = type(mod) is nn.Linear and bias_ok
    else:
        if t == aten.batch_norm.default:  # (x, weight, bias, mean, var, training, momentum, eps, cudnn)
            mean, var, training, eps = node.args[3], node.args[4], node.args[5], node.args[7]
        else:  # (x, weight, bias, mean, var, momentum, eps)
            mean, var, training, eps = node.args[3], node.args[4], False, node.args[6]
        ok = (type(mod) is nn.BatchNorm2d and not training and bias_ok and eps == mod.eps
              and getattr(mean, "target", None) == f"{name}.running_mean"
              and getattr(var, "target", None) == f"{name}.running_var")
    return name if ok else None


def to_torch_level(exported: fx.GraphModule, root: nn.Module) -> fx.Graph:
    """The graph of ``exported`` (``ExportedProgram.module()`` of ``root``) with torch-level calls.

    In-place ATen ops become their out-of-place form; that is refused (an error naming the node) where
    the two forms could differ.
    """
    graph = fx.Graph(owning_module=root)  # dead-code elimination asks the modules whether they are pure
    env: dict[fx.Node, object] = {}

    def load(a):
        return fx.node.map_arg(a, lambda n: env[n])

    for node in exported.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            continue
        if node.op == "output":  # export flattens the outputs; give back the model's own structure
            flat = load(node.args[0])
            spec = getattr(getattr(exported.graph._codegen, "pytree_info", None), "out_spec", None)
            graph.output(pytree.tree_unflatten(list(flat), spec) if spec is not None else flat)
            continue
        if node.op == "get_attr":
            env[node] = graph.get_attr(node.target)
            continue
        if node.op == "call_module" and node.target == "_guards_fn":  # export's input-shape guards
            continue
        if node.op != "call_function":
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        t = node.target
        if t in _ASSERTS:
            continue
        if t in _IN_PLACE:
            _check_out_of_place_is_safe(node)
        if t in _DROPOUT:
            env[node] = env[node.args[0]]
            continue
        module = _as_module_call(node, root)
        if module is not None:
            env[node] = graph.call_module(module, (load(node.args[0]),))
        elif t in _SAME_ARGS:
            env[node] = graph.call_function(_SAME_ARGS[t], load(node.args), load(node.kwargs))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
        if isinstance(env[node], fx.Node):
            env[node].meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
    graph.eliminate_dead_code()
    return graph


def _check_out_of_place_is_safe(node: fx.Node) -> None:
    """Out of place equals in place only when nothing else can see the write: the mutated tensor has no
    other reader (export already points later reads at the op's result) and is not a view of another."""
    from .trace import TraceError

    mutated = node.args[0]
    producer = getattr(mutated, "target", None)
    aliased = mutated.op in ("placeholder", "get_attr") or (  # an in-place producer was checked the same way
        isinstance(producer, torch._ops.OpOverload) and producer not in _IN_PLACE
        and any(r.alias_info is not None for r in producer._schema.returns))
    if len(mutated.users) > 1 or aliased:
        raise TraceError(
            f"torch.export recorded the in-place {node.target} on {mutated.name}, which "
            f"{'is a view of another tensor or an input' if aliased else 'another op reads too'}; hqp_fx cannot "
            "convert it to the out-of-place op its rules read. Make the op out-of-place in the model "
            "(e.g. y = x + r instead of x += r, F.relu(x) instead of F.relu(x, inplace=True))")
