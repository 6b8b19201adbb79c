"""The INT8 presets as pt2e Quantizers, and the range observers they calibrate with.

Each preset places Q/DQ where its engine fuses them (``TensorRTQuantizer``, ``OnnxRuntimeQuantizer``) or reuses
torchao's patterns for inductor (``X86InductorPresetQuantizer``). ``MSEObserver`` and ``PercentileObserver`` choose
an activation range from a running histogram. ``hqp_fx.passes.quantize`` runs them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
import torch.fx as fx
from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver
from torchao.quantization.pt2e.quantizer import (QuantizationAnnotation, QuantizationSpec, Quantizer,
                                                 SharedQuantizationSpec)
from torchao.quantization.pt2e.quantizer.utils import QuantizationConfig
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

if TYPE_CHECKING:
    from .passes.quantize import QuantConfig

__all__ = ["QUANTIZERS", "TensorRTQuantizer", "OnnxRuntimeQuantizer", "X86InductorPresetQuantizer", "MSEObserver",
           "PercentileObserver", "cpu_lacks_vnni", "layer_name", "is_call", "WEIGHTED", "ANNOTATION"]

ANNOTATION = "quantization_annotation"

aten = torch.ops.aten
# weighted op -> index of the weight's output-channel axis (ConvTranspose stores weights as [in, out/g, k...])
WEIGHTED = {aten.conv1d.default: 0, aten.conv2d.default: 0, aten.conv3d.default: 0, aten.linear.default: 0,
             aten.conv_transpose1d.default: 1, aten.conv_transpose2d.input: 1, aten.conv_transpose3d.input: 1}
_ACTIVATIONS = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default}
_ADDS = {aten.add.Tensor, aten.add_.Tensor}
# ops whose int8 output can reuse the input's scale (ORT runs them on int8 directly; a Pad once lower_onnx has
# taken its Q/DQ off, which ORT's own QDQ fusions do not)
_PASS_THROUGH = {aten.max_pool2d.default, aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default,
                 aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten.slice.Tensor,
                 aten.pad.default, aten.constant_pad_nd.default}


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
    if node.target in WEIGHTED and len(node.args) > 1 and getattr(node.args[1], "op", None) == "get_attr":
        return str(node.args[1].target).removesuffix(".weight")
    return node.name


def is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _annotate(node: fx.Node, inputs: dict, output=None) -> None:
    node.meta[ANNOTATION] = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=output, _annotated=True)


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
        return [n for n in gm.graph.nodes if is_call(n, WEIGHTED) and self.wanted(n)]

    def annotate_weighted(self, node: fx.Node) -> None:
        inputs = {node.args[0]: self.act, node.args[1]: self.weight[WEIGHTED[node.target]]}
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
            if not is_call(node, _ADDS) or self.only is not None or node.name in self.skip:
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
    the output of residual adds, and shared scales through pooling, flatten, slicing and padding so they run on
    int8 too."""

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        for node in self.weighted_nodes(model):
            self.annotate_weighted(node)
            tail = node
            if len(node.users) == 1 and is_call(next(iter(node.users)), _ACTIVATIONS):
                tail = next(iter(node.users))
            if tail is node:
                node.meta[ANNOTATION].output_qspec = self.act
            else:
                _annotate(tail, {}, self.act)
        if self.only is not None:
            return model
        for node in model.graph.nodes:
            if is_call(node, _ADDS) and node.name not in self.skip:
                a, b = node.args[:2]
                if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                    tail = node
                    if len(node.users) == 1 and is_call(next(iter(node.users)), _ACTIVATIONS):
                        tail = next(iter(node.users))
                    _annotate(node, {a: self.act, b: self.act}, None if tail is not node else self.act)
                    if tail is not node:
                        _annotate(tail, {}, self.act)
            elif is_call(node, _PASS_THROUGH) and node.name not in self.skip:
                src = node.args[0]
                src_ann = src.meta.get(ANNOTATION) if isinstance(src, fx.Node) else None
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


QUANTIZERS = {"tensorrt": TensorRTQuantizer, "onnxruntime": OnnxRuntimeQuantizer,
               "x86-inductor": X86InductorPresetQuantizer}
