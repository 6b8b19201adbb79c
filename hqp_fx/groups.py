"""The coupled-channel data model: ChannelGroup, ParamSlice and the analysis behind them.

Vocabulary: every channel that some op creates is an *element* (an integer id). The
dependency pass unions elements that must be removed together (a residual add ties
position i of both operands, a depthwise conv ties its input channel to its output
channel, ...). Each union is a *class*: one prunable channel. Classes that share a
producing layer form a *group*; ``group.size`` is its number of classes and channel ``k``
of a group is its ``k``-th class in topological order of the first layer producing it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import torch

__all__ = ["ParamSlice", "ChannelGroup", "ChannelAnalysis", "SliceRecord", "labels_vary", "labels_along", "kept_units"]

NO_LABEL = torch.iinfo(torch.long).max  # above every element id: ignored by a min over labels


def labels_vary(lab: torch.Tensor, dim: int) -> bool:
    """True when the non-zero labels of a label tensor differ along ``dim`` (zeros are constants: padding,
    scalars)."""
    if lab.shape[dim] <= 1:
        return False
    mx = lab.amax(dim)
    mn = torch.where(lab > 0, lab, NO_LABEL).amin(dim)
    return bool(((mx > 0) & (mn != mx)).any())


def labels_along(lab: torch.Tensor, dim: int) -> torch.Tensor:
    """The element ids along ``dim`` of a tensor whose channels lie along that dim only (a new tensor)."""
    return lab.movedim(dim, 0).reshape(lab.shape[dim], -1)[:, 0].clone()


@dataclass(frozen=True)
class ParamSlice:
    """Entries ``index`` along ``dim`` of parameter/buffer ``param`` (qualified name in the original model)."""

    param: str
    dim: int
    index: torch.Tensor
    role: Literal["out", "in"]

    def __repr__(self) -> str:
        idx = self.index.tolist()
        shown = idx if len(idx) <= 8 else idx[:8] + ["..."]
        return f"ParamSlice({self.param}, dim={self.dim}, role={self.role}, index={shown})"


@dataclass(frozen=True)
class SliceRecord:
    """One parameter dimension whose entries carry channel elements (``labels[i]`` = element of entry i, 0 = none)."""

    param: str
    dim: int
    labels: torch.Tensor
    role: Literal["out", "in"]
    node: str


@dataclass
class ChannelAnalysis:
    """Element-level result of ChannelDependencyPass, shared by its groups and read by PruneChannelsPass."""

    class_of: torch.Tensor  # [E+1] class id (the smallest element id of the class) per element; 0 -> 0
    group_of: torch.Tensor  # [E+1] index into ``groups`` per element, -1 where no group
    records: list[SliceRecord]
    node_labels: dict[str, object]  # node name -> compact label tensor (or tuple of them)
    node_shapes: dict[str, object]  # node name -> full output shape (or tuple of shapes)
    pads: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]  # pad node -> (tensor dim, left elems, right elems)
    grouped: dict[str, tuple[int, int]]  # grouped conv / GroupNorm node -> (groups, input channels per group)
    gathers: dict[str, str]  # end node of a multi-dim channel permutation -> its single-dim source node
    spread: set[str]  # nodes inside such permutations (channels over several dims); replaced when pruned
    groups: list["ChannelGroup"] = field(default_factory=list)
    branches: dict = field(default_factory=dict)  # group id -> branches.Branch, for removable groups
    # get_attr node -> label tensor of a parameter used directly in forward (a class token, a layer scale)
    param_labels: dict[str, torch.Tensor] = field(default_factory=dict)

    def labels(self, node: str):
        """Full-shape label tensor(s) of a node's output."""
        lab, shape = self.node_labels[node], self.node_shapes[node]
        if isinstance(lab, torch.Tensor):
            return lab.expand(shape)
        return tuple(None if l is None else l.expand(s) for l, s in zip(lab, shape))

    @functools.cached_property
    def tensor_widths(self) -> dict[tuple[int, ...], int]:
        """Every traced tensor's set of classes, with how many channels one of them spans there: the narrowest
        ``width`` of their groups (1 for convolution channels, head_dim for attention heads). Per-tensor channel
        minimums count channels, so they divide by this."""
        widths: dict[tuple[int, ...], int] = {}
        for lab in self.node_labels.values():
            for t in (lab if isinstance(lab, tuple) else (lab,)):
                if not isinstance(t, torch.Tensor):
                    continue
                present = torch.unique(self.class_of[t[t > 0]])
                key = tuple(present.tolist())
                if key and key not in widths:
                    owners = torch.unique(self.group_of[present])
                    widths[key] = min((self.groups[i].width for i in owners[owners >= 0].tolist()), default=1)
        return widths

    def removed_elements(self, plan: dict[str, Sequence[int]]) -> torch.Tensor:
        """Boolean mask over elements removed by ``plan`` (already validated)."""
        removed_classes = torch.zeros_like(self.class_of, dtype=torch.bool)
        by_id = {g.id: g for g in self.groups}
        for gid, idx in plan.items():
            if len(idx):
                removed_classes[by_id[gid].classes[torch.as_tensor(list(idx), dtype=torch.long)]] = True
        mask = removed_classes[self.class_of]
        mask[0] = False
        return mask


