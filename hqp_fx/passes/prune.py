"""PruneChannelsPass: physically remove channels and rewrite every shape that depends on them.

The only pass that changes shapes. It works from the element labels the dependency pass
stored: a parameter dimension keeps the entries whose element survives; a view/split/pad/
getitem constant is recomputed from how many labelled positions survive along the dim it
acts on; a channel permutation spread over several dims (channel shuffle) becomes one
``index_select`` with the surviving order. A plan that takes every channel of a removable
group removes the branch it feeds (``branch.remove_branches``). The result is
re-shape-propagated and linted.
"""
from __future__ import annotations

import copy
import operator
from collections import defaultdict
from typing import Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .. import meta
from ..core import GraphPass, PassError, PassResult
from ..groups import ChannelAnalysis, SliceRecord
from ..trace import propagate_shapes
from .branch import remove_branches
from .dependency import _PAD_FUNCTIONS, _arg, is_data_movement

__all__ = ["PruneChannelsPass", "validate_plan"]


def _restricted_value(kept: "_Kept", name: str):
    lab = kept.a.node_labels[name]
    if isinstance(lab, torch.Tensor):
        return kept.restricted(name)
    return tuple(None if l is None else kept.restricted(name, i) for i, l in enumerate(lab))


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


def _single_tensor_input(node: fx.Node, analysis, kept) -> fx.Node | None:
    """The one labelled input of a data-movement node when a gather from it can replace the node."""
    ins = [n for n in node.all_input_nodes if kept._name(n.name) in analysis.node_labels
           and isinstance(analysis.node_labels[kept._name(n.name)], torch.Tensor)]
    if len(ins) != 1 or not isinstance(analysis.node_labels.get(kept._name(node.name)), torch.Tensor):
        return None
    src, end = kept._name(ins[0].name), kept._name(node.name)
    if kept.shape(src) != kept.shape(end):
        return None
    s_lab, e_lab = analysis.node_labels[src], analysis.node_labels[end]
    dims = [d for d in range(s_lab.ndim) if s_lab.shape[d] > 1 or e_lab.shape[d] > 1]
    if len(dims) != 1:
        return None
    s_vec = kept.vector(src, dims[0])
    e_vec = kept.vector(end, dims[0])
    if (s_vec <= 0).any() or len(torch.unique(s_vec)) != len(s_vec) or not torch.isin(e_vec, s_vec).all():
        return None
    return ins[0]

_SPLITS = {"split", "chunk", "tensor_split", torch.split, torch.chunk, torch.tensor_split}
_RESHAPES = {"view", "reshape", "expand", torch.reshape}


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

    Parameters and buffers are *shared* with ``gm`` here: ``_own_tensors`` then replaces every
    one of them with a sliced or cloned tensor, so each is copied once, not twice.
    """
    memo = {id(v): None for k, v in gm.meta.items() if k not in (meta.EXAMPLE_INPUTS, meta.SOURCE_NAMES)}
    memo.update({id(t): t for t in list(gm.parameters()) + list(gm.buffers())})
    new = copy.deepcopy(gm, memo)
    new.meta = {k: v for k, v in new.meta.items() if k in (meta.EXAMPLE_INPUTS, meta.SOURCE_NAMES)}
    for node in new.graph.nodes:
        node.meta.pop(meta.NODE_CHANNEL_GROUP, None)
    return new


class _Kept:
    """Which positions of each node's output survive, computed lazily from the labels."""

    def __init__(self, analysis: ChannelAnalysis, removed: torch.Tensor):
        self.a = analysis
        self.rm = removed
        self._cache: dict[tuple[str, int], tuple[int, torch.Tensor] | None] = {}
        self.alias: dict[str, str] = {}  # node inserted by the rewrite -> analysed node it stands for
        self.replaced: dict[fx.Node, fx.Node] = {}  # node taken out by the rewrite -> the node now in its place

    def _name(self, name: str) -> str:
        return self.alias.get(name, name)

    def of(self, name: str, item: int = -1) -> tuple[int, torch.Tensor] | None:
        """(dim, keep mask over that dim) for a node output, None when nothing of it is removed."""
        name = self._name(name)
        key = (name, item)
        if key not in self._cache:
            lab, shape = self.a.node_labels[name], self.a.node_shapes[name]
            if item >= 0:
                lab, shape = lab[item], shape[item]
            self._cache[key] = self._regular(lab, shape, name)
        return self._cache[key]

    def _regular(self, lab: torch.Tensor, shape, name: str):
        removed = self.rm[lab]
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
            return d, ~rem
        return None if name in self.a.spread else (-1, torch.ones(0, dtype=torch.bool))

    def shape(self, name: str) -> tuple:
        return self.a.node_shapes[self._name(name)]

    def new_shape(self, name: str, item: int = -1) -> tuple[int, ...]:
        name = self._name(name)
        shape = self.a.node_shapes[name] if item < 0 else self.a.node_shapes[name][item]
        info = self.of(name, item)
        if info is None or info[0] < 0:
            return tuple(shape)
        d, keep = info
        return tuple(int(keep.sum()) if i == d else s for i, s in enumerate(shape))

    def restricted(self, name: str, item: int = -1) -> torch.Tensor:
        """Labels of a node output with the removed positions dropped: what the pruned op must yield.

        An expanded view of the compact labels (no copy of constant dims)."""
        name = self._name(name)
        lab, shape = self.a.node_labels[name], self.a.node_shapes[name]
        if item >= 0:
            lab, shape = lab[item], shape[item]
        info = self.of(name, item)
        if info is None:
            return lab.expand(shape)
        d, keep = info
        idx = keep.nonzero().flatten()
        new_shape = list(shape)
        new_shape[d] = len(idx)
        return lab.index_select(d, idx).expand(new_shape)

    def vector(self, name: str, dim: int) -> torch.Tensor:
        """Element per position along ``dim`` of a node's output (labels are uniform there)."""
        lab = self.a.labels(name)
        rows = lab.movedim(dim, 0).reshape(lab.shape[dim], -1)
        return rows.amax(1)


