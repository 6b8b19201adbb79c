"""INT8 quantization: every preset on the model zoo (dense and pruned), per-layer error within one quantization
step, range checks (NaN, collapsed ranges), the hybrid FP fallback, and the user's model left untouched."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torchao.quantization.pt2e.utils import _fuse_conv_bn_  # the fold prepare_pt2e applies, for the reference

import hqp_fx
from hqp_fx import meta
from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass
from hqp_fx.passes.quantize import (BACKENDS, QuantConfig, QuantizeError, QuantizePass, export_for_quantization,
                                    hybrid_quantize, quantize, sqnr_db)

from helpers import ZOO_TORCHVISION, build_zoo_model, random_plan

qd = torch.ops.quantized_decomposed
_WEIGHTED = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
             torch.ops.aten.linear.default}


def _value(gm, node_or_value, env):
    if isinstance(node_or_value, fx.Node):
        return env[node_or_value]
    return node_or_value


def folded_weights(model: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float weights after BN folding, by node name of the weighted op (node names survive prepare/convert)."""
    exported = export_for_quantization(copy.deepcopy(model), (example,))
    _fuse_conv_bn_(exported)
    return {n.name: operator.attrgetter(n.args[1].target)(exported).detach()
            for n in exported.graph.nodes if n.op == "call_function" and n.target in _WEIGHTED}


def check_layers_within_one_step(converted: fx.GraphModule, weights: dict[str, torch.Tensor], x: torch.Tensor) -> int:
    """For every quantized weighted op: weights and inputs are within half a step of the float values, and the
    op's output is within the error those half steps imply: |Δy| <= (s_x/2)·op(1, |W|) + op(|x̂|, s_w/2) (+ the
    exact error of inputs clipped because the INT8 network's activations left the range calibrated on the float
    network). Returns the number of layers checked."""
    env: dict[fx.Node, object] = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            env[n] = out.clone() if isinstance(out, torch.Tensor) else out  # in-place ReLUs would overwrite it
            return out

    with torch.no_grad():
        Record(converted).run(x)
    checked = 0
    for n in converted.graph.nodes:
        if n.name not in weights or n.op != "call_function":
            continue
        dq_x, dq_w = n.args[0], n.args[1]
        if not (getattr(dq_x, "target", None) == qd.dequantize_per_tensor.default
                and getattr(dq_w, "target", None) == qd.dequantize_per_channel.default):
            continue
        q_x = dq_x.args[0]
        x_float, x_hat = env[q_x.args[0]], env[dq_x]
        s_x = float(_value(converted, q_x.args[1], env))
        zp, qmin, qmax = (int(_value(converted, a, env)) for a in q_x.args[2:5])
        w, w_hat, s_w = weights[n.name], env[dq_w], env[dq_w.args[1]]
        shape = (-1,) + (1,) * (w.ndim - 1)
        w_err = (w_hat - w).abs() - (s_w.view(shape) / 2 * (1 + 1e-4) + 1e-6 * w.abs())
        assert (w_err <= 0).all(), f"{n.name}: weight rounding off by {w_err.max():.3g} beyond half a step"
        lo, hi = (qmin - zp) * s_x, (qmax - zp) * s_x
        clipped = (x_float < lo - s_x / 2) | (x_float > hi + s_x / 2)
        tol = s_x / 2 * (1 + 1e-4) + 1e-6 * x_float.abs()  # ties round to even; x/s carries float error
        assert ((x_hat - x_float).abs() <= tol)[~clipped].all(), f"{n.name}: input rounding"
        rest = [_value(converted, a, env) for a in n.args[3:]]
        bias = _value(converted, n.args[2], env) if len(n.args) > 2 else None

        def op(a, b, bias=None):
            return n.target(a, b, bias, *rest)

        y_float = op(x_float, w, bias)
        bound = (s_x / 2 * op(torch.ones_like(x_hat), w.abs()) + op(x_hat.abs(), (s_w / 2).view(shape).expand_as(w))
                 + op((x_float - x_hat).abs() * clipped, w.abs()))
        slack = 1e-4 * y_float.abs().max() + 1e-6
        assert ((env[n] - y_float).abs() <= bound * 1.001 + slack).all(), f"{n.name}: output error beyond the bound"
        checked += 1
    return checked


