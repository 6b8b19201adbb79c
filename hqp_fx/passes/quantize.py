"""INT8 post-training quantization: calibration, range checks, the hybrid FP fallback, and ``QuantizePass``.

Data flow: ``torch.export`` (dynamic batch where the model allows it) → torchao's ``prepare_pt2e`` with one of
hqp_fx's presets (``hqp_fx.quantizers``; BN is folded into the convs there) → calibrate on real batches → range checks →
``convert_pt2e``. The result is a GraphModule with explicit quantize/dequantize ops that
``hqp_fx.lower_onnx.export_onnx`` lowers to Q/DQ ONNX.

torch.ao's ``quantize_fx`` is not used: it is deprecated and its reference graphs do not export to ONNX.

Layers are named after the module that owns the weight (``layer1.0.conv1``), so names match the user's model.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.passes.infra.pass_base import PassResult
from torch.ao.quantization.fx import utils as torch_ao_fx_utils
from torchao import utils as torchao_utils
from torchao.quantization.pt2e.observer import ObserverBase
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from .. import meta
from ..branches import constants_in_full
from ..core import GraphPass, HQPError
from ..quantizers import (ANNOTATION, QUANTIZERS, WEIGHTED, MSEObserver, PercentileObserver, cpu_lacks_vnni,
                          is_call, layer_name)

__all__ = ["QuantConfig", "QuantizeError", "QuantizeResult", "QuantizePass", "quantize", "layer_sensitivity",
           "PercentileObserver", "MSEObserver", "BACKENDS", "CALIBRATIONS", "sqnr_db", "take_samples",
           "hybrid_quantize"]

BACKENDS = ("tensorrt", "onnxruntime", "x86-inductor")
CALIBRATIONS = ("minmax", "histogram", "percentile")  # histogram = MSE-optimal clipping on a histogram

class QuantizeError(HQPError):
    """Quantization cannot produce a trustworthy model; the message names the layer and the fix."""


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    ``on_bad_range``: ``"error"`` stops when a layer saw NaN/Inf, no data, or a collapsed (constant) range during
    calibration; ``"fallback"`` keeps such layers in floating point and reports them. ``keep_float`` names
    layers the user wants left in floating point.
    """

    backend: str = "tensorrt"
    calibration: str = "histogram"
    percentile: float = 99.99
    num_samples: int = 256
    on_bad_range: str = "error"
    keep_float: tuple[str, ...] = ()
    reduce_range: bool | None = None  # 7-bit weights for CPU presets; None = on for x86 CPUs without VNNI

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {self.calibration!r}; choose one of {', '.join(CALIBRATIONS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.on_bad_range not in ("error", "fallback"):
            raise ValueError(f"on_bad_range must be 'error' or 'fallback', got {self.on_bad_range!r}")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        if self.reduce_range is None:
            object.__setattr__(self, "reduce_range", self.backend != "tensorrt" and cpu_lacks_vnni())


@dataclass
class QuantizeResult:
    """The converted model and what happened to every weighted layer."""

    model: fx.GraphModule
    config: QuantConfig
    quantized_layers: tuple[str, ...]
    float_layers: dict[str, str]  # layer -> why it stayed in floating point
    output_sqnr_db: float  # INT8 vs FP32 model output on the calibration samples
    samples: int
    sensitivity: dict[str, float] = field(default_factory=dict)  # layer -> output SQNR (dB) when only it is INT8
    budget: str = ""  # hybrid fallback: whether the accuracy/SQNR budget was met, and how

    def report(self) -> dict:
        return {"backend": self.config.backend, "calibration": self.config.calibration, "samples": self.samples,
                "weight_range": "-63..63 (reduce_range)" if self.config.reduce_range and self.config.backend != "tensorrt"
                else "-127..127",
                "output_sqnr_db": round(self.output_sqnr_db, 2), "quantized_layers": list(self.quantized_layers),
                "float_layers": dict(self.float_layers),
                "sensitivity_sqnr_db": {k: round(v, 2) for k, v in self.sensitivity.items()}, "budget": self.budget}


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    noise = (reference.double() - approx.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def _first_tensor(batch):
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise QuantizeError(f"calibration batches must be tensors or (tensor, label) pairs, got {type(x).__name__}")
    return x


def take_samples(calibration: Iterable, num_samples: int) -> list[torch.Tensor]:
    """Up to ``num_samples`` calibration samples as batches; NaN/Inf inputs are refused (they void every range)."""
    batches, seen = [], 0
    for i, batch in enumerate(calibration):
        x = _first_tensor(batch).detach().float().cpu()
        if not torch.isfinite(x).all():
            raise QuantizeError(f"calibration batch {i} contains NaN or Inf values; clean the data "
                                "(a broken image or a failed normalisation) before calibrating")
        batches.append(x[: num_samples - seen])
        seen += len(batches[-1])
        if seen >= num_samples:
            break
    if not batches:
        raise QuantizeError("the calibration data is empty; pass a loader with at least one batch")
    return batches


def export_for_quantization(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], *,
                            strict: bool = False) -> fx.GraphModule:
    """``torch.export`` with a dynamic batch where the model allows it (static, as given, otherwise).

    The batch-2 probe matters: torch.export specialises a dimension whose example size is 1. ``strict``
    (TorchDynamo capture) records a ``source_fn_stack`` per call; with it one nn.ReLU module called twice
    (torchvision's ResNet blocks) yields two ops instead of one two-output partition, which torchao's
    X86InductorQuantizer needs. When strict capture fails the non-strict export is used.
    """
    model = model.eval()
    if strict:
        try:
            return _export(model, example_inputs, strict=True)
        except Exception:  # dynamo refuses more models than non-strict tracing; those go the non-strict way
            pass
    try:
        return _export(model, example_inputs, strict=False)
    except Exception as exc:  # torch.export raises many types; all mean "not exportable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizeError(f"torch.export cannot capture {type(model).__name__}: {first}. pt2e quantization "
                            "needs an exportable model; remove data-dependent Python control flow from forward "
                            "or quantize a submodule") from exc


def _exported_copy(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
                   config: QuantConfig) -> fx.GraphModule:
    """``export_for_quantization`` of a copy of ``model`` (never modified), its stored constants at their ops' full
    shape (``constants_in_full``: ORT's int8 add), as ``quantize`` and ``layer_sensitivity`` both need it."""
    lowered = constants_in_full(model, example_inputs)  # already a copy when it expands anything
    return export_for_quantization(lowered if lowered is not model else copy.deepcopy(model), example_inputs,
                                   strict=config.backend == "x86-inductor")


def _export(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], strict: bool) -> fx.GraphModule:
    dynamic = tuple({0: torch.export.Dim.AUTO} for _ in example_inputs)
    probe = tuple(torch.cat([x, x]) for x in example_inputs)
    try:
        exported = torch.export.export(model, probe, dynamic_shapes=dynamic, strict=strict).module()
        if _static_batch(exported) is None:
            return exported
    except Exception:  # a forward that pins the batch (x.view(2, -1)) fails here rather than specialising
        pass
    return torch.export.export(model, tuple(example_inputs), strict=strict).module()


