"""PruneChannelsPass: physically remove channels and rewrite every shape that depends on them.

The only pass that changes shapes, in the torchao ``prepare`` style: first a read-only plan of every change
(which tensor entries survive, each node's new call from its op rule in ``hqp_fx.ops``, each module's new
attributes, which data-movement ops become an explicit ``index_select``), then one loop that applies them to a
copy, then a read-only verification (lint, shape propagation). It works from the element labels the dependency
pass stored: a parameter dimension keeps the entries whose element survives, and a constant that counts
channels is recomputed from how many labelled positions survive along the dim it acts on. A plan that takes
every channel of a removable group removes the branch it feeds (``hqp_fx.branches``); with ``drop_branch_bias``
an added constant it leaves goes too, so a removed residual block becomes the identity (not exact: see
``hqp_fx.branches.droppable``).
"""
from __future__ import annotations

import copy
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .. import meta, ops
from ..branches import StoredConstant, branch_constants, drop_branch_bias, remove_branches
from ..core import GraphPass, PassError, PassResult
from ..groups import ChannelAnalysis, SliceRecord
from ..trace import propagate_shapes

__all__ = ["PruneChannelsPass", "validate_plan", "KeptChannels", "Keep"]


def validate_plan(groups, plan: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Check a plan against the groups; ValueError names the group and the problem."""
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must map group ids to channel indices, got {type(plan).__name__}")
    by_id = {g.id: g for g in groups}
    clean: dict[str, list[int]] = {}
    for gid, indices in plan.items():
        if gid not in by_id:
            close = [k for k in by_id if gid.split(".")[0] in k][:5] or list(by_id)[:5]
            raise ValueError(f"unknown group {gid!r} in the prune plan; known ids include {close}")
        g = by_id[gid]
        idx = g.check_indices(indices)
        if len(idx) == 0:
            continue
        if not g.prunable:
            raise ValueError(f"group {gid!r} is not prunable: {g.reason}")
        if len(idx) >= g.size and not g.removable:
            raise ValueError(f"group {gid!r}: the plan removes all {g.size} channels, but its channels do not only "
                             "feed a branch that meets the rest of the net in an add or mul; keep at least one")
        clean[gid] = sorted(idx.tolist())
    return clean


def _copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Deep copy of a GraphModule's structure that skips the (large, now stale) analysis metadata.

    Parameters and buffers are *shared* with ``gm`` here: the mutation loop replaces every one of
    them with a sliced or cloned tensor (``_pruned_tensors``), so each is copied once, not twice.
    """
    memo = {id(v): None for k, v in gm.meta.items() if k not in (meta.EXAMPLE_INPUTS, meta.SOURCE_NAMES)}
    memo.update({id(t): t for t in list(gm.parameters()) + list(gm.buffers())})
    new = copy.deepcopy(gm, memo)
    new.meta = {k: v for k, v in new.meta.items() if k in (meta.EXAMPLE_INPUTS, meta.SOURCE_NAMES)}
    for node in new.graph.nodes:
        node.meta.pop(meta.NODE_CHANNEL_GROUP, None)
    return new


def _delete_unused_submodules(gm: fx.GraphModule) -> None:
    """``GraphModule.delete_all_unused_submodules``, except that a module the graph reads whole (``get_attr``: the
    owner of a method ``hqp_fx.trace`` kept opaque, such as a detector's decode) keeps its children too; fx's
    own version keeps them only for ``call_module`` and would drop the decode's layers and buffers."""
    used = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        parts = node.target.split(".")
        used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        obj = operator.attrgetter(node.target)(gm)
        if isinstance(obj, nn.Module):
            used.update(f"{node.target}.{name}" for name, _ in obj.named_modules() if name)
    for name in [name for name, _ in gm.named_modules() if name and name not in used]:
        gm.delete_submodule(name)


class Keep(NamedTuple):
    """The surviving positions of a tensor: ``mask[i]`` is True when position ``i`` along ``dim`` is kept."""

    dim: int
    mask: torch.Tensor


class _IrregularLayout(Exception):
    """The kept positions of a node's output do not form a slice along one dim."""


class KeptChannels:
    """Which positions of each analysed node's output survive the removal of ``removed`` elements.

    Read-only and lazy: ``keep`` is computed per node on first use. The op rules' rewrites read it.
    """

    def __init__(self, analysis: ChannelAnalysis, removed: torch.Tensor):
        self.analysis = analysis
        self.removed = removed
        self._cache: dict[tuple[str, int | None], Keep | None | _IrregularLayout] = {}

    def is_tensor(self, name: str) -> bool:
        return isinstance(self.analysis.node_labels.get(name), torch.Tensor)

    def _labels(self, name: str, item: int | None):
        if name in self.analysis.param_labels:
            lab = self.analysis.param_labels[name]
            return lab, tuple(lab.shape)
        lab, shape = self.analysis.node_labels[name], self.analysis.node_shapes[name]
        return (lab, shape) if item is None else (lab[item], shape[item])

    def keep(self, name: str, item: int | None = None) -> Keep | None:
        """The kept positions of node ``name``'s output (its ``item``-th for tuples), None when all survive."""
        key = (name, item)
        if key not in self._cache:
            self._cache[key] = self._layout(*self._labels(name, item), name)
        found = self._cache[key]
        if isinstance(found, _IrregularLayout):
            raise found
        return found

    def _layout(self, lab: torch.Tensor, shape, name: str) -> Keep | None | _IrregularLayout:
        removed = self.removed[lab]
        if not removed.any():
            return None
        kept_real = ~removed & (lab > 0)
        if not kept_real.any() and not (lab == 0).any():
            raise ValueError(f"the plan removes every channel that reaches node {name!r}; keep at least one of them")
        for d in range(lab.ndim):
            if shape[d] <= 1:
                continue
            others = tuple(o for o in range(lab.ndim) if o != d)
            rem = removed.amax(dim=others) if others else removed
            kep = kept_real.amax(dim=others) if others else kept_real
            rem = rem.expand(shape[d]) if rem.numel() == 1 else rem
            kep = kep.expand(shape[d]) if kep.numel() == 1 else kep
            if rem.all() or (rem & kep).any():
                continue
            return Keep(d, ~rem)
        # channels spread over several dims are fine inside a run the pass replaces by one index_select
        return None if name in self.analysis.spread else _IrregularLayout(name)

    def touched(self, name: str) -> bool:
        """Whether the plan removes anything from node ``name``'s output (any item of a tuple output)."""
        lab = self.analysis.param_labels.get(name, self.analysis.node_labels.get(name))
        labs = lab if isinstance(lab, (tuple, list)) else (lab,)
        return any(isinstance(t, torch.Tensor) and bool(self.removed[t].any()) for t in labs)

    def shape(self, name: str, item: int | None = None) -> tuple:
        return self._labels(name, item)[1]

    def new_shape(self, name: str, item: int | None = None) -> tuple[int, ...]:
        shape = self.shape(name, item)
        keep = self.keep(name, item)
        if keep is None:
            return tuple(shape)
        return tuple(int(keep.mask.sum()) if i == keep.dim else s for i, s in enumerate(shape))

    def restricted(self, name: str, item: int | None = None) -> torch.Tensor:
        """Labels of a node output with the removed positions dropped: what the pruned op must yield.

        An expanded view of the compact labels (no copy of constant dims)."""
        lab, shape = self._labels(name, item)
        keep = self.keep(name, item)
        if keep is None:
            return lab.expand(shape)
        idx = keep.mask.nonzero().flatten()
        new_shape = list(shape)
        new_shape[keep.dim] = len(idx)
        return lab.index_select(keep.dim, idx).expand(new_shape)

    def restricted_value(self, name: str):
        """``restricted`` for a tensor output, a tuple of them (None for non-tensor items) for a tuple output."""
        lab = self.analysis.node_labels[name]
        if isinstance(lab, torch.Tensor):
            return self.restricted(name)
        return tuple(None if item is None else self.restricted(name, i) for i, item in enumerate(lab))

    def vector(self, name: str, dim: int) -> torch.Tensor:
        """Element per position along ``dim`` of a node's output (labels are uniform there)."""
        lab = self.analysis.labels(name)
        return lab.movedim(dim, 0).reshape(lab.shape[dim], -1).amax(1)


@dataclass
class _Gather:
    """Node ``end`` becomes ``index_select(source, dim, perm)``."""

    end: fx.Node
    source: fx.Node
    dim: int
    perm: torch.Tensor


@dataclass
class _Changes:
    """Everything the mutation loop does, decided before it starts."""

    constants: list[StoredConstant]
    tensors: dict[str, torch.Tensor]  # qualified name -> the pruned module's tensor (one object per shared tensor)
    edits: dict[fx.Node, ops.NodeEdit] = field(default_factory=dict)
    module_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    gathers: list[_Gather] = field(default_factory=list)


class PruneChannelsPass(GraphPass):
    """Remove the channels ``plan`` names ({group id: channel indices}) and rewrite all shapes.

    Returns a new GraphModule; the input module is never changed. With ``plan=None`` the
    plan written by AlignChannelsPass (``gm.meta["hqp.align"]["plan"]``) is used. A group emptied whole removes
    its branch, leaving the branch's constant where it met the net: the result equals the original with those
    channels masked. ``drop_branch_bias=True`` drops a constant that is only added as well (the pruning loop's
    default: the block then costs nothing in the engine, and fine-tuning follows).
    """

    provided_meta = (meta.PRUNE_PLAN,)
    # the returned module is a new graph: run ChannelDependencyPass on it again before further channel passes
    invalidated_meta = (meta.CHANNEL_GROUPS, meta.CHANNEL_ANALYSIS, meta.ALIGN, meta.SENSITIVITY)

    def __init__(self, plan: Mapping[str, Sequence[int]] | None = None, *, drop_branch_bias: bool = False):
        self.plan = None if plan is None else {k: list(v) for k, v in plan.items()}
        self.drop_branch_bias = drop_branch_bias
        self.required_meta = (meta.CHANNEL_GROUPS, meta.CHANNEL_ANALYSIS) + ((meta.ALIGN,) if plan is None else ())

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        analysis = meta.channel_analysis(graph_module)
        raw = self.plan if self.plan is not None else graph_module.meta[meta.ALIGN]["plan"]
        plan = validate_plan(analysis.groups, raw)
        if not plan:
            graph_module.meta[meta.PRUNE_PLAN] = {}
            return PassResult(graph_module, False)
        new = _copy_module(graph_module)
        changes = _plan_changes(new, analysis, plan)
        _apply_changes(new, changes, self.drop_branch_bias)
        new.graph.lint()
        propagate_shapes(new, meta.example_inputs(new),
                         hint="The pruned graph is inconsistent: this is a bug in hqp_fx, please report it with the model.")
        new.meta[meta.PRUNE_PLAN] = plan
        return PassResult(new, True)


# ----- 1. the plan: read-only ---------------------------------------------------------------------------------

def _plan_changes(new: fx.GraphModule, analysis: ChannelAnalysis, plan: dict[str, list[int]]) -> _Changes:
    removed = analysis.removed_elements(plan)
    kept = KeptChannels(analysis, removed)
    modules = dict(new.named_modules())
    sizes = {g.id: g.size for g in analysis.groups}
    branches = [analysis.branches[gid] for gid, idx in plan.items() if len(idx) == sizes[gid]]
    constants = branch_constants(new, branches, analysis, meta.example_inputs(new)) if branches else []
    gone = _removed_with(new, set().union(*(b.zero | b.constant for b in branches)))
    live = [n for n in new.graph.nodes if n.name not in gone]
    for node in live:  # fail before anything is decided when a node's pruned layout is not a slice
        if kept.is_tensor(node.name):
            try:
                kept.keep(node.name)
            except _IrregularLayout:
                raise PassError(f"PruneChannelsPass: cannot express the pruned layout of node {node.format_node()}; "
                                "this is a bug in hqp_fx's dependency analysis, please report it with the model") from None
    records = analysis.records + [c.record for c in constants if c.record is not None]
    changes = _Changes(constants, _pruned_tensors(new, records, removed, {c.attr: c.value for c in constants}))
    for node in live:
        if node.name in analysis.gathers or (node.op != "call_module" and node.name not in analysis.node_labels):
            continue  # a gathered node is replaced whole; an unlabelled call holds no channels
        rule = ops.rule_for(node, modules)
        if rule is None:
            continue
        if node.op == "call_module":
            x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if rule.fix_module is not None and x is not None and x.name in analysis.node_shapes:
                attrs = rule.fix_module(modules[node.target], node, kept)
                if attrs:
                    changes.module_attrs.setdefault(node.target, {}).update(attrs)
        elif rule.rewrite is not None:
            edit = rule.rewrite(node, kept)
            if edit is not None:
                changes.edits[node] = edit
    nodes = {n.name: n for n in new.graph.nodes}
    ends = {nodes[end]: nodes[source] for end, source in analysis.gathers.items() if end not in gone}
    ends.update(_moves_to_gather(new, modules, kept, changes, gone))
    for end in (n for n in live if n in ends):  # graph order: a source may itself be a gathered node
        gather = _gather(end, ends[end], kept)
        if gather is not None:
            changes.gathers.append(gather)
    return changes


def _removed_with(gm: fx.GraphModule, branch_nodes: set[str]) -> set[str]:
    """The nodes removing the branches deletes: their own, and those left feeding nothing but them (the layers
    before a removed block's group, which dead-code elimination then takes too)."""
    gone = set(branch_nodes)
    for node in reversed(gm.graph.nodes):
        if node.name not in gone and node.op not in ("placeholder", "output") and node.users and not node.is_impure() \
                and all(user.name in gone for user in node.users):
            gone.add(node.name)
    return gone


def _pruned_tensors(new: fx.GraphModule, records: list[SliceRecord], removed: torch.Tensor,
                    constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pruned module's own tensors: the surviving entries of sliced ones, clones of the rest."""
    keep: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for rec in records:
        mask = ~removed[rec.labels]
        prev = keep[rec.param].get(rec.dim)
        keep[rec.param][rec.dim] = mask if prev is None else prev & mask
    named = [(n, t, True) for n, t in new.named_parameters(remove_duplicate=False)]
    named += [(n, t, False) for n, t in new.named_buffers(remove_duplicate=False)]
    named += [(n, t, False) for n, t in constants.items()]
    done: dict[int, torch.Tensor] = {}  # a tensor registered under two names stays one tensor
    out: dict[str, torch.Tensor] = {}
    for name, old, is_param in named:
        if id(old) not in done:
            t = old.detach()
            dims = {d: m for d, m in keep.get(name, {}).items() if not m.all()}
            for d, m in dims.items():
                t = t.index_select(d, m.nonzero().flatten())  # a copy
            t = t if dims else t.clone()
            done[id(old)] = nn.Parameter(t, requires_grad=old.requires_grad) if is_param else t
        out[name] = done[id(old)]
    return out


def _moves_to_gather(new: fx.GraphModule, modules, kept: KeptChannels, changes: _Changes,
                     gone: set[str]) -> dict[fx.Node, fx.Node]:
    """Data-movement ops whose rewritten call, run on the surviving labels, does not give the original mapping
    restricted to the kept channels: {node: the input an ``index_select`` replaces it from}.

    This is what makes the rewrite safe for ops without a rewrite of their own (a channel shuffle module, a
    roll over channels, ...); when even a gather cannot express the op, pruning stops with the node named.
    """
    analysis = kept.analysis
    env: dict[fx.Node, object] = {}
    found: dict[fx.Node, fx.Node] = {}
    for node in new.graph.nodes:
        name = node.name
        if node.op == "output" or name in gone:
            continue
        if node.op == "get_attr":  # a parameter that carries channels is followed by its labels, like a tensor
            if name in analysis.param_labels:
                env[node] = kept.restricted(name)
            elif node.target in changes.tensors:
                env[node] = changes.tensors[node.target]
            else:
                env[node] = operator.attrgetter(node.target)(new)
            continue
        if name in analysis.spread:
            env[node] = None  # inside a replaced permutation run: checked at its end node
            continue
        labelled = name in analysis.node_labels
        if node.op == "placeholder" or name in analysis.gathers or (labelled and not ops.moves_data(node, modules)):
            env[node] = kept.restricted_value(name) if labelled else None
            continue

        if labelled and node not in changes.edits and not kept.touched(name) and not any(
                kept.touched(n.name) for n in node.all_input_nodes):
            # the plan reaches neither its inputs nor its output: it runs as before. Re-running it on labels
            # could not even work for a tensor the analysis labelled but an op reads as values
            env[node] = kept.restricted_value(name)
            continue

        def materialised(n):  # ops such as view() need contiguous inputs, not expanded views
            v = env.get(n)
            return v.contiguous() if isinstance(v, torch.Tensor) else v

        call = changes.edits.get(node) or ops.NodeEdit.of(node)
        args = fx.node.map_arg(call.args, materialised)
        kwargs = fx.node.map_arg(call.kwargs, materialised)
        if any(a is None for a in _flat(args, kwargs)) and node.all_input_nodes:
            env[node] = None
            continue
        try:
            actual = ops.run_call(node.op if node.op == "call_module" else call.op, call.target, args, kwargs, modules)
        except Exception as exc:
            if not labelled:
                raise PassError(f"PruneChannelsPass: {node.format_node()} fails on the pruned shapes: {exc}") from None
            actual = None
        if not labelled:
            env[node] = actual
            continue
        expected = kept.restricted_value(name)
        env[node] = expected
        if _same(actual, expected):
            continue
        source = _single_tensor_input(node, kept)
        if source is None:
            raise PassError(f"PruneChannelsPass: {node.format_node()} cannot be rewritten for the pruned channels "
                            "(its channel mapping is not a plain selection); keep it opaque with leaf_modules or report it")
        found[node] = source
    return found


def _gather(end: fx.Node, source: fx.Node, kept: KeptChannels) -> _Gather | None:
    """The permutation that yields ``end``'s surviving channels from ``source``'s surviving ones."""
    keep = kept.keep(source.name)
    if keep is None:
        return None
    source_elements = kept.vector(source.name, keep.dim)
    end_elements = kept.vector(end.name, keep.dim)
    rank = torch.cumsum(keep.mask.long(), 0) - 1
    position = {int(e): int(rank[i]) for i, e in enumerate(source_elements.tolist()) if keep.mask[i]}
    perm = torch.tensor([position[int(e)] for e in end_elements.tolist() if int(e) in position], dtype=torch.long)
    return _Gather(end, source, keep.dim, perm)


def _single_tensor_input(node: fx.Node, kept: KeptChannels) -> fx.Node | None:
    """The one labelled input of a data-movement node when a gather from it can replace the node."""
    ins = [n for n in node.all_input_nodes if kept.is_tensor(n.name)]
    if len(ins) != 1 or not kept.is_tensor(node.name):
        return None
    src, end = ins[0].name, node.name
    if kept.shape(src) != kept.shape(end):
        return None
    s_lab, e_lab = kept.analysis.node_labels[src], kept.analysis.node_labels[end]
    dims = [d for d in range(s_lab.ndim) if s_lab.shape[d] > 1 or e_lab.shape[d] > 1]
    if len(dims) != 1:
        return None
    s_vec = kept.vector(src, dims[0])
    e_vec = kept.vector(end, dims[0])
    if (s_vec <= 0).any() or len(torch.unique(s_vec)) != len(s_vec) or not torch.isin(e_vec, s_vec).all():
        return None
    return ins[0]


def _same(actual, expected) -> bool:
    if isinstance(expected, torch.Tensor):
        return isinstance(actual, torch.Tensor) and actual.shape == expected.shape and torch.equal(actual, expected)
    if isinstance(expected, tuple):
        return isinstance(actual, (tuple, list)) and len(actual) == len(expected) and all(
            e is None or _same(a, e) for a, e in zip(actual, expected))
    return False


def _flat(*objs):
    for o in objs:
        if isinstance(o, (tuple, list)):
            yield from _flat(*o)
        elif isinstance(o, dict):
            yield from _flat(*o.values())
        else:
            yield o


# ----- 2. the one mutation loop, on the private copy ----------------------------------------------------------

def _apply_changes(new: fx.GraphModule, changes: _Changes, drop_bias: bool) -> None:
    if changes.constants:
        remove_branches(new, changes.constants, changes.tensors)
    for name, _ in list(new.named_parameters(remove_duplicate=False)) + list(new.named_buffers(remove_duplicate=False)):
        owner_name, _, attr = name.rpartition(".")
        owner = new.get_submodule(owner_name) if owner_name else new
        if isinstance(changes.tensors[name], nn.Parameter):
            setattr(owner, attr, changes.tensors[name])
        else:
            owner._buffers[attr] = changes.tensors[name]
    for node, edit in changes.edits.items():
        node.op, node.target, node.args, node.kwargs = edit.op, edit.target, edit.args, edit.kwargs
    for target, attrs in changes.module_attrs.items():
        module = new.get_submodule(target)
        for attr, value in attrs.items():
            setattr(module, attr, value)
    replaced: dict[fx.Node, fx.Node] = {}
    for g in changes.gathers:
        buf = f"_hqp_perm_{g.end.name}"
        new.register_buffer(buf, g.perm)
        with new.graph.inserting_before(g.end):
            getter = new.graph.get_attr(buf)
            gathered = new.graph.call_function(torch.index_select, (replaced.get(g.source, g.source), g.dim, getter))
        g.end.replace_all_uses_with(gathered)
        gathered.meta = dict(g.end.meta)
        replaced[g.end] = gathered
    if drop_bias and changes.constants:
        drop_branch_bias(new, changes.constants)
    new.graph.eliminate_dead_code()
    _delete_unused_submodules(new)
    new.recompile()
