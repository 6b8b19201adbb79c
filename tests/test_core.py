"""Pass infrastructure: torch's PassManager, Pipeline contracts, instruments, printout."""
from __future__ import annotations

import io

import pytest
import torch
from torch.fx.passes.infra.pass_manager import PassManager

import hqp_fx
from hqp_fx import meta
from hqp_fx.core import DumpInstrument, Pipeline, PrintInstrument, TimingInstrument, format_graph
from hqp_fx.passes import AlignChannelsPass, ChannelDependencyPass, PruneChannelsPass

from test_dependency import Chain, Residual


def traced(model=None):
    return hqp_fx.trace((model or Residual()).eval(), torch.randn(1, 3, 8, 8))


def test_passes_run_inside_torch_pass_manager():
    gm = traced()
    pm = PassManager(passes=[ChannelDependencyPass(), PruneChannelsPass({"stem": [0]})])
    result = pm(gm)
    assert result.modified
    assert result.graph_module.stem.out_channels == 3
    assert gm.stem.out_channels == 4  # functional: the input is untouched


def test_pipeline_checks_metadata_contract_at_construction():
    with pytest.raises(hqp_fx.PassError, match=r"entry 0 \(PruneChannelsPass\) requires .*hqp.channel_groups"):
        Pipeline([PruneChannelsPass({"stem": [0]})])
    with pytest.raises(hqp_fx.PassError, match=r"entry 1 \(PruneChannelsPass\) requires \['hqp.align'\]"):
        Pipeline([ChannelDependencyPass(), PruneChannelsPass()])
    with pytest.raises(hqp_fx.PassError, match="not a hqp_fx GraphPass"):
        Pipeline([lambda gm: gm])
    Pipeline([ChannelDependencyPass(), AlignChannelsPass({"stem": [0]}, 2), PruneChannelsPass()])


def test_pipeline_with_instruments(tmp_path):
    stream = io.StringIO()
    timing = TimingInstrument()
    pipe = Pipeline([ChannelDependencyPass(), AlignChannelsPass({"stem": [0, 1, 2]}, 2), PruneChannelsPass()],
                    instruments=[PrintInstrument(stream), DumpInstrument(tmp_path / "dump"), timing])
    result = pipe(traced())
    assert result.modified and result.graph_module.stem.out_channels == 2  # keep 1 -> rounded to 2
    assert [name for name, _ in timing.timings] == ["ChannelDependencyPass", "AlignChannelsPass", "PruneChannelsPass"]
    assert all(t >= 0 for _, t in timing.timings)
    dumps = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumps == ["01_ChannelDependencyPass.txt", "02_AlignChannelsPass.txt", "03_PruneChannelsPass.txt"]
    text = stream.getvalue()
    assert "=== after ChannelDependencyPass (modified=False) ===" in text and "groups=stem" in text


def test_format_graph_is_deterministic_with_shapes_and_groups():
    a, b = traced(), traced()
    ChannelDependencyPass()(a)
    ChannelDependencyPass()(b)
    text = format_graph(a)
    assert text == format_graph(b)
    assert "0x" not in text  # no memory addresses
    line = next(l for l in text.splitlines() if l.startswith("stem "))
    assert "call_module" in line and "[Conv2d]" in line and "1x4x8x8" in line and "groups=stem" in line
    assert len(text.splitlines()) == len(list(a.graph.nodes))


def test_analysis_pass_requires_graph_module():
    with pytest.raises(hqp_fx.PassError, match="needs a torch.fx.GraphModule"):
        ChannelDependencyPass()(Chain())


def test_metadata_accessors_explain_missing_keys():
    gm = traced()
    with pytest.raises(KeyError, match="run hqp_fx.passes.ChannelDependencyPass first"):
        meta.channel_groups(gm)


def test_pipeline_subtracts_what_a_pass_invalidates():
    """Pruning returns a new graph without the channel analysis: a later channel pass must re-analyse first."""
    from hqp_fx.passes import SensitivityPass

    with pytest.raises(hqp_fx.PassError, match=r"entry 2 \(SensitivityPass\) requires \['hqp.channel_groups', "
                                               r"'hqp.channel_analysis'\], which entry 1 \(PruneChannelsPass\) "
                                               r"invalidates; run the pass that provides them"):
        Pipeline([ChannelDependencyPass(), PruneChannelsPass({"stem": [0]}), SensitivityPass("l1")])
    pipe = Pipeline([ChannelDependencyPass(), PruneChannelsPass({"stem": [0]}), ChannelDependencyPass(),
                     SensitivityPass("l1")])
    result = pipe(traced())
    assert result.modified and result.graph_module.stem.out_channels == 3
    assert result.graph_module.meta[meta.SENSITIVITY]["scores"]["stem"].shape == (3,)
    assert result.graph_module.meta[meta.PRUNE_PLAN] == {"stem": [0]}


def test_an_empty_plan_keeps_its_promise_and_says_nothing_changed():
    gm = traced()
    ChannelDependencyPass()(gm)
    result = PruneChannelsPass({})(gm)
    assert result.modified is False and result.graph_module is gm and gm.meta[meta.PRUNE_PLAN] == {}


def test_ensures_checks_the_returned_module():
    from hqp_fx.core import GraphPass, PassResult

    class Forgetful(GraphPass):
        provided_meta = ("hqp.something",)

        def call(self, graph_module):
            return PassResult(graph_module, False)

    with pytest.raises(hqp_fx.PassError, match=r"Forgetful promised gm.meta keys \['hqp.something'\]"):
        Forgetful()(traced())
    gm = traced()
    ChannelDependencyPass()(gm)
    pruned = PruneChannelsPass({"stem": [0]})(gm).graph_module  # writes its plan on the new module only
    assert meta.PRUNE_PLAN in pruned.meta and meta.PRUNE_PLAN not in gm.meta
    pm = PassManager(passes=[ChannelDependencyPass(), AlignChannelsPass({"stem": [0, 1]}, 2), PruneChannelsPass()])
    assert pm(traced()).graph_module.stem.out_channels == 2  # torch's PassManager runs the contract too
