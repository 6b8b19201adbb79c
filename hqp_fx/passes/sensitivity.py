"""Channel sensitivity: Fisher information (seed and Group-Fisher forms) and baseline criteria.

Every criterion scores every channel of every prunable group from the parameter slices (or the
producing activations) that the dependency analysis recorded, so a channel's score covers all
the coupled layers it lives in. All accumulation is vectorised: one ``index_add_`` per recorded
parameter dimension per batch, no per-filter loop and no ``.item()``.

BatchNorm runs in **eval mode** while scoring (the deployed network's function, and running
statistics are never updated by the calibration data); dropout is off for the same reason.
Under ``torch.distributed`` each rank scores its own shard of the data and the sums are
all-reduced, so every rank ranks channels identically to one process over all the data.
"""
from __future__ import annotations

from typing import Callable, Iterable, Literal

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import meta
from ..core import GraphPass, PassResult
from ..groups import ChannelAnalysis, ChannelGroup, kept_units, labels_along

__all__ = ["CRITERIA", "SensitivityPass", "score_channels", "select_channels"]

Criterion = Literal["fisher", "group-fisher", "l1", "l2", "taylor", "random"]
CRITERIA: tuple[str, ...] = ("fisher", "group-fisher", "l1", "l2", "taylor", "random")
_NEEDS_DATA = {"fisher", "group-fisher", "taylor"}
Normalize = Literal["layer", "group", "none"]
# fisher/l1/l2 sum one term per coupled layer, on each layer's own scale: "layer" puts the layers on one scale.
# taylor and group-fisher estimate the loss change of removing the channel, already comparable across groups.
DEFAULT_NORMALIZE: dict[str, Normalize] = {"fisher": "layer", "l1": "layer", "l2": "layer", "taylor": "none",
                                           "group-fisher": "none", "random": "none"}
_PER_LAYER = {"fisher", "l1", "l2"}
_LOSS_CHANGE = {"group-fisher", "taylor"}  # estimates of a loss change: per MAC is meaningful


def check_flops_normalize(criterion: str, flops_normalize: bool) -> None:
    """Refuse ``flops_normalize`` for a criterion that is not a loss estimate; PruneLoopConfig calls it before any round."""
    if flops_normalize and criterion not in _LOSS_CHANGE:
        raise ValueError(f"flops_normalize divides an estimated loss change by MACs "
                         f"({', '.join(sorted(_LOSS_CHANGE))}); {criterion!r} is not one: drop "
                         f"flops_normalize or use one of those criteria")


def _class_index(analysis: ChannelAnalysis) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element: (group index or -1, channel index within its group)."""
    pos = torch.full_like(analysis.class_of, -1)
    for g in analysis.groups:
        pos[g.classes] = torch.arange(g.size)
    chan = pos[analysis.class_of]
    chan[0] = -1
    return analysis.group_of, chan


class _Accumulator:
    """Scores of all group channels in one flat vector, filled through element labels."""

    def __init__(self, analysis: ChannelAnalysis):
        self.analysis = analysis
        group_of, chan = _class_index(analysis)
        offsets = torch.zeros(len(analysis.groups) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.tensor([g.size for g in analysis.groups], dtype=torch.long), 0)
        self.offsets = offsets
        flat = torch.where(group_of >= 0, offsets[group_of.clamp(min=0)] + chan, torch.full_like(chan, -1))
        self.flat_of_element = flat  # element id -> index in the flat score vector, -1 = none
        self.total = torch.zeros(int(offsets[-1]), dtype=torch.float64)

    def add(self, labels: torch.Tensor, values: torch.Tensor) -> None:
        idx = self.flat_of_element[labels]
        keep = idx >= 0
        self.total.index_add_(0, idx[keep], values[keep].to(torch.float64))

    def per_group(self) -> dict[str, torch.Tensor]:
        """Scores of the prunable groups (the only ones a plan may touch)."""
        return {g.id: self.total[self.offsets[i]:self.offsets[i + 1]].clone()
                for i, g in enumerate(self.analysis.groups) if g.prunable}


def _entries_along(t: torch.Tensor, dim: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Reduce ``fn(t)`` over every dim except ``dim``: one value per entry along ``dim``."""
    v = fn(t)
    return v.movedim(dim, 0).reshape(t.shape[dim], -1).sum(1) if t.ndim > 1 else v


