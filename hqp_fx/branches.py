"""Whole-group removal: a group whose every channel goes takes its branch with it (depth pruning).

Channel pruning alone cannot make a layer cheaper than one block of the engine's kernel (16 channels for ONNX
Runtime's int8 convolutions), so on a deep net of narrow stages the time stops falling long before the MACs do.
Removing *all* channels of a residual block's inner group removes the block: the layers that consumed the group
now see no input, so their output is a constant (the consumer's bias, carried through its BatchNorm), and the
branch collapses to ``x + constant``. The same holds for an SE gate (``x * constant``).

A group qualifies (``find_branches``) when the tensors holding only its channels feed nothing but convolutions or
linear layers, and everything computed from those layers alone meets the live network only in an elementwise
add, sub or mul. ``remove_branches`` then replaces each such meeting point's constant operand by a buffer
holding its value, computed once with the group's tensors set to zero (eval mode: a BatchNorm inside the branch
contributes its running-statistics shift). Pruning all channels of the group in the original model (its producing
slices zeroed) computes the same function.

The buffer keeps only the dims the value varies along (batch 1): ``[1, C, 1, 1]`` for a residual block's
BatchNorm shift, so the pruned model runs at any input size its layers allow. ONNX Runtime's int8 add, though,
broadcasts a per-channel operand on a slow path and one that only broadcasts over the batch at full speed
(profiles in benchmarks/RESULTS.md), so ``constants_in_full`` stores an add's constant at the add's full shape in
the copy that ``quantize`` captures: the INT8 files run at the example's size, as exported anyway. Float files keep
it per channel (``hqp_fx.lower_onnx``).
A value that varies over space (zero padding inside the branch) is stored whole.

Which ops consume a group's channels and where a branch may meet the live net is each op rule's ``branch`` role
(``hqp_fx.ops``).
"""
from __future__ import annotations

import copy
import heapq
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .core import PassError
from .groups import ChannelAnalysis, SliceRecord, labels_along, labels_vary

__all__ = ["Branch", "StoredConstant", "find_branches", "branch_constants", "remove_branches", "drop_branch_bias",
           "droppable", "constants_in_full"]

_ADD = frozenset({operator.add, torch.add, "add"})
_SUB = frozenset({operator.sub, torch.sub, "sub"})
_ADD_SUB = _ADD | _SUB


@dataclass(frozen=True)
class Branch:
    """The nodes that go with a group: ``zero`` hold only its channels, ``constant`` are computed from those
    alone, and each ``meeting`` pair is (constant node, live node that combines it with the rest of the net)."""

    group: str
    zero: frozenset[str]
    constant: frozenset[str]
    meeting: tuple[tuple[str, str], ...]


def _is_consumer(node: fx.Node, modules: dict[str, nn.Module], zero: set[str]) -> bool:
    """A layer that reduces over the group's channels: with none of them left, its output is its bias."""
    rule = ops.rule_for(node, modules)
    if rule is None or rule.branch != "consumer" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    return node.args[0].name in zero and not any(n.name in zero for n in node.all_input_nodes[1:])


