"""AlignChannelsPass: round a prune plan so every pruned group keeps a multiple of 8/16/32 channels.

INT8 kernels compute output channels in fixed-width blocks and pad the last one: a layer whose width is not a
multiple of the block pays for the padding. ``engine_alignment`` names the multiple each deployment backend needs.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.fx as fx

from .. import meta
from ..core import GraphPass, PassResult
from .prune import validate_plan

__all__ = ["AlignChannelsPass", "aligned_keep", "engine_alignment", "ENGINE_ALIGNMENT"]

ENGINE_ALIGNMENT = {
    # ONNX Runtime's x86 int8 convolution (MLAS) computes output channels 16 at a time: measured on AVX2 by
    # benchmarks/ort_channel_steps.py, C -> 24 costs what C -> 32 costs, and C -> 8 at least what C -> 16 costs.
    "onnxruntime": 16,
    # NVIDIA's tensor-core guidance asks INT8 layers for channel counts in multiples of 16 (16 bytes). Not
    # measured here: no TensorRT or GPU on these machines.
    "tensorrt": 16,
    # torch.compile's x86 int8 convolutions go through oneDNN, whose blocked layouts are 16 channels wide on
    # AVX-512 (8 on AVX2); 16 serves both. Not measured here.
    "x86-inductor": 16,
}


def engine_alignment(backend: str) -> int:
    """The channel multiple that ``backend``'s INT8 convolutions compute in (what ``--align auto`` uses)."""
    if backend not in ENGINE_ALIGNMENT:
        raise ValueError(f"no channel alignment known for backend {backend!r}; choose one of "
                         f"{', '.join(ENGINE_ALIGNMENT)} or pass an explicit multiple such as 8")
    return ENGINE_ALIGNMENT[backend]


def aligned_keep(size: int, keep: int, multiple: int) -> int:
    """Nearest multiple of ``multiple`` to ``keep``; never zero, never above ``size``."""
    rounded = int(math.floor(keep / multiple + 0.5)) * multiple
    return min(max(rounded, multiple), size)


class AlignChannelsPass(GraphPass):
    """Adjust ``plan`` so each group it prunes keeps a multiple of ``multiple`` channels (a group whose channels
    are attention heads keeps heads whose channels make that multiple: ``ChannelGroup.unit``).

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
            # 0: a removable group goes whole; the multiple counts a layer's channels (a head is head_dim of them)
            target = 0 if keep == 0 else aligned_keep(size, keep, groups[gid].unit(self.multiple))
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