@dataclass(eq=False)
class ChannelGroup:
    """A set of channels that must be removed together, across every layer they couple.

    ``slices(indices)`` lists every parameter/buffer entry touched when channels ``indices``
    (0 <= i < size) of this group are removed: ``role="out"`` for entries that produce the
    channels, ``"in"`` for entries that consume them.
    """

    id: str
    size: int
    prunable: bool
    reason: str
    cross_channel: bool
    classes: torch.Tensor  # [size] class id per group channel
    layers: tuple[str, ...]  # node names that produce the group's channels, topological order
    record_ids: tuple[int, ...]
    analysis: ChannelAnalysis = field(repr=False)
    removable: bool = False  # all channels may go: the branch they feed then becomes a constant (hqp_fx.branches)

    def check_indices(self, indices: Iterable[int]) -> torch.Tensor:
        """Validate channel indices for this group; ValueError names the group and the problem."""
        values = list(indices)
        idx = torch.as_tensor(values) if values else torch.zeros(0, dtype=torch.long)
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():  # 1.9 must not mean channel 1
            raise ValueError(f"group {self.id!r}: channel indices must be integers, got {values[:5]}")
        idx = idx.long()
        if idx.ndim != 1:
            raise ValueError(f"group {self.id!r}: indices must be a flat list of ints")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.size):
            bad = idx[(idx < 0) | (idx >= self.size)].tolist()
            raise ValueError(f"group {self.id!r}: channel indices {bad} are out of range 0..{self.size - 1}")
        if len(torch.unique(idx)) != len(idx):
            dup = sorted({int(i) for i in idx.tolist() if (idx == i).sum() > 1})
            raise ValueError(f"group {self.id!r}: duplicate channel indices {dup}")
        return idx

    @functools.cached_property
    def width(self) -> int:
        """Channels one of this group's classes spans in the layers producing it: 1, or head_dim (3 * head_dim in
        a fused qkv projection) for an attention head. Read from the weights, not the activations: an attention
        map holds one entry per head, and a per-head temperature one value."""
        return max((len(s.index) for s in self.slices([0]) if s.role == "out"), default=1)

    def unit(self, multiple: int) -> int:
        """The fewest classes of this group whose channels make a multiple of ``multiple`` (engine alignment in
        the group's own units: 1 head of 64 channels is aligned to 16, a single conv channel is not)."""
        return multiple // math.gcd(multiple, self.width)

    def slices(self, indices: Iterable[int]) -> list[ParamSlice]:
        idx = self.check_indices(indices)
        chosen = torch.zeros_like(self.analysis.class_of, dtype=torch.bool)
        chosen[self.classes[idx]] = True
        elem_mask = chosen[self.analysis.class_of]
        elem_mask[0] = False
        out = []
        for rid in self.record_ids:
            rec = self.analysis.records[rid]
            hit = elem_mask[rec.labels].nonzero().flatten()
            if len(hit):
                out.append(ParamSlice(rec.param, rec.dim, hit, rec.role))
        return out

    def __str__(self) -> str:
        state = "prunable" if self.prunable else f"unprunable ({self.reason})"
        state += ", removable as a whole" if self.removable else ""
        cc = ", cross-channel" if self.cross_channel else ""
        return f"{self.id}: {self.size} ch, {len(self.layers)} layer(s), {state}{cc}"

    def details(self) -> str:
        lines = [str(self)]
        lines.append("  producers: " + ", ".join(self.layers))
        for rid in self.record_ids:
            rec = self.analysis.records[rid]
            lines.append(f"  {rec.role:>3} {rec.param} dim {rec.dim} ({len(rec.labels)} entries)")
        return "\n".join(lines)


def kept_units(channels: int, width: int) -> int:
    """How many classes ``width`` channels wide hold at least ``channels`` channels (a minimum in classes)."""
    return -(-channels // width)
