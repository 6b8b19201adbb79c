"""INT8 post-training quantization: backend presets as pt2e Quantizers, calibration, range checks, hybrid FP fallback.

Data flow: ``torch.export`` (dynamic batch where the model allows it) → torchao's ``prepare_pt2e`` with one of
hqp_fx's quantizers (BN is folded into the convs there) → calibrate on real batches → range checks →
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
from torch.fx.passes.infra.pass_base import PassResult
from torchao.quantization.pt2e.observer import (HistogramObserver, MinMaxObserver, ObserverBase,
                                                PerChannelMinMaxObserver)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import (QuantizationAnnotation, QuantizationSpec, Quantizer,
                                                 SharedQuantizationSpec)
from torchao.quantization.pt2e.quantizer.utils import QuantizationConfig
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

from .. import meta
from ..core import GraphPass, HQPError

__all__ = ["QuantConfig", "QuantizeError", "QuantizeResult", "QuantizePass", "quantize", "layer_sensitivity",
           "PercentileObserver", "MSEObserver", "BACKENDS", "CALIBRATIONS", "sqnr_db", "take_samples",
           "hybrid_quantize"]

BACKENDS = ("tensorrt", "onnxruntime", "x86-inductor")
CALIBRATIONS = ("minmax", "histogram", "percentile")  # histogram = MSE-optimal clipping on a histogram
_ANNOTATION = "quantization_annotation"

aten = torch.ops.aten
# weighted op -> index of the weight's output-channel axis (ConvTranspose stores weights as [in, out/g, k...])
_WEIGHTED = {aten.conv1d.default: 0, aten.conv2d.default: 0, aten.conv3d.default: 0, aten.linear.default: 0,
             aten.conv_transpose1d.default: 1, aten.conv_transpose2d.input: 1, aten.conv_transpose3d.input: 1}
_ACTIVATIONS = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default}
_ADDS = {aten.add.Tensor, aten.add_.Tensor}
# ops whose int8 output can reuse the input's scale (ORT runs them on int8 directly)
_PASS_THROUGH = {aten.max_pool2d.default, aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default,
                 aten.flatten.using_ints, aten.view.default, aten.reshape.default}


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


class _RangeSearchObserver(HistogramObserver):
    """HistogramObserver's running histogram, with the range chosen by ``_choose_range`` over its bins.

    HistogramObserver's own greedy L2 search stops at the first non-improving step; with one large outlier it
    keeps the full min-max range (measured: scale unchanged with a 1000x outlier), so both our methods replace it.
    """

    def _bins(self) -> tuple[torch.Tensor, torch.Tensor]:
        edges = torch.linspace(self.min_val.item(), self.max_val.item(), self.bins + 1)
        return (edges[:-1] + edges[1:]) / 2, self.histogram / self.histogram.sum().clamp_min(1)

    @property
    def _symmetric(self) -> bool:
        return self.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self._choose_range()
        return torch.as_tensor(lo).to(self.min_val), torch.as_tensor(hi).to(self.max_val)


class MSEObserver(_RangeSearchObserver):
    """Range = the clipping threshold (out of 256 candidates) that minimises the expected squared error:
    rounding noise step²/12 inside the range plus the squared distance of every clipped bin to the range."""

    def _choose_range(self):
        centers, mass = self._bins()
        amax = centers.abs().max().clamp_min(1e-12)
        thresholds = amax * torch.linspace(1 / 256, 1, 256).view(-1, 1)
        lo = torch.maximum(self.min_val.view(1, 1), -thresholds)
        hi = torch.minimum(self.max_val.view(1, 1), thresholds)
        if self._symmetric:
            lo, hi = -torch.maximum(-lo, hi), torch.maximum(-lo, hi)
        step = (hi - lo) / (self.quant_max - self.quant_min)
        clip = (lo - centers).clamp_min(0) + (centers - hi).clamp_min(0)
        error = (mass * (clip.pow(2) + step.pow(2) / 12)).sum(1)
        best = int(error.argmin())
        return lo[best, 0], hi[best, 0]


class PercentileObserver(_RangeSearchObserver):
    """Range = the given percentile of |x| (symmetric) or of each tail (affine), read off the histogram."""

    def __init__(self, *args, percentile: float = 99.99, **kwargs):
        super().__init__(*args, **kwargs)
        self.percentile = percentile

    def _choose_range(self):
        centers, mass = self._bins()
        tail = 1.0 - self.percentile / 100.0
        if self._symmetric:
            order = torch.argsort(centers.abs())
            pos = int(torch.searchsorted(torch.cumsum(mass[order], 0), torch.tensor(1.0 - tail)).clamp(max=self.bins - 1))
            amax = centers[order[pos]].abs()
            return -amax, amax
        cdf = torch.cumsum(mass, 0)
        lo = int(torch.searchsorted(cdf, torch.tensor(tail / 2)).clamp(max=self.bins - 1))
        hi = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail / 2)).clamp(max=self.bins - 1))
        return centers[lo].clamp(max=0), centers[hi].clamp(min=0)


def cpu_lacks_vnni() -> bool:
    """True on an x86 CPU without AVX-VNNI / AVX512-VNNI / AMX (Linux /proc/cpuinfo); False elsewhere."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return False
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        return False
    return bool(flags) and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def _activation_observer(config: QuantConfig, **kwargs):
    if config.calibration == "minmax":
        return MinMaxObserver.with_args(**kwargs)
    if config.calibration == "percentile":
        return PercentileObserver.with_args(percentile=config.percentile, **kwargs)
    return MSEObserver.with_args(**kwargs)