class PruneChannelsPass(GraphPass):
    """Remove the channels ``plan`` names ({group id: channel indices}) and rewrite all shapes.

    Returns a new GraphModule; the input module is never changed. With ``plan=None`` the
    plan written by AlignChannelsPass (``gm.meta["hqp.align"]["plan"]``) is used.
    """

    provided_meta = (meta.PRUNE_PLAN,)
    # the returned module is a new graph: run ChannelDependencyPass on it again before further channel passes
    invalidated_meta = (meta.CHANNEL_GROUPS, meta.CHANNEL_ANALYSIS, meta.ALIGN, meta.SENSITIVITY)

    def __init__(self, plan: Mapping[str, Sequence[int]] | None = None):
        self.plan = None if plan is None else {k: list(v) for k, v in plan.items()}
        self.required_meta = (meta.CHANNEL_GROUPS, meta.CHANNEL_ANALYSIS) + ((meta.ALIGN,) if plan is None else ())

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        analysis = meta.channel_analysis(graph_module)
        raw = self.plan if self.plan is not None else graph_module.meta[meta.ALIGN]["plan"]
        plan = validate_plan(analysis.groups, raw)
        if not plan:
            graph_module.meta[meta.PRUNE_PLAN] = {}
            return PassResult(graph_module, False)
        removed = analysis.removed_elements(plan)
        kept = _Kept(analysis, removed)
        new = _copy_module(graph_module)
        sizes = {g.id: g.size for g in analysis.groups}
        whole = [analysis.branches[gid] for gid, idx in plan.items() if len(idx) == sizes[gid]]
        constants = remove_branches(new, whole, analysis, meta.example_inputs(new)) if whole else []
        modules = dict(new.named_modules())
        for node in new.graph.nodes:  # fail before touching anything when a node would be irregular
            if node.name in analysis.node_labels and isinstance(analysis.node_labels[node.name], torch.Tensor):
                info = kept.of(node.name)
                if info is not None and info[0] < 0:
                    raise PassError(f"PruneChannelsPass: cannot express the pruned layout of node {node.format_node()}; "
                                    "this is a bug in hqp_fx's dependency analysis, please report it with the model")
        self._own_tensors(new, analysis.records + constants, removed)
        self._rewrite_nodes(new, modules, analysis, kept)
        self._verify_data_movement(new, modules, analysis, kept)
        new.graph.eliminate_dead_code()
        new.delete_all_unused_submodules()
        new.recompile()
        new.graph.lint()
        propagate_shapes(new, meta.example_inputs(new),
                         hint="The pruned graph is inconsistent: this is a bug in hqp_fx, please report it with the model.")
        new.meta[meta.PRUNE_PLAN] = plan
        return PassResult(new, True)

    # ----- parameters ----------------------------------------------------------------
    @staticmethod
    def _own_tensors(new: fx.GraphModule, records: list[SliceRecord], removed: torch.Tensor) -> None:
        """Give ``new`` its own tensors: the surviving entries of sliced ones, clones of the rest."""
        keep: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        for rec in records:
            mask = ~removed[rec.labels]
            prev = keep[rec.param].get(rec.dim)
            keep[rec.param][rec.dim] = mask if prev is None else prev & mask
        named = [(n, t, True) for n, t in new.named_parameters(remove_duplicate=False)]
        named += [(n, t, False) for n, t in new.named_buffers(remove_duplicate=False)]
        done: dict[int, torch.Tensor] = {}  # a tensor registered under two names stays one tensor
        for name, old, is_param in named:
            if id(old) not in done:
                t = old.detach()
                dims = {d: m for d, m in keep.get(name, {}).items() if not m.all()}
                for d, m in dims.items():
                    t = t.index_select(d, m.nonzero().flatten())  # a copy
                t = t if dims else t.clone()
                done[id(old)] = nn.Parameter(t, requires_grad=old.requires_grad) if is_param else t
            owner_name, _, attr = name.rpartition(".")
            owner = new.get_submodule(owner_name) if owner_name else new
            if is_param:
                setattr(owner, attr, done[id(old)])
            else:
                owner._buffers[attr] = done[id(old)]

    # ----- graph constants and module attributes ------------------------------------
    def _rewrite_nodes(self, new: fx.GraphModule, modules, analysis: ChannelAnalysis, kept: _Kept) -> None:
        nodes = {n.name: n for n in new.graph.nodes}
        for node in list(new.graph.nodes):
            if node.name in analysis.gathers:
                self._gather(new, node, nodes[analysis.gathers[node.name]], kept)
                continue
            if node.op == "call_module":
                self._module_attrs(modules[node.target], node, analysis, kept)
                continue
            if node.op not in ("call_function", "call_method") or node.name not in analysis.node_labels:
                continue
            t = node.target
            if t in _RESHAPES:
                self._reshape(node, kept)
            elif t in _SPLITS:
                self._split(node, kept)
            elif t is operator.getitem and isinstance(analysis.node_labels.get(kept._name(node.args[0].name)), torch.Tensor):
                self._getitem(node, kept)
            elif t in ("narrow", torch.narrow):
                self._narrow(node, kept)
            elif t in _PAD_FUNCTIONS and node.name in analysis.pads:
                pad = list(_arg(node, 1, "pad"))
                self._set_arg(node, 1, "pad", tuple(self._new_pad(pad, node, kept)))
            elif t is torch.nn.functional.layer_norm:
                self._set_arg(node, 1, "normalized_shape", tuple(kept.new_shape(node.name)[-len(_arg(node, 1, "normalized_shape")):]))
            elif t is torch.nn.functional.group_norm and node.name in analysis.grouped:
                self._set_arg(node, 1, "num_groups", kept.new_shape(node.name)[1] // analysis.grouped[node.name][1])
            elif t in (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d) and node.name in analysis.grouped:
                self._set_arg(node, 6, "groups", kept.new_shape(node.args[0].name)[1] // analysis.grouped[node.name][1])
            elif node.name in analysis.grouped and t in (torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
                                                          torch.nn.functional.conv_transpose3d):
                self._set_arg(node, 7, "groups", kept.new_shape(node.args[0].name)[1] // analysis.grouped[node.name][1])

    def _verify_data_movement(self, new: fx.GraphModule, modules, analysis: ChannelAnalysis, kept: _Kept) -> None:
        """Re-run every rewritten data-movement op on the surviving labels and compare.

        This is what makes the rewrite safe for ops without a rule of their own (a channel
        shuffle module, a roll over channels, ...): an op whose pruned result is not the
        original mapping restricted to the surviving channels becomes an explicit
        ``index_select``; when even that cannot express it, pruning stops with the node named.
        """
        env: dict[fx.Node, object] = {}
        for node in list(new.graph.nodes):
            name = kept._name(node.name)
            if node.op == "output":
                continue
            if node.op == "get_attr":
                env[node] = operator.attrgetter(node.target)(new)
                continue
            if name in analysis.spread:
                env[node] = None  # inside a replaced permutation run: checked at its end node
                continue
            labelled = name in analysis.node_labels
            if node.op == "placeholder" or node.name in kept.alias or (labelled and not is_data_movement(node, modules)):
                env[node] = _restricted_value(kept, name) if labelled else None
                continue
            def materialised(n):  # ops such as view() need contiguous inputs, not expanded views
                v = env.get(n)
                return v.contiguous() if isinstance(v, torch.Tensor) else v

            args = fx.node.map_arg(node.args, materialised)
            kwargs = fx.node.map_arg(node.kwargs, materialised)
            if any(a is None for a in _flat(args, kwargs)) and node.all_input_nodes:
                env[node] = None
                continue
            try:
                if node.op == "call_function":
                    actual = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    actual = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    actual = modules[node.target](*args, **kwargs)
            except Exception as exc:
                if not labelled:
                    raise PassError(f"PruneChannelsPass: {node.format_node()} fails on the pruned shapes: {exc}") from None
                actual = None
            if not labelled:
                env[node] = actual
                continue
            expected = _restricted_value(kept, name)
            env[node] = expected
            if _same(actual, expected):
                continue
            source = _single_tensor_input(node, analysis, kept)
            if source is None:
                raise PassError(f"PruneChannelsPass: {node.format_node()} cannot be rewritten for the pruned channels "
                                "(its channel mapping is not a plain selection); keep it opaque with leaf_modules or report it")
            self._gather(new, node, source, kept)

    @staticmethod
    def _set_arg(node: fx.Node, index: int, name: str, value) -> None:
        if len(node.args) > index:
            args = list(node.args)
            args[index] = value
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, name: value}

    @staticmethod
    def _new_pad(pad: list[int], node: fx.Node, kept: _Kept) -> list[int]:
        """Pad amounts on channel dims shrink by the removed zero channels the pad creates."""
        ndim = len(kept.a.node_shapes[node.name])
        out = list(pad)
        for d, lids, rids in kept.a.pads[node.name]:
            k = ndim - 1 - d
            out[2 * k] = int((~kept.rm[lids]).sum())
            out[2 * k + 1] = int((~kept.rm[rids]).sum())
        return out

    @staticmethod
    def _reshape(node: fx.Node, kept: _Kept) -> None:
        if kept.of(node.name) is None:
            return
        new_shape = kept.new_shape(node.name)
        old_shape = kept.a.node_shapes[node.name]
        sizes_at = 1
        if node.op == "call_method" and len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            sizes, packed = list(node.args[1]), True
        elif node.op == "call_function":
            sizes, packed = list(node.args[1]), True
        else:
            sizes, packed = list(node.args[1:]), False
        for i, s in enumerate(sizes):
            if isinstance(s, int) and s != -1 and old_shape[i] != new_shape[i]:
                sizes[i] = new_shape[i]
        if packed:
            node.args = (node.args[0], type(node.args[sizes_at])(sizes)) + tuple(node.args[2:])
        else:
            node.args = (node.args[0], *sizes)

    @staticmethod
    def _split(node: fx.Node, kept: _Kept) -> None:
        x = node.args[0]
        info = kept.of(x.name)
        dim = _arg(node, 2, "dim", 0)
        if info is None or info[0] != dim % len(kept.shape(x.name)):
            return
        pieces = kept.a.node_shapes[node.name]
        keep = info[1]
        sizes, start = [], 0
        for shape in pieces:
            n = shape[info[0]]
            sizes.append(int(keep[start:start + n].sum()))
            start += n
        if any(s == 0 for s in sizes):
            raise ValueError(f"the plan removes every channel of one output of {node.name} ({node.format_node()})")
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (x, sizes, info[0]), {}

    @staticmethod
    def _rank(keep: torch.Tensor, pos: int) -> int:
        return int(keep[:pos].sum())

    def _getitem(self, node: fx.Node, kept: _Kept) -> None:
        x = node.args[0]
        info = kept.of(x.name)
        if info is None:
            return
        d, keep = info
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        # map tensor dims to index entries (None adds a dim, Ellipsis spans the rest)
        ndim = len(kept.shape(x.name))
        explicit = sum(1 for e in index if e is not None and e is not Ellipsis)
        entries, dim = list(index), 0
        for pos, e in enumerate(entries):
            if e is None:
                continue
            if e is Ellipsis:
                dim += ndim - explicit
                continue
            if dim == d:
                entries[pos] = self._reindex(e, keep, node)
                break
            dim += 1
        node.args = (x, tuple(entries) if isinstance(node.args[1], tuple) else entries[0])

    def _reindex(self, e, keep: torch.Tensor, node: fx.Node):
        n = len(keep)
        if isinstance(e, int):
            pos = e % n
            if not keep[pos]:
                raise ValueError(f"the plan removes channel {pos} that {node.format_node()} selects")
            return self._rank(keep, pos)
        if isinstance(e, slice) and all(v is None or isinstance(v, int) for v in (e.start, e.stop, e.step)):
            start, stop, step = e.indices(n)
            if step != 1:
                raise ValueError(f"cannot prune through the strided channel slice of {node.format_node()}")
            return slice(self._rank(keep, start), self._rank(keep, stop), None)
        raise ValueError(f"cannot prune through the channel index of {node.format_node()}")

    def _narrow(self, node: fx.Node, kept: _Kept) -> None:
        x = node.args[0]
        info = kept.of(x.name)
        if info is None or info[0] != _arg(node, 1, "dim") % len(kept.shape(x.name)):
            return
        keep = info[1]
        start, length = _arg(node, 2, "start"), _arg(node, 3, "length")
        self._set_arg(node, 2, "start", self._rank(keep, start))
        self._set_arg(node, 3, "length", self._rank(keep, start + length) - self._rank(keep, start))

    @staticmethod
    def _gather(new: fx.GraphModule, end: fx.Node, source: fx.Node, kept: _Kept) -> None:
        info = kept.of(source.name)
        if info is None:
            return
        d, keep = info
        s_vec = kept.vector(source.name, d)
        e_vec = kept.vector(end.name, d)
        rank = torch.cumsum(keep.long(), 0) - 1
        pos_of = {int(e): int(rank[i]) for i, e in enumerate(s_vec.tolist()) if keep[i]}
        perm = torch.tensor([pos_of[int(e)] for e in e_vec.tolist() if int(e) in pos_of], dtype=torch.long)
        buf = f"_hqp_perm_{end.name}"
        new.register_buffer(buf, perm)
        with new.graph.inserting_before(end):
            getter = new.graph.get_attr(buf)
            gathered = new.graph.call_function(torch.index_select, (kept.replaced.get(source, source), d, getter))
        end.replace_all_uses_with(gathered)
        kept.replaced[end] = gathered
        gathered.meta = dict(end.meta)
        kept.alias[gathered.name] = end.name

    @staticmethod
    def _module_attrs(mod: nn.Module, node: fx.Node, analysis: ChannelAnalysis, kept: _Kept) -> None:
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if x is None or kept._name(x.name) not in analysis.node_shapes:
            return
        in_shape = kept.new_shape(x.name)
        if isinstance(mod, nn.modules.conv._ConvNd):
            if node.name in analysis.grouped:
                mod.groups = in_shape[1] // analysis.grouped[node.name][1]
            w = mod.weight.shape
            if mod.transposed:
                mod.in_channels, mod.out_channels = w[0], w[1] * mod.groups
            else:
                mod.in_channels, mod.out_channels = w[1] * mod.groups, w[0]
        elif isinstance(mod, nn.Linear):
            mod.in_features, mod.out_features = mod.weight.shape[1], mod.weight.shape[0]
        elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            mod.num_features = in_shape[1]
        elif isinstance(mod, nn.GroupNorm):
            mod.num_channels = in_shape[1]
            if node.name in analysis.grouped:
                mod.num_groups = in_shape[1] // analysis.grouped[node.name][1]
        elif isinstance(mod, nn.LayerNorm):
            mod.normalized_shape = tuple(in_shape[-len(mod.normalized_shape):])
        elif isinstance(mod, nn.PReLU):
            mod.num_parameters = mod.weight.numel()
        elif node.name in analysis.pads and hasattr(mod, "padding"):
            mod.padding = tuple(PruneChannelsPass._new_pad(list(mod.padding), node, kept))