def _producer_channels(gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, tuple[int, torch.Tensor]]:
    """Nodes that mint channels (conv/linear outputs): node name -> (channel dim, element per channel)."""
    out: dict[str, tuple[int, torch.Tensor]] = {}
    producers = {rec.node for rec in analysis.records if rec.role == "out"}
    for node in gm.graph.nodes:
        if node.name not in producers or not isinstance(analysis.node_labels.get(node.name), torch.Tensor):
            continue
        lab = analysis.labels(node.name)
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear) or (
                node.op == "call_function" and node.target is F.linear):
            dim = lab.ndim - 1
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.conv._ConvNd) or (
                node.op == "call_function" and "conv" in getattr(node.target, "__name__", "")):
            dim = 1
        else:
            continue
        out[node.name] = (dim, labels_along(lab, dim))
    return out


def _channel_cost(gm: fx.GraphModule, analysis: ChannelAnalysis) -> torch.Tensor:
    """MACs each group channel costs: conv/linear weight entries it owns times their layer's output positions."""
    cost = _Accumulator(analysis)
    params = dict(gm.named_parameters())
    nodes = {n.name: n for n in gm.graph.nodes}
    for rec in analysis.records:
        p, node = params.get(rec.param), nodes.get(rec.node)
        if p is None or p.ndim < 2 or node is None or "tensor_meta" not in node.meta:
            continue
        shape = node.meta["tensor_meta"].shape
        positions = int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1
        per_entry = p.numel() // p.shape[rec.dim]
        cost.add(rec.labels, torch.full((len(rec.labels),), float(per_entry * positions)))
    return cost.total


