"""The engine latency model and selection under a latency budget: the plan-to-shape arithmetic, the fused int8
layer it times, its cache, the greedy knapsack, and the loop that predicts and measures every accepted round."""
from __future__ import annotations

import json
import statistics
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

import hqp_fx
from hqp_fx import meta
from hqp_fx.prune_loop import DEPTH_TRIES, PruneLoopConfig, prune_loop, stem_layers
from hqp_fx.latency import LatencyModel, LayerShape, _Layer, _qdq_layer, select_for_latency
from hqp_fx.measure import paired_ratio
from hqp_fx.models import CifarResNet
from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass

from helpers import random_plan, realistic_random

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def analysed(model, x=X):
    gm = hqp_fx.trace(model, x)
    ChannelDependencyPass()(gm)
    return gm


def step_table(gm, per_block: float = 0.01, flat: tuple[str, ...] = ()) -> LatencyModel:
    """A synthetic engine: each layer costs ``per_block`` ms per 16 input x 16 output channels (rounded up), the
    ``flat`` layers a constant. Stands in for timings so the arithmetic can be checked exactly."""
    from hqp_fx.latency import _grid, _layer_shapes

    layers = {}
    for name, (shape, c_in, c_out) in _layer_shapes(gm).items():
        in_axis = [c_in] if shape.depthwise else _grid(c_in, 1, 10 ** 6)
        out_axis = _grid(c_out, 1, 10 ** 6)
        table = [[per_block if name in flat else per_block * -(-ci // 16) * -(-co // 16) for co in out_axis]
                 for ci in in_axis]
        layers[name] = _Layer(name, shape, c_in, c_out, in_axis, out_axis, table)
    return LatencyModel(layers)


@pytest.mark.parametrize("name", ["cifar:resnet20", "mobilenet_v3_small"])
def test_a_plans_predicted_counts_are_the_pruned_models_shapes(name):
    if name.startswith("cifar"):
        model, x = realistic_random(CifarResNet(20), X), X
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torchvision.models.mobilenet_v3_small()
        x = torch.randn(1, 3, 64, 64)
    gm = analysed(model, x)
    engine = step_table(gm)
    assert any(layer.shape.depthwise for layer in engine.layers.values()) == (name != "cifar:resnet20")
    plan = random_plan(meta.channel_groups(gm), 0.4, seed=3)
    pruned = analysed(PruneChannelsPass(plan)(gm).graph_module, x)
    assert engine.counts(gm, plan) == engine.counts(pruned)
    assert engine.predict(gm, plan) == pytest.approx(engine.predict(pruned))
    assert engine.predict(pruned) < engine.predict(gm)


def test_the_timed_layer_is_the_fused_int8_convolution(tmp_path):
    """The layer graph must be what ORT turns into an int8 kernel, or the table would time float convolutions."""
    shape = LayerShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (1, 16, 16))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(_qdq_layer(shape, 32, 48, reduce_range=False, copies=3), options,
                         providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops, ops


def test_measure_times_the_grid_in_passes_and_a_slow_spell_does_not_stick(tmp_path, monkeypatch):
    """Each grid point is the median of whole passes over the grid, so a slow spell of the machine during one pass
    moves no point; the table is cached, and a cached table is spot-checked and timed again once the machine has
    drifted from it."""
    from hqp_fx.latency import SPOT_CHECK_PASSES, TIMING_PASSES

    calls, speed = [], {"factor": 1.0, "slow_call": None}

    def fake(shape, c_in, c_out, **kw):
        calls.append((shape.key(), c_in, c_out))
        slow = speed["slow_call"] is not None and speed["slow_call"](len(calls) - 1)
        return 0.001 * c_in * c_out * speed["factor"] * (3.0 if slow else 1.0)

    monkeypatch.setattr("hqp_fx.latency.time_layer", fake)
    gm = analysed(realistic_random(CifarResNet(20), X))
    points = 36  # R20's distinct (layer shape, in, out) grid points at align 16
    speed["slow_call"] = lambda i: points <= i < 2 * points  # the whole second pass runs three times slower
    first = LatencyModel.measure(gm, threads=1, align=16, cache_dir=tmp_path)
    assert len(set(calls)) == points and len(calls) == TIMING_PASSES * points
    assert all(calls[k * points:(k + 1) * points] == calls[:points] for k in range(TIMING_PASSES)), "whole passes"
    layer = first.layers["layer3.0.conv1"]
    assert layer.in_axis == [16, 32] and layer.out_axis == [16, 32, 48, 64]
    assert layer.table == [[pytest.approx(0.001 * ci * co) for co in layer.out_axis] for ci in layer.in_axis]

    speed["slow_call"] = None
    calls.clear()
    again = LatencyModel.measure(gm, threads=1, align=16, cache_dir=tmp_path)
    shapes = {c[0] for c in calls}
    assert len(calls) == SPOT_CHECK_PASSES * len(shapes) and len(shapes) < points  # only the spot check timed
    assert again.to_json() == first.to_json()  # the rest from the cache
    assert LatencyModel.from_json(first.to_json()).to_json() == first.to_json()

    speed["factor"] = 1.5  # the machine now runs every layer half again slower than the cached table says
    calls.clear()
    drifted = LatencyModel.measure(gm, threads=1, align=16, cache_dir=tmp_path)
    assert len(calls) == SPOT_CHECK_PASSES * len(shapes) + TIMING_PASSES * points
    assert drifted.layers["layer3.0.conv1"].table[-1][-1] == pytest.approx(1.5 * 0.001 * 32 * 64)
    calls.clear()
    assert LatencyModel.measure(gm, threads=1, align=16, cache_dir=tmp_path).to_json() == drifted.to_json()
    assert len(calls) == SPOT_CHECK_PASSES * len(shapes)  # the re-timed table was cached


def test_selection_never_buys_nothing_and_prefers_cheap_importance_per_ms():
    gm = analysed(realistic_random(CifarResNet(20), X))
    groups = {g.id: g for g in meta.channel_groups(gm) if g.prunable}
    inner = [gid for gid in groups if gid.endswith(".conv1")]
    # every inner group's layers are flat (pruning them saves nothing) except layer3.2.conv1's
    flat = tuple(n for n in step_table(gm).layers if n.endswith(("conv1", "conv2")) and not n.startswith("layer3.2"))
    engine = step_table(gm, flat=flat)
    scores = {gid: torch.full((g.size,), 0.001 if gid != "layer3.2.conv1" else 1.0) for gid, g in groups.items()}
    scores["conv1"] = torch.full((groups["conv1"].size,), 5.0)  # the stream: costly to cut
    plan = select_for_latency(gm, scores, engine, 0.02, align=16, min_keep=16, ignore=())
    assert set(plan) <= {"layer3.2.conv1", "conv1"} and plan, plan  # the almost free flat groups are never taken
    assert "layer3.2.conv1" in plan  # 16 channels at importance 16 beat the stream's 80 per block, per ms
    assert all(len(v) % 16 == 0 for v in plan.values())
    before = engine.predict(gm)
    assert engine.predict(gm, plan) <= before * 0.98
    assert select_for_latency(gm, scores, step_table(gm, flat=tuple(engine.layers)), 0.1, align=16,
                              min_keep=16) == {}  # nothing saves time: nothing is removed
    assert inner  # the model has the inner groups the test is about


def test_depth_pruning_is_one_more_item_of_the_knapsack():
    """A residual block whose inner group is at min_keep cannot lose a channel block; with remove_branches its
    whole group is an item, priced by the same table, and wins when it is the cheapest importance per ms."""
    gm = analysed(realistic_random(CifarResNet(20), X))
    groups = {g.id: g for g in meta.channel_groups(gm) if g.prunable}
    engine = step_table(gm)
    scores = {gid: torch.full((g.size,), 1.0) for gid, g in groups.items()}
    scores["layer1.1.conv1"] = torch.full((16,), 0.01)  # 16 wide = min_keep: only removable as a whole
    scores["conv1"] = torch.full((groups["conv1"].size,), 5.0)
    without = select_for_latency(gm, scores, engine, 0.02, align=16, min_keep=16)
    assert without and "layer1.1.conv1" not in without
    plan = select_for_latency(gm, scores, engine, 0.02, align=16, min_keep=16, remove_branches=True)
    assert plan.get("layer1.1.conv1") == list(range(16)), plan
    assert all(len(v) < groups[k].size or groups[k].removable for k, v in plan.items())
    assert engine.predict(gm, plan) <= engine.predict(gm) * 0.98
    pruned = analysed(PruneChannelsPass(plan)(gm).graph_module)
    names = dict(pruned.named_modules())
    assert "layer1.1.conv1" not in names and "layer1.1.conv2" not in names  # the block went with its group
    assert engine.predict(pruned) == pytest.approx(engine.predict(gm, plan))  # the table priced what was removed
    # a costly branch is not taken whole when a channel block buys the time for less importance
    scores["layer1.1.conv1"] = torch.full((16,), 100.0)
    plan = select_for_latency(gm, scores, engine, 0.02, align=16, min_keep=16, remove_branches=True)
    assert "layer1.1.conv1" not in plan and plan


def test_the_knapsack_takes_whole_attention_heads_at_the_engine_alignment():
    """A head of 16 channels is one aligned block at align 16: the knapsack may take heads, down to one (min_keep 16
    is one head's channels). Counted as single channels, a 4-head group had no block at all."""
    from test_ops import FusedQKVAttention

    torch.manual_seed(0)
    model, x = FusedQKVAttention(dim=64, heads=4), torch.randn(1, 3, 16, 16)
    gm = analysed(model, x)
    groups = {g.id: g for g in meta.channel_groups(gm) if g.prunable}
    engine = step_table(gm)
    scores = {gid: torch.full((g.size,), 1.0) for gid, g in groups.items()}
    scores["qkv"] = torch.tensor([0.01, 0.02, 0.03, 0.04])
    plan = select_for_latency(gm, scores, engine, 0.3, align=16, min_keep=16)
    assert plan.get("qkv") and len(plan["qkv"]) <= 3 and plan["qkv"][0] == 0, plan  # the cheapest head first
    pruned = analysed(PruneChannelsPass(plan)(gm).graph_module, x)
    assert pruned.get_submodule("qkv").out_features == 3 * 16 * (4 - len(plan["qkv"]))
    assert engine.predict(pruned) == pytest.approx(engine.predict(gm, plan))


class Stubs:
    def __init__(self, fail_at=None):
        self.fail_at = fail_at
        self.base = hqp_fx.count_params(CifarResNet(20))

    def finetune(self, m, rnd):
        if rnd == self.fail_at:
            raise KeyboardInterrupt("simulated kill")

    def evaluate(self, m):
        return {"top1": 90.0 - 5.0 * (1 - hqp_fx.count_params(m) / self.base)}


def _engine(model):
    """The "engine": the synthetic table of ``model``, plus 0.05 ms of overhead."""
    measured = step_table(analysed(model))
    return lambda m: measured.predict(analysed(m)) + 0.05


def _loop(tmp_path, stubs=None, resume=False, latency_fn=None, progress=lambda msg: None, **cfg):
    torch.manual_seed(0)
    model = realistic_random(CifarResNet(20), X)
    calib = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10)]
    stubs = stubs or Stubs()
    config = PruneLoopConfig(**{"delta_max": 50.0, "align": 16, "max_rounds": 4, "select": "latency", "steps": (0.1,),
                          **cfg})
    return prune_loop(model, X, calibration=calib, finetune_fn=stubs.finetune, evaluate_fn=stubs.evaluate,
                      config=config, checkpoint_dir=tmp_path, resume=resume,
                      latency_fn=latency_fn or _engine(model), latency_model=lambda gm: step_table(gm),
                      progress=progress)