def _run_batches(model, batches: list[torch.Tensor], static_batch: int | None) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for x in batches:
            pieces = x.split(static_batch) if static_batch else (x,)
            outs.extend(model(p) for p in pieces if static_batch is None or len(p) == static_batch)
    return outs


def _static_batch(exported: fx.GraphModule) -> int | None:
    """The batch size an export was specialised to, or None when the batch dimension is dynamic."""
    for node in exported.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if val is not None and isinstance(val.shape[0], int):
                return val.shape[0]
            return None
    return None


def _observer_problems(prepared: fx.GraphModule, nonfinite: dict[str, int], layers: dict[str, str]) -> dict[str, str]:
    """Layers (or other quantized ops, by node name) whose calibration ranges cannot be trusted -> the reason."""
    problems = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not isinstance(prepared.get_submodule(node.target), ObserverBase):
            continue
        obs = prepared.get_submodule(node.target)
        lo, hi = getattr(obs, "min_val", None), getattr(obs, "max_val", None)
        if lo is None or lo.numel() == 0:
            continue
        is_weight = getattr(node.args[0], "op", None) == "get_attr"
        if nonfinite.get(node.target, 0):
            reason = f"saw {nonfinite[node.target]} NaN/Inf values during calibration"
        elif not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            reason = "never saw calibration data" if (lo == math.inf).any() else "has a non-finite range"
        elif not is_weight and (hi - lo).max().item() == 0:
            reason = f"has a collapsed range (every value was {lo.max().item():g})"
        else:
            continue
        consumers = [u for u in node.users if u.op == "call_function"]
        producer = node.args[0] if isinstance(node.args[0], fx.Node) else None
        for n in consumers + ([producer] if producer is not None and producer.op == "call_function" else []):
            if n.target in WEIGHTED or n.meta.get(ANNOTATION) is not None:
                problems.setdefault(layers.get(n.name, n.name), f"{'weight' if is_weight else 'activation'} observer "
                                                    f"{node.target} {reason}")
    return problems