def score_channels(
    gm: fx.GraphModule,
    criterion: Criterion = "fisher",
    data: Iterable | None = None,
    *,
    loss_fn: Callable = F.cross_entropy,
    num_batches: int | None = None,
    normalize: Normalize | None = None,
    flops_normalize: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Score every channel of every prunable group of ``gm`` (after ChannelDependencyPass).

    ``data`` yields ``(inputs, targets)`` batches (needed by fisher, group-fisher, taylor).

    - ``fisher``: S(f) = sum over batches of sum over every parameter entry channel f owns, in
      every coupled layer, of (dL/dw)^2.
    - ``group-fisher`` (Liu et al., ICML 2021): per sample n, g_n(f) = sum over the layers producing
      f of sum over positions of a * dL/da (the gradient of a channel mask), summed over coupled
      layers *before* squaring; S(f) = sum_n g_n(f)^2 / (2 N).
    - ``l1`` / ``l2``: magnitude of every entry f owns; ``taylor``: sum over batches of
      |sum over all entries f owns of w * dL/dw| (first-order loss change of removing f);
      ``random``: seeded uniform.

    ``flops_normalize`` (group-fisher, taylor: the two estimates of a loss change) divides each score by the
    MACs the channel costs, so global ranking removes the least loss per MAC saved (Liu et al.'s knapsack
    ratio); the magnitudes and fisher's normalised sums have no such unit, so it is refused for them.

    ``normalize`` puts groups on one scale for global ranking (default: ``DEFAULT_NORMALIZE``):

    - ``"layer"`` (fisher, l1, l2): each coupled layer's term is divided by its mean over that
      layer's channels before the terms are summed, so a layer's size or gradient scale does not
      decide, while a channel coupled into many layers (a residual stream) weighs as many terms;
    - ``"group"``: each group's total is divided by its mean (every group equally prunable);
    - ``"none"``: raw sums (taylor and group-fisher: estimates of the loss change).

    ``"layer"`` is the default because ``"group"`` lets fisher prune a residual stream as readily as
    a single layer, which cost points on a CIFAR ResNet-56 (benchmarks/RESULTS.md). The module's parameters, gradients, buffers and train/eval mode are left as they were.
    """
    analysis = meta.channel_analysis(gm)
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if criterion in _NEEDS_DATA and data is None:
        raise ValueError(f"criterion {criterion!r} needs calibration data: pass data=[(inputs, targets), ...]")
    normalize = DEFAULT_NORMALIZE[criterion] if normalize is None else normalize
    if normalize not in ("layer", "group", "none"):
        raise ValueError(f"normalize must be 'layer', 'group' or 'none', got {normalize!r}")
    if normalize == "layer" and criterion not in _PER_LAYER:
        raise ValueError(f"normalize='layer' needs a per-layer sum ({', '.join(sorted(_PER_LAYER))}); {criterion!r} "
                         f"scores all coupled layers jointly: use 'none' or 'group'")
    check_flops_normalize(criterion, flops_normalize)
    acc = _Accumulator(analysis)
    params = dict(gm.named_parameters())
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        acc.total = torch.rand(acc.total.shape, generator=gen, dtype=torch.float64)
    elif criterion in ("l1", "l2"):
        fn = torch.abs if criterion == "l1" else torch.square
        with torch.no_grad():
            terms = [_entries_along(params[rec.param].detach(), rec.dim, fn).to(torch.float64)
                     if rec.param in params else None for rec in analysis.records]
        _add_layer_terms(acc, analysis, terms, normalize == "layer")
        if criterion == "l2":
            acc.total = acc.total.sqrt()
    else:
        _score_with_gradients(gm, analysis, acc, criterion, data, loss_fn, num_batches, params, normalize == "layer")
    if flops_normalize:
        acc.total = acc.total / _channel_cost(gm, analysis).clamp(min=1.0)
    scores = acc.per_group()
    if normalize == "group":
        scores = {k: v / v.mean().clamp(min=_TINY) for k, v in scores.items()}
    return scores


_TINY = torch.finfo(torch.float64).tiny


def _add_layer_terms(acc: _Accumulator, analysis: ChannelAnalysis, terms: list[torch.Tensor | None],
                     per_layer: bool) -> None:
    """Add each recorded layer's per-channel term, divided by its mean over the layer's channels if ``per_layer``."""
    for rec, term in zip(analysis.records, terms):
        if term is not None:
            acc.add(rec.labels, term / term.mean().clamp(min=_TINY) if per_layer else term)


def _score_with_gradients(gm, analysis, acc, criterion, data, loss_fn, num_batches, params, per_layer) -> None:
    was_training = gm.training
    saved_grads = {n: p.grad for n, p in params.items()}
    requires = {n: p.requires_grad for n, p in params.items()}
    hooks = []
    producers = _producer_channels(gm, analysis) if criterion == "group-fisher" else {}
    captured: dict[str, torch.Tensor] = {}
    if producers:
        functional = sorted(n.name for n in gm.graph.nodes if n.name in producers and n.op != "call_module")
        if functional:
            raise ValueError(f"group-fisher reads layer outputs through module hooks; the functional layers "
                             f"{functional} have none: use criterion='fisher' or make them nn.Conv2d/nn.Linear modules")
        for node in gm.graph.nodes:
            if node.name in producers:
                hooks.append(gm.get_submodule(node.target).register_forward_hook(_capture(captured, node.name)))
    gm.eval()
    seen = 0
    # fisher: one term per recorded layer, summed over batches; sized from the model alone so that every rank
    # all-reduces the same tensors even when its shard is empty
    fisher_terms = [torch.zeros(params[rec.param].shape[rec.dim], dtype=torch.float64)
                    if criterion == "fisher" and rec.param in params else None for rec in analysis.records]
    try:
        for p in params.values():
            p.grad = None
            p.requires_grad_(True)
        for b, batch in enumerate(data):
            if num_batches is not None and b >= num_batches:
                break
            inputs, targets = batch[0], batch[1]
            captured.clear()
            loss = loss_fn(gm(inputs), targets)
            acts = dict(captured)
            grads = torch.autograd.grad(loss, list(params.values()) + list(acts.values()), allow_unused=True)
            pgrads = dict(zip(params, grads[:len(params)]))
            with torch.no_grad():
                if criterion == "group-fisher":
                    per_sample = torch.zeros(inputs.shape[0], acc.total.numel(), dtype=torch.float64)
                    for (name, act), grad in zip(acts.items(), grads[len(params):]):
                        if grad is None:
                            continue
                        dim, elements = producers[name]
                        mask_grad = (act * grad).movedim(dim, -1).reshape(act.shape[0], -1, act.shape[dim]).sum(1)
                        idx = acc.flat_of_element[elements]
                        keep = idx >= 0
                        per_sample.index_add_(1, idx[keep], mask_grad[:, keep].to(torch.float64))
                    acc.total += per_sample.square().sum(0) / 2
                    seen += inputs.shape[0]
                elif criterion == "fisher":
                    for i, rec in enumerate(analysis.records):
                        g = pgrads.get(rec.param)
                        if g is not None:
                            fisher_terms[i] += _entries_along(g, rec.dim, torch.square).to(torch.float64)
                else:
                    before = acc.total.clone()
                    for rec in analysis.records:
                        g = pgrads.get(rec.param)
                        if g is not None:  # taylor: the loss change of removing the whole channel, all entries together
                            acc.add(rec.labels, _entries_along(params[rec.param].detach() * g, rec.dim, lambda t: t))
                    acc.total = before + (acc.total - before).abs()
        if dist.is_available() and dist.is_initialized():  # every rank scored its own shard: sum them
            counts = torch.tensor([float(seen)], dtype=torch.float64)
            dist.all_reduce(acc.total)
            dist.all_reduce(counts)
            seen = int(counts.item())
            present = [i for i, t in enumerate(fisher_terms) if t is not None]
            if present:
                flat = torch.cat([fisher_terms[i] for i in present])
                dist.all_reduce(flat)
                for i, part in zip(present, flat.split([fisher_terms[i].numel() for i in present])):
                    fisher_terms[i] = part
        if criterion == "fisher":
            _add_layer_terms(acc, analysis, fisher_terms, per_layer)
        if criterion == "group-fisher" and seen:
            acc.total /= seen
    finally:
        for h in hooks:
            h.remove()
        for n, p in params.items():
            p.grad = saved_grads[n]
            p.requires_grad_(requires[n])
        gm.train(was_training)


def _capture(store: dict[str, torch.Tensor], name: str):
    """Keep a layer's output for a*dL/da; pass a copy on, so in-place ops downstream cannot alter it."""
    def hook(module, inputs, output):
        store[name] = output
        return output + 0
    return hook


class SensitivityPass(GraphPass):
    """Write ``gm.meta["hqp.sensitivity"] = {"criterion", "scores": {group id: scores}}`` (analysis only)."""

    required_meta = (meta.CHANNEL_GROUPS, meta.CHANNEL_ANALYSIS)
    provided_meta = (meta.SENSITIVITY,)

    def __init__(self, criterion: Criterion = "fisher", data: Iterable | None = None, **options):
        self.criterion, self.data, self.options = criterion, data, options

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        scores = score_channels(graph_module, self.criterion, self.data, **self.options)
        graph_module.meta[meta.SENSITIVITY] = {"criterion": self.criterion, "scores": scores}
        return PassResult(graph_module, False)


def select_channels(
    groups: Iterable[ChannelGroup],
    scores: dict[str, torch.Tensor],
    fraction: float,
    *,
    min_keep: int = 8,
    unit: int = 1,
    ignore: Iterable[str] = (),
    remove_branches: bool = False,
) -> dict[str, list[int]]:
    """Globally rank channels and pick the lowest-scoring ``fraction`` of all eligible channels.

    Eligible: prunable groups with scores, none of whose layers is in ``ignore`` (module names; a
    prefix matches its submodules). Each group, and each tensor, keeps at least ``min_keep``
    channels (or all of them when it has fewer). With ``unit`` > 1 channels are taken in blocks of
    ``unit`` (each group's least sensitive ``unit`` channels first, ranked globally by their mean
    score), so a later AlignChannelsPass to that multiple does not round a small removal away; at
    least one block is taken whenever ``fraction`` > 0. With ``remove_branches``, a group that is
    ``removable`` (its channels feed only a residual or gating branch) may also lose its last channels
    (the last block, when its size is a multiple of ``unit``): the branch then goes as a whole.
    Returns a plan in priority order (least sensitive first) for AlignChannelsPass / PruneChannelsPass.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if unit < 1:
        raise ValueError(f"unit must be a positive number of channels, got {unit}")
    ignore = tuple(ignore)
    eligible = [g for g in groups if g.prunable and g.id in scores and not any(
        layer == pre or layer.startswith(pre + ".") for layer in g.layers for pre in ignore)]
    if not eligible:
        return {}
    # blocks of `unit` channels in ascending score order within each group, at most size - min_keep channels;
    # both count a layer's channels, so a group whose classes are wider (attention heads) counts in fewer classes
    blocks = []  # (mean score, group index, channels of the group)
    for gi, g in enumerate(eligible):
        order = torch.argsort(scores[g.id].to(torch.float64), stable=True)
        g_unit = g.unit(unit)
        n_blocks = max(g.size - kept_units(min_keep, g.width), 0) // g_unit
        if remove_branches and g.removable and g.size % g_unit == 0:
            n_blocks = g.size // g_unit
        for b in range(n_blocks):
            chans = order[b * g_unit:(b + 1) * g_unit]
            blocks.append((float(scores[g.id].to(torch.float64)[chans].mean()), gi, chans))
    values = torch.cat([scores[g.id].to(torch.float64) for g in eligible])
    chosen = torch.zeros(len(values), dtype=torch.bool)
    offsets = torch.cumsum(torch.tensor([0] + [g.size for g in eligible[:-1]]), 0).tolist()
    budget, taken = int(fraction * len(values)), 0
    for _, gi, chans in sorted(blocks, key=lambda b: b[0]) if fraction > 0 else ():  # stable: ties keep group order
        if taken and taken + len(chans) > budget:
            break  # at least one block is taken whenever fraction > 0
        chosen[offsets[gi] + chans] = True
        taken += len(chans)
    _keep_every_tensor(eligible, values, chosen, min_keep, remove_branches)
    group_idx = torch.cat([torch.full((g.size,), i, dtype=torch.long) for i, g in enumerate(eligible)])
    chan_idx = torch.cat([torch.arange(g.size) for g in eligible])
    picked = torch.argsort(values, stable=True)
    picked = picked[chosen[picked]]  # least sensitive first
    plan: dict[str, list[int]] = {}
    for gi, ci in zip(group_idx[picked].tolist(), chan_idx[picked].tolist()):
        plan.setdefault(eligible[gi].id, []).append(ci)
    return plan


def _keep_every_tensor(eligible: list[ChannelGroup], values: torch.Tensor, chosen: torch.Tensor, min_keep: int,
                       remove_branches: bool) -> None:
    """Un-choose the most sensitive picks where a tensor would keep fewer than ``min_keep`` channels.

    One group can span tensors of different widths (an option-A residual stream: stage 1 holds
    16 of the stream's 64 channels), so a per-group minimum alone can still empty a tensor. With
    ``remove_branches``, a tensor of a removable group may also lose every channel.
    """
    analysis = eligible[0].analysis
    entry_class = torch.cat([g.classes for g in eligible])
    whole = torch.cat([g.classes for g in eligible if g.removable] + [torch.zeros(0, dtype=torch.long)])
    for key, width in analysis.tensor_widths.items():
        present = torch.tensor(key)
        inside = torch.isin(entry_class, present)
        picked = (inside & chosen).nonzero().flatten()
        if remove_branches and len(picked) == len(present) and bool(torch.isin(present, whole).all()):
            continue  # the whole branch goes
        excess = len(picked) - (len(present) - min(kept_units(min_keep, width), len(present)))
        if excess > 0:  # give back the most sensitive of the picks in this tensor
            chosen[picked[torch.argsort(values[picked], descending=True, stable=True)[:excess]]] = False