def test_the_loop_predicts_and_measures_every_accepted_round_and_resumes_exactly(tmp_path):
    res = _loop(tmp_path / "a")
    accepted = [r for r in res.history if r.accepted]
    assert accepted and all(r.latency is not None and r.predicted_latency is not None for r in accepted)
    for r in accepted:  # calibrated on the dense model: the residual is the overhead, so predictions are exact
        assert r.predicted_latency == pytest.approx(r.latency)
    lat = [res.baseline_latency] + [r.latency for r in accepted]
    assert all(b <= a * 0.9 + 1e-9 for a, b in zip(lat, lat[1:])), lat  # each round takes its 10% of the time
    with pytest.raises(KeyboardInterrupt):
        _loop(tmp_path / "b", Stubs(fail_at=2))
    resumed = _loop(tmp_path / "b", resume=True)
    assert resumed.history == res.history
    # depth pruning inside the latency knapsack: only stage 1's 16-wide blocks are open, so only whole blocks can go
    deep = _loop(tmp_path / "c", remove_branches=True, ignore=("conv1", "layer2", "layer3"))
    assert deep.history and deep.history[0].accepted
    for r in deep.history:
        assert r.removed and all(n == 16 for n in r.removed.values())
        if r.accepted:
            assert r.predicted_latency == pytest.approx(r.latency)
    names = {n for n, _ in deep.model.named_modules()}
    assert not {f"layer1.{i}.conv{j}" for i in range(3) for j in (1, 2)} & names  # removed, not just planned