def _quantize_once(exported: fx.GraphModule, config: QuantConfig, batches: list[torch.Tensor],
                   skip: Iterable[str], only: str | None = None) -> tuple[fx.GraphModule | None, dict[str, str]]:
    """prepare → calibrate → range check → convert on a copy of ``exported`` (no model when a range is bad)."""
    quantizer = QUANTIZERS[config.backend](config, skip=skip, only=only)
    prepared = prepare_pt2e(copy.deepcopy(exported), quantizer)
    nonfinite: dict[str, int] = {}
    hooks = []
    for name, mod in prepared.named_modules(remove_duplicate=False):
        if isinstance(mod, ObserverBase):
            def count(_mod, args, _name=name):  # counted, then hidden from the observer: a histogram observer
                bad = int((~torch.isfinite(args[0])).sum())  # fails inside torch.histc on NaN, and the range check
                if bad:                                     # below reports the layer for every calibrator alike
                    nonfinite[_name] = nonfinite.get(_name, 0) + bad
                    return (torch.nan_to_num(args[0], nan=0.0, posinf=0.0, neginf=0.0), *args[1:])
            hooks.append(mod.register_forward_pre_hook(count))
    _run_batches(prepared, batches, _static_batch(exported))
    for h in hooks:
        h.remove()
    problems = _observer_problems(prepared, nonfinite, _weighted_layers(exported))
    converted = None if problems else convert_pt2e(prepared)
    _release_device_caches()
    return converted, problems


def _release_device_caches() -> None:
    """torchao (0.18) and torch.ao memoise ``(_)assert_and_get_unique_device`` with an unbounded ``functools.cache``
    keyed by the module, so every model prepare/convert saw stays alive: about 3.5 GraphModules per ``quantize``
    call, gigabytes over a pruning loop that quantizes each round or over a model zoo. The cache only spares a walk
    over the parameters."""
    for cached in (getattr(torchao_utils, "_assert_and_get_unique_device", None),
                   getattr(torch_ao_fx_utils, "assert_and_get_unique_device", None)):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def _weighted_layers(exported: fx.GraphModule) -> dict[str, str]:
    """Node name -> layer name of every weighted op; node names survive prepare/convert, weight names do not."""
    return {n.name: layer_name(n) for n in exported.graph.nodes if is_call(n, WEIGHTED)}