def _is_meeting(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    rule = ops.rule_for(node, modules)
    return rule is not None and rule.branch == "meeting"


def _shape(node: fx.Node):
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def find_branches(gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, Branch]:
    """{group id: the branch that removing all its channels takes away} for every prunable group that has one."""
    only: dict[int, set[str]] = {}  # group index -> nodes whose output holds that group's channels and nothing else
    for name, lab in analysis.node_labels.items():
        if isinstance(lab, torch.Tensor) and lab.numel() and bool((lab > 0).all()):
            owners = analysis.group_of[lab]
            lo, hi = int(owners.min()), int(owners.max())
            if lo == hi >= 0:
                only.setdefault(lo, set()).add(name)
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    skip = analysis.spread | set(analysis.gathers)
    found = {}
    for gi, zero in only.items():
        group = analysis.groups[gi]
        if group.prunable and not zero & skip:
            branch = _branch(group.id, zero, modules, nodes, order)
            if branch is not None:
                found[group.id] = branch
    return found


def _branch(group: str, zero: set[str], modules: dict[str, nn.Module], nodes: dict[str, fx.Node],
            order: dict[str, int]) -> Branch | None:
    """None when the group's channels reach anything but layers whose outputs only meet the live net in
    add/sub/mul. Walks only the nodes downstream of the group, in graph order."""
    pending: list[tuple[int, str]] = []
    queued: set[str] = set()

    def queue_users(node: fx.Node) -> None:
        for user in node.users:
            if user.name not in zero and user.name not in queued:
                queued.add(user.name)
                heapq.heappush(pending, (order[user.name], user.name))

    for name in zero:
        node = nodes[name]
        if node.op == "placeholder" or any(u.name not in zero and not _is_consumer(u, modules, zero)
                                           for u in node.users):
            return None
        queue_users(node)
    constant: set[str] = set()
    while pending:
        node = nodes[heapq.heappop(pending)[1]]
        if node.op in ("call_module", "call_function", "call_method") and all(
                n.name in zero or n.name in constant or n.op == "get_attr" for n in node.all_input_nodes):
            constant.add(node.name)
            queue_users(node)
    if not constant:
        return None
    meeting = []
    for node in sorted((nodes[c] for c in constant), key=lambda n: order[n.name]):
        for user in node.users:
            if user.name in constant or user.name in zero:  # inside the branch (an SE gate scaling it): goes too
                continue
            live = [n for n in user.all_input_nodes
                    if n.name not in constant and n.name not in zero and n.op != "get_attr"]
            # the live operand has the result's shape, so the stored batch-1 constant broadcasts to the same result
            if not _is_meeting(user, modules) or len(live) != 1 or _shape(live[0]) is None or _shape(live[0]) != _shape(user):
                return None
            meeting.append((node.name, user.name))
    return Branch(group, frozenset(zero), frozenset(constant), tuple(meeting))


@dataclass(frozen=True)
class StoredConstant:
    """A removed branch's value where it meets the live net, stored as buffer ``attr`` read by node ``user``
    instead of node ``node``. ``record`` says which channels its entries carry (None: no channel dim)."""

    attr: str
    node: str
    user: str
    value: torch.Tensor
    record: SliceRecord | None


def branch_constants(gm: fx.GraphModule, branches: list[Branch], analysis: ChannelAnalysis,
                     example_inputs) -> list[StoredConstant]:
    """What removing ``branches`` stores, computed without changing ``gm`` (it runs once, in eval mode)."""
    zero = set().union(*(b.zero for b in branches))
    gone = zero | set().union(*(b.constant for b in branches))
    wanted = {c for b in branches for c, user in b.meeting if user not in gone}
    values = _constant_values(gm, zero, wanted, example_inputs)
    taken: set[str] = set()
    constants = []
    for b in branches:
        for const_name, user_name in b.meeting:
            if user_name in gone:
                continue  # the meeting point lies inside another removed branch: it goes too
            value = values[const_name]
            first = value[:1] if value.ndim else value
            lab = analysis.labels(const_name)
            channel_dims = [d for d in range(lab.ndim) if labels_vary(lab, d)]
            if (value.ndim and not torch.equal(value, first.expand_as(value))) or len(channel_dims) > 1:
                raise PassError(f"PruneChannelsPass: removing all channels of group {b.group!r} leaves "
                                f"{const_name!r} with a value that varies over the batch or holds channels along "
                                "several dims, so it cannot become one stored tensor; keep at least one channel "
                                "of this group")
            attr = _free_attr(gm, f"{const_name}_constant", taken)
            taken.add(attr)
            record = None
            if channel_dims:
                d = channel_dims[0]
                record = SliceRecord(attr, d, labels_along(lab, d), "out", const_name)
            constants.append(StoredConstant(attr, const_name, user_name, _compact(first, channel_dims), record))
    return constants


def _compact(value: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """``value`` with every dim after the batch that it is constant along (``keep`` excepted) cut to size 1: the
    same tensor once broadcast, stored without the repeats."""
    for d in range(1, value.ndim):
        if d not in keep and value.shape[d] > 1 and torch.equal(value, value.narrow(d, 0, 1).expand_as(value)):
            value = value.narrow(d, 0, 1)
    return value.detach().clone()


def constants_in_full(model: nn.Module, example_inputs) -> nn.Module:
    """A copy of ``model`` whose stored constants that an add or sub broadcasts over more than the batch are
    expanded to that op's shape at ``example_inputs`` (batch 1), for ONNX Runtime's int8 add (module docstring);
    ``model`` itself when it has none. Values are unchanged; only the lowered files are tied to the example's size.
    A multiply's constant (an SE gate's) stays per channel: the INT8 files run that multiply in float, and full
    shape made it no faster, only larger."""
    if not isinstance(model, fx.GraphModule):
        return model
    modules = dict(model.named_modules())
    params = {name for name, _ in model.named_parameters()}
    wanted = {}
    for node in model.graph.nodes:
        if node.target not in _ADD_SUB or not _is_meeting(node, modules):
            continue
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg.target not in params:
                value = _attr(model, arg.target)
                if isinstance(value, torch.Tensor) and value.ndim > 1 and value.shape[0] == 1 and any(
                        size == 1 for size in value.shape[1:]):
                    wanted.setdefault(node.name, []).append(arg.target)
    if not wanted:
        return model
    model = copy.deepcopy(model)
    shapes: dict[str, tuple[int, ...]] = {}

    class _Shapes(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted and isinstance(out, torch.Tensor):
                shapes[n.name] = tuple(out.shape)
            return out

    _run_in_eval(_Shapes(model), example_inputs)
    for name, targets in wanted.items():
        out = shapes.get(name)
        for target in targets:
            value = _attr(model, target)
            if out is not None and len(out) == value.ndim:
                full = (1, *out[1:])
                if tuple(value.shape) != full:
                    owner, _, leaf = target.rpartition(".")
                    module = model.get_submodule(owner) if owner else model
                    expanded = value.expand(full).contiguous()
                    if leaf in module._buffers:
                        module.register_buffer(leaf, expanded, persistent=leaf not in module._non_persistent_buffers_set)
                    else:
                        setattr(module, leaf, expanded)
    return model


def _attr(model: nn.Module, target: str):
    owner, _, leaf = target.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, leaf)


def remove_branches(gm: fx.GraphModule, constants: list[StoredConstant], tensors: dict[str, torch.Tensor]) -> None:
    """Store each constant as a buffer (its tensor from ``tensors``, already sliced) and drop the branches'
    nodes, in place on ``gm`` (a private copy)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for c in constants:
        gm.register_buffer(c.attr, tensors[c.attr])
        user = nodes[c.user]
        with gm.graph.inserting_before(user):
            getter = gm.graph.get_attr(c.attr)
        user.replace_input_with(nodes[c.node], getter)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()


def drop_branch_bias(gm: fx.GraphModule, constants: list[StoredConstant]) -> None:
    """Drop each of ``constants`` (stored by ``remove_branches``) that is only added, with its add, and a ReLU
    then applied to what is already non-negative; in place on ``gm`` (a private copy). See ``droppable``."""
    modules = dict(gm.named_modules())
    attrs = {c.attr for c in constants}
    for getter in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in attrs]:
        user = next(iter(getter.users), None)
        if len(getter.users) != 1 or not droppable(user, getter):
            continue
        live = next(n for n in user.all_input_nodes if n is not getter)
        followers = list(user.users)
        user.replace_all_uses_with(live)
        for follower in followers:
            if _is_relu(follower, modules) and _nonnegative(live, modules) and follower.all_input_nodes == [live]:
                follower.replace_all_uses_with(live)  # relu(x) is x where x >= 0
        gm.graph.erase_node(user)
        gm.graph.erase_node(getter)
        delattr(gm, getter.target)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()


def droppable(user: fx.Node, constant: fx.Node) -> bool:
    """Whether a removed branch's ``constant`` meets the live net in ``user`` as a bias only: an add, or a sub
    that subtracts it. Dropping it leaves the live operand alone (``_branch`` checked it has the result's shape),
    so a removed residual block becomes the identity instead of ``x + bias``: not the masked original any more,
    but the original with the branch's whole output zeroed, its last BatchNorm's shift included.

    Why drop what is exact to keep: ONNX Runtime's int8 add over a whole feature map is not free. On ResNet-56
    with seven blocks removed, the adds they left were 5-7% of the INT8 model's time, and dropping them cost no
    measurable accuracy after one fine-tune epoch on either CIFAR ResNet (benchmarks/RESULTS.md, "A removed
    block's bias dropped")."""
    second = len(user.args) > 1 and user.args[1] is constant
    if user.target in _ADD:
        return second or user.kwargs.get("alpha", 1) == 1  # c + alpha * x is not x
    return user.target in _SUB and second


def _nonnegative(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A ReLU's output, possibly through ops that keep it non-negative: identities, slicing and padding with a
    value >= 0 (a residual block's shortcut: ``nn.Identity``, or the CIFAR ResNets' subsample-and-pad)."""
    def passes_sign(n: fx.Node) -> bool:
        if n.op == "call_module":
            return type(modules.get(n.target)) is nn.Identity
        if n.op == "call_function" and n.target is F.pad:
            value = n.args[3] if len(n.args) > 3 else n.kwargs.get("value")
            return isinstance(value, (int, float, type(None))) and (value or 0) >= 0
        return n.op == "call_function" and n.target is operator.getitem

    while node.all_input_nodes and passes_sign(node):
        node = node.all_input_nodes[0]
    return _is_relu(node, modules)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return node.op == "call_function" and node.target in (torch.relu, torch.relu_, F.relu, F.relu_)


def _free_attr(gm: fx.GraphModule, base: str, taken: set[str]) -> str:
    name, k = base, 1
    while hasattr(gm, name) or name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _constant_values(gm: fx.GraphModule, zero: set[str], wanted: set[str], example_inputs) -> dict[str, torch.Tensor]:
    """Run ``gm`` once in eval mode with the removed groups' tensors set to zero; keep the ``wanted`` values.

    Eval mode: the parameters and buffers may still be shared with the caller's model, and a BatchNorm in train
    mode would update its running statistics.
    """
    values: dict[str, torch.Tensor] = {}

    class _ZeroedRun(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in zero:
                out = torch.zeros_like(out)
            if n.name in wanted:
                values[n.name] = out
            return out

    _run_in_eval(_ZeroedRun(gm), example_inputs)
    return values


def _run_in_eval(interpreter: fx.Interpreter, example_inputs) -> None:
    """Run ``interpreter`` once without gradients and with its module in eval mode, every submodule's mode restored
    afterwards: a BatchNorm in train mode would move its running statistics."""
    modes = {m: m.training for m in interpreter.module.modules()}
    interpreter.module.eval()
    try:
        with torch.no_grad():
            interpreter.run(*example_inputs)
    finally:
        for m, mode in modes.items():
            m.train(mode)