def test_each_prediction_starts_from_the_last_measured_round(tmp_path):
    """The table overstates what a cut saves (here the engine saves 0.6 of it, as whole blocks did on ResNet-56).
    Anchored once on the dense model, the error grew round by round; anchored on the last measurement (on the dense
    model's scale), a round's prediction is off only by the table's error on its own cut."""
    torch.manual_seed(0)
    table = _engine(realistic_random(CifarResNet(20), X))
    dense_ms = table(CifarResNet(20))
    res = _loop(tmp_path, latency_fn=lambda m: 0.6 * table(m) + 0.4 * dense_ms, max_rounds=4)
    accepted = [r for r in res.history if r.accepted]
    assert len(accepted) >= 3, res.history
    measured = [res.baseline_latency] + [r.latency for r in accepted]
    for before, after, r in zip(measured, measured[1:], accepted):
        table_saving = (before - after) / 0.6
        assert r.predicted_latency == pytest.approx(before - table_saving)
        assert r.reference_latency == pytest.approx(res.baseline_latency)


def test_keep_stem_leaves_the_stream_the_stem_feeds_whole(tmp_path):
    """With every block's inner channels ignored, the residual stream the stem feeds (one group across the padded
    shortcuts) is the only item of the knapsack: it is thinned, unless keep_stem keeps it."""
    assert stem_layers(analysed(CifarResNet(20))) == ("conv1",)
    assert stem_layers(analysed(torchvision.models.mobilenet_v3_small(), torch.randn(1, 3, 64, 64))) == \
        ("features.0.0",)
    inner = tuple(f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3))
    for keep in (False, True):
        res = _loop(tmp_path / str(keep), keep_stem=keep, ignore=inner, max_rounds=2)
        stream = next(g for g in meta.channel_groups(analysed(res.model)) if "conv1" in g.layers)
        assert (stream.size == 64) == keep, (res.history, res.stop_reason)
        assert any(r.accepted for r in res.history) != keep