def _specs(config: QuantConfig) -> tuple[QuantizationSpec, dict[int, QuantizationSpec]]:
    """(activation spec, weight spec per output-channel axis) of a preset.

    TensorRT: int8 symmetric activations (zero point 0) over -128..127, the range ONNX's QuantizeLinear saturates
    to. ONNX Runtime / x86: uint8 affine activations (ORT's fast U8S8 kernels, oneDNN's u8 convolutions).
    Weights: int8 per-channel symmetric over -127..127, so scale = amax/127 exactly; with ``reduce_range`` over
    -63..63, because x86 CPUs without VNNI multiply u8 x s8 pairs into a saturating int16 (255·127·2 > 32767),
    which ONNX Runtime and oneDNN document as an accuracy loss; 255·63·2 fits.
    """
    if config.backend == "tensorrt":
        act_args = dict(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric)
    else:
        act_args = dict(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine)
    act = QuantizationSpec(observer_or_fake_quant_ctr=_activation_observer(config, **act_args), **act_args)
    weights = {}
    for axis in (0, 1):
        bound = 63 if config.reduce_range and config.backend != "tensorrt" else 127
        w_args = dict(dtype=torch.int8, quant_min=-bound, quant_max=bound, qscheme=torch.per_channel_symmetric)
        weights[axis] = QuantizationSpec(
            ch_axis=axis, observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(ch_axis=axis, **w_args),
            **w_args)
    return act, weights


def layer_name(node: fx.Node) -> str:
    """The module that owns a weighted op's weight (``layer1.0.conv1``); the node name for everything else."""
    if node.target in _WEIGHTED and len(node.args) > 1 and getattr(node.args[1], "op", None) == "get_attr":
        return str(node.args[1].target).removesuffix(".weight")
    return node.name


def _is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _annotate(node: fx.Node, inputs: dict, output=None) -> None:
    node.meta[_ANNOTATION] = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=output, _annotated=True)


class _PresetQuantizer(Quantizer):
    """Shared rules: which weighted layers take part (``only`` for one-layer sensitivity, ``skip`` for FP)."""

    def __init__(self, config: QuantConfig, skip: Iterable[str] = (), only: str | None = None):
        super().__init__()
        self.config, self.skip, self.only = config, set(skip), only
        self.act, self.weight = _specs(config)

    def wanted(self, node: fx.Node) -> bool:
        name = layer_name(node)
        return name not in self.skip and (self.only is None or name == self.only)

    def weighted_nodes(self, gm: fx.GraphModule) -> list[fx.Node]:
        return [n for n in gm.graph.nodes if _is_call(n, _WEIGHTED) and self.wanted(n)]

    def annotate_weighted(self, node: fx.Node) -> None:
        inputs = {node.args[0]: self.act, node.args[1]: self.weight[_WEIGHTED[node.target]]}
        _annotate(node, inputs)

    def validate(self, model: fx.GraphModule) -> None:
        pass


class TensorRTQuantizer(_PresetQuantizer):
    """Q/DQ where TensorRT's explicit-quantization guide puts them: on the inputs and weights of Conv/ConvTranspose/
    Gemm (never on their outputs; TensorRT fuses BN/ReLU itself), plus the residual input of an add that follows
    a quantized weighted op, so TensorRT can fuse the add into the convolution's INT8 epilogue."""

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        quantized = set()
        for node in self.weighted_nodes(model):
            self.annotate_weighted(node)
            quantized.add(node)
        for node in model.graph.nodes:
            if not _is_call(node, _ADDS) or self.only is not None or node.name in self.skip:
                continue
            a, b = node.args[:2]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            if a in quantized and b not in quantized:
                _annotate(node, {b: self.act})
            elif b in quantized and a not in quantized:
                _annotate(node, {a: self.act})
        return model


