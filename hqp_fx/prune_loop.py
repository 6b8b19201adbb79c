"""The HQP pruning loop: score -> select -> align -> prune -> fine-tune -> validate, with rollback.

Each round removes the least sensitive ``step`` fraction of all prunable channels (globally
ranked), fine-tunes briefly and re-validates. A round whose top-1 drop against the dense
baseline exceeds ``delta_max`` is rolled back and retried with the next smaller step
(5% -> 2% -> 1%); the loop stops when the step would fall below its floor, when a MACs,
parameter or measured-latency target is reached, or when nothing is left to prune. An optional recovery
fine-tune (``recover_fn``, typically longer than a round's) then trains the accepted model once more, the usual
last step of a pruning schedule; it is validated like a round and kept only when top-1 does not fall. Every
round is checkpointed atomically, and ``resume=True`` continues after an interruption with the same decisions
(fine-tuning and scoring are seeded by round, not by wall-clock state); resuming a finished run returns its
result.

A round is composed of the passes, each through a checked ``Pipeline``: SensitivityPass scores, selection picks
(a function: it decides from scores, rolled-back plans and the latency table, and changes no graph),
AlignChannelsPass rounds, then PruneChannelsPass and ChannelDependencyPass give the analysed candidate.
Quantization, export and reporting (the rest of HQP, ``hqp_fx.compress``) come after this loop.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import meta
from .core import HQPError, Pipeline, atomic_write_text
from .count import count_macs, count_params
from .latency import LatencyModel, select_for_latency
from .measure import paired_ratio
from .passes import AlignChannelsPass, ChannelDependencyPass, PruneChannelsPass, SensitivityPass, select_channels
from .passes.sensitivity import CRITERIA, check_flops_normalize
from .serialize import load, save
from .trace import trace
from .train import paired_drop

__all__ = ["PruneLoopConfig", "RoundRecord", "PruneResult", "prune_loop", "step_schedule", "run_fingerprint",
           "paired_latency"]

STATE_FILE = "hqp_state.json"
LATENCY_FILE = "latency_model.json"  # the table a select="latency" run decides with, kept for an exact resume
SELECTIONS = ("channels", "latency")
RETRY_SEED = 100003  # a retried fine-tune's seed offset, past any round number
# a round over delta_max by at most this share of it gets the retries of config.patience: one measured retry in
# ten won back more than half a point (benchmarks/RESULTS.md, "Figures behind constants")
RETRY_WITHIN = 0.5
# rounds whose whole blocks broke delta_max before no further block is removed whole: a second block may pass where
# the first failed (benchmarks/RESULTS.md, "The recovery fills the time budget"), and each try costs a round
DEPTH_TRIES = 2
HITS = "hits"  # the key under which evaluate_fn / guard_fn may return per-image hits, for the drop's error
_clock = time.monotonic  # the time budget's clock (a test replaces it)


def step_schedule(first: float = 0.05) -> tuple[float, ...]:
    """The steps a rollback walks down: ``first``, then 2% and 1% (those not larger than ``first``)."""
    return (first,) + tuple(s for s in (0.02, 0.01) if s < first)


@dataclass(frozen=True)
class PruneLoopConfig:
    delta_max: float = 1.0  # largest allowed top-1 drop (points) against the dense baseline
    steps: tuple[float, ...] = step_schedule()  # fraction of prunable channels per round; shrinks on rollback
    criterion: str = "fisher"
    flops_normalize: bool = False  # taylor / group-fisher: rank by loss change per MAC the channel costs
    align: int = 8
    min_keep: int | None = None  # per group; defaults to ``align``
    remove_branches: bool = False  # a removable group (a residual block's inner channels) may go whole: depth pruning
    # a block removed whole leaves the identity, not x + its last BatchNorm's shift: the add it would leave costs
    # engine time, the fine-tune absorbs the shift (``hqp_fx.branches.droppable``)
    drop_branch_bias: bool = True
    select: str = "channels"  # "channels": the step is a share of channels; "latency": a share of predicted latency
    max_rounds: int = 100
    time_budget: float | None = None  # seconds: no round starts that would end past it (at the mean round's length)
    patience: int = 0  # a round over delta_max (by at most RETRY_WITHIN of it) gets up to this many more fine-tunes
    margin: float = 0.0  # accept a round only when drop + margin * its standard error <= delta_max (needs hits)
    target_macs: float | None = None  # stop once MACs <= this fraction of the baseline
    target_params: float | None = None
    target_latency: float | None = None  # stop once latency_fn(model) <= this fraction of the dense model's
    # an accepted round is timed with the dense model in this many rounds (``paired_latency``), judged on the median
    # of their per-round ratios: after a minute of training one round in five was 18-29% off (benchmarks/RESULTS.md,
    # "The loop's latency ratio"), and the median of five outlasts two such rounds
    latency_rounds: int = 5
    # a round whose ratio reaches target_latency is timed again in this many rounds, and judged on that, before the
    # loop stops (0: not): a spell on a shared VM can make three rounds read a round far past the target that the
    # report's own timing then does not find (benchmarks/RESULTS.md, "A latency table timed in a slow spell")
    latency_confirm_rounds: int = 7
    calib_batches: int | None = 8
    ignore: tuple[str, ...] = ()
    keep_stem: bool = False  # the first conv/linear layer's channels (the stem, and the stream it feeds) stay whole
    seed: int = 0
    metric: str = "top1"  # the key of evaluate_fn's dict that delta_max guards (higher is better, in points)

    def __post_init__(self):
        if self.delta_max < 0:
            raise ValueError(f"delta_max must be >= 0 (a top-1 drop in points), got {self.delta_max}")
        if not self.steps or any(not 0 < s < 1 for s in self.steps) or list(self.steps) != sorted(self.steps, reverse=True):
            raise ValueError(f"steps must be decreasing fractions in (0, 1), e.g. (0.05, 0.02, 0.01); got {self.steps}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        check_flops_normalize(self.criterion, self.flops_normalize)
        for name in ("target_macs", "target_params", "target_latency"):
            v = getattr(self, name)
            if v is not None and not 0 < v < 1:
                raise ValueError(f"{name} is a fraction of the dense model in (0, 1), got {v}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget is in seconds (> 0), got {self.time_budget}")
        if not self.margin >= 0:
            raise ValueError(f"margin counts standard errors of the drop (>= 0), got {self.margin}")
        if self.patience < 0:
            raise ValueError(f"patience is a count of extra fine-tunes (>= 0), got {self.patience}")
        if self.latency_rounds < 1 or self.latency_confirm_rounds < 0:
            raise ValueError(f"latency_rounds must be >= 1 and latency_confirm_rounds >= 0, got {self.latency_rounds} "
                             f"and {self.latency_confirm_rounds}")
        if self.align < 1:
            raise ValueError(f"align must be a positive channel multiple, got {self.align}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"metric names the key of evaluate_fn's result to guard, e.g. 'top1'; got {self.metric!r}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.min_keep is not None and self.min_keep < self.align:
            # alignment may round a removal up by < align channels: a minimum of align keeps every tensor non-empty
            raise ValueError(f"min_keep ({self.min_keep}) must be at least the alignment multiple ({self.align})")


@dataclass
class RoundRecord:
    round: int
    step: float
    accepted: bool
    top1: float  # the value of config.metric (top-1 unless the caller guards another metric, e.g. mAP)
    drop: float
    macs: int
    params: int
    removed: dict[str, int]  # group id -> channels removed this round
    # measured when a latency target is set: the dense model's median round times the candidate's ratio to it,
    # paired over the rounds (``paired_ratio``); latency / reference_latency is that ratio
    latency: float | None = None
    predicted_latency: float | None = None  # the latency model's prediction for the candidate (select="latency")
    reference_latency: float | None = None  # the dense model's median round, timed with the candidate
    retries: int = 0  # extra fine-tunes the candidate had (config.patience) before this verdict
    drops_before: list[float] = field(default_factory=list)  # the drop after each earlier fine-tune, one per retry
    drop_se: float | None = None  # the drop's standard error, paired over the images (when the evaluation has hits)
    latency_rounds_ms: list[float] = field(default_factory=list)  # the candidate's raw time in each timing round
    reference_rounds_ms: list[float] = field(default_factory=list)  # the dense model's, in the same rounds


@dataclass
class PruneResult:
    model: fx.GraphModule
    baseline: dict[str, float]
    final: dict[str, float]
    baseline_macs: int
    baseline_params: int
    history: list[RoundRecord] = field(default_factory=list)
    stop_reason: str = ""
    baseline_latency: float | None = None
    recovery: dict | None = None  # {"top1_before", "top1_after", "kept"} when recover_fn ran
    baseline_hits: list[torch.Tensor] | None = None  # evaluate_fn's per-image hits of the dense model, if it gave any


def _analysed(gm: fx.GraphModule) -> fx.GraphModule:
    ChannelDependencyPass()(gm)
    return gm


def stem_layers(gm: fx.GraphModule) -> tuple[str, ...]:
    """The first convolution or linear layer in execution order: the stem, whose output channels in a residual
    network are the stream every block of its stage adds to. Pruning them thins every block at once, and per MAC
    they rank cheapest: the loss-per-MAC ranking cut ResNet-56's stream to 6/17/48 channels and lost 5.8 points
    more than with the stem kept (benchmarks/RESULTS.md, "Criteria and Torch-Pruning at equal MACs")."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.modules.conv._ConvNd, nn.Linear)):
            return (str(node.target),)
    return ()


