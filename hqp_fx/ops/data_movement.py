"""Data movement: views, permutes, cat/stack, split/chunk, getitem, narrow, flatten, shuffles, padding.

The analysis runs the very op on the label tensors, so index maps through concat offsets, flatten strides or
shuffles are never modelled by hand. The rewrites recompute the constants that count channels (a view's
sizes, a split's sizes, a slice's bounds, a pad's amount) from how many labelled positions survive; every
other op is re-run on the surviving labels by PruneChannelsPass, which replaces it by an explicit
``index_select`` when its pruned result is not the original mapping restricted to the kept channels.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..groups import labels_vary
from .base import NodeEdit, OpRule, arg, index_dims

_RESHAPE_METHODS = frozenset({"view", "reshape", "expand"})
_SPLIT_METHODS = frozenset({"split", "chunk", "tensor_split"})
_OTHER_METHODS = frozenset({
    "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze", "expand_as", "view_as", "reshape_as",
    "repeat", "select", "unbind", "flip", "roll", "t", "movedim", "swapaxes", "contiguous",
})
_OTHER_FUNCTIONS = frozenset({
    torch.flatten, torch.permute, torch.transpose, torch.stack, torch.unbind,
    torch.squeeze, torch.unsqueeze, torch.movedim, torch.flip, torch.roll, torch.pixel_shuffle,
    torch.pixel_unshuffle, torch.channel_shuffle, F.pixel_shuffle, F.pixel_unshuffle,
})
_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle)
PAD_FUNCTIONS = frozenset({F.pad} | ({torch._C._nn.pad} if hasattr(torch._C._nn, "pad") else set()))
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)


def _move(p, node: fx.Node):
    return p.move(node)


def _rank(keep: torch.Tensor, pos: int) -> int:
    """Position of original channel ``pos`` among the kept ones (the kept channels before it)."""
    return int(keep[:pos].sum())


def _reshape_rewrite(node: fx.Node, kept) -> NodeEdit | None:
    """view/reshape/expand: explicit sizes that changed take the new size; -1 stays -1.

    A size computed in forward that counts channels (``view(B, C, H, W)`` with ``C`` read from another
    tensor's shape) becomes the pruned count: that tensor may be pruned differently, and a channel count
    is fixed by the weights anyway. Computed sizes of dims without channel labels (batch, tokens, spatial)
    stay computed, so the graph still takes any batch or image size.
    """
    lab = kept.analysis.node_labels.get(node.name)
    if not isinstance(lab, torch.Tensor):
        return None
    new_shape, old_shape = kept.new_shape(node.name), kept.shape(node.name)
    packed = node.op == "call_function" or (len(node.args) == 2 and isinstance(node.args[1], (tuple, list)))
    sizes = list(node.args[1]) if packed else list(node.args[1:])
    changed = False
    for i, s in enumerate(sizes):
        counts_channels = isinstance(s, fx.Node) and i < lab.ndim and labels_vary(lab, i)  # not padding's zeros
        if (isinstance(s, int) and s != -1 and old_shape[i] != new_shape[i]) or counts_channels:
            sizes[i], changed = new_shape[i], True
    if not changed:
        return None
    if packed:
        return NodeEdit(node.target, (node.args[0], type(node.args[1])(sizes)) + tuple(node.args[2:]), dict(node.kwargs))
    return NodeEdit(node.target, (node.args[0], *sizes), dict(node.kwargs))


def _split_rewrite(node: fx.Node, kept) -> NodeEdit | None:
    """split/chunk/tensor_split over the channel dim: one ``torch.split`` with the kept count of each piece."""
    x = node.args[0]
    keep = kept.keep(x.name)
    dim = arg(node, 2, "dim", 0)
    if keep is None or keep.dim != dim % len(kept.shape(x.name)):
        return None
    sizes, start = [], 0
    for shape in kept.shape(node.name):
        n = shape[keep.dim]
        sizes.append(int(keep.mask[start:start + n].sum()))
        start += n
    if any(s == 0 for s in sizes):
        raise ValueError(f"the plan removes every channel of one output of {node.name} ({node.format_node()})")
    return NodeEdit(torch.split, (x, sizes, keep.dim), {})


def _reindex(e, keep: torch.Tensor, node: fx.Node):
    n = len(keep)
    if isinstance(e, int):
        pos = e % n
        if not keep[pos]:
            raise ValueError(f"the plan removes channel {pos} that {node.format_node()} selects")
        return _rank(keep, pos)
    if isinstance(e, slice) and all(v is None or isinstance(v, int) for v in (e.start, e.stop, e.step)):
        start, stop, step = e.indices(n)
        if step != 1:
            raise ValueError(f"cannot prune through the strided channel slice of {node.format_node()}")
        return slice(_rank(keep, start), _rank(keep, stop), None)
    raise ValueError(f"cannot prune through the channel index of {node.format_node()}")


def _getitem_rewrite(node: fx.Node, kept) -> NodeEdit | None:
    """Indexing a tensor: the entry on the channel dim is mapped to the kept positions (tuples pass as is)."""
    x = node.args[0]
    if not kept.is_tensor(x.name):
        return None
    keep = kept.keep(x.name)
    if keep is None:
        return None
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    entries = list(index)
    for pos, dim in index_dims(index, len(kept.shape(x.name))):
        if dim == keep.dim:
            entries[pos] = _reindex(entries[pos], keep.mask, node)
            break
    return NodeEdit(node.target, (x, tuple(entries) if isinstance(node.args[1], tuple) else entries[0]), {})


def _narrow_rewrite(node: fx.Node, kept) -> NodeEdit | None:
    x = node.args[0]
    keep = kept.keep(x.name)
    if keep is None or keep.dim != arg(node, 1, "dim") % len(kept.shape(x.name)):
        return None
    start, length = arg(node, 2, "start"), arg(node, 3, "length")
    new_start = _rank(keep.mask, start)
    return NodeEdit.of(node).set(2, "start", new_start).set(3, "length", _rank(keep.mask, start + length) - new_start)


def _concat(p, node: fx.Node):
    return p.concat(node)


def _pad_function(p, node: fx.Node):
    # amounts computed in forward from shapes (timm's window padding) are known here: the shapes are fixed
    pad = fx.node.map_arg(arg(node, 1, "pad"), p.value)
    mode = arg(node, 2, "mode", "constant")
    value = arg(node, 3, "value", None)
    if not isinstance(pad, (tuple, list)) or not all(isinstance(v, int) for v in pad):
        return p.unknown(node, f"{node.name} pads by computed amounts")
    if mode == "constant" and value not in (None, 0, 0.0):
        return p.unknown(node, f"{node.name} pads with the non-zero value {value}")
    return p.pad(node, node.args[0], tuple(pad), mode)


def _new_pad(pad, node: fx.Node, kept) -> tuple[int, ...]:
    """Pad amounts on channel dims shrink to the kept number of the zero channels the pad creates."""
    ndim = len(kept.shape(node.name))
    out = list(pad)
    for d, left_ids, right_ids in kept.analysis.pads[node.name]:
        k = ndim - 1 - d
        out[2 * k] = int((~kept.removed[left_ids]).sum())
        out[2 * k + 1] = int((~kept.removed[right_ids]).sum())
    return tuple(out)


def _pad_rewrite(node: fx.Node, kept) -> NodeEdit | None:
    if node.name not in kept.analysis.pads:
        return None
    return NodeEdit.of(node).set(1, "pad", _new_pad(arg(node, 1, "pad"), node, kept))


def _pad_module(p, node: fx.Node):
    return p.pad(node, node.args[0], tuple(p.modules[node.target].padding), "constant")


def _pad_module_fix(mod, node: fx.Node, kept) -> dict:
    return {"padding": _new_pad(mod.padding, node, kept)} if node.name in kept.analysis.pads else {}


RULES = (
    OpRule("view/reshape/expand", _move, methods=_RESHAPE_METHODS, functions=frozenset({torch.reshape}),
           rewrite=_reshape_rewrite, moves_data=True),
    OpRule("split/chunk", _move, methods=_SPLIT_METHODS,
           functions=frozenset({torch.split, torch.chunk, torch.tensor_split}), rewrite=_split_rewrite, moves_data=True),
    OpRule("getitem", _move, functions=frozenset({operator.getitem}), rewrite=_getitem_rewrite, moves_data=True),
    OpRule("narrow", _move, methods=frozenset({"narrow"}), functions=frozenset({torch.narrow}),
           rewrite=_narrow_rewrite, moves_data=True),
    OpRule("data movement", _move, methods=_OTHER_METHODS, functions=_OTHER_FUNCTIONS, modules=_MODULES,
           moves_data=True),
    OpRule("cat", _concat, functions=frozenset({torch.cat, torch.concat}), moves_data=True),
    OpRule("pad", _pad_function, functions=PAD_FUNCTIONS, rewrite=_pad_rewrite),
    OpRule("zero/constant pad", _pad_module, modules=_PAD_MODULES, fix_module=_pad_module_fix),
)