class OnnxRuntimeQuantizer(_PresetQuantizer):
    """Q/DQ laid out as ONNX Runtime fuses it into QLinearConv/QGemm/QLinearAdd on CPU: inputs, weights and the
    output of each weighted op (after its ReLU/ReLU6, which ORT folds into the output range), both inputs and
    the output of residual adds, and shared scales through pooling and flatten so they run on int8 too."""

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        for node in self.weighted_nodes(model):
            self.annotate_weighted(node)
            tail = node
            if len(node.users) == 1 and _is_call(next(iter(node.users)), _ACTIVATIONS):
                tail = next(iter(node.users))
            if tail is node:
                node.meta[_ANNOTATION].output_qspec = self.act
            else:
                _annotate(tail, {}, self.act)
        if self.only is not None:
            return model
        for node in model.graph.nodes:
            if _is_call(node, _ADDS) and node.name not in self.skip:
                a, b = node.args[:2]
                if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                    tail = node
                    if len(node.users) == 1 and _is_call(next(iter(node.users)), _ACTIVATIONS):
                        tail = next(iter(node.users))
                    _annotate(node, {a: self.act, b: self.act}, None if tail is not node else self.act)
                    if tail is not node:
                        _annotate(tail, {}, self.act)
            elif _is_call(node, _PASS_THROUGH) and node.name not in self.skip:
                src = node.args[0]
                src_ann = src.meta.get(_ANNOTATION) if isinstance(src, fx.Node) else None
                if src_ann is not None and src_ann.output_qspec is not None:
                    _annotate(node, {src: SharedQuantizationSpec(src)}, SharedQuantizationSpec((src, node)))
        return model


class X86InductorPresetQuantizer(X86InductorQuantizer):
    """torchao's X86InductorQuantizer (its patterns are the ones inductor lowers to oneDNN int8 kernels, which we
    should not re-derive), configured with hqp_fx's calibration method and layer selection."""

    def __init__(self, config: QuantConfig, skip: Iterable[str] = (), only: str | None = None):
        super().__init__()
        act, weight = _specs(config)
        qconfig = QuantizationConfig(act, act, weight[0], None, False)
        self.set_global(None if only is not None else qconfig)
        if only is not None:
            self.set_module_name_qconfig(only, qconfig)
        for name in skip:
            self.set_module_name_qconfig(name, None)


_QUANTIZERS = {"tensorrt": TensorRTQuantizer, "onnxruntime": OnnxRuntimeQuantizer,
               "x86-inductor": X86InductorPresetQuantizer}


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
            if n.target in _WEIGHTED or n.meta.get(_ANNOTATION) is not None:
                problems.setdefault(layers.get(n.name, n.name), f"{'weight' if is_weight else 'activation'} observer "
                                                    f"{node.target} {reason}")
    return problems


def _quantize_once(exported: fx.GraphModule, config: QuantConfig, batches: list[torch.Tensor],
                   skip: Iterable[str], only: str | None = None) -> tuple[fx.GraphModule | None, dict[str, str]]:
    """prepare → calibrate → range check → convert on a copy of ``exported`` (no model when a range is bad)."""
    quantizer = _QUANTIZERS[config.backend](config, skip=skip, only=only)
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
    return (None if problems else convert_pt2e(prepared)), problems


def _weighted_layers(exported: fx.GraphModule) -> dict[str, str]:
    """Node name -> layer name of every weighted op; node names survive prepare/convert, weight names do not."""
    return {n.name: layer_name(n) for n in exported.graph.nodes if _is_call(n, _WEIGHTED)}


def _quantized_layers(converted: fx.GraphModule, layers: dict[str, str]) -> tuple[str, ...]:
    """Weighted layers whose weight reaches them through a dequantize op, read off the converted graph."""
    return tuple(layers[n.name] for n in converted.graph.nodes
                 if n.name in layers and _is_call(n, _WEIGHTED) and isinstance(n.args[1], fx.Node)
                 and "dequantize" in str(n.args[1].target))


def quantize(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...] | torch.Tensor, calibration: Iterable,
             config: QuantConfig = QuantConfig()) -> QuantizeResult:
    """Quantize a float model (never modified) with ``config``; see QuantConfig for the bad-range policy."""
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    batches = take_samples(calibration, config.num_samples)
    exported = export_for_quantization(copy.deepcopy(model), example_inputs, strict=config.backend == "x86-inductor")
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
    static = _static_batch(reference)
    ref = torch.cat([o.flatten(1) for o in _run_batches(reference, batches, static)])
    out = torch.cat([o.flatten(1) for o in _run_batches(quantized, batches, static)])
    return sqnr_db(ref, out)


def layer_sensitivity(model: torch.nn.Module, example_inputs, calibration: Iterable,
                      config: QuantConfig = QuantConfig()) -> dict[str, float]:
    """Output SQNR (dB) with only one weighted layer quantized, for every weighted layer (lower = more sensitive)."""
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    batches = take_samples(calibration, config.num_samples)
    exported = export_for_quantization(copy.deepcopy(model), example_inputs, strict=config.backend == "x86-inductor")
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