def _ignored(gm: fx.GraphModule, config: PruneLoopConfig) -> tuple[str, ...]:
    return config.ignore + (stem_layers(gm) if config.keep_stem else ())


def _floor(gm: fx.GraphModule, min_keep: int, config: PruneLoopConfig, example) -> tuple[int, int]:
    """MACs and params with every eligible group pruned down to ``min_keep`` (or away, with remove_branches):
    the most pruning can do."""
    groups = meta.channel_groups(gm)
    scores = {g.id: torch.arange(g.size, dtype=torch.float64) for g in groups if g.prunable}
    plan = select_channels(groups, scores, 0.999999, min_keep=min_keep, ignore=_ignored(gm, config),
                           remove_branches=config.remove_branches)
    smallest = PruneChannelsPass(plan)(gm).graph_module if plan else gm
    return count_macs(smallest, example), count_params(smallest)


def prune_loop(
    model: nn.Module,
    example_inputs: Any,
    *,
    calibration: Iterable,
    finetune_fn: Callable[[nn.Module, int], Any],
    evaluate_fn: Callable[[nn.Module], dict[str, float]],
    config: PruneLoopConfig = PruneLoopConfig(),
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
    latency_fn: Callable[[nn.Module], float] | None = None,
    recover_fn: Callable[[nn.Module], Any] | None = None,
    fingerprint: dict[str, Any] | None = None,
    leaf_modules: Iterable[type | str] = (),
    latency_model: Callable[[fx.GraphModule], LatencyModel] | None = None,
    loss_fn: Callable = F.cross_entropy,
    guard_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    progress: Callable[[str], None] = lambda msg: None,
) -> PruneResult:
    """Run the HQP pruning loop on a copy of ``model``.

    ``finetune_fn(model, round_index)`` trains in place (seed it by the round for exact resume);
    ``evaluate_fn(model)`` returns at least ``{config.metric: points}`` (``{"top1": percent}`` by default; a
    detector returns e.g. ``{"map": 100 * mAP}``); ``calibration`` yields ``(inputs, targets)`` batches for the
    sensitivity criterion, which scores with ``loss_fn(model(inputs), targets)`` (any task's training loss;
    cross-entropy by default). Records and results keep the guarded metric under the name ``top1``.
    ``latency_fn(model)`` measures what ``config.target_latency`` is a fraction of (any unit, ideally on the
    deployment engine; e.g. ``hqp_fx.compress.onnx_latency``, ms in ONNX Runtime); it is called on the dense model
    and on every accepted candidate, that one together with the dense model again in ``config.latency_rounds``
    rounds (``paired_latency``), and the target is judged on their ratio: timing on a shared machine
    drifts by tens of percent over minutes, so a dense time taken once at the start is no reference an hour later.
    A ratio at or under the target is timed again in ``config.latency_confirm_rounds`` rounds and judged on that.
    ``guard_fn(model)``, when given, judges each candidate and the recovered model instead of ``evaluate_fn``, against
    ``evaluate_fn``'s dense baseline: e.g. the top-1 of the candidate's INT8 model (``compress`` with
    ``guard="int8"``), so that delta_max is spent on what ships and none is left for a hybrid fallback to buy back.
    With ``config.patience`` > 0, a candidate over delta_max by at most half of it (``RETRY_WITHIN``) is fine-tuned
    again (``finetune_fn(model, round_index)`` once more, on the same candidate; a ``finetune_fn`` that wants a fresh
    data order counts its calls per round) and judged again, up to that many times, before it is rolled back.
    When ``evaluate_fn`` and ``guard_fn`` also return per-image top-1 hits under ``"hits"`` (``evaluate``'s
    ``hits``, a list of bool tensors in a fixed image order), each record holds its drop's standard error, paired over
    the images, and ``config.margin`` > 0 accepts a round only when its drop plus that many standard errors is within
    delta_max: a loop that keeps the rounds whose measured drop came out low otherwise spends the budget on noise.
    ``recover_fn(model)`` fine-tunes the final model in place once the rounds stop (not when none was accepted); the
    result replaces it only when its metric is at least the last accepted round's; a dict it returns joins the
    result's ``recovery`` record (and the checkpoint's). ``progress(message)`` hears which whole blocks a
    rolled-back round removed: they stay from then on (below).
    ``leaf_modules`` are kept opaque while tracing (``hqp_fx.trace``). With ``config.time_budget`` (seconds, counted
    from this call: an interrupted run resumed has the budget afresh) no round starts when the rounds so far say it
    would end past the budget; the recovery and whatever the caller does afterwards come on top.

    ``config.select="latency"`` needs ``latency_model(dense graph)`` (e.g. ``LatencyModel.measure``) and
    ``latency_fn``: each round removes the channel blocks of least importance per predicted millisecond until the
    prediction falls by the step (``select_for_latency``); every accepted round is measured too, so each record
    holds the prediction and the measurement. The model is calibrated on the last measurement (the dense model at
    first, then each accepted round's ratio to the dense model timed alongside, on the dense model's first timing's
    scale), so a prediction is that measurement minus what the table says this round's cut saves. With
    ``remove_branches`` whole blocks are items of that knapsack; the blocks a rolled-back round removed whole are
    kept from then on (they may still be thinned) and its step is tried again without them; after ``DEPTH_TRIES``
    such rounds no further block is removed whole. The knapsack takes its cheapest item first whatever the step, so
    a rejected block would otherwise come back at every smaller step.

    With ``checkpoint_dir`` the run records a fingerprint of what decides it: the model's weights, the example
    input's shape, ``config`` (all but ``max_rounds`` and ``time_budget``) and ``fingerprint``, the caller's own
    entries for what the loop cannot see (its data, its fine-tune settings). ``resume`` refuses a run whose
    fingerprint differs, naming the fields; a run without ``resume`` refuses a ``checkpoint_dir`` that already holds
    a run.
    """
    started = _clock()
    by_latency = config.select == "latency"
    if by_latency and (latency_model is None or latency_fn is None):
        raise ValueError("select='latency' needs latency_model (e.g. hqp_fx.latency.LatencyModel.measure) to predict "
                         "and latency_fn to measure (e.g. hqp_fx.compress.onnx_latency(example))")
    measure = config.target_latency is not None or by_latency
    if config.target_latency is not None and latency_fn is None:
        raise ValueError("target_latency needs latency_fn: pass a callable that measures a model's latency "
                         "(e.g. hqp_fx.compress.onnx_latency(example))")
    min_keep = config.min_keep if config.min_keep is not None else config.align
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    identity = run_fingerprint(model, example_inputs, config, fingerprint) if ckpt is not None else None
    state = _read_state(ckpt) if resume else None
    if resume and state is None:
        raise FileNotFoundError(f"resume=True but {ckpt}/{STATE_FILE} does not exist; run once without resume first")
    if state is not None:
        _check_same_run(ckpt, state, identity)
    elif ckpt is not None and (ckpt / STATE_FILE).exists():
        raise HQPError(f"{ckpt} holds the checkpoints of an earlier run; pass resume=True (hqp compress --resume) "
                       "to continue it, or remove the folder to start over")

    if state is None:
        current = _analysed(trace(model, example_inputs, leaf_modules=leaf_modules))
        dense = current  # the reference every accepted round is timed against
        example = meta.example_inputs(current)
        baseline, base_hits = _evaluate(evaluate_fn, current, config.metric, config.margin)
        base_macs, base_params = count_macs(current, example), count_params(current)
        _check_targets(current, config, min_keep, example, base_macs, base_params)
        base_latency = latency_fn(current) if measure else None
        engine = None
        if by_latency:
            engine = latency_model(current)
            if ckpt is not None:
                ckpt.mkdir(parents=True, exist_ok=True)
                atomic_write_text(ckpt / LATENCY_FILE, engine.to_json())
        history: list[RoundRecord] = []
        step_index, next_round, rejected = 0, 0, None
        kept_whole: list[str] = []
        depth_failures = 0
    else:
        current = _analysed(load(_checkpoint_file(ckpt, state["model"]), leaf_modules=dict(model.named_modules())))
        dense = trace(model, example_inputs, leaf_modules=leaf_modules)
        example = meta.example_inputs(current)
        baseline, base_macs, base_params = state["baseline"], state["baseline_macs"], state["baseline_params"]
        base_latency = state.get("baseline_latency")
        history = state["history"]
        step_index, next_round, rejected = state["step_index"], state["next_round"], state.get("rejected_plan")
        kept_whole = list(state.get("kept_whole", []))
        depth_failures = int(state.get("depth_failures", 0))
        # the dense model's hits are not checkpointed: its evaluation is deterministic, so it is run again
        base_hits = _evaluate(evaluate_fn, dense, config.metric, config.margin)[1]
        if "stop_reason" in state:  # the rounds had finished: resuming returns that result
            next_round = config.max_rounds
        engine = None
        if by_latency:
            if not (ckpt / LATENCY_FILE).is_file():
                raise HQPError(f"{ckpt / LATENCY_FILE} is missing: the run's latency model cannot be restored; remove "
                               f"{ckpt} to start over")
            engine = LatencyModel.from_json((ckpt / LATENCY_FILE).read_text())

    current_macs, current_params = count_macs(current, example), count_params(current)
    ignore = _ignored(current, config)
    accepted_top1 = next((r.top1 for r in reversed(history) if r.accepted), baseline[config.metric])
    last = next((r for r in reversed(history) if r.accepted), None)
    current_latency = last.latency if last is not None else base_latency
    ratio = 1.0 if last is None or last.latency is None else last.latency / (last.reference_latency or base_latency)
    if engine is not None:
        engine.calibrate(current, ratio * base_latency)
    stop = state.get("stop_reason", "") if state else ""
    round_seconds: list[float] = []  # this call's rounds that trained, for the time budget
    for rnd in range(next_round, config.max_rounds):
        if config.target_macs is not None and current_macs <= config.target_macs * base_macs:
            stop = f"MACs target reached ({current_macs / base_macs:.3f} of dense <= {config.target_macs})"
            break
        if config.target_params is not None and current_params <= config.target_params * base_params:
            stop = f"params target reached ({current_params / base_params:.3f} of dense <= {config.target_params})"
            break
        if config.target_latency is not None and ratio <= config.target_latency:
            stop = (f"latency target reached ({ratio:.3f} of dense <= {config.target_latency}, timed in "
                    f"{config.latency_confirm_rounds or config.latency_rounds} round(s) with the dense model)")
            break
        elapsed = _clock() - started
        expected = statistics.fmean(round_seconds) if round_seconds else 0.0
        if config.time_budget is not None and elapsed + expected > config.time_budget:
            stop = (f"time budget reached ({elapsed / 60:.1f} of {config.time_budget / 60:g} min used"
                    + (f"; a round takes about {expected / 60:.1f} min" if round_seconds else "") + ")")
            break
        round_start = _clock()
        step = config.steps[step_index]
        torch.manual_seed(config.seed * 1000 + rnd)
        scoring = SensitivityPass(config.criterion, calibration, num_batches=config.calib_batches,
                                  flops_normalize=config.flops_normalize, seed=config.seed * 1000 + rnd,
                                  loss_fn=loss_fn)
        Pipeline([scoring], available=tuple(current.meta))(current)
        scores = current.meta[meta.SENSITIVITY]["scores"]
        if by_latency:
            plan = select_for_latency(current, scores, engine, step, align=config.align, min_keep=min_keep,
                                      ignore=ignore,
                                      remove_branches=config.remove_branches and depth_failures < DEPTH_TRIES,
                                      keep_whole=frozenset(kept_whole))
        else:
            plan = select_channels(meta.channel_groups(current), scores, step, min_keep=min_keep, unit=config.align,
                                   ignore=ignore, remove_branches=config.remove_branches)
        Pipeline([AlignChannelsPass(plan, config.align, scores)], available=tuple(current.meta))(current)
        aligned = current.meta[meta.ALIGN]["plan"]
        sizes = {g.id: g.size for g in meta.channel_groups(current)} if by_latency else {}
        whole = [k for k, v in aligned.items() if by_latency and len(v) == sizes[k]]  # depth items of the knapsack
        if not aligned or _same_plan(aligned, rejected):  # alignment can round a smaller step to the same plan
            if step_index + 1 < len(config.steps):
                step_index += 1
                continue
            stop = ("nothing left to prune at the smallest step (every group at its minimum or alignment floor)"
                    if not aligned else f"round {history[-1].round} broke delta_max and every smaller step aligns to "
                    "the same plan; rolled back")
            break
        # the aligned plan is pruned and the result analysed at once: fine-tuning changes weights, not structure
        candidate = Pipeline([PruneChannelsPass(drop_branch_bias=config.drop_branch_bias), ChannelDependencyPass()],
                             available=tuple(current.meta))(current).graph_module
        drops_before: list[float] = []
        for retries in range(config.patience + 1):
            torch.manual_seed(config.seed * 1000 + rnd + RETRY_SEED * retries)
            finetune_fn(candidate, rnd)
            stats, hits = _evaluate(guard_fn or evaluate_fn, candidate, config.metric, config.margin)
            value = stats[config.metric]
            drop = baseline[config.metric] - value
            drop_se = paired_drop(base_hits, hits)[1] if base_hits is not None and hits is not None else None
            judged = drop + config.margin * (drop_se or 0.0)
            # a cut just over the budget may be a fine-tune short of it, and a round's cut costs a whole round to
            # find again; one further over it is not retried: few measured retries won back half a point
            if retries == config.patience or not config.delta_max < judged <= (1 + RETRY_WITHIN) * config.delta_max:
                break
            drops_before.append(drop)  # kept so the retry gate can be judged from a run's records
        accepted = judged <= config.delta_max
        reference_ms, candidate_ms = (paired_latency(latency_fn, dense, candidate, config.latency_rounds)
                                      if measure and accepted else ([], []))
        paired = paired_ratio(candidate_ms, reference_ms) if reference_ms else None
        if (paired is not None and config.latency_confirm_rounds and config.target_latency is not None
                and paired <= config.target_latency):
            # the ratio would stop the loop: one spell that slows the dense model's timings must not do so
            reference_ms, candidate_ms = paired_latency(latency_fn, dense, candidate, config.latency_confirm_rounds)
            paired = paired_ratio(candidate_ms, reference_ms)
        reference = statistics.median(reference_ms) if reference_ms else None
        record = RoundRecord(rnd, step, accepted, value, drop, count_macs(candidate, example),
                             count_params(candidate), {k: len(v) for k, v in aligned.items()},
                             reference * paired if paired is not None else None,
                             engine.predict(current, aligned) if engine is not None else None, reference, retries,
                             drops_before, drop_se, candidate_ms, reference_ms)
        history.append(record)
        round_seconds.append(_clock() - round_start)
        rejected = None if accepted or whole else {k: sorted(v) for k, v in aligned.items()}
        if accepted:
            current = candidate
            current_macs, current_params, accepted_top1 = record.macs, record.params, record.top1
            current_latency = record.latency
            ratio = record.latency / record.reference_latency if measure else ratio
            if engine is not None:
                # each prediction starts from the last measurement (NetAdapt's measure-and-correct): the table then
                # only has to get one round's cut right, and on the dense start's scale the VM's drift cancels
                engine.calibrate(current, ratio * base_latency)
        elif whole:  # the blocks were the cut's largest items: its step is tried again without them
            kept_whole += whole
            depth_failures += 1
        elif step_index + 1 < len(config.steps):
            step_index += 1
        else:
            stop = f"round {rnd} broke delta_max ({drop:.2f} > {config.delta_max}) at the smallest step; rolled back"
        if ckpt is not None:
            _write_state(ckpt, identity, current, baseline, base_macs, base_params, base_latency, history, step_index,
                         rnd + 1, rejected_plan=rejected, kept_whole=kept_whole, depth_failures=depth_failures,
                         **({"stop_reason": stop} if stop else {}))  # a stop here is not re-derived on resume
        if on_round is not None:
            on_round(record)
        if whole and not accepted:  # after the round's own line
            progress(f"round {rnd}: the block(s) it removed whole ({', '.join(whole)}) stay from now on; step "
                     f"{step:g} is tried again without them" + (", and no further block is removed whole"
                                                              if depth_failures >= DEPTH_TRIES else ""))
        if stop:
            break
    else:
        stop = stop or f"max_rounds ({config.max_rounds}) reached"
    recovery = state.get("recovery") if state else None
    if recovery is not None and recovery["kept"]:  # resumed after the recovery: its model is the loaded one
        accepted_top1 = recovery["top1_after"]
    elif recover_fn is not None and recovery is None and any(r.accepted for r in history):
        candidate = copy.deepcopy(current)
        torch.manual_seed(config.seed * 1000 + history[-1].round + 1)  # the seed of the round it stands in for
        told = recover_fn(candidate)
        top1 = _evaluate(guard_fn or evaluate_fn, candidate, config.metric, config.margin)[0][config.metric]
        recovery = {"top1_before": accepted_top1, "top1_after": top1, "kept": top1 >= accepted_top1,
                    **(told if isinstance(told, dict) else {})}  # e.g. the epochs it chose: kept for a resume
        if recovery["kept"]:
            current, accepted_top1 = _analysed(candidate), top1
    if ckpt is not None:  # the finished state: a later resume returns this result without training again
        _write_state(ckpt, identity, current, baseline, base_macs, base_params, base_latency, history, step_index,
                     history[-1].round + 1 if history else 0, rejected_plan=rejected, kept_whole=kept_whole,
                     depth_failures=depth_failures, stop_reason=stop, recovery=recovery)
    final = {config.metric: accepted_top1}
    return PruneResult(current, baseline, final, base_macs, base_params, history, stop, base_latency, recovery,
                       base_hits)