def _calibration(example: torch.Tensor, n: int = 8, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(example.shape[1:]), generator=gen)


ZOO_FOR_QUANT = [name for name in ZOO_TORCHVISION if name not in ("inception_v3",)]  # inception: see its own test


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_FOR_QUANT)
def test_every_preset_quantizes_the_zoo(name):
    model, example = build_zoo_model(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = _calibration(example)
    weights = folded_weights(model, example)
    with torch.no_grad():
        reference = model(calib)
    for backend in BACKENDS:
        result = quantize(model, example, [calib], QuantConfig(backend=backend, calibration="minmax"))
        assert len(result.quantized_layers) == len(weights), f"{name}/{backend}: a weighted layer stayed float"
        assert not result.float_layers
        checked = check_layers_within_one_step(result.model, weights, calib)
        assert checked == len(weights), f"{name}/{backend}: checked {checked} of {len(weights)} layers"
        with torch.no_grad():
            out = result.model(calib)
        # per-layer bounds above are the real check; this only catches gross mis-wiring: the error must stay below
        # the signal (a wrong weight axis gives < 0 dB; random-weight nets measure 1-8 dB end to end, the deepest,
        # efficientnet_v2_s, ~1 dB; trained ones 25-40 dB)
        assert sqnr_db(reference, out) > 0, f"{name}/{backend}: output SQNR {sqnr_db(reference, out):.1f} dB"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{name}: quantization mutated the user's {k}"


def test_inception_v3_needs_eval_mode_export():
    """inception_v3 exports like the others once in eval mode (its aux head is training-only)."""
    model, example = build_zoo_model("inception_v3")
    result = quantize(model, example, [_calibration(example, 4)], QuantConfig(backend="tensorrt", calibration="minmax"))
    assert len(result.quantized_layers) == len(folded_weights(model, example))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121",
                                  "cifar:resnet56"])
def test_pruned_models_quantize(name):
    model, example = build_zoo_model(name)
    gm = hqp_fx.trace(model, example)
    ChannelDependencyPass()(gm)
    pruned = PruneChannelsPass(random_plan(meta.channel_groups(gm), 0.3, seed=1))(gm).graph_module
    calib = _calibration(example)
    weights = folded_weights(pruned, example)
    # the presets differ only in what they annotate, which pruning does not change, and test_every_preset covers
    # densenet121 under each: its pruned copy (concat pruning) needs one, and the other two cost CI about 80 s
    for backend in BACKENDS if name != "densenet121" else ("onnxruntime",):
        result = QuantizePass([calib], QuantConfig(backend=backend, calibration="minmax"))(pruned)
        report = result.graph_module.meta[meta.QUANTIZATION]
        assert len(report["quantized_layers"]) == len(weights)
        assert check_layers_within_one_step(result.graph_module, weights, calib) == len(weights)