def _quantized_layers(converted: fx.GraphModule, layers: dict[str, str]) -> tuple[str, ...]:
    """Weighted layers whose weight reaches them through a dequantize op, read off the converted graph."""
    return tuple(layers[n.name] for n in converted.graph.nodes
                 if n.name in layers and is_call(n, WEIGHTED) and isinstance(n.args[1], fx.Node)
                 and "dequantize" in str(n.args[1].target))


def quantize(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...] | torch.Tensor, calibration: Iterable,
             config: QuantConfig = QuantConfig()) -> QuantizeResult:
    """Quantize a float model (never modified) with ``config``; see QuantConfig for the bad-range policy."""
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    batches = take_samples(calibration, config.num_samples)
    exported = _exported_copy(model, example_inputs, config)
    layers = _weighted_layers(exported)
    known = set(layers.values())
    unknown = sorted(set(config.keep_float) - known)
    if unknown:
        raise QuantizeError(f"keep_float names layers the model does not have: {unknown}; "
                            f"weighted layers are e.g. {sorted(known)[:5]}")
    float_layers = {name: "kept in floating point by the user" for name in config.keep_float}
    while True:
        converted, problems = _quantize_once(exported, config, batches, float_layers)
        if not problems:
            break
        if config.on_bad_range == "error":
            listed = "; ".join(f"{k}: {v}" for k, v in sorted(problems.items()))
            raise QuantizeError(f"calibration ranges are not usable — {listed}. Fix the model/data, or pass "
                                "on_bad_range='fallback' (CLI: --on-bad-range fallback) to keep these layers in "
                                "floating point")
        new = {k: f"fallback: {v}" for k, v in problems.items() if k not in float_layers}
        if not new:
            raise QuantizeError(f"ranges stay unusable after falling back {sorted(float_layers)}: {problems}")
        float_layers.update(new)
    return QuantizeResult(converted, config, _quantized_layers(converted, layers), float_layers,
                          _output_sqnr(exported, converted, batches), sum(len(b) for b in batches))


def _output_sqnr(reference: fx.GraphModule, quantized: fx.GraphModule, batches: list[torch.Tensor]) -> float:
    """SQNR over every float tensor the model returns (detectors and segmenters return tuples and dicts)."""
    static = _static_batch(reference)

    def flat(model) -> torch.Tensor:
        return torch.cat([t.flatten() for out in _run_batches(model, batches, static)
                          for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()])
    return sqnr_db(flat(reference), flat(quantized))


def layer_sensitivity(model: torch.nn.Module, example_inputs, calibration: Iterable,
                      config: QuantConfig = QuantConfig()) -> dict[str, float]:
    """Output SQNR (dB) with only one weighted layer quantized, for every weighted layer (lower = more sensitive)."""
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    batches = take_samples(calibration, config.num_samples)
    exported = _exported_copy(model, example_inputs, config)
    result = {}
    for name in _weighted_layers(exported).values():
        converted, problems = _quantize_once(exported, config, batches, skip=(), only=name)
        result[name] = _output_sqnr(exported, converted, batches) if converted is not None else -math.inf
    return result


