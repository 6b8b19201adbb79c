"""The HQP pruning loop: delta_max with forced rollback, targets, exact resume after a kill."""
from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import hqp_fx
from hqp_fx import meta
from hqp_fx.prune_loop import STATE_FILE, PruneLoopConfig, prune_loop
from hqp_fx.train import paired_drop
from hqp_fx.models import CifarResNet
from hqp_fx.passes import AlignChannelsPass, ChannelDependencyPass, score_channels, select_channels

from helpers import realistic_random

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CALIB = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)), torch.arange(8) % 10) for i in range(2)]


def model():
    torch.manual_seed(0)
    return realistic_random(CifarResNet(20), X)


class Stubs:
    """A deterministic stand-in for accuracy: 90% minus 10 points per 100% of parameters removed."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.base = hqp_fx.count_params(CifarResNet(20))

    def finetune(self, m, rnd):
        if rnd == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        gen = torch.Generator().manual_seed(rnd)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        m.train()
        loss = F.cross_entropy(m(torch.randn(4, 3, 32, 32, generator=gen)), torch.arange(4))
        loss.backward()
        opt.step()
        m.eval()

    def evaluate(self, m):
        return {"top1": 90.0 - 10.0 * (1 - hqp_fx.count_params(m) / self.base)}


def run(tmp_path=None, stubs=None, resume=False, latency_fn=None, recover_fn=None, **cfg):
    stubs = stubs or Stubs()
    config = PruneLoopConfig(**{"delta_max": 2.0, "align": 4, "criterion": "fisher", **cfg})
    return prune_loop(model(), X, calibration=CALIB, finetune_fn=stubs.finetune, evaluate_fn=stubs.evaluate,
                      config=config, checkpoint_dir=tmp_path, resume=resume, latency_fn=latency_fn,
                      recover_fn=recover_fn)


class Recovery(Stubs):
    """A recovery fine-tune that trains one real step and moves the stub accuracy by ``gain`` points."""

    def __init__(self, gain: float, kill: bool = False):
        super().__init__()
        self.gain, self.kill, self.calls = gain, kill, 0

    def recover(self, m):
        self.calls += 1
        if self.kill:
            self.kill = False
            raise KeyboardInterrupt("simulated kill during the recovery")
        self.finetune(m, 999)
        m.recovered = True

    def evaluate(self, m):
        return {"top1": super().evaluate(m)["top1"] + (self.gain if getattr(m, "recovered", False) else 0.0)}


def test_loop_honours_delta_max_with_forced_rollback():
    res = run()
    assert res.history, "at least one round ran"
    rejected = [r for r in res.history if not r.accepted]
    assert rejected, "the stub accuracy must force at least one rollback"
    assert all(r.drop <= 2.0 for r in res.history if r.accepted)
    assert all(r.drop > 2.0 for r in rejected)
    first_reject = res.history.index(rejected[0])
    later = res.history[first_reject + 1:]
    assert all(r.step < rejected[0].step for r in later), "a rollback shrinks the step"
    assert res.baseline["top1"] - res.final["top1"] <= 2.0
    assert hqp_fx.count_params(res.model) == [r for r in res.history if r.accepted][-1].params
    assert "delta_max" in res.stop_reason or "nothing left" in res.stop_reason


def test_a_guard_judges_the_candidates_against_the_dense_evaluation():
    """guard_fn (compress: the candidate's INT8 model in ONNX Runtime) decides delta_max for every round and the
    recovery; the baseline stays evaluate_fn's dense figure. A guard 1.5 points below leaves 0.5 of the budget."""
    stubs, calls = Stubs(), []

    def guard(m):
        calls.append(m)
        return {"top1": stubs.evaluate(m)["top1"] - 1.5}

    rec = Recovery(0.0)
    config = PruneLoopConfig(delta_max=2.0, align=4, criterion="fisher")
    res = prune_loop(model(), X, calibration=CALIB, finetune_fn=stubs.finetune, evaluate_fn=stubs.evaluate,
                     config=config, guard_fn=guard, recover_fn=rec.recover)
    plain = run()
    assert res.baseline["top1"] == 90.0 and len(calls) == len(res.history) + 1  # every round and the recovery
    for r in res.history:
        assert r.drop == pytest.approx(1.5 + 10.0 * (1 - r.params / stubs.base)) and r.accepted == (r.drop <= 2.0)
    assert res.recovery["top1_before"] == res.final["top1"] and res.baseline["top1"] - res.final["top1"] <= 2.0
    assert hqp_fx.count_params(res.model) > hqp_fx.count_params(plain.model)  # the guard's budget was smaller


class Retuned(Stubs):
    """A candidate scores ``penalty`` points under the stub after its round's fine-tune and wins back ``gain``
    points with each further fine-tune of the same round (the loop's patience)."""

    def __init__(self, penalty: float, gain: float):
        super().__init__()
        self.penalty, self.gain, self.calls = penalty, gain, Counter()

    def finetune(self, m, rnd):
        super().finetune(m, rnd)
        self.calls[rnd] += 1
        m.extra = self.calls[rnd] - 1

    def evaluate(self, m):
        top1 = super().evaluate(m)["top1"]
        return {"top1": top1 if not hasattr(m, "extra") else top1 - self.penalty + self.gain * m.extra}


def test_patience_fine_tunes_a_candidate_just_over_delta_max_again_before_rolling_it_back():
    stub_drop = lambda r: 10.0 * (1 - r.params / Stubs().base)  # noqa: E731 (0.66 for the first round here)
    # delta_max 2.0: a drop of 2.66 wins back 1.0 with one more fine-tune; 2.96 wins back 0.2, not enough, rolled
    # back after the retry; 3.86 is over delta_max by more than half of it (RETRY_WITHIN): never retried
    for patience, penalty, gain, accepted, retries in ((1, 2.0, 1.0, True, 1), (0, 2.0, 1.0, False, 0),
                                                       (1, 2.3, 0.2, False, 1), (3, 3.2, 1.0, False, 0)):
        stubs = Retuned(penalty, gain=gain)
        res = run(stubs=stubs, patience=patience, max_rounds=1)
        (first,) = res.history
        assert (first.accepted, first.retries) == (accepted, retries)
        assert stubs.calls[first.round] == 1 + first.retries
        assert first.drop == pytest.approx(stub_drop(first) + penalty - gain * first.retries)
        # the drop each retry started from is on the record
        assert first.drops_before == pytest.approx([first.drop + gain] * first.retries)
    with pytest.raises(ValueError, match="patience"):
        PruneLoopConfig(patience=-1)


class Hits(Stubs):
    """The stub's accuracy as per-image hits on 1,000 images: the dense model right on the first 900, a pruned one
    wrong on as many of those as its drop says (0.1 point each)."""

    @staticmethod
    def hits(lost: int) -> torch.Tensor:
        h = torch.arange(1000) < 900
        h[:lost] = False
        return h

    def evaluate(self, m):
        lost = round((90.0 - super().evaluate(m)["top1"]) * 10)
        h = self.hits(lost)
        return {"top1": 100 * h.double().mean().item(), "hits": [h]}


def test_a_margin_accepts_a_round_only_when_its_drop_clears_delta_max_by_that_many_standard_errors():
    plain = run(stubs=Hits(), max_rounds=8)
    for r in plain.history:  # every record carries its drop's paired standard error
        assert r.drop_se == pytest.approx(paired_drop([Hits.hits(0)], [Hits.hits(round(r.drop * 10))])[1])
    margined = run(stubs=Hits(), margin=2.0, max_rounds=8)
    assert all(r.drop + 2.0 * r.drop_se <= 2.0 for r in margined.history if r.accepted)
    assert any(not r.accepted and r.drop <= 2.0 for r in margined.history), "the margin changed a verdict"
    assert hqp_fx.count_params(margined.model) > hqp_fx.count_params(plain.model)
    with pytest.raises(hqp_fx.HQPError, match="margin=1 needs the drop's standard error"):
        run(margin=1.0, max_rounds=1)  # the plain stub returns no hits
    with pytest.raises(ValueError, match="margin"):
        PruneLoopConfig(margin=-1.0)


class Clocked(Stubs):
    """Each fine-tune advances a stand-in clock by ``minutes`` (replacing the loop's, so no test waits)."""

    def __init__(self, minutes: float):
        super().__init__()
        self.now, self.minutes = 0.0, minutes

    def clock(self):
        return self.now

    def finetune(self, m, rnd):
        super().finetune(m, rnd)
        self.now += 60 * self.minutes


def test_a_time_budget_starts_no_round_that_would_end_past_it(monkeypatch, tmp_path):
    """Rounds of 10 stand-in minutes under a 35-minute budget: three rounds (30 min), then a fourth would end at
    40, so the loop stops, says why, and the budget is no part of what a resume checks."""
    stubs = Clocked(10.0)
    monkeypatch.setattr("hqp_fx.prune_loop._clock", stubs.clock)
    res = run(tmp_path / "ckpt", stubs=stubs, time_budget=35 * 60, delta_max=50.0, max_rounds=10)
    assert len(res.history) == 3 and all(r.accepted for r in res.history)
    assert res.stop_reason == "time budget reached (30.0 of 35 min used; a round takes about 10.0 min)"
    # the same run with no budget goes on; a budget already spent before the first round stops at once
    assert len(run(stubs=Clocked(10.0), delta_max=50.0, max_rounds=5).history) == 5
    monkeypatch.setattr("hqp_fx.prune_loop._clock", itertools.count().__next__)  # a second per reading
    spent = run(time_budget=0.5, max_rounds=5)
    assert spent.history == [] and spent.stop_reason == "time budget reached (0.0 of 0.00833333 min used)"
    with pytest.raises(ValueError, match="time_budget"):
        PruneLoopConfig(time_budget=0)
    fingerprint = json.loads((tmp_path / "ckpt" / STATE_FILE).read_text())["fingerprint"]
    assert not any("time_budget" in k for k in fingerprint) and "config.delta_max" in fingerprint


def test_resume_after_kill_gives_the_same_decisions(tmp_path):
    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", Stubs(fail_at=2))
    assert (tmp_path / "b" / STATE_FILE).is_file()
    resumed = run(tmp_path / "b", resume=True)
    assert [(r.round, r.step, r.accepted, r.removed, r.params) for r in resumed.history] == \
           [(r.round, r.step, r.accepted, r.removed, r.params) for r in straight.history]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recovery_fine_tune_is_kept_only_when_it_does_not_lower_top1():
    plain = run(target_params=0.9, delta_max=50.0)
    for gain, kept in ((0.5, True), (-0.5, False)):
        rec = Recovery(gain)
        res = run(stubs=rec, recover_fn=rec.recover, target_params=0.9, delta_max=50.0)
        assert rec.calls == 1 and [(r.round, r.removed) for r in res.history] == [(r.round, r.removed)
                                                                                  for r in plain.history]
        before = plain.final["top1"]
        assert res.recovery == {"top1_before": before, "top1_after": before + gain, "kept": kept}
        assert res.final["top1"] == (before + gain if kept else before)
        assert getattr(res.model, "recovered", False) is kept
        trained = [not torch.equal(a, b) for a, b in zip(res.model.state_dict().values(),
                                                         plain.model.state_dict().values())]
        assert any(trained) is kept  # a rejected recovery leaves the last accepted round's weights
    nothing = Recovery(1.0)  # nothing accepted: no model of the loop's own to recover
    res = run(stubs=nothing, recover_fn=nothing.recover, delta_max=0.0, steps=(0.05,))
    assert not any(r.accepted for r in res.history) and nothing.calls == 0 and res.recovery is None


def test_resume_after_a_finished_run_or_a_kill_in_the_recovery(tmp_path):
    straight_rec = Recovery(0.5)
    straight = run(tmp_path / "a", straight_rec, recover_fn=straight_rec.recover, target_params=0.9, delta_max=50.0)
    again = Recovery(0.5)  # a finished run: resume returns its result, training nothing
    resumed = run(tmp_path / "a", again, resume=True, recover_fn=again.recover, target_params=0.9, delta_max=50.0)
    assert again.calls == 0 and resumed.final == straight.final and resumed.recovery == straight.recovery
    assert json.loads((tmp_path / "a" / STATE_FILE).read_text())["model"] == "recovered.hqp"
    assert resumed.stop_reason == straight.stop_reason and resumed.history == straight.history
    killed = Recovery(0.5, kill=True)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", killed, recover_fn=killed.recover, target_params=0.9, delta_max=50.0)
    res = run(tmp_path / "b", killed, resume=True, recover_fn=killed.recover, target_params=0.9, delta_max=50.0)
    assert killed.calls == 2 and res.recovery == straight.recovery and res.history == straight.history
    for done in (resumed, res):
        a, b = straight.model.state_dict(), done.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_at_the_smallest_step_survives_resume(tmp_path):
    """The delta_max stop is decided by a fine-tuned round, which a resume must not run again."""
    res = run(tmp_path, steps=(0.05,))
    assert "broke delta_max" in res.stop_reason
    resumed = run(tmp_path, resume=True, steps=(0.05,))
    assert resumed.history == res.history and resumed.stop_reason == res.stop_reason


def test_targets_stop_the_loop_and_unreachable_targets_fail_cleanly(tmp_path):
    res = run(delta_max=50.0, target_params=0.9)
    assert "params target reached" in res.stop_reason
    assert hqp_fx.count_params(res.model) <= 0.9 * res.baseline_params
    with pytest.raises(ValueError, match="target_macs=0.01 is unreachable"):
        run(tmp_path / "c", target_macs=0.01)
    assert not (tmp_path / "c").exists()  # nothing half-written


def test_measured_latency_target_stops_the_loop_and_survives_resume(tmp_path):
    """A deterministic stand-in for a latency measurement: the model's MACs in millions."""
    calls = []

    def latency(m):
        calls.append(hqp_fx.count_macs(m))
        return calls[-1] / 1e6

    res = run(tmp_path / "a", delta_max=50.0, target_latency=0.9, latency_fn=latency)
    assert "latency target reached" in res.stop_reason
    accepted = [r for r in res.history if r.accepted]
    # the dense model once at the start, then per accepted round alternating rounds of the dense model and it,
    # and more for the round that reached the target
    defaults = PruneLoopConfig()
    assert res.baseline_latency == calls[0] / 1e6 and \
        len(calls) == 1 + 2 * defaults.latency_rounds * len(accepted) + 2 * defaults.latency_confirm_rounds
    assert all(r.reference_latency == res.baseline_latency for r in accepted)  # a steady timer: the same dense time
    assert accepted[-1].latency <= 0.9 * res.baseline_latency < accepted[-2].latency
    assert all(r.latency is None for r in res.history if not r.accepted)
    with pytest.raises(KeyboardInterrupt):  # resume: the baseline latency comes from the checkpoint
        run(tmp_path / "b", Stubs(fail_at=1), delta_max=50.0, target_latency=0.9, latency_fn=latency)
    resumed = run(tmp_path / "b", resume=True, delta_max=50.0, target_latency=0.9, latency_fn=latency)
    assert [(r.round, r.params, r.latency) for r in resumed.history] == [(r.round, r.params, r.latency)
                                                                         for r in res.history]
    with pytest.raises(ValueError, match="target_latency needs latency_fn"):
        run(target_latency=0.5)


def test_flops_normalize_reaches_the_loops_ranking():
    """Round 0 of a taylor-per-MAC loop removes exactly what score -> select -> align by hand removes."""
    gm = hqp_fx.trace(model(), X)
    ChannelDependencyPass()(gm)
    by_hand = {}
    for per_mac in (True, False):
        scores = score_channels(gm, "taylor", CALIB, num_batches=8, flops_normalize=per_mac, seed=0)
        AlignChannelsPass(select_channels(meta.channel_groups(gm), scores, 0.05, min_keep=4, unit=4), 4, scores)(gm)
        by_hand[per_mac] = {k: len(v) for k, v in gm.meta[meta.ALIGN]["plan"].items()}
    assert by_hand[True] != by_hand[False], "per MAC must change the choice on this model, or the test shows nothing"
    for per_mac in (True, False):
        res = run(criterion="taylor", flops_normalize=per_mac, max_rounds=1, delta_max=50.0)
        assert res.history[0].removed == by_hand[per_mac]
    with pytest.raises(ValueError, match="flops_normalize divides an estimated loss change by MACs"):
        PruneLoopConfig(criterion="fisher", flops_normalize=True)


def test_bad_configuration_is_explained(tmp_path):
    with pytest.raises(ValueError, match="delta_max must be >= 0"):
        PruneLoopConfig(delta_max=-1)
    with pytest.raises(ValueError, match="steps must be decreasing fractions"):
        PruneLoopConfig(steps=(0.01, 0.05))
    with pytest.raises(ValueError, match="target_macs is a fraction"):
        PruneLoopConfig(target_macs=2)
    with pytest.raises(ValueError, match=r"min_keep \(4\) must be at least the alignment multiple \(8\)"):
        PruneLoopConfig(min_keep=4, align=8)
    with pytest.raises(FileNotFoundError, match="resume=True but"):
        run(tmp_path / "none", resume=True)


def test_a_smaller_step_that_aligns_to_the_rolled_back_plan_is_not_retried(tmp_path):
    """On a 16 grid the 2% and 1% steps round to the 5% step's plan: retraining it would repeat the rollback."""
    res = run(tmp_path, delta_max=0.1, align=16)
    assert [(r.round, r.step, r.accepted, r.removed) for r in res.history] == [(0, 0.05, False, {"layer3.2.conv1": 16})]
    assert res.stop_reason == "round 0 broke delta_max and every smaller step aligns to the same plan; rolled back"
    mixed = run(delta_max=0.3, align=16, steps=(0.1, 0.05, 0.02))  # 10% -> two groups, 5% -> one, 2% -> that one
    assert [r.step for r in mixed.history] == [0.1, 0.05] and not any(r.accepted for r in mixed.history)
    resumed = run(tmp_path, resume=True, delta_max=0.1, align=16)  # the skip survives resume
    assert resumed.history == res.history and resumed.stop_reason == res.stop_reason
