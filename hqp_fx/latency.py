"""A latency model of the deployment engine, and channel selection under a latency budget.

The engine's time is not MACs: ONNX Runtime's int8 convolutions compute output channels in blocks, batch-1 runs
pay per-op overhead, and a channel that buys no time still spends accuracy. So, NetAdapt-style, every
convolution and linear layer of the model is timed alone in ONNX Runtime, as the int8 Q/DQ pattern the
``onnxruntime`` preset exports (``QuantizeLinear`` -> ``DequantizeLinear`` -> ``Conv`` with per-channel int8
weights -> ``QuantizeLinear``, which ORT fuses to ``QLinearConv``), at the model's input size, batch and threads,
on a grid of kept input and output channel counts. A model's predicted latency is the sum of its layers' times,
interpolated on the grid, plus a residual (everything else: adds, pooling, the graph's overhead) calibrated
once against the whole dense model measured in the engine. Tables are cached on disk, keyed by machine,
versions, preset, input shape and threads. Each grid point is the median of several passes over the whole grid,
so a slow spell of the machine (these VMs have them, seconds to minutes long) falls on one pass, not on one layer;
a cached table is spot-checked against fresh timings of its largest points and timed again when the machine has
drifted from it (a table cached during a slow spell overstates every saving: benchmarks/RESULTS.md, "A latency
table timed in a slow spell"). A linear layer on tokens (``[B, N, C]``) is timed with its rows; the products of two
activations in attention (``q @ k``, ``attn @ v``, SDPA) are not layers of the table, so a pruned head's share of
them stays in the residual (the prediction overstates what is left).

A layer is timed as the difference between graphs holding several copies of it and one (see ``time_layer``), so
the per-run overhead of a session is not counted once per layer. The layer graphs are written with ``onnx.helper`` rather than through ``quantize`` + ``export_onnx``: those
take seconds per grid point (torch.export, pt2e, the dynamo exporter), the table needs hundreds of points, and
the resulting pattern is the same one ORT fuses.

``select_for_latency`` is the per-round selection (HALP's knapsack, solved greedily as NetAdapt does): it removes
the channel blocks of least importance per millisecond they save until the round's latency decrement is met,
recomputing each block's saving from the counts the earlier picks left. A block that saves nothing is never
taken. With depth pruning, a removable group's remaining channels taken all at once (the residual block or gate
they feed goes with them, ``hqp_fx.branches``) are one more item of the same knapsack, priced the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from . import meta
from .core import HQPError, atomic_write_text
from .data import cache_dir as data_cache_dir
from .groups import kept_units

__all__ = ["LayerShape", "LatencyModel", "select_for_latency", "time_layer"]

TIMING_METHOD = "qdq-copies-difference/2"  # part of the cache key: a change in how layers are timed re-times them
TIMING_PASSES = 5  # passes over the grid; each point is the median of its passes
SPOT_CHECK_PASSES = 3  # passes of the cached table's spot check
SPOT_CHECK_TOLERANCE = 0.2  # a cached table more than this far off fresh timings (median ratio) is timed again


@dataclass(frozen=True)
class LayerShape:
    """What a conv/linear layer's engine time depends on besides its channel counts."""

    kind: str  # "conv" | "linear"
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    depthwise: bool
    input: tuple[int, ...]  # batch and spatial (or token) size of the input (channels excluded)

    def key(self) -> str:
        return json.dumps([self.kind, self.kernel, self.stride, self.padding, self.dilation, self.depthwise,
                           self.input])


