"""PruneChannelsPass: bad plans are refused by name; the output is a normal, savable nn.Module."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import hqp_fx
from hqp_fx import meta
from hqp_fx.models import CifarResNet
from hqp_fx.passes import AlignChannelsPass, ChannelDependencyPass, PruneChannelsPass

from helpers import random_plan, realistic_random
from test_dependency import Chain, analyse


@pytest.fixture
def chain():
    return analyse(Chain())


@pytest.mark.parametrize("plan, match", [
    ({"nope": [0]}, "unknown group 'nope'"),
    ({"conv1": [6]}, r"group 'conv1': channel indices \[6\] are out of range 0..5"),
    ({"conv1": [-1]}, "out of range"),
    ({"conv1": [1, 1]}, r"group 'conv1': duplicate channel indices \[1\]"),
    ({"conv1": list(range(6))}, "group 'conv1': the plan removes all 6 channels"),
    ({"conv2": [0]}, "group 'conv2' is not prunable: feeds the network output"),
    ({"x": [0]}, "group 'x' is not prunable: network input"),
])
def test_bad_plans_are_rejected_by_name(chain, plan, match):
    gm, _, _ = chain
    with pytest.raises(ValueError, match=match):
        PruneChannelsPass(plan)(gm)


def test_empty_plan_reports_unmodified(chain):
    gm, _, _ = chain
    res = PruneChannelsPass({"conv1": []})(gm)
    assert res.modified is False and res.graph_module is gm


def test_prune_needs_the_analysis():
    gm = hqp_fx.trace(Chain().eval(), torch.randn(1, 3, 8, 8))
    with pytest.raises(hqp_fx.PassError, match="PruneChannelsPass needs gm.meta keys"):
        PruneChannelsPass({"conv1": [0]})(gm)


def test_pruned_model_trains_and_exports(chain, tmp_path):
    gm, _, x = chain
    pruned = PruneChannelsPass({"conv1": [0, 2]})(gm).graph_module
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    loss = pruned(x).square().mean()
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in pruned.parameters())
    exported = torch.export.export(pruned.eval(), (x,))
    assert torch.allclose(exported.module()(x), pruned(x), atol=1e-6)


def test_user_model_never_mutated():
    model = realistic_random(CifarResNet(20), torch.randn(1, 3, 32, 32)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    gm = hqp_fx.trace(model, x)
    ChannelDependencyPass()(gm)
    gm_params = {k: v.clone() for k, v in gm.state_dict().items()}
    PruneChannelsPass(random_plan(meta.channel_groups(gm), 0.5))(gm)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, gm_params[k]) for k, v in gm.state_dict().items())
    assert model.training is True  # trace works on a copy in eval mode


def test_save_load_roundtrip_in_fresh_process(tmp_path):
    model = realistic_random(CifarResNet(20), torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    gm = hqp_fx.trace(model, x)
    ChannelDependencyPass()(gm)
    pruned = PruneChannelsPass(random_plan(meta.channel_groups(gm), 0.3))(gm).graph_module
    path = tmp_path / "pruned.hqp"
    hqp_fx.save(pruned, path)
    torch.save({"x": x, "y": pruned(x).detach()}, tmp_path / "io.pt")
    script = (
        "import torch, hqp_fx, sys\n"
        f"m = hqp_fx.load({str(path)!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)\n"
        "assert torch.equal(m(io['x']), io['y']), 'outputs differ'\n"
        "assert not m.training\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == hqp_fx.count_params(pruned)
    # the reloaded model is a GraphModule that hqp_fx passes accept again
    again = hqp_fx.load(path)
    ChannelDependencyPass()(again)
    assert any(g.prunable for g in meta.channel_groups(again))


def test_load_refuses_foreign_files(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(hqp_fx.HQPError, match="not a hqp_fx model file"):
        hqp_fx.load(bad)


def test_save_is_atomic_and_rejects_non_graph_modules(tmp_path):
    with pytest.raises(TypeError, match="expects a torch.fx.GraphModule"):
        hqp_fx.save(nn.Linear(2, 2), tmp_path / "x.hqp")
    assert not list(tmp_path.iterdir())


# ---- alignment --------------------------------------------------------------------------

def test_align_rounds_to_nearest_multiple():
    model = realistic_random(CifarResNet(20), torch.randn(1, 3, 32, 32))
    gm = hqp_fx.trace(model, torch.randn(1, 3, 32, 32))
    ChannelDependencyPass()(gm)
    groups = {g.id: g for g in meta.channel_groups(gm)}
    plan = {
        "conv1": list(range(40, 50)),           # 64 -> keep 54 -> 56
        "layer2.0.conv1": list(range(0, 13)),   # 32 -> keep 19 -> 16
        "layer1.0.conv1": list(range(0, 13)),   # 16 -> keep 3  -> 8, never zero
        "layer1.1.conv1": [],                   # untouched
    }
    res = AlignChannelsPass(plan, multiple=8)(gm)
    assert res.modified is False
    record = gm.meta[meta.ALIGN]
    assert record["multiple"] == 8
    assert record["rounding"] == {"conv1": (64, 54, 56), "layer2.0.conv1": (32, 19, 16), "layer1.0.conv1": (16, 3, 8)}
    aligned = record["plan"]
    assert aligned["conv1"] == list(range(40, 48))  # priority order kept: first entries survive
    assert len(aligned["layer2.0.conv1"]) == 16 and set(range(13)) <= set(aligned["layer2.0.conv1"])
    assert len(aligned["layer1.0.conv1"]) == 8
    assert "layer1.1.conv1" not in aligned
    pruned = PruneChannelsPass()(gm).graph_module  # takes the aligned plan from the metadata
    for gid, (size, _, keep) in record["rounding"].items():
        assert groups[gid].size - len(aligned[gid]) == keep and keep % 8 == 0
    assert pruned.get_submodule("layer2.0.conv1").out_channels == 16


def test_align_uses_scores_and_never_exceeds_size():
    gm, groups, _ = analyse(Chain())
    scores = {"conv1": torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 0.3])}
    AlignChannelsPass({"conv1": [1]}, multiple=4, scores=scores)(gm)  # keep 5 -> 4: one more, lowest score
    assert gm.meta[meta.ALIGN]["plan"] == {"conv1": [1, 3]}
    AlignChannelsPass({"conv1": [1]}, multiple=8)(gm)  # keep 5 -> nearest 8 > size 6 -> 6: nothing removed
    assert gm.meta[meta.ALIGN]["plan"] == {} and gm.meta[meta.ALIGN]["rounding"]["conv1"] == (6, 5, 6)


def test_engine_alignment_covers_every_backend():
    from hqp_fx.passes.align import engine_alignment
    from hqp_fx.passes.quantize import BACKENDS

    assert {b: engine_alignment(b) for b in BACKENDS} == {"tensorrt": 16, "onnxruntime": 16, "x86-inductor": 16}
    with pytest.raises(ValueError, match=r"no channel alignment known for backend 'openvino'.*explicit multiple"):
        engine_alignment("openvino")


def test_align_rejects_bad_input():
    gm, _, _ = analyse(Chain())
    with pytest.raises(ValueError, match="multiple must be a positive int"):
        AlignChannelsPass({}, multiple=0)
    with pytest.raises(ValueError, match="unknown group"):
        AlignChannelsPass({"zzz": [0]})(gm)