class VetoAnyBlock(Stubs):
    """Removing any stage-2 residual block costs 10 points; thinning one costs nothing."""

    def evaluate(self, m):
        names = dict(m.named_modules())
        return {"top1": 90.0 if all(f"layer2.{b}.conv1" in names for b in range(3)) else 80.0}


def test_a_whole_block_that_breaks_delta_max_is_kept_and_the_step_retried_without_it(tmp_path):
    """The knapsack picks its cheapest item whatever the step, so a rejected whole block would come back at every
    smaller step, which used to stop the loop. Now the block is kept from then on and the same step retried
    without it: a second block may pass where the first failed; after DEPTH_TRIES rejected rounds of whole blocks,
    the rounds thin channels only."""
    said: list[str] = []
    res = _loop(tmp_path, VetoAnyBlock(), remove_branches=True, ignore=("conv1", "layer1", "layer3"), delta_max=1.0,
                max_rounds=8, steps=(0.1, 0.02, 0.01), progress=said.append)
    names = dict(res.model.named_modules())
    assert all(f"layer2.{b}.conv1" in names for b in range(3)), res.history  # no block went
    assert any(r.accepted for r in res.history) and \
        any(names[f"layer2.{b}.conv1"].out_channels < 32 for b in range(3)), res.history  # channels did
    state = json.loads((tmp_path / "hqp_state.json").read_text())
    # two rounds tried a block each, at the first step both times, and were rolled back; then the third block was
    # not tried
    tried = [r for r in res.history if any(r.removed.get(g) == 32 for g in state["kept_whole"])]  # all 32 inner
    assert [r.round for r in tried] == [0, 1] and [r.step for r in tried] == [0.1, 0.1], res.history
    assert len(state["kept_whole"]) == DEPTH_TRIES == state["depth_failures"] == 2, state["kept_whole"]
    kept = [m for m in said if "stay from now on" in m]
    assert len(kept) == 2 and all(b in m for b, m in zip(state["kept_whole"], kept)), said
    assert "no further block is removed whole" in kept[1] and "no further" not in kept[0]
    assert [r.round for r in res.history] == list(range(len(res.history)))  # every round number has its record
    assert "nothing left to prune" in res.stop_reason, res.stop_reason
    with pytest.raises(ValueError, match="select='latency' needs latency_model"):
        prune_loop(CifarResNet(20), X, calibration=[], finetune_fn=lambda m, r: None, evaluate_fn=lambda m: {},
                   config=PruneLoopConfig(select="latency"))


