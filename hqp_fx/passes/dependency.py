"""ChannelDependencyPass: which channels must be removed together (analysis only).

How it works, and why it is correct by construction: every channel a layer creates gets an
integer *element* id. The pass walks the graph once and carries, for every tensor, a label
tensor of the same shape whose entries are the element living at that position (0 for
constants). Pure data movement (view, permute, cat, split, getitem, flatten, channel
shuffle, ...) is computed by running the very same op on the labels, so index maps through
concat offsets, flatten strides or shuffles are never modelled by hand and cannot drift
from what the op does. Ops that compute (add, mul, BN, conv, ...) follow small rules:
elementwise ops union the elements that meet at the same position, producers mint new
elements, parameterised layers record which parameter entries carry which element.
Which rule an op follows is the op-rule registry's business (``hqp_fx.ops``); this module is the engine whose
primitives the rules call, and holds no op's rule (its generic ``move`` only special-cases indexing a tuple). Anything unknown pins its channels, with the node named in the reason:
never silently wrong.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata

from .. import meta, ops
from ..branches import find_branches
from ..core import GraphPass, PassError, PassResult
from ..groups import NO_LABEL, ChannelAnalysis, ChannelGroup, SliceRecord, labels_along, labels_vary

__all__ = ["ChannelDependencyPass", "analyze_channels"]

_PAIR = 1 << 31  # element ids stay below this, so (a, b) packs into one int64


def _is_tensor_meta(tm) -> bool:
    return isinstance(tm, TensorMetadata)


def _compact(lab: torch.Tensor) -> torch.Tensor:
    """Shrink every dim along which the labels are exactly constant to size 1 (memory)."""
    for d in range(lab.ndim):
        if lab.shape[d] > 1 and bool((lab == lab.narrow(d, 0, 1)).all()):
            lab = lab.narrow(d, 0, 1)
    return lab.contiguous()


class _Propagator:
    """One walk over the graph that computes labels, unions, records and pins."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.next_id = 1
        self.owner_chunks: list[tuple[int, int]] = []  # (count, owner index) in element order
        self.owners: list[tuple[str, str, str]] = []  # (node name, display name, kind)
        self.owner_index: dict[tuple[str, str], int] = {}
        self.edges: list[torch.Tensor] = []  # [2, k] element pairs to union
        self.pins: list[tuple[torch.Tensor, str]] = []
        self.mixed: list[tuple[torch.Tensor, str]] = []  # positions read as one channel that hold several elements
        self.cross: list[torch.Tensor] = []
        self.records: list[SliceRecord] = []
        self.param_blocks: list[tuple[str, torch.Tensor, str]] = []
        self.pads: dict[str, list] = {}
        self.grouped: dict[str, tuple[int, int]] = {}
        self.env: dict[fx.Node, Any] = {}
        self.shapes: dict[str, Any] = {}

    # ----- element bookkeeping -------------------------------------------------------
    def new_elements(self, count: int, node: fx.Node, kind: str, display: str | None = None) -> torch.Tensor:
        key = (node.name, kind)
        if key not in self.owner_index:
            self.owner_index[key] = len(self.owners)
            self.owners.append((node.name, display or node.name, kind))
        ids = torch.arange(self.next_id, self.next_id + count, dtype=torch.long)
        self.next_id += count
        if self.next_id >= _PAIR:  # union() packs two ids into one int64
            raise PassError(f"ChannelDependencyPass: more than {_PAIR - 1} channel elements at node {node.name}; "
                            "trace with a smaller example input")
        self.owner_chunks.append((count, self.owner_index[key]))
        return ids

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.reshape(-1), b.reshape(-1)
        keep = (a > 0) & (b > 0) & (a != b)
        if keep.any():  # dedupe pairs through one int64 key: 1-D unique is far faster than unique(dim=1)
            key = torch.unique(a[keep] * _PAIR + b[keep])
            self.edges.append(torch.stack([key // _PAIR, key % _PAIR]))

    def union_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Make the elements of each row of a 2-D label tensor one class; returns each row's anchor (its largest
        element, 0 for a row of constants)."""
        anchor = rows.amax(1)
        self.union(rows, anchor.unsqueeze(1).expand_as(rows))  # zeros (constants) are skipped by union
        return anchor

    def pin(self, labels: torch.Tensor, reason: str) -> None:
        labels = torch.unique(labels.reshape(-1))
        labels = labels[labels > 0]
        if len(labels):
            self.pins.append((labels, reason))

    def mark_cross(self, labels: torch.Tensor) -> None:
        labels = torch.unique(labels.reshape(-1))
        self.cross.append(labels[labels > 0])

    def record(self, param: str, dim: int, labels: torch.Tensor, role: str, node: fx.Node) -> None:
        self.records.append(SliceRecord(param, dim, labels.reshape(-1).clone(), role, node.name))

    # ----- label access --------------------------------------------------------------
    def value(self, n: Any) -> Any:
        """Label tensor (compact) of a node, or its plain value when it is not a tensor."""
        if not isinstance(n, fx.Node):
            return n
        if n not in self.env and n.op == "get_attr":
            self.env[n] = self._param_labels(n)
        return self.env[n]

    def _param_labels(self, n: fx.Node) -> Any:
        attr = operator.attrgetter(n.target)(self.gm)
        if not isinstance(attr, torch.Tensor):
            return attr
        lab = self.new_elements(attr.numel(), n, "param").reshape(attr.shape)
        self.param_blocks.append((n.target, lab, n.name))
        return lab

    def full(self, n: fx.Node) -> torch.Tensor:
        return self.value(n).expand(self.shape_of(n)).contiguous()

    def shape_of(self, n: fx.Node) -> tuple[int, ...]:
        tm = n.meta.get("tensor_meta")
        if _is_tensor_meta(tm):
            return tuple(tm.shape)
        val = self.value(n)
        return tuple(val.shape)

    def read_dim(self, lab: torch.Tensor, dim: int, size: int, node: fx.Node) -> torch.Tensor:
        """Element per position along ``dim`` (0 = constant). A position holding several elements is pinned
        unless they turn out to be one class (a class token concatenated before patch tokens): decided by
        ``resolve_mixed`` once every union is known."""
        dim = dim % lab.ndim
        rows = lab.movedim(dim, 0).reshape(lab.shape[dim], -1)
        mx = rows.amax(1)
        mn = torch.where(rows > 0, rows, NO_LABEL).amin(1)
        mixed = (mx > 0) & (mn != mx)
        if mixed.any():
            self.mixed.append((rows[mixed], f"channel dim of {node.name} ({_describe(node, self.modules)}) mixes "
                                            "several channels"))
        return mx.expand(size) if mx.numel() == 1 and size != 1 else mx

    def resolve_mixed(self, class_of: torch.Tensor) -> None:
        """Pin the positions ``read_dim`` found holding elements of more than one class."""
        for rows, reason in self.mixed:
            cls = class_of[rows]
            several = torch.where(rows > 0, cls, NO_LABEL).amin(1) != cls.amax(1)
            if several.any():
                self.pin(rows[several], reason)
        self.mixed = []

    # ----- the walk ------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                out = self._placeholder(node)
            elif node.op == "get_attr":
                continue  # materialised lazily by value(): functional weights never need labels
            elif node.op == "output":
                for lab in _tensors_in(fx.node.map_arg(node.args, self.value)):
                    self.pin(lab, "feeds the network output")
                continue
            else:
                out = self._compute(node)
            self.env[node] = out
            tm = node.meta.get("tensor_meta")
            if _is_tensor_meta(tm):
                self.shapes[node.name] = tuple(tm.shape)
            elif isinstance(tm, (tuple, list)) and isinstance(out, tuple):
                self.shapes[node.name] = tuple(tuple(t.shape) if _is_tensor_meta(t) else None for t in tm)

    def _placeholder(self, node: fx.Node) -> Any:
        tm = node.meta.get("tensor_meta")
        if not _is_tensor_meta(tm):
            return None
        return self.pinned_output(node, tuple(tm.shape), "input", f"network input {node.name}")

    def pinned_output(self, node: fx.Node, shape: tuple[int, ...], kind: str, reason: str) -> torch.Tensor:
        """Fresh, pinned elements along dim 1 (dim 0 for vectors): channels nothing may remove."""
        if not shape:
            return torch.zeros((), dtype=torch.long)
        cdim = 1 if len(shape) >= 2 else 0
        ids = self.new_elements(shape[cdim], node, kind)
        self.pin(ids, reason)
        return _along(ids, cdim, len(shape))

    def _compute(self, node: fx.Node) -> Any:
        tm = node.meta.get("tensor_meta")
        if tm is None:  # not a tensor (sizes, ints): evaluate on the labels' shapes
            return self._execute(node)
        rule = ops.rule_for(node, self.modules)
        if rule is None:
            leaf = self.gm.meta.get(meta.LEAVES, {}).get(meta.leaf_key(node))
            what = f"opaque {_describe(node, self.modules)} ({leaf})" if leaf else f"unsupported op {_describe(node, self.modules)}"
            return self.unknown(node, what)
        return rule.label(self, node)

    def _execute(self, node: fx.Node) -> Any:
        def shaped(n):  # sizes must be the real ones, not the compact label shape
            v = self.value(n)
            return v.expand(self.shape_of(n)) if isinstance(v, torch.Tensor) else v

        args = fx.node.map_arg(node.args, shaped)
        kwargs = fx.node.map_arg(node.kwargs, shaped)
        return ops.run_call(node.op, node.target, args, kwargs, self.modules)

    # ----- rules: the op rules of hqp_fx.ops call these ----------------------------------
    def move(self, node: fx.Node) -> Any:
        def materialise(n):
            v = self.value(n)
            return self.full(n) if isinstance(v, torch.Tensor) else v

        if node.target is operator.getitem and isinstance(self.value(node.args[0]), (tuple, list)):
            return self.value(node.args[0])[node.args[1]]
        idx = node.args[1] if node.target is operator.getitem and len(node.args) > 1 else None
        if idx is not None and any(self._is_tensor(n) for n in _nodes_in(idx)):
            return self._indexed(node)
        args = fx.node.map_arg(node.args, materialise)
        kwargs = fx.node.map_arg(node.kwargs, materialise)
        return _map_tensors(ops.run_call(node.op, node.target, args, kwargs, self.modules), _compact)

    def _indexed(self, node: fx.Node) -> Any:
        """``x[index]`` with integer index tensors that are buffers of the model (a relative position table read
        through its index: Swin, CoAtNet, LeViT): run on the labels with the buffer's values, like any move. The
        index may not select along a dim that carries channels (the rewrite could not follow it): whether a dim
        does is known only once every union is (a table's entries are one class per head), so each run of
        positions along an indexed dim is checked then, by ``resolve_mixed``, and pinned when it holds several
        classes. Any other tensor index (computed in forward, or a boolean mask) pins its channels."""
        x, idx = node.args[0], node.args[1]
        idx = fx.node.map_arg(idx, lambda n: n if self._is_tensor(n) else self.value(n))  # bounds: sizes, known
        entries = idx if isinstance(idx, tuple) else (idx,)
        if not isinstance(x, fx.Node) or not isinstance(self.value(x), torch.Tensor) or any(
                isinstance(e, fx.Node) and not _index_buffer(e, self.gm) for e in entries) or any(
                _nodes_in(e) and not isinstance(e, fx.Node) for e in entries):
            return self.unknown(node, f"tensor-indexed getitem {node.name}")
        full = self.full(x)
        for pos, d in ops.index_dims(entries, full.ndim):
            if isinstance(entries[pos], fx.Node) and full.shape[d] > 1:
                self.mixed.append((full.movedim(d, -1).reshape(-1, full.shape[d]),
                                   f"{node.name} reads its input through an index tensor along a channel dim"))
        index = tuple(operator.attrgetter(e.target)(self.gm) if isinstance(e, fx.Node) else e for e in entries)
        return _compact(full[index if isinstance(idx, tuple) else index[0]])

    def _is_tensor(self, n: fx.Node) -> bool:
        """Whether a node is a tensor, without labelling a buffer (an index buffer is read for its values)."""
        if n.op == "get_attr":
            return isinstance(operator.attrgetter(n.target)(self.gm), torch.Tensor)
        return isinstance(self.value(n), torch.Tensor)

    def concat(self, node: fx.Node) -> Any:
        """torch.cat: data movement, and where it stacks tensors along a dim that is not their channel dim (a
        ViT's class token before its patch tokens), position ``c`` of each is the same channel: they are one."""
        out = self.move(node)
        pieces, dim = ops.arg(node, 0, "tensors"), ops.arg(node, 1, "dim", 0)
        labs = [self.value(n) for n in pieces if isinstance(n, fx.Node)] if isinstance(pieces, (list, tuple)) else []
        labs = [lab for lab in labs if isinstance(lab, torch.Tensor)]
        if not isinstance(out, torch.Tensor) or not isinstance(dim, int) or len(labs) < 2:
            return out
        dim %= out.ndim
        if any(labels_vary(lab, dim) for lab in labs):
            return out  # a concat of channels: nothing shares a position
        varying = {e for lab in labs for e in range(lab.ndim) if labels_vary(lab, e)}
        if len(varying) == 1:
            e = varying.pop()
            self.union_rows(out.expand(self.shape_of(node)).movedim(e, 0).reshape(self.shape_of(node)[e], -1))
        return out

    def elementwise(self, node: fx.Node) -> Any:
        tm = node.meta["tensor_meta"]
        out_shape = tuple(tm.shape)
        nd = len(out_shape)
        operands = []
        for n in _nodes_in((node.args, node.kwargs)):
            lab = self.value(n)
            if not isinstance(lab, torch.Tensor):
                continue
            true_shape = self.shape_of(n)
            pad = nd - lab.ndim
            operands.append((lab.reshape((1,) * pad + tuple(lab.shape)), (1,) * (nd - len(true_shape)) + true_shape))
        if not operands:
            return torch.zeros((1,) * nd, dtype=torch.long)
        kept = []
        for i, (lab, ts) in enumerate(operands):
            broadcast_over_channels = any(
                ts[d] == 1 and out_shape[d] > 1
                and any(labels_vary(o, d) for j, (o, _) in enumerate(operands) if j != i)
                for d in range(nd)
            )
            if not broadcast_over_channels:
                kept.append(lab)
        if not kept:  # every operand is broadcast over another's channels: nothing to couple
            return torch.zeros((1,) * nd, dtype=torch.long)
        shape = torch.broadcast_shapes(*[k.shape for k in kept])
        out = kept[0].expand(shape).clone()
        for other in kept[1:]:
            other = other.expand(shape)
            self.union(out, other)
            out = torch.where(out > 0, out, other)
        return _compact(out)

    def producer(self, node: fx.Node, x: fx.Node, weight: str, bias: str | None, *,
                 kind: str, groups: int, out_channels: int, display: str) -> torch.Tensor:
        """Conv / ConvTranspose / Linear: consume input channels, mint output channels."""
        lab = self.value(x)
        in_shape = self.shape_of(x)
        cdim = -1 if kind == "linear" else 1
        in_vec = self.read_dim(lab, cdim, in_shape[cdim], node)
        out_ids = self.new_elements(out_channels, node, "producer", display)
        transposed = kind == "convT"
        if groups == 1:
            self.record(weight, 0 if transposed else 1, in_vec, "in", node)
            self.record(weight, 1 if transposed else 0, out_ids, "out", node)
        else:
            # Grouped/depthwise: a conv group is removed whole, so its input channels and its
            # output channels form one class each (group structure is preserved).
            in_per, out_per = in_shape[cdim] // groups, out_channels // groups
            anchors = out_ids.reshape(groups, out_per)[:, 0]
            self.union(out_ids, anchors.repeat_interleave(out_per))
            self.union(in_vec, anchors.repeat_interleave(in_per))
            self.grouped[node.name] = (groups, in_per)
            self.record(weight, 0, in_vec if transposed else out_ids, "in" if transposed else "out", node)
        if bias is not None:
            self.record(bias, 0, out_ids, "out", node)
        return _along(out_ids, cdim, len(self.shape_of(node)))

    def channelwise(self, node: fx.Node, x: fx.Node, params: list[str | None], *,
                    norm_dims: int = 0, groups: int = 0, display: str = "") -> torch.Tensor:
        """BN / InstanceNorm / LayerNorm / GroupNorm / PReLU: channels pass through, params follow.

        ``norm_dims`` > 0: LayerNorm over the last ``norm_dims`` dims (params span them).
        ``groups`` > 0: GroupNorm with that many groups over dim 1.
        """
        lab = self.value(x)
        shape = self.shape_of(x)
        nd = len(shape)
        if norm_dims:
            varying = [d for d in range(nd - norm_dims, nd) if labels_vary(lab, d)]
            if varying:
                self.mark_cross(lab)
            if len(varying) > 1:
                self.pin(lab, f"{node.name} normalises over several channel dims")
                return lab
            pdim = varying[0] if varying else nd - 1
            vec = self.read_dim(lab, pdim, shape[pdim], node)
            param_dim = pdim - (nd - norm_dims)
        else:
            vec = self.read_dim(lab, 1, shape[1], node)
            param_dim = 0
            if groups == 1 and shape[1] > 1:
                self.mark_cross(vec)
            elif groups > 1:
                per = shape[1] // groups
                if per > 1:  # removing whole GroupNorm groups keeps every other group's statistics exact
                    anchors = vec.reshape(groups, per)[:, 0]
                    self.union(vec, anchors.repeat_interleave(per))
                    self.grouped[node.name] = (groups, per)
        for p in params:
            if p is not None:
                self.record(p, param_dim, vec, "out", node)
        return lab

    def spatial(self, node: fx.Node, x: fx.Node) -> torch.Tensor:
        lab = self.value(x)
        nd = lab.ndim
        if any(labels_vary(lab, d) for d in range(2, nd)):
            self.pin(lab, f"{node.name} ({_describe(node, self.modules)}) works over dims that carry channels")
        return lab.amax(dim=tuple(range(2, nd)), keepdim=True) if nd > 2 else lab

    def reduce(self, node: fx.Node) -> Any:
        x = node.args[0]
        lab = self.value(x)
        dim = ops.arg(node, 1, "dim", None)
        if dim is None:
            dim = node.kwargs.get("axis")
        keepdim = bool(ops.arg(node, 2, "keepdim", False))
        if isinstance(dim, int):
            dims = (dim % lab.ndim,)
        elif isinstance(dim, (tuple, list)) and all(isinstance(d, int) for d in dim):
            dims = tuple(d % lab.ndim for d in dim)
        elif dim is None and len(node.args) <= 1:
            dims = tuple(range(lab.ndim))
        else:
            return self.unknown(node, f"reduction {node.name} with non-constant dims")
        over_channels = any(labels_vary(lab, d) for d in dims)
        if over_channels:
            self.mark_cross(lab)
        out = lab.amax(dim=dims, keepdim=keepdim) if dims else lab
        if over_channels:
            out = torch.zeros_like(out)
        tm = node.meta["tensor_meta"]
        if not _is_tensor_meta(tm):  # max/min with dim: (values, indices)
            return (out, torch.zeros_like(out))
        return out

    def softmax(self, node: fx.Node, x: fx.Node, dim: int | None) -> torch.Tensor:
        lab = self.value(x)
        if dim is None or not isinstance(dim, int) or labels_vary(lab, dim % lab.ndim):
            self.mark_cross(lab)
        return lab

    def pad(self, node: fx.Node, x: fx.Node, pad: tuple[int, ...], mode: str) -> torch.Tensor:
        lab = self.value(x)
        full = self.full(x)
        nd = full.ndim
        if mode == "constant":
            out = F.pad(full, list(pad), mode="constant", value=0)
        else:  # non-constant padding only ever repeats labels of the same channel
            out = F.pad(full.double(), list(pad), mode="replicate").long()
        entries = []
        for k in range(len(pad) // 2):
            d = nd - 1 - k
            left, right = int(pad[2 * k]), int(pad[2 * k + 1])
            if (left == 0 and right == 0) or not labels_vary(lab, d):
                continue
            if mode != "constant" or left < 0 or right < 0:
                self.pin(lab, f"{node.name} pads the channel dim with mode {mode!r} or a negative amount")
                continue
            lids = self.new_elements(left, node, "pad")
            rids = self.new_elements(right, node, "pad")
            out.narrow(d, 0, left).copy_(_along(lids, d, nd).expand_as(out.narrow(d, 0, left)))
            out.narrow(d, left + full.shape[d], right).copy_(_along(rids, d, nd).expand_as(out.narrow(d, left + full.shape[d], right)))
            entries.append((d, lids, rids))
        if entries:
            self.pads[node.name] = entries
        return _compact(out)

    def attention(self, node: fx.Node) -> Any:
        """scaled_dot_product_attention(q, k, v, ...): every head (a position of the leading dims) is one class:
        its q, k and v channels go together (``hqp_fx.ops.attention``). The output carries v's labels."""
        q, k, v = (ops.arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
        if not all(isinstance(n, fx.Node) and isinstance(self.value(n), torch.Tensor) for n in (q, k, v)):
            return self.unknown(node, f"attention {node.name} on computed or missing q/k/v")
        labs, shapes = [self.value(n) for n in (q, k, v)], [self.shape_of(n) for n in (q, k, v)]
        if any(len(s) < 3 for s in shapes) or len({len(s) for s in shapes}) != 1 or any(
                labels_vary(lab, lab.ndim - 2) for lab in labs):
            return self.unknown(node, f"attention {node.name} with channels along its token dim or unbatched heads")
        try:
            lead = torch.broadcast_shapes(*[s[:-2] for s in shapes])
        except RuntimeError:  # grouped-query attention: k/v heads shared by several q heads
            return self.unknown(node, f"attention {node.name} whose q, k and v have different head counts")
        scale = node.kwargs.get("scale")
        if isinstance(scale, fx.Node) and isinstance(self.value(scale), torch.Tensor):
            self.pin(self.value(scale), f"the scale of attention {node.name}")
        rows = [lab.expand(lead + tuple(lab.shape[-2:])) for lab in labs]
        mask = ops.arg(node, 3, "attn_mask")
        if isinstance(mask, fx.Node) and isinstance(self.value(mask), torch.Tensor):
            # a per-head mask (a relative position bias) goes with its head; one shared by every head stays whole
            shape = (1,) * (len(lead) + 2 - len(self.shape_of(mask))) + tuple(self.shape_of(mask))
            lm = self.value(mask).reshape((1,) * (len(shape) - self.value(mask).ndim) + tuple(self.value(mask).shape))
            heads = [d for d in range(len(lead)) if any(labels_vary(lab, d) for lab in labs)]
            if any(labels_vary(lm, d) for d in range(len(lead))):
                rows.append(lm.expand(shape).expand(lead + shape[-2:]))
            elif any(shape[d] > 1 for d in heads):
                return self.unknown(node, f"attention {node.name} whose mask spans the heads without following them")
        per_head = torch.cat([r.reshape(*lead, -1) for r in rows], -1)
        self.union_rows(per_head.reshape(-1, per_head.shape[-1]))
        return _compact(labs[2].expand(lead + tuple(labs[2].shape[-2:]))[..., :1, :])  # constant over tokens

    def matmul(self, node: fx.Node) -> Any:
        """a @ b of two activations ``[..., L, E] @ [..., E, S]`` (``hqp_fx.ops.attention``)."""
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        if not all(isinstance(n, fx.Node) and n.op != "get_attr" and isinstance(self.value(n), torch.Tensor)
                   for n in (a, b)):
            return self.unknown(node, f"matrix product {node.name} with a parameter or a non-tensor")
        la, lb = self.value(a), self.value(b)
        sa, sb = self.shape_of(a), self.shape_of(b)
        if len(sa) < 2 or len(sb) < 2:
            return self.unknown(node, f"matrix product {node.name} of a vector")
        try:
            lead = tuple(torch.broadcast_shapes(sa[:-2], sb[:-2]))
        except RuntimeError:
            return self.unknown(node, f"matrix product {node.name} whose batch dims do not broadcast")
        fa, fb = la.expand(sa).expand(lead + sa[-2:]), lb.expand(sb).expand(lead + sb[-2:])
        nd = len(lead) + 2
        if any(labels_vary(fa, d) or labels_vary(fb, d) for d in range(len(lead))):  # heads: one class each
            rows = torch.cat([fa.reshape(*lead, -1), fb.reshape(*lead, -1)], -1)
            rows = self.union_rows(rows.reshape(-1, rows.shape[-1]))
            # the head's one element everywhere in its slice: a per-head parameter applied to the product (XCA's
            # temperature, [H, 1, 1]) then follows the head instead of looking broadcast over channels
            return _compact(rows.reshape(lead + (1, 1)))
        free_a, free_b = labels_vary(fa, nd - 2), labels_vary(fb, nd - 1)
        inner_a, inner_b = labels_vary(fa, nd - 1), labels_vary(fb, nd - 2)
        if (free_a and inner_a) or (free_b and inner_b) or (free_a and free_b):
            return self.unknown(node, f"matrix product {node.name} with channels along several of its dims")
        if inner_a != inner_b:  # a channel dropped from one side has no partner to drop on the other
            return self.unknown(node, f"matrix product {node.name} contracting channels with a plain tensor")
        if inner_a:
            self.union(self.read_dim(fa, nd - 1, sa[-1], node), self.read_dim(fb, nd - 2, sb[-2], node))
        out = torch.zeros(lead + (1, 1), dtype=torch.long)
        if free_a:
            out = fa[..., :1].amax(tuple(range(len(lead))), keepdim=True)
        elif free_b:
            out = fb[..., :1, :].amax(tuple(range(len(lead))), keepdim=True)
        return _compact(out)

    def unknown(self, node: fx.Node, why: str) -> Any:
        for n in _nodes_in((node.args, node.kwargs)):
            lab = self.value(n)
            for t in _tensors_in(lab):
                self.pin(t, f"{why}: channels through it are kept")
        tm = node.meta.get("tensor_meta")

        def fresh(t):
            return self.pinned_output(node, tuple(t.shape), "unknown", f"{why}: channels through it are kept")

        if _is_tensor_meta(tm):
            return fresh(tm)
        return tuple(fresh(t) if _is_tensor_meta(t) else None for t in tm)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def _index_buffer(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A ``get_attr`` of an integer buffer: an index whose values are known when the graph is analysed."""
    if node.op != "get_attr":
        return False
    value = operator.attrgetter(node.target)(gm)
    return isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and \
        value.dtype in (torch.int64, torch.int32, torch.int16, torch.int8)  # uint8 and bool index as masks


def _along(ids: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim % ndim] = len(ids)
    return ids.reshape(shape)


def _nodes_in(obj) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(obj, lambda n: found.append(n) or n)
    return found


def _tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors_in(o)]
    return []


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj) if not hasattr(obj, "_fields") else tuple(_map_tensors(o, fn) for o in obj)
    return obj


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} module {node.target}"
    if node.op == "call_method":
        owner = meta.method_owner(node)
        if owner in modules:
            return f"{type(modules[owner]).__name__} method {owner}.{node.target}()"
        return f"method .{node.target}()"
    t = node.target
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)}".lstrip(".")


def _components(num: int, edges: list[torch.Tensor]) -> torch.Tensor:
    """Connected components of ``edges`` over ids 0..num-1: each id maps to the smallest id of its component."""
    label = torch.arange(num, dtype=torch.long)
    if not edges:
        return label
    e = torch.cat(edges, dim=1)
    a, b = e[0], e[1]
    while True:
        m = torch.minimum(label[a], label[b])
        new = label.clone()
        new.scatter_reduce_(0, a, m, reduce="amin")
        new.scatter_reduce_(0, b, m, reduce="amin")
        while True:  # pointer jumping: every id points straight at its current root
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, label):
            return label
        label = new


def _multi_dim(lab: torch.Tensor) -> bool:
    return sum(labels_vary(lab, d) for d in range(lab.ndim)) > 1


def _find_gathers(p: _Propagator, class_of: torch.Tensor) -> tuple[dict[str, str], set[str]]:
    """Tensors whose channels spread over several dims (e.g. inside a channel shuffle).

    Pruning cannot shrink such a layout along one dim, so PruneChannelsPass replaces the
    whole run by one ``index_select`` from its single-dim source. That is only possible when
    the run is pure data movement ending in a permutation of the source's channels; any
    other use pins the channels. A layout whose channel *classes* vary along one dim only (attention heads:
    ``[B, H, N, D]`` where a head's D channels are one class) loses whole slices of that dim under any plan,
    so the ordinary rewrites handle it and it is neither gathered nor pinned.
    """
    gathers: dict[str, str] = {}
    spread: set[str] = set()
    nodes = {n.name: n for n in p.gm.graph.nodes}
    for node in p.gm.graph.nodes:
        lab = p.env.get(node)
        if not isinstance(lab, torch.Tensor) or not _multi_dim(lab) or not _multi_dim(class_of[lab]):
            continue
        if node.op != "placeholder" and not (ops.moves_data(node, p.modules) and _single_input_move(node, p)):
            p.pin(lab, f"{node.name} lays channels over several dims and is not pure data movement")
            continue
        spread.add(node.name)
        for user in node.users:
            ulab = p.env.get(user)
            if not isinstance(ulab, torch.Tensor):
                p.pin(lab, f"{node.name} lays channels over several dims and feeds {user.name}")
                continue
            if _multi_dim(ulab) and _multi_dim(class_of[ulab]):
                continue
            source = _chain_source(user, p)
            ok = False
            if source is not None and ops.moves_data(user, p.modules) and _single_input_move(user, p):
                s_shape, e_shape = p.shape_of(source), p.shape_of(user)
                s_lab, e_lab = p.value(source), ulab
                cdims = [d for d in range(len(s_shape)) if labels_vary(s_lab, d)]
                if s_shape == e_shape and len(cdims) == 1 and labels_vary(e_lab, cdims[0]):
                    d = cdims[0]
                    s_vec = p.read_dim(s_lab, d, s_shape[d], nodes[source.name])
                    e_vec = p.read_dim(e_lab, d, e_shape[d], user)
                    ok = bool((s_vec > 0).all()) and len(torch.unique(s_vec)) == len(s_vec) and bool(
                        torch.isin(e_vec, s_vec).all()) and len(torch.unique(e_vec)) == len(e_vec)
            if ok:
                gathers[user.name] = source.name
            else:
                p.pin(lab, f"channel layout from {node.name} to {user.name} is not a permutation hqp_fx can rewrite")
    return gathers, spread


def _single_input_move(node: fx.Node, p: _Propagator) -> bool:
    return sum(isinstance(p.env.get(n), torch.Tensor) for n in _nodes_in((node.args, node.kwargs))) == 1


def _chain_source(end: fx.Node, p: _Propagator) -> fx.Node | None:
    node = end
    while True:
        ins = [n for n in _nodes_in((node.args, node.kwargs)) if isinstance(p.env.get(n), torch.Tensor)]
        if len(ins) != 1:
            return None
        prev = ins[0]
        if not _multi_dim(p.env[prev]):
            return prev if node is not end else None
        node = prev


# ---------------------------------------------------------------------------------------
# Assembling groups
# ---------------------------------------------------------------------------------------

def _refuse_aten_graphs(gm: fx.GraphModule) -> None:
    """One clear error for an ATen-level graph (torch.export, or QuantizePass's output), instead of one
    "unsupported op" pin per node: the op rules are written for the torch-level calls hqp_fx.trace records."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    aten = [n for n in calls if isinstance(n.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
            and getattr(n.target, "namespace", "") == "aten"]
    if aten and 2 * len(aten) >= len(calls):
        raise PassError(
            f"ChannelDependencyPass: {gm.__class__.__name__} is an ATen-level graph ({len(aten)} of its {len(calls)} "
            f"calls are aten ops, e.g. {aten[0].target}), as torch.export and QuantizePass produce; the channel analysis "
            "reads torch-level graphs. Trace the nn.Module with hqp_fx.trace(model, example_inputs) (capture='export' "
            "captures it with torch.export and converts the graph) and prune before exporting or quantizing")


def analyze_channels(gm: fx.GraphModule) -> ChannelAnalysis:
    """Run the label propagation and build the groups (see the module docstring)."""
    _refuse_aten_graphs(gm)
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        raise PassError(
            "ChannelDependencyPass needs shape metadata on the graph; build the GraphModule with "
            "hqp_fx.trace(model, example_inputs) (or run torch.fx.passes.shape_prop.ShapeProp first)"
        )
    p = _Propagator(gm)
    p.run()

    # Shared parameters (a module called twice) must stay consistent: tie their entries.
    by_param: dict[tuple[str, int], list[SliceRecord]] = defaultdict(list)
    for rec in p.records:
        by_param[(rec.param, rec.dim)].append(rec)
    for recs in by_param.values():
        for other in recs[1:]:
            p.union(recs[0].labels, other.labels)

    num = p.next_id
    class_of = _components(num, p.edges)
    gathers, spread = _find_gathers(p, class_of)  # adds pins only: the classes stay as they are
    p.resolve_mixed(class_of)

    # Parameters used directly in forward (layer scale, ...): slice along the one dim their classes follow.
    for name, lab, node_name in p.param_blocks:
        cls = class_of[lab]
        dims = [d for d in range(lab.ndim) if lab.shape[d] > 1]
        chosen = None
        for d in dims:
            if all(not labels_vary(cls, o) for o in range(lab.ndim) if o != d):
                chosen = d
                break
        if chosen is None and lab.numel() > 1:
            p.pin(lab, f"parameter {name} couples channels along several dims")
            continue
        if chosen is not None:
            p.records.append(SliceRecord(name, chosen, labels_along(lab, chosen), "out", node_name))

    # owner of every element, then groups = classes linked through a shared owner
    counts = torch.tensor([c for c, _ in p.owner_chunks], dtype=torch.long)
    owner_ids = torch.tensor([o for _, o in p.owner_chunks], dtype=torch.long)
    elem_owner = torch.cat([torch.tensor([-1]), owner_ids.repeat_interleave(counts)])
    starts = 1 + torch.cumsum(counts, 0) - counts
    first_elem = torch.full((len(p.owners),), NO_LABEL, dtype=torch.long).scatter_reduce(0, owner_ids, starts, reduce="amin")
    elems = torch.arange(1, num)
    class_edges = torch.stack([class_of[elems], class_of[first_elem[elem_owner[elems]]]])
    group_root = _components(num, [class_edges])  # indexed by class id

    classes = torch.unique(class_of[1:])
    roots = group_root[classes]
    pin_reason: dict[int, str] = {}
    for labels, reason in p.pins:
        for g in torch.unique(group_root[class_of[labels]]).tolist():
            pin_reason.setdefault(g, reason)
    cross = torch.zeros(num, dtype=torch.bool)
    for labels in p.cross:
        cross[class_of[labels]] = True

    analysis = ChannelAnalysis(
        class_of=class_of, group_of=torch.full((num,), -1, dtype=torch.long), records=p.records,
        node_labels={n.name: p.env[n] for n in gm.graph.nodes if n in p.env and n.name in p.shapes},
        node_shapes=p.shapes, pads=p.pads, grouped=p.grouped, gathers=gathers, spread=spread,
        param_labels={n.name: p.env[n] for n in gm.graph.nodes  # what PruneChannelsPass re-runs data movement on
                      if n.op == "get_attr" and isinstance(p.env.get(n), torch.Tensor)
                      and any(ops.moves_data(u, p.modules) for u in n.users)},
    )
    # one group per root, ordered by the first element (= topological order of its first owner)
    order = torch.argsort(roots * num + classes)  # roots are class ids, so this sorts by root then class
    roots_sorted, classes_sorted = roots[order], classes[order]
    uniq_roots, counts_per = torch.unique_consecutive(roots_sorted, return_counts=True)
    used_ids: set[str] = set()
    group_index_of_root: dict[int, int] = {}
    owner_pairs = torch.unique(torch.stack([group_root[class_of[elems]], elem_owner[elems]]), dim=1)
    owners_of_root: dict[int, list[int]] = defaultdict(list)
    for root, owner in owner_pairs.t().tolist():
        owners_of_root[root].append(owner)
    offset = 0
    for root, count in zip(uniq_roots.tolist(), counts_per.tolist()):
        cls = classes_sorted[offset:offset + count]
        owners = owners_of_root[root]
        offset += count
        kinds = {p.owners[o][2] for o in owners}
        if kinds <= {"param", "pad"}:
            continue  # constants that no layer produces: nothing to prune
        producers = [p.owners[o] for o in owners if p.owners[o][2] in ("producer", "input", "unknown")]
        gid = producers[0][1] if producers else p.owners[owners[0]][1]
        base, k = gid, 1
        while gid in used_ids:
            k += 1
            gid = f"{base}#{k}"
        used_ids.add(gid)
        if root in pin_reason:
            prunable, reason = False, pin_reason[root]
        elif count < 2:
            prunable, reason = False, "a single channel: removing it would remove the whole tensor"
        else:
            prunable, reason = True, ""
        group_index_of_root[root] = len(analysis.groups)
        analysis.groups.append(ChannelGroup(
            id=gid, size=count, prunable=prunable, reason=reason, cross_channel=bool(cross[cls].any()),
            classes=cls, layers=tuple(o[1] for o in producers if o[2] == "producer"), record_ids=(), analysis=analysis,
        ))
    root_to_group = torch.full((num,), -1, dtype=torch.long)
    for root, gi in group_index_of_root.items():
        root_to_group[root] = gi
    group_of = root_to_group[group_root[class_of]]
    group_of[0] = -1
    analysis.group_of = group_of

    # which records touch which group
    rec_groups: dict[int, list[int]] = defaultdict(list)
    for rid, rec in enumerate(p.records):
        touched = torch.unique(group_of[rec.labels[rec.labels > 0]])
        for g in touched[touched >= 0].tolist():
            rec_groups[g].append(rid)
    for gi, g in enumerate(analysis.groups):
        g.record_ids = tuple(rec_groups.get(gi, ()))
    analysis.branches = find_branches(gm, analysis)
    for g in analysis.groups:
        g.removable = g.id in analysis.branches
    return analysis


class ChannelDependencyPass(GraphPass):
    """Group every set of channels that must be removed together (analysis only).

    Writes ``gm.meta["hqp.channel_groups"]`` (tuple of ChannelGroup),
    ``gm.meta["hqp.channel_analysis"]`` and ``node.meta["hqp.channel_group"]``; the graph is
    not changed, so ``modified`` is always False.
    """

    provided_meta = (meta.CHANNEL_GROUPS, meta.CHANNEL_ANALYSIS)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        analysis = analyze_channels(graph_module)
        graph_module.meta[meta.CHANNEL_ANALYSIS] = analysis
        graph_module.meta[meta.CHANNEL_GROUPS] = tuple(analysis.groups)
        ids = [g.id for g in analysis.groups]
        for node in graph_module.graph.nodes:
            lab = analysis.node_labels.get(node.name)
            labs = [lab] if isinstance(lab, torch.Tensor) else [t for t in (lab or ()) if isinstance(t, torch.Tensor)]
            found: set[int] = set()
            for t in labs:
                g = torch.unique(analysis.group_of[t.reshape(-1)])
                found.update(g[g >= 0].tolist())
            if found:
                node.meta[meta.NODE_CHANNEL_GROUP] = tuple(ids[i] for i in sorted(found))
            else:
                node.meta.pop(meta.NODE_CHANNEL_GROUP, None)
        return PassResult(graph_module, False)