def hybrid_quantize(model: torch.nn.Module, example_inputs, calibration: Iterable, config: QuantConfig = QuantConfig(),
                    *, sqnr_floor_db: float | None = None, evaluate: Callable[[torch.nn.Module], float] | None = None,
                    max_drop: float | None = None, max_float_layers: int | None = None) -> QuantizeResult:
    """Keep the most sensitive layers in floating point until the budget holds.

    The budget is an output SQNR floor (``sqnr_floor_db``) or an accuracy budget (``evaluate`` returns a metric,
    higher is better; ``max_drop`` is the allowed drop from the float model). Layers are ranked by
    ``layer_sensitivity``; the fewest most-sensitive layers that meet the budget stay in floating point. When even
    ``max_float_layers`` do not meet the budget that attempt is returned and its ``budget`` says so.
    """
    if (sqnr_floor_db is None) == (evaluate is None):
        raise ValueError("give exactly one budget: sqnr_floor_db, or evaluate together with max_drop")
    if evaluate is not None and (max_drop is None or max_drop < 0):
        raise ValueError(f"max_drop must be a non-negative number when evaluate is given, got {max_drop}")
    batches = take_samples(calibration, config.num_samples)
    float_metric = evaluate(model) if evaluate is not None else None

    def holds(result: QuantizeResult) -> tuple[bool, str]:
        if sqnr_floor_db is not None:
            why = f"output SQNR {result.output_sqnr_db:.1f} dB (floor {sqnr_floor_db} dB)"
            return result.output_sqnr_db >= sqnr_floor_db, why
        score = evaluate(result.model)
        why = f"metric {score:.3f} vs float {float_metric:.3f} (allowed drop {max_drop})"
        return float_metric - score <= max_drop, why

    plain = quantize(model, example_inputs, batches, config)
    ok, why = holds(plain)
    plain.budget = f"{'met' if ok else 'NOT met'}: {why} with 0 layer(s) in floating point"
    if ok:  # the per-layer sensitivity scan costs one quantization per layer: only pay it when needed
        return plain
    sensitivity = layer_sensitivity(model, example_inputs, batches, config)
    plain.sensitivity = sensitivity
    ranked = sorted((k for k in sensitivity if k not in config.keep_float), key=sensitivity.get)
    limit = len(ranked) if max_float_layers is None else min(max_float_layers, len(ranked))
    tried: dict[int, tuple[QuantizeResult, bool]] = {0: (plain, False)}

    def attempt(k: int) -> bool:
        if k not in tried:
            result = quantize(model, example_inputs, batches,
                              replace(config, keep_float=config.keep_float + tuple(ranked[:k])))
            ok, why = holds(result)
            for rank, name in enumerate(ranked[:k]):
                result.float_layers[name] = (f"hybrid fallback: sensitivity rank {rank + 1} (output SQNR "
                                             f"{sensitivity[name]:.1f} dB when only it is INT8)")
            result.sensitivity = sensitivity
            result.budget = f"{'met' if ok else 'NOT met'}: {why} with {k} layer(s) in floating point"
            tried[k] = (result, ok)
        return tried[k][1]

    # Galloping then bisection over k (the number of most-sensitive layers in FP): O(log n) quantizations,
    # exact for a budget that only improves as layers move to FP, which holds up to calibration noise.
    fail, k = -1, 0
    while not attempt(k):
        fail = k
        if k == limit:
            return tried[k][0]
        k = min(limit, max(1, 2 * k))
    ok_k = k
    while ok_k - fail > 1:
        mid = (fail + ok_k) // 2
        if attempt(mid):
            ok_k = mid
        else:
            fail = mid
    return tried[ok_k][0]


class QuantizePass(GraphPass):
    """The quantization stage as a pass: GraphModule in, converted Q/DQ GraphModule out.

    ``gm.meta['hqp.quantization']`` of the output holds ``QuantizeResult.report()``.
    """

    required_meta = (meta.EXAMPLE_INPUTS,)
    provided_meta = (meta.QUANTIZATION, meta.EXAMPLE_INPUTS)
    invalidated_meta = (meta.CHANNEL_GROUPS, meta.CHANNEL_ANALYSIS, meta.ALIGN, meta.SENSITIVITY, meta.PRUNE_PLAN,
                        meta.SOURCE_NAMES)  # an exported ATen graph: no fx-level analysis survives

    def __init__(self, calibration: Iterable, config: QuantConfig = QuantConfig()):
        super().__init__()
        self.calibration, self.config = calibration, config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        example = meta.example_inputs(graph_module)
        result = quantize(graph_module, example, self.calibration, self.config)
        result.model.meta[meta.EXAMPLE_INPUTS] = example
        result.model.meta[meta.QUANTIZATION] = result.report()
        return PassResult(result.model, True)

    def __repr__(self) -> str:
        return f"QuantizePass(backend={self.config.backend!r}, calibration={self.config.calibration!r})"