class SlowStart:
    """A machine in a slow spell while the run starts: its first timing is 30% slow, every later one exact."""

    def __init__(self):
        torch.manual_seed(0)
        self.engine, self.calls = _engine(realistic_random(CifarResNet(20), X)), 0

    def __call__(self, m):
        self.calls += 1
        return self.engine(m) * (1.3 if self.calls == 1 else 1.0)


def test_the_latency_target_is_judged_against_the_dense_model_timed_alongside(tmp_path):
    """Judged against a dense time taken once at the start, the slow spell made the first round look like 0.73 of
    dense and the loop stopped there (the true ratio 0.9). Each accepted round is now timed in alternating rounds
    with the dense model, and the target is their ratio."""
    timer = SlowStart()
    res = _loop(tmp_path, latency_fn=timer, target_latency=0.8, max_rounds=6)
    accepted = [r for r in res.history if r.accepted]
    assert len(accepted) >= 2 and "latency target reached" in res.stop_reason, (res.history, res.stop_reason)
    for r in accepted:
        assert r.reference_latency == pytest.approx(timer.engine(CifarResNet(20)))  # the steady dense time
    last, before = (r.latency / r.reference_latency for r in accepted[-1:-3:-1])
    assert last <= 0.8 < before
    # the start, then the alternating rounds of two per accepted round, and more for the one that reached the target
    defaults = PruneLoopConfig()
    assert timer.calls == 1 + 2 * defaults.latency_rounds * len(accepted) + 2 * defaults.latency_confirm_rounds