class _Branchy(nn.Module):
    """A conv fed by sqrt(x - 2): NaN for most inputs. A second conv reads x * 0: a collapsed range."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.nan_conv = nn.Conv2d(3, 8, 1)
        self.zero_conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.stem(x) + torch.nan_to_num(self.nan_conv(torch.sqrt(x - 2.0)), nan=0.0)
        return self.head(torch.relu(y + self.zero_conv(x * 0.0)))


def test_nan_calibration_data_is_refused_with_the_batch_named():
    model, example = build_zoo_model("cifar:resnet20")
    bad = _calibration(example)
    bad[3, 1, 4, 4] = float("nan")
    with pytest.raises(QuantizeError, match="batch 1 contains NaN"):
        quantize(model, example, [_calibration(example), bad], QuantConfig(num_samples=64))


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_nan_and_collapsed_ranges_stop_or_fall_back(backend):
    model = _Branchy().eval()
    example = torch.randn(1, 3, 8, 8)
    calib = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(QuantizeError, match=r"nan_conv.*NaN/Inf.*on_bad_range='fallback'"):
        quantize(model, example, calib, QuantConfig(backend=backend, calibration="minmax"))
    result = quantize(model, example, calib, QuantConfig(backend=backend, calibration="minmax", on_bad_range="fallback"))
    # the residual add reading the (all-zero after nan_to_num) NaN branch falls back too, by node name
    assert {"nan_conv", "zero_conv"} <= set(result.float_layers) <= {"nan_conv", "zero_conv", "add", "add_1", "add_2"}
    assert "NaN/Inf" in result.float_layers["nan_conv"] and "collapsed" in result.float_layers["zero_conv"]
    assert set(result.quantized_layers) == {"stem", "head"}
    x = calib[0]
    with torch.no_grad():
        out, ref = result.model(x), model(x)
    assert torch.isfinite(out).all() and sqnr_db(ref, out) > 20


def _float_weight_layers(converted: fx.GraphModule) -> set[str]:
    """Layers whose weight still reaches its op as a float parameter, read straight off the graph."""
    out = set()
    for n in converted.graph.nodes:
        if n.op == "call_function" and n.target in _WEIGHTED and n.args[1].op == "get_attr":
            weight = operator.attrgetter(n.args[1].target)(converted)
            assert weight.dtype == torch.float32
            out.add(str(n.args[1].target).removesuffix(".weight"))
    return out


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_hybrid_fallback_keeps_exactly_the_layers_it_reports(backend):
    model, example = build_zoo_model("cifar:resnet20")
    calib = [_calibration(example, 16)]
    plain = quantize(model, example, calib, QuantConfig(backend=backend, calibration="minmax"))
    floor = plain.output_sqnr_db + 1.0
    result = hybrid_quantize(model, example, calib, QuantConfig(backend=backend, calibration="minmax"),
                             sqnr_floor_db=floor)
    assert result.budget.startswith("met"), result.budget
    assert result.output_sqnr_db >= floor
    assert result.float_layers and set(result.float_layers) == _float_weight_layers(result.model)
    assert set(result.quantized_layers).isdisjoint(result.float_layers)
    # the most sensitive layers went first, and each reason names its rank
    ranked = sorted(result.sensitivity, key=result.sensitivity.get)
    assert set(result.float_layers) == set(ranked[:len(result.float_layers)])
    assert all("sensitivity rank" in why for why in result.float_layers.values())


def test_hybrid_fallback_reports_an_unmet_budget():
    model, example = build_zoo_model("cifar:resnet20")
    result = hybrid_quantize(model, example, [_calibration(example)], QuantConfig(calibration="minmax"),
                             sqnr_floor_db=200.0, max_float_layers=2)
    assert result.budget.startswith("NOT met") and len(result.float_layers) == 2


def test_calibration_methods_on_heavy_tailed_data():
    """Student-t inputs: the MSE search (histogram) gives the lowest squared quantization error of the three
    (below min-max, which spends its range on the tails), and percentile lands on the requested quantile of |x|."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    x = torch.distributions.StudentT(2.0).sample((64, 3, 8, 8))
    errors, scales = {}, {}
    for method in ("minmax", "histogram", "percentile"):
        result = quantize(model, x[:1], [x], QuantConfig(calibration=method, num_samples=64, percentile=99.9))
        q = next(n for n in result.model.graph.nodes if n.target == qd.quantize_per_tensor.default)
        scales[method] = float(q.args[1])
        x_hat = torch.fake_quantize_per_tensor_affine(x, scales[method], 0, -128, 127)
        errors[method] = (x_hat - x).pow(2).mean().item()
    assert errors["histogram"] < min(errors["minmax"], errors["percentile"]), errors
    assert scales["minmax"] == pytest.approx(x.abs().max().item() / 127.5, rel=1e-3)
    quantile = torch.quantile(x.abs().flatten()[:100_000], 0.999).item()
    assert scales["percentile"] * 127.5 == pytest.approx(quantile, rel=0.1)


def test_bad_config_and_unknown_layers_are_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        QuantConfig(backend="tflite")
    with pytest.raises(ValueError, match="on_bad_range"):
        QuantConfig(on_bad_range="ignore")
    model, example = build_zoo_model("cifar:resnet20")
    with pytest.raises(QuantizeError, match="does not have"):
        quantize(model, example, [example], QuantConfig(keep_float=("layer9.conv",)))
    with pytest.raises(QuantizeError, match="calibration data is empty"):
        quantize(model, example, [], QuantConfig())