def paired_latency(latency_fn: Callable[[nn.Module], float], reference: nn.Module, candidate: nn.Module,
                   rounds: int) -> tuple[list[float], list[float]]:
    """Both models timed in each of ``rounds`` rounds: (the reference's ms per round, the candidate's). A slow
    spell of the machine then falls on both rather than on one (a dense ResNet-56 timed once at a run's start was
    20% slower than in the report an hour later, and the loop stopped at a ratio it had not reached); judge them
    with ``paired_ratio``. ``latency_fn.paired(reference, candidate, rounds)``, when it has one, returns the same
    without preparing each model once per round (``onnx_latency``'s times the two run by run in each round);
    otherwise the rounds alternate between the two."""
    if hasattr(latency_fn, "paired"):
        return latency_fn.paired(reference, candidate, rounds)
    times = [(latency_fn(reference), latency_fn(candidate)) for _ in range(rounds)]
    return [t[0] for t in times], [t[1] for t in times]


def _evaluate(evaluate_fn: Callable[[nn.Module], dict], model: nn.Module, metric: str,
              margin: float = 0.0) -> tuple[dict, list | None]:
    """(the evaluation's figures, its per-image hits or None): the hits are kept out of records and checkpoints."""
    stats = evaluate_fn(model)
    if not isinstance(stats, dict) or not isinstance(stats.get(metric), (int, float)):
        got = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        raise HQPError(f"evaluate_fn must return a dict with the guarded metric {metric!r} as a number (got {got}); "
                       f"return it, or set PruneLoopConfig(metric=...) to the key it does return")
    stats = dict(stats)
    hits = stats.pop(HITS, None)
    if margin and hits is None:
        raise HQPError(f"margin={margin:g} needs the drop's standard error: evaluate_fn (and guard_fn) must also "
                       f"return per-image top-1 hits under {HITS!r} (hqp_fx.train.evaluate(..., hits=[])), or set "
                       "margin=0")
    return stats, hits