class FastSpell(SlowStart):
    """The dense model's timings during ``spell_calls`` fall in a slow spell (1.5x): a candidate timed beside them
    looks a third faster than it is. Every other timing is exact."""

    def __init__(self, spell_calls: range):
        super().__init__()
        self.spell, self.dense_params = spell_calls, hqp_fx.count_params(CifarResNet(20))

    def __call__(self, m):
        self.calls += 1
        slow = self.calls in self.spell and hqp_fx.count_params(m) == self.dense_params
        return self.engine(m) * (1.5 if slow else 1.0)


def test_a_ratio_that_would_stop_the_loop_is_timed_again_before_it_does(tmp_path):
    """The first accepted round's first pairing (calls 2-7) reads the dense model 1.5x slow, so the 0.9 round looks
    like 0.6 of dense, under the 0.8 target. Timed again in 7 rounds it is 0.9, and the loop goes on; without the
    confirmation it stops there."""
    steady = _loop(tmp_path / "steady", latency_fn=FastSpell(range(0)), target_latency=0.8, max_rounds=6)
    first = next(r for r in steady.history if r.accepted)
    assert first.latency / first.reference_latency > 0.8  # the true first round is short of the target
    fooled = _loop(tmp_path / "fooled", latency_fn=FastSpell(range(2, 8)), target_latency=0.8, max_rounds=6,
                   latency_confirm_rounds=0, latency_rounds=3)
    assert [r.round for r in fooled.history if r.accepted] == [first.round], fooled.history  # stopped at once
    confirmed = _loop(tmp_path / "confirmed", latency_fn=FastSpell(range(2, 8)), target_latency=0.8, max_rounds=6,
                      latency_rounds=3)
    assert [(r.round, r.params) for r in confirmed.history] == [(r.round, r.params) for r in steady.history]
    again = next(r for r in confirmed.history if r.accepted)
    assert again.latency / again.reference_latency == pytest.approx(first.latency / first.reference_latency)
    assert "latency target reached" in confirmed.stop_reason and "7 round(s)" in confirmed.stop_reason


class Spell(SlowStart):
    """Every model timed in the calls of ``spell`` is 1.5x slow; every other timing is exact."""

    def __init__(self, spell: set[int]):
        super().__init__()
        self.spell = spell

    def __call__(self, m):
        self.calls += 1
        return self.engine(m) * (1.5 if self.calls in self.spell else 1.0)


def test_a_round_is_judged_on_its_paired_ratio_and_keeps_its_raw_timings(tmp_path):
    """The first accepted round is timed in calls 2-7 (dense, candidate, three times). A spell over the dense
    model's second timing and the whole third round leaves dense [1, 1.5, 1.5] and candidate [1, 1, 1.5] of their
    true times: the ratio of the two medians reads the round at 2/3 of its true ratio, the median of the per-round
    ratios reads it exactly. The raw rounds are in the record."""
    steady = _loop(tmp_path / "steady", latency_fn=Spell(set()), max_rounds=1, latency_confirm_rounds=0,
                   latency_rounds=3)
    spell = _loop(tmp_path / "spell", latency_fn=Spell({4, 6, 7}), max_rounds=1, latency_confirm_rounds=0,
                  latency_rounds=3)
    (true,), (read,) = steady.history, spell.history
    assert true.accepted and read.accepted and read.params == true.params
    dense, cand = true.reference_latency, true.latency
    assert read.reference_rounds_ms == pytest.approx([dense, 1.5 * dense, 1.5 * dense])
    assert read.latency_rounds_ms == pytest.approx([cand, cand, 1.5 * cand])
    assert read.latency / read.reference_latency == pytest.approx(cand / dense)
    assert statistics.median(read.latency_rounds_ms) / statistics.median(read.reference_rounds_ms) == \
        pytest.approx(cand / dense / 1.5)  # what the loop judged before
    assert paired_ratio([2.0, 3.0], [1.0, 1.0]) == 2.5
    with pytest.raises(ValueError, match="one time per round for both files"):
        paired_ratio([1.0, 2.0], [1.0])
