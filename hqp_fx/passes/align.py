"""AlignChannelsPass: round a prune plan so every pruned group keeps a multiple of 8/16/32 channels.

Tensor cores and INT8 kernels (TensorRT, oneDNN) run fastest on channel counts that are
multiples of 8 or 32; a 61-channel layer is often slower than a 64-channel one.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.fx as fx

from .. import meta
from ..core import GraphPass, PassResult
from .prune import validate_plan

__all__ = ["AlignChannelsPass", "aligned_keep"]


def aligned_keep(size: int, keep: int, multiple: int) -> int:
    """Nearest multiple of ``multiple`` to ``keep``; never zero, never above ``size``."""
    rounded = int(math.floor(keep / multiple + 0.5)) * multiple
    return min(max(rounded, multiple), size)


class AlignChannelsPass(GraphPass):
    """Adjust ``plan`` so each group it prunes keeps a multiple of ``multiple`` channels.

    Analysis only: writes ``gm.meta["hqp.align"] = {"multiple", "plan", "rounding"}``, where
    ``rounding[group id] = (size, kept as requested, kept after alignment)``. Plan lists are
    read in priority order (first = most removable): rounding down the removal drops entries
    from the end; rounding it up takes the extra channels with the lowest ``scores`` (or, with
    no scores, the highest indices not yet listed). Groups absent from the plan, or with an
    empty list, are left alone. ``modified`` is False: the graph itself is unchanged.
    """

    required_meta = (meta.CHANNEL_GROUPS,)
    provided_meta = (meta.ALIGN,)

    def __init__(self, plan: Mapping[str, Sequence[int]], multiple: int = 8,
                 scores: Mapping[str, torch.Tensor] | None = None):
        if not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"multiple must be a positive int such as 8, 16 or 32, got {multiple!r}")
        self.plan = {k: list(v) for k, v in plan.items()}
        self.multiple = multiple
        self.scores = dict(scores or {})

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        groups = {g.id: g for g in meta.channel_groups(graph_module)}
        validate_plan(groups.values(), self.plan)
        aligned: dict[str, list[int]] = {}
        rounding: dict[str, tuple[int, int, int]] = {}
        for gid, indices in self.plan.items():
            if not indices:
                continue
            size = groups[gid].size
            keep = size - len(indices)
            target = aligned_keep(size, keep, self.multiple)
            n_remove = size - target
            chosen = list(indices[:n_remove])
            if n_remove > len(chosen):
                listed = set(chosen)
                rest = [i for i in range(size) if i not in listed]
                if gid in self.scores:
                    s = torch.as_tensor(self.scores[gid], dtype=torch.float64)
                    rest.sort(key=lambda i: (float(s[i]), i))
                else:
                    rest.reverse()
                chosen += rest[: n_remove - len(chosen)]
            rounding[gid] = (size, keep, target)
            if chosen:
                aligned[gid] = sorted(chosen)
        record = {"multiple": self.multiple, "plan": aligned, "rounding": rounding}
        graph_module.meta[meta.ALIGN] = record
        return PassResult(graph_module, False)