def _qdq_layer(shape: LayerShape, c_in: int, c_out: int, reduce_range: bool, copies: int = 1) -> bytes:
    """An ONNX model of ``copies`` independent int8 Q/DQ layers on one quantized input, as the onnxruntime preset
    exports them: DequantizeLinear -> Conv (per-channel int8 weights) -> QuantizeLinear, which ORT fuses to
    QLinearConv. Outputs stay uint8, as between the layers of a whole model."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    bound = 63 if reduce_range else 127
    batch, *spatial = shape.input
    if shape.kind == "conv":
        w_shape = [c_out, 1 if shape.depthwise else c_in, *shape.kernel]
        x_shape = [batch, c_in, *spatial]
    else:
        w_shape, x_shape = [c_in, c_out], [*shape.input, c_in]  # rows: the batch, and tokens for [B, N, C]
    inits = [numpy_helper.from_array(np.full(c_out, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(c_out, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "a_zp"),
             numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "bias")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "a_scale", "a_zp"], ["x_dq"])]
    outputs = []
    for i in range(copies):
        inits.append(numpy_helper.from_array(rng.integers(-bound, bound + 1, w_shape).astype(np.int8), f"w_q{i}"))
        nodes.append(helper.make_node("DequantizeLinear", [f"w_q{i}", "w_scale", "w_zp"], [f"w_dq{i}"],
                                      axis=0 if shape.kind == "conv" else 1))
        if shape.kind == "conv":
            nodes.append(helper.make_node("Conv", ["x_dq", f"w_dq{i}", "bias"], [f"y{i}"], strides=list(shape.stride),
                                          pads=list(shape.padding) * 2, dilations=list(shape.dilation),
                                          group=c_in if shape.depthwise else 1))
        else:
            nodes += [helper.make_node("MatMul", ["x_dq", f"w_dq{i}"], [f"mm{i}"]),
                      helper.make_node("Add", [f"mm{i}", "bias"], [f"y{i}"])]
        nodes.append(helper.make_node("QuantizeLinear", [f"y{i}", "a_scale", "a_zp"], [f"y_q{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y_q{i}", TensorProto.UINT8, None))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def _median_ms(model: bytes, x_shape: list[int], threads: int, runs: int, warmup: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def time_layer(shape: LayerShape, c_in: int, c_out: int, *, threads: int = 2, reduce_range: bool = False,
               runs: int = 30, warmup: int = 5, copies: int = 4) -> float:
    """Median ms of one int8 layer in ONNX Runtime (CPU, ``threads`` intra-op threads), in this process.

    A session run costs a fixed overhead (and the input's quantization) that a layer inside a whole model does not
    pay; timed alone, small layers would be all overhead. So the time is the difference between graphs of
    ``copies`` and of one copy of the layer, per extra copy."""
    x_shape = [shape.input[0], c_in, *shape.input[1:]] if shape.kind == "conv" else [*shape.input, c_in]
    one = _median_ms(_qdq_layer(shape, c_in, c_out, reduce_range), x_shape, threads, runs, warmup)
    many = _median_ms(_qdq_layer(shape, c_in, c_out, reduce_range, copies), x_shape, threads, runs, warmup)
    return max(many - one, 0.0) / (copies - 1)


def _grid(full: int, align: int, points: int) -> list[int]:
    """Up to ``points`` kept counts, multiples of ``align``, from the smallest to ``full``."""
    steps = max(1, full // align)
    chosen = {max(1, round(steps * (i + 1) / points)) * align for i in range(points)} if steps > points else \
        {align * (i + 1) for i in range(steps)}
    return sorted({min(c, full) for c in chosen} | {full})


def _interp(axis: list[int], value: int) -> tuple[int, int, float]:
    """Indices of the grid points around ``value`` and the weight of the upper one (clamped below the grid)."""
    if value <= axis[0]:
        return 0, 0, 0.0
    for i in range(1, len(axis)):
        if value <= axis[i]:
            return i - 1, i, (value - axis[i - 1]) / (axis[i] - axis[i - 1])
    return len(axis) - 1, len(axis) - 1, 0.0


@dataclass
class _Layer:
    name: str  # module qualified name
    shape: LayerShape
    c_in: int
    c_out: int
    in_axis: list[int]
    out_axis: list[int]
    table: list[list[float]]  # [in index][out index] ms

    def time(self, c_in: int, c_out: int) -> float:
        if c_in <= 0 or c_out <= 0:
            return 0.0  # removed with its branch
        if self.shape.depthwise:
            c_in = c_out
        i0, i1, wi = _interp(self.in_axis, c_in)
        o0, o1, wo = _interp(self.out_axis, c_out)
        t = self.table
        low = t[i0][o0] * (1 - wo) + t[i0][o1] * wo
        high = t[i1][o0] * (1 - wo) + t[i1][o1] * wo
        return low * (1 - wi) + high * wi


def _machine_key(threads: int, preset: str, reduce_range: bool) -> str:
    import onnxruntime

    flags = ""
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    except OSError:
        pass
    text = json.dumps([TIMING_METHOD, platform.processor(), platform.machine(), os.cpu_count(),
                       hashlib.sha256(flags.encode()).hexdigest(), onnxruntime.__version__, preset, reduce_range,
                       threads])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _layer_shapes(gm: fx.GraphModule) -> dict[str, tuple[LayerShape, int, int]]:
    """Every conv2d/linear leaf module of a traced graph (a linear on any number of leading dims): (shape, input
    channels, output channels)."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        tm = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) else None
        if tm is None or not hasattr(tm, "shape"):
            continue
        x = tuple(tm.shape)
        if isinstance(mod, nn.Conv2d) and isinstance(mod.padding, tuple):
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            if mod.groups > 1 and not depthwise:
                continue  # grouped convs are pruned a conv group at a time; not modelled (their time is residual)
            found[node.target] = (LayerShape("conv", tuple(mod.kernel_size), tuple(mod.stride), tuple(mod.padding),
                                             tuple(mod.dilation), depthwise, (x[0], *x[2:])),
                                  mod.in_channels, mod.out_channels)
        elif isinstance(mod, nn.Linear) and len(x) >= 2:  # [B, C], or a transformer's tokens [B, N, C]
            found[node.target] = (LayerShape("linear", (), (), (), (), False, x[:-1]), mod.in_features,
                                  mod.out_features)
    return found


class LatencyModel:
    """Predicted engine latency (ms) of a model from its layers' kept channel counts (see the module docstring)."""

    def __init__(self, layers: dict[str, _Layer], residual: float = 0.0):
        self.layers, self.residual = layers, residual

    @classmethod
    def measure(cls, gm: fx.GraphModule, *, threads: int = 2, align: int = 16, points: int = 6,
                reduce_range: bool = False, preset: str = "onnxruntime", cache_dir: Path | None = None,
                passes: int = TIMING_PASSES,
                progress: Callable[[str], None] = lambda msg: None) -> "LatencyModel":
        """Time every conv/linear layer of ``gm`` on a grid of ``points`` x ``points`` kept counts (multiples of
        ``align``), each point the median of ``passes`` interleaved passes. Points already in the disk cache are
        not timed again unless the spot check finds the machine has drifted from them."""
        key = _machine_key(threads, preset, reduce_range)
        cache_file = (cache_dir or data_cache_dir() / "latency") / f"latency-{key}.json"
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        points_of, grids = {}, {}  # cache entry -> (shape, c_in, c_out) to time it; layer -> its axes
        for name, (shape, c_in, c_out) in _layer_shapes(gm).items():
            in_axis = [c_in] if shape.depthwise else _grid(c_in, align, points)
            out_axis = _grid(c_out, align, points)
            grids[name] = (shape, c_in, c_out, in_axis, out_axis)
            for ci in in_axis:
                for co in out_axis:
                    points_of[f"{shape.key()}|{ci}|{co}"] = (shape, co if shape.depthwise else ci, co)

        def timed(entries: list[str], n: int) -> dict[str, float]:
            runs: dict[str, list[float]] = {e: [] for e in entries}
            for _ in range(n):  # whole passes: a slow spell lands on one pass of many points, not on one point
                for e in entries:
                    runs[e].append(time_layer(*points_of[e], threads=threads, reduce_range=reduce_range))
            return {e: statistics.median(v) for e, v in runs.items()}

        missing = [e for e in points_of if e not in cache]
        cached = [e for e in points_of if e in cache]
        by_shape: dict[str, list[str]] = {}
        for e in cached:
            by_shape.setdefault(points_of[e][0].key(), []).append(e)
        # per layer shape, its largest cached point: the most time, the least relative noise
        sample = [e for e in (max(es, key=lambda e: points_of[e][1] * points_of[e][2]) for es in by_shape.values())
                  if cache[e] > 0]
        if sample:
            fresh = timed(sample, SPOT_CHECK_PASSES)
            drift = statistics.median(fresh[e] / cache[e] for e in sample)
            if abs(drift - 1) > SPOT_CHECK_TOLERANCE:
                progress(f"latency model: {len(sample)} points timed afresh take {drift:.2f}x their cached times: "
                         "the machine has drifted from the cached table, timing it again")
                missing = list(points_of)
        cache.update(timed(missing, passes))
        layers = {name: _Layer(name, shape, c_in, c_out, in_axis, out_axis,
                               [[cache[f"{shape.key()}|{ci}|{co}"] for co in out_axis] for ci in in_axis])
                  for name, (shape, c_in, c_out, in_axis, out_axis) in grids.items()}
        progress(f"latency model: {len(layers)} layers, {len(missing)} grid points timed ({cache_file})")
        if missing:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_file, json.dumps(cache))
        return cls(layers)

    def calibrate(self, gm: fx.GraphModule, measured_ms: float) -> None:
        """Set the residual so that the prediction for ``gm`` equals its measured whole-model latency."""
        self.residual = 0.0
        self.residual = measured_ms - self.predict(gm)

    def predict(self, gm: fx.GraphModule, plan: Mapping[str, list[int]] | None = None) -> float:
        """Predicted ms of ``gm`` after removing ``plan``'s channels (``gm`` must carry its channel analysis)."""
        counts = self.counts(gm, plan)
        return self.residual + sum(layer.time(*counts[name]) for name, layer in self.layers.items())

    def counts(self, gm: fx.GraphModule, plan: Mapping[str, list[int]] | None = None) -> dict[str, tuple[int, int]]:
        """(input, output) channels every modelled layer keeps after ``plan`` (the current ones without a plan)."""
        mods = dict(gm.named_modules())
        current = {}
        for name in self.layers:
            m = mods.get(name)
            if m is None:
                current[name] = (0, 0)  # removed with its branch
            elif isinstance(m, nn.Conv2d):
                current[name] = (m.in_channels, m.out_channels)
            else:
                current[name] = (m.in_features, m.out_features)
        if not plan:
            return current
        analysis = meta.channel_analysis(gm)
        removed = analysis.removed_elements(dict(plan))
        for rec in analysis.records:
            layer, _, param = rec.param.rpartition(".")
            if layer not in self.layers or param != "weight" or layer not in current:
                continue
            gone = int((removed[rec.labels] & (rec.labels > 0)).sum())
            c_in, c_out = current[layer]
            # conv weights are [out, in/groups, k...] and linear weights [out, in]: dim 0 holds the outputs
            current[layer] = (c_in, c_out - gone) if rec.dim == 0 else (c_in - gone, c_out)
        for name, layer in self.layers.items():
            if layer.shape.depthwise:  # one conv group per channel: its inputs go with its outputs
                current[name] = (current[name][1], current[name][1])
        return current

    def to_json(self) -> str:
        return json.dumps({"residual": self.residual, "layers": {
            n: {"shape": json.loads(layer.shape.key()), "c_in": layer.c_in, "c_out": layer.c_out,
                "in_axis": layer.in_axis, "out_axis": layer.out_axis, "table": layer.table}
            for n, layer in self.layers.items()}})

    @classmethod
    def from_json(cls, text: str) -> "LatencyModel":
        try:
            data = json.loads(text)
            layers = {}
            for n, d in data["layers"].items():
                kind, kernel, stride, padding, dilation, depthwise, inp = d["shape"]
                shape = LayerShape(kind, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), bool(depthwise),
                                   tuple(inp))
                layers[n] = _Layer(n, shape, int(d["c_in"]), int(d["c_out"]), [int(v) for v in d["in_axis"]],
                                   [int(v) for v in d["out_axis"]], [[float(v) for v in row] for row in d["table"]])
            return cls(layers, float(data["residual"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise HQPError(f"damaged latency model ({type(exc).__name__}: {exc})") from None




def _tensor_limits(analysis, min_keep: int):
    """Per traced tensor, the channel classes it holds and how many of them it may lose (``select_channels``'s
    rule: every tensor keeps ``min_keep`` channels, or all it has when fewer), indexed by class."""
    sets = list(analysis.tensor_widths)
    room = [len(p) - min(kept_units(min_keep, w), len(p)) for p, w in analysis.tensor_widths.items()]
    by_class: dict[int, list[int]] = {}
    for i, present in enumerate(sets):
        for c in present:
            by_class.setdefault(c, []).append(i)
    return room, by_class, sets


def select_for_latency(gm: fx.GraphModule, scores: Mapping[str, torch.Tensor], model: LatencyModel, fraction: float,
                       *, align: int, min_keep: int, ignore: tuple[str, ...] = (),
                       remove_branches: bool = False, keep_whole: frozenset[str] = frozenset()) -> dict[str, list[int]]:
    """Channels to remove this round: the blocks of least importance per predicted millisecond saved, until the
    prediction falls by ``fraction`` of the current one. Blocks are ``align`` channels (the first one of a group
    ``size % align``, so kept counts land on the grid), least important channels first. Every group and every
    tensor keeps at least ``min_keep`` channels; ``ignore`` names modules never pruned (a prefix matches its
    submodules). With ``remove_branches``, all remaining channels of a ``removable`` group are one more item
    (depth pruning: its branch goes), importance the sum of their scores, as ``select_channels`` ranks it; tensors
    holding only that group's channels may then empty; ``keep_whole`` names groups never removed whole (the loop's
    record of blocks whose removal broke delta_max). Empty when no block saves time."""
    groups = [g for g in meta.channel_groups(gm) if g.prunable and g.id in scores and not any(
        layer == pre or layer.startswith(pre + ".") for layer in g.layers for pre in ignore)]
    by_id = {g.id: g for g in groups}
    order = {g.id: torch.argsort(scores[g.id].to(torch.float64), stable=True).tolist() for g in groups}
    room, tensors_of, tensor_classes = _tensor_limits(meta.channel_analysis(gm), min_keep)
    plan: dict[str, list[int]] = {}
    now = model.predict(gm)
    goal = now * (1 - fraction)
    while now > goal:
        best = None
        for gid, g in by_id.items():
            taken = len(plan.get(gid, []))  # == g.size once the group went whole: no item is left below
            items = []
            unit = g.unit(align)  # align and min_keep count a layer's channels: an attention head is head_dim of them
            block = (g.size - taken) % unit or unit
            if g.size - taken - block >= kept_units(min_keep, g.width):
                items.append(order[gid][taken:taken + block])
            if remove_branches and g.removable and gid not in keep_whole and g.size - taken > 0:
                items.append(order[gid][taken:])  # depth pruning: the rest of the group, and its branch with it
            for chosen in items:
                whole = taken + len(chosen) == g.size
                hits: dict[int, int] = {}
                for c in g.classes[chosen].tolist():
                    for t in tensors_of.get(c, ()):
                        hits[t] = hits.get(t, 0) + 1
                own = set(g.classes.tolist()) if whole else set()
                if any(room[t] < n and not set(tensor_classes[t]) <= own for t, n in hits.items()):
                    continue  # it would leave some tensor below min_keep channels (but a branch may empty its own)
                saving = now - model.predict(gm, {**plan, gid: plan.get(gid, []) + chosen})
                if saving <= 1e-9:
                    continue  # buys no time: never worth its accuracy
                ratio = float(scores[gid][chosen].to(torch.float64).sum()) / saving
                if best is None or ratio < best[0]:
                    best = (ratio, gid, chosen, saving, hits)
        if best is None:
            break
        _, gid, chosen, saving, hits = best
        plan[gid] = plan.get(gid, []) + chosen
        for t, n in hits.items():
            room[t] -= n
        now -= saving
    return {k: sorted(v) for k, v in plan.items()}