def _check_targets(gm, config: PruneLoopConfig, min_keep: int, example, base_macs: int, base_params: int) -> None:
    if config.target_macs is None and config.target_params is None:
        return
    floor_macs, floor_params = _floor(gm, min_keep, config, example)
    also = " (removing every removable branch)" if config.remove_branches else ""
    if config.target_macs is not None and floor_macs > config.target_macs * base_macs:
        raise ValueError(f"target_macs={config.target_macs} is unreachable: keeping {min_keep} channels per group{also} "
                         f"leaves at least {floor_macs / base_macs:.3f} of the dense MACs; lower min_keep/align or raise the target")
    if config.target_params is not None and floor_params > config.target_params * base_params:
        raise ValueError(f"target_params={config.target_params} is unreachable: keeping {min_keep} channels per group{also} "
                         f"leaves at least {floor_params / base_params:.3f} of the dense params; lower min_keep/align or raise the target")


def _same_plan(plan: dict[str, list[int]], rejected: dict[str, list[int]] | None) -> bool:
    return rejected is not None and {k: sorted(v) for k, v in plan.items()} == rejected


def _weights_digest(model: nn.Module) -> str:
    """sha256 over every state-dict entry's name, dtype, shape and bytes: the same architecture and weights."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_fingerprint(model: nn.Module, example_inputs: Any, config: PruneLoopConfig,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What decides a pruning run, as JSON values: a resume must see the same (``max_rounds`` and ``time_budget``
    may change)."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    entries = {"model weights": _weights_digest(model),
               "example input shape": [list(getattr(t, "shape", ())) for t in inputs],
               **{f"config.{k}": v for k, v in asdict(config).items() if k not in ("max_rounds", "time_budget")},
               **(extra or {})}
    return json.loads(json.dumps(entries, default=str))


def _check_same_run(ckpt: Path, state: dict, identity: dict | None) -> None:
    saved = state.get("fingerprint")
    if not isinstance(saved, dict):
        raise HQPError(f"{ckpt / STATE_FILE} records no run fingerprint (written by an older hqp_fx), so this "
                       "cannot be checked to be the same run; remove the folder to start over")
    differ = sorted(k for k in set(saved) | set(identity or {}) if saved.get(k) != (identity or {}).get(k))
    if differ:
        def show(v):
            text = json.dumps(v)
            return text if len(text) <= 40 else text[:16] + "…"
        detail = "; ".join(f"{k}: {show(saved.get(k))} then, {show((identity or {}).get(k))} now" for k in differ[:6])
        raise HQPError(f"refusing to resume: this run differs from the one checkpointed in {ckpt} ({detail}); "
                       "rerun with the interrupted run's model, weights, data and settings, or remove the folder "
                       "to start over")


_BARE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.hqp$")


def _checkpoint_file(ckpt: Path, name: Any) -> Path:
    """A state file names its model by bare file name inside the checkpoint folder; nothing else is opened."""
    if not isinstance(name, str) or not _BARE_NAME.match(name) or ".." in name:
        raise HQPError(f"{ckpt / STATE_FILE} names the checkpoint {name!r}; a state file may only name a .hqp file "
                       f"inside {ckpt} by its bare name. The file was not written by hqp_fx: remove the folder")
    return ckpt / name


def _read_state(ckpt: Path | None) -> dict | None:
    if ckpt is None or not (ckpt / STATE_FILE).is_file():
        return None
    path = ckpt / STATE_FILE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        for key, kind in (("model", str), ("baseline", dict), ("baseline_macs", int), ("baseline_params", int),
                          ("history", list), ("step_index", int), ("next_round", int)):
            if not isinstance(state.get(key), kind):
                raise ValueError(f"field {key!r} is missing or not a {kind.__name__}")
        state["history"] = [RoundRecord(**r) for r in state["history"]]  # a damaged record fails here
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise HQPError(f"{path} is damaged ({exc}); remove {ckpt} to start over") from None
    return state


def _write_state(ckpt: Path, identity, model, baseline, base_macs, base_params, base_latency, history, step_index,
                 next_round, **finished) -> None:
    """Model file first, then the state that points at it: a kill between the two loses nothing. ``finished``
    (stop_reason, recovery) marks a run whose rounds are over; its model is the final one."""
    ckpt.mkdir(parents=True, exist_ok=True)
    name = f"round_{next_round - 1:03d}.hqp"
    if "stop_reason" in finished:  # a recovered model gets its own file: the state before it may still point
        # at final.hqp
        name = "recovered.hqp" if (finished.get("recovery") or {}).get("kept") else "final.hqp"
    save(model, ckpt / name)
    state = {"model": name, "fingerprint": identity, "baseline": baseline, "baseline_macs": base_macs,
             "baseline_params": base_params, "baseline_latency": base_latency, "history": [asdict(r) for r in history],
             "step_index": step_index, "next_round": next_round, **finished}
    atomic_write_text(ckpt / STATE_FILE, json.dumps(state, indent=1, allow_nan=False))
