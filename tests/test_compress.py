"""hqp compress / hqp demo end to end: every output, the documented hqp.json schema, reported numbers that
re-measure the same, and refusals that leave nothing behind."""
from __future__ import annotations

import json
import operator
import re
import subprocess
import sys

import jsonschema
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import hqp_fx
from hqp_fx.cli import main
from hqp_fx.compress import HQP_JSON_SCHEMA, RECOVER_AUTO_MAX_EPOCHS, CompressConfig, onnx_latency, recovery_epochs
from hqp_fx.data import BatchLoader
from hqp_fx.demo import digits
from hqp_fx.engines.ort import OrtModel
from hqp_fx.passes.quantize import QuantConfig
from hqp_fx.train import evaluate, paired_drop

OUTPUTS = ["accuracy_vs_macs.png", "channels_per_layer.png", "hqp.json", "latency_size.png", "model_dense_fp32.onnx",
           "model_dense_int8.onnx", "model_fp32.onnx", "model_int8.onnx", "model_pruned.hqp", "report.md", "report.txt",
           "verification.txt"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    code = main(["demo", "--out", str(out), "--size", "8", "--max-rounds", "3", "--finetune-epochs", "0.5",
                 "--samples", "64", "--threads", "1", "--distill", "0.9"])
    assert code == 0
    return out


@pytest.mark.slow  # a whole compress job
def test_demo_writes_every_output_and_a_valid_sidecar(demo_run):
    assert sorted(p.name for p in demo_run.iterdir()) == OUTPUTS
    assert not (demo_run.parent / "out.checkpoints").exists(), "checkpoints are removed after a successful run"
    report = json.loads((demo_run / "hqp.json").read_text())
    jsonschema.validate(report, HQP_JSON_SCHEMA)
    assert len(report["rounds"]) == 3 and report["stop_reason"].startswith("max_rounds")
    assert report["recovery"] is None and report["config"]["recover_epochs"] == 0
    assert "seen_check" not in report["splits"]  # its validation images were held out before the model trained
    assert set(report["variants"]) == {"dense_fp32", "prune_only_fp32", "hqp_int8", "quantize_only_int8"}
    var = report["variants"]  # speed-ups: the median of round-paired ratios over the alternating timing rounds
    paired = sorted(base / v for base, v in zip(var["dense_fp32"]["rounds_ms"], var["hqp_int8"]["rounds_ms"]))
    assert len(paired) == 3 and var["hqp_int8"]["speedup"] == paired[1]
    head_to_head = report["hqp_vs_quantize_only_rounds_ms"]  # the headline: the two INT8 files timed run by run
    paired = sorted(q / h for q, h in zip(head_to_head["quantize_only_int8"], head_to_head["hqp_int8"]))
    assert len(paired) == 3 and report["hqp_vs_quantize_only"] == paired[1]
    assert "HQP INT8 against quantize-only INT8" in (demo_run / "report.md").read_text()
    assert report["compression"]["macs"][1] < report["compression"]["macs"][0]
    assert report["within_delta_max"] == (report["accuracy"]["final_drop"] <= report["delta_max"])
    assert report["config"]["finetune"]["distill"] == 0.9 and report["config"]["finetune"]["temperature"] == 4.0
    # --align auto: the onnxruntime backend's 16-channel int8 blocks, and every layer the loop narrowed honours them
    assert report["config"]["prune"]["align"] == 16
    narrowed = {n: kept for n, (dense, kept) in report["channels"].items() if kept < dense}
    assert narrowed and all(kept % 16 == 0 for kept in narrowed.values()), report["channels"]
    assert report["tensorrt"]["ran"] is False and "TensorRT: not run" in (demo_run / "report.md").read_text()
    for png in ("accuracy_vs_macs.png", "channels_per_layer.png", "latency_size.png"):
        with Image.open(demo_run / png) as img:
            assert img.size[0] > 200 and img.size[1] > 200


@pytest.mark.slow  # a whole compress job
def test_demo_reported_accuracies_remeasure_the_same(demo_run):
    report = json.loads((demo_run / "hqp.json").read_text())
    _, test = digits(size=8)
    loader = list(BatchLoader(test, 500))
    pruned = hqp_fx.load(demo_run / "model_pruned.hqp")
    assert evaluate(pruned, loader)["top1"] == pytest.approx(report["accuracy"]["pruned_fp32"]["top1"])
    int8 = evaluate(OrtModel(demo_run / "model_int8.onnx"), loader)["top1"]
    assert int8 == pytest.approx(report["accuracy"]["hqp_int8_onnxruntime"]["top1"])
    widths = report["channels"]
    assert widths["head"] == [10, 10]  # the classifier's outputs are never pruned
    assert pruned.get_submodule("stem.0").out_channels == widths["stem.0"][1]


def test_an_automatic_recovery_trains_the_whole_epochs_the_budget_leaves():
    """An hour, 20 minutes gone, 4-minute epochs: 3 minutes (5%) kept for the report, so 9 epochs fit; never more
    than the cap or fewer than one, and one when no epoch was timed."""
    assert recovery_epochs(3600, 1200, 240) == 9
    assert recovery_epochs(3600, 1200, 60) == RECOVER_AUTO_MAX_EPOCHS == 10
    assert recovery_epochs(3600, 3500, 240) == recovery_epochs(3600, 1200, None) == recovery_epochs(3600, 0, 0) == 1
    with pytest.raises(ValueError, match="set prune.time_budget"):
        CompressConfig(recover_epochs="auto")
    with pytest.raises(ValueError, match='or "auto", got \'soon\''):
        CompressConfig(recover_epochs="soon")


@pytest.mark.slow  # a whole compress job
def test_demo_with_depth_pruning_ships_a_model_without_the_removed_blocks(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    # the job's clock reads a minute later at every look: started, the one round's fine-tune (0.2 epochs) from 1 to
    # 2 min (an epoch: 5 min), the recovery at 3 min; 20 minutes, less 5% for the report, leave 16 min: 3 epochs
    monkeypatch.setattr("hqp_fx.compress._clock", lambda t=iter(range(0, 6000, 60)): next(t))
    # a 90% step accepted whatever it costs: the other groups stop at 16 channels, so the demo net's two residual
    # blocks (inner widths 64 and 128) must go whole
    assert main(["demo", "--out", str(out), "--size", "8", "--max-rounds", "1", "--step", "0.9", "--delta-max", "100",
                 "--finetune-epochs", "0.2", "--recover-epochs", "auto", "--time-budget", "20",
                 "--samples", "64", "--threads", "1", "--remove-branches"]) == 0
    assert ("recovery: fine-tuning the pruned model 3 epoch(s) (auto: 3.0 of 20 min used, an epoch about 5.0 min, "
            "at most 10)") in capsys.readouterr().err
    report = json.loads((out / "hqp.json").read_text())
    jsonschema.validate(report, HQP_JSON_SCHEMA)
    assert report["config"]["prune"]["remove_branches"] is True and report["config"]["recover_epochs"] == "auto"
    # the recovery fine-tune ran once on the pruned model, and the shipped model is the better of the two
    rec = report["recovery"]
    assert rec["epochs"] == 3 and rec["top1_before"] == report["rounds"][-1]["top1"]
    # (the recovery is judged on the validation split, like the rounds)
    assert report["accuracy"]["validation"]["pruned_fp32"]["top1"] == pytest.approx(
        max(rec["top1_before"], rec["top1_after"]))
    assert rec["kept"] == (rec["top1_after"] >= rec["top1_before"])
    assert "Recovery fine-tune (3 epoch(s))" in (out / "report.md").read_text()
    removed = sorted(n for n, (_, kept) in report["channels"].items() if kept == 0)
    assert removed, report["channels"]
    assert f"layers removed with their branches: {len(removed)}" in (out / "report.md").read_text()
    assert "a removed block leaves the identity" in (out / "report.md").read_text()
    pruned = hqp_fx.load(out / "model_pruned.hqp")
    assert not any(n in dict(pruned.named_modules()) for n in removed)
    # the default drop_branch_bias: a removed block's add goes with it, and no constant is stored in its place
    blocks = {n.split(".")[0] for n in removed}
    assert sum(n.target is operator.add for n in pruned.graph.nodes) == 2 - len(blocks)
    assert not any(n.op == "get_attr" and n.target.endswith("_constant") for n in pruned.graph.nodes)
    _, test = digits(size=8)
    loader = list(BatchLoader(test, 500))
    int8 = evaluate(OrtModel(out / "model_int8.onnx"), loader)["top1"]
    assert int8 == pytest.approx(report["accuracy"]["hqp_int8_onnxruntime"]["top1"])


def test_onnx_latency_times_the_int8_file_when_given_a_quant_config(monkeypatch):
    timed = []

    def fake_measure(path, shape, threads, runs):
        timed.append({node.op_type for node in onnx.load(path).graph.node})
        return {"median_ms": 1.5}

    monkeypatch.setattr(hqp_fx.compress, "measure_onnx", fake_measure)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    example = torch.randn(1, 3, 8, 8)
    calibration = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    quant = QuantConfig(backend="onnxruntime", num_samples=8)
    assert onnx_latency(example)(model) == 1.5
    assert onnx_latency(example, quant=quant, calibration=calibration)(model) == 1.5
    assert "QuantizeLinear" not in timed[0] and {"QuantizeLinear", "DequantizeLinear"} <= timed[1]
    with pytest.raises(ValueError, match="needs calibration batches"):
        onnx_latency(example, quant=quant)


def test_hybrid_fallback_judges_candidates_in_onnxruntime(monkeypatch, tmp_path):
    """The fallback's budget is checked on the file that ships, run in ONNX Runtime, not on PyTorch's reference."""
    judged = []

    class SpyOrtModel(OrtModel):
        def __init__(self, path, threads=2):
            judged.append({node.op_type for node in onnx.load(path).graph.node})
            super().__init__(path, threads)

    judges = []

    def capture(model, example, calibration, config, *, max_drop, evaluate):
        judges.append(evaluate)
        return hqp_fx.artifacts.quantize(model, example, calibration, config)

    monkeypatch.setattr(hqp_fx.artifacts, "OrtModel", SpyOrtModel)
    monkeypatch.setattr(hqp_fx.engines.ort, "OrtModel", SpyOrtModel)  # where the fallback's judge runs files
    monkeypatch.setattr(hqp_fx.artifacts, "hybrid_quantize", capture)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    example = torch.randn(1, 3, 8, 8)
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(2)]
    config = QuantConfig(backend="onnxruntime", num_samples=8)
    hqp_fx.artifacts.ship_quantized(model, example, batches, batches, config, tmp_path, max_drop=0.5, threads=1, runs=2)
    (judge,) = judges
    judged.clear()
    int8 = hqp_fx.artifacts.quantize(model, example, batches, config).model
    with torch.no_grad():
        expected = (int8(torch.cat([x for x, _ in batches])).argmax(1) == torch.cat([y for _, y in batches]))
    score = judge(int8)
    assert judged and {"QuantizeLinear", "DequantizeLinear"} <= judged[0], "the candidate was not run in ORT"
    assert score == pytest.approx(100 * expected.float().mean().item(), abs=100 / 8 + 1e-6)  # one image at most


def _folder(root, classes, per_class=2, size=32):
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("extra, message", [
    (["--target-macs", "0.001"], "target_macs=0.001 is unreachable"),
    (["--target-macs", "0.001", "--remove-branches"],  # the stem and the head stay
     "target_macs=0.001 is unreachable: keeping 16 channels per group (removing every removable branch)"),
    (["--resume"], "--resume needs"),
])
def test_compress_refusals_leave_nothing_behind(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setenv("HQP_CACHE", str(tmp_path / "cache"))
    data = _folder(tmp_path / "data", [f"c{i}" for i in range(10)])
    out = tmp_path / "out"
    assert main(["compress", "cifar:resnet20", "--data", str(data), "--out", str(out), "--finetune-epochs", "0",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["data"]


def test_compress_refuses_a_bad_alignment(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "cifar:resnet20", "--data", "unused", "--out", "unused", "--align", "eight"])
    assert exit_.value.code == 2
    assert "--align: expected 'auto' or a power-of-two channel multiple (1 for none, 8, 16, 32), got 'eight'" in \
        capsys.readouterr().err


def test_compress_refuses_mismatched_or_empty_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HQP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    three = _folder(tmp_path / "three", ["a", "b", "c"])
    assert main(["compress", "cifar:resnet20", "--data", str(three), "--out", str(out)]) == 2
    assert "predicts 10 classes but" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "test" / "a").mkdir(parents=True)
    assert main(["compress", "cifar:resnet20", "--data", str(empty), "--out", str(out)]) == 2
    assert "hold no images" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # a whole compress job
def test_decisions_use_the_validation_split_and_the_test_split_is_only_reported(tmp_path, monkeypatch):
    """Two runs that differ only in their test split (the second one's labels are scrambled) make the same
    decisions and ship the same model; fine-tuning never sees the held-out validation images."""
    from hqp_fx.compress import CompressConfig, compress
    from hqp_fx.data import ImageSet
    from hqp_fx.demo import train_demo_model
    from hqp_fx.prune_loop import PruneLoopConfig
    from hqp_fx.train import FinetuneConfig, finetune

    train, test = digits(size=8)
    model = train_demo_model(train, epochs=2, width=32)
    scrambled = ImageSet(test.images, test.labels.roll(1), test.classes)
    seen = []
    monkeypatch.setattr("hqp_fx.compress.finetune", lambda m, loader, *a, **k: (seen.append(loader.data),
                                                                               finetune(m, loader, *a, **k)))
    config = CompressConfig(prune=PruneLoopConfig(delta_max=1.0, align=8, max_rounds=3, steps=(0.2, 0.1)),
                            finetune=FinetuneConfig(epochs=0.2, lr=0.01), quant=QuantConfig(backend="onnxruntime",
                            num_samples=64), batch_size=64, augment=False, threads=1, latency_runs=3)
    reports = []
    for name, split in (("a", test), ("b", scrambled)):
        (tmp_path / name).mkdir()
        reports.append(compress(model, torch.randn(1, 3, 8, 8), train, split, config, tmp_path / name))
    a, b = reports
    assert a["rounds"] == b["rounds"] and a["accuracy"]["validation"] == b["accuracy"]["validation"]
    assert a["quantization"]["float_layers"] == b["quantization"]["float_layers"]
    assert a["accuracy"]["pruned_fp32"]["top1"] > 50 > b["accuracy"]["pruned_fp32"]["top1"]  # test: only reported
    first, second = (hqp_fx.load(tmp_path / n / "model_pruned.hqp").state_dict() for n in "ab")
    assert all(torch.equal(first[k], second[k]) for k in first)
    splits = a["splits"]
    assert splits["train"] + splits["validation"] == len(train) and splits["test"] == len(test)
    assert "held out from the training images" in splits["validation_source"]
    assert seen and all(len(d) == splits["train"] for d in seen)
    assert "on the validation split that decided the run" in (tmp_path / "a" / "report.md").read_text()
    # the final drop and its standard error, paired over the test images: the dense model against the shipped file
    dense_hits, int8_hits = [], []
    evaluate(model, BatchLoader(test, 500), hits=dense_hits)
    evaluate(OrtModel(tmp_path / "a" / "model_int8.onnx"), BatchLoader(test, 500), hits=int8_hits)
    assert (a["accuracy"]["final_drop"], a["accuracy"]["final_drop_se"]) == pytest.approx(
        paired_drop(dense_hits, int8_hits))
    assert a["accuracy"]["final_drop_se"] > 0
    # the demo model trained on all of train, the held-out images included: the report says when that shows
    gap = a["accuracy"]["validation"]["dense_fp32"]["top1"] - a["accuracy"]["dense_fp32"]["top1"]
    assert splits["dense_val_minus_test"] == pytest.approx(gap)
    from hqp_fx.report import MEMORISED_GAP, render_report
    unseen = {**splits["seen_check"], "likely_seen": False}
    for value, warned in ((MEMORISED_GAP + 0.1, True), (MEMORISED_GAP - 0.1, False), (-5.0, False)):
        text = render_report({**a, "splits": {**splits, "dense_val_minus_test": value, "seen_check": unseen}})
        assert ("likely trained on the validation images" in text) is warned
    # the check before the rounds scored the dense model on the same validation images as the loop's baseline
    check = splits["seen_check"]
    assert check["validation_top1"] == a["accuracy"]["validation"]["dense_fp32"]["top1"]
    assert abs(check["train_images"] - splits["validation"]) <= 10  # one rounding per class
    assert check["gap"] == check["train_top1"] - check["validation_top1"]
    jsonschema.validate(a, HQP_JSON_SCHEMA)
    text = render_report({**a, "splits": {**splits, "dense_val_minus_test": 0.0,
                                          "seen_check": {**check, "likely_seen": True}}})
    assert f"scores as well on validation as on {check['train_images']} training images" in text


def test_the_rounds_left_count_the_round_numbers_not_the_lines_printed():
    """A resumed run, or one that skipped a round number (a smaller step aligning to a rejected plan), has
    printed fewer lines than rounds it used: the budget left is counted from the last round's number."""
    import io

    from hqp_fx.prune_loop import RoundRecord
    from hqp_fx.progress import RunProgress

    stream = io.StringIO()
    with RunProgress(22, stream=stream, interactive=False) as progress:
        for rnd in (16, 18):
            progress.round(RoundRecord(rnd, 0.01, False, 90.0, 1.5, 10 ** 6, 10 ** 4, {"g": 16}))
        progress.round(RoundRecord(19, 0.01, True, 90.0, 0.5, 10 ** 6, 10 ** 4, {"g": 16}, latency=0.5,
                                   reference_latency=0.8, drop_se=0.25))
    lines = stream.getvalue().splitlines()
    assert "round 16: rolled back" in lines[0] and "at most 5 round(s) left" in lines[0], lines
    assert "at most 3 round(s) left" in lines[1], lines
    assert "latency 0.500 ms (0.625 of dense timed alongside)" in lines[2], lines  # the ratio the target judges
    assert "(drop +0.50 ± 0.25)" in lines[2] and "(drop +1.50)" in lines[0], lines
    stream = io.StringIO()
    with RunProgress(100, target_latency=0.5, stream=stream, interactive=False) as progress:
        for rnd, ratio in enumerate((0.9, 0.8)):  # 0.894 per accepted round: 0.8 -> 0.5 takes 5 more, 5 rounds
            progress.round(RoundRecord(rnd, 0.1, True, 90.0, 0.5, 10 ** 6, 10 ** 4, {"g": 16}, latency=ratio,
                                       reference_latency=1.0))
    assert "~5 round(s) to the latency target, ETA" in stream.getvalue().splitlines()[-1], stream.getvalue()


@pytest.mark.slow  # a whole compress job
def test_a_run_without_a_terminal_logs_one_line_per_phase_and_round(tmp_path):
    """nohup / CI / a log file: rich would print nothing until the end."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "hqp_fx.cli", "demo", "--out", str(out), "--size", "8", "--max-rounds", "2",
                           "--finetune-epochs", "0.2", "--samples", "32", "--threads", "1", "--target-macs", "0.5"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[")]
    rounds = [ln for ln in lines if "round 0:" in ln or "round 1:" in ln]
    assert len(rounds) >= 3, proc.stderr  # two fine-tune phases and two results at least
    result = next(ln for ln in lines if "round 0: accepted" in ln or "round 0: rolled back" in ln)
    # the drop with its standard error: compress's evaluation returns per-image hits
    assert re.match(r"\[\d:\d\d:\d\d\] round 0: .*top-1 \d+\.\d\d% \(drop [+-]\d+\.\d\d ± \d+\.\d\d\), MACs \d+\.\d\dM; "
                    r"(~\d+ round\(s\) to the MACs target, ETA \d:\d\d:\d\d|at most \d+ round)", result), result
    assert any("exporting" in ln for ln in lines) and "━" not in proc.stderr  # no progress bars in a log


@pytest.mark.slow  # a whole compress job
def test_demo_selects_by_predicted_latency_and_reports_the_prediction_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HQP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--size", "8", "--max-rounds", "2", "--select", "latency", "--step", "0.1",
                 "--delta-max", "100", "--finetune-epochs", "0.2", "--samples", "32", "--threads", "1",
                 "--guard", "int8"]) == 0
    report = json.loads((out / "hqp.json").read_text())
    jsonschema.validate(report, HQP_JSON_SCHEMA)
    assert report["config"]["prune"]["select"] == "latency" and report["config"]["guard"] == "int8"
    accepted = [r for r in report["rounds"] if r["accepted"]]
    # the guard judged each round on the INT8 model as it ships: the last one is the shipped file's validation top-1
    final = report["recovery"]["top1_after"] if (report["recovery"] or {}).get("kept") else accepted[-1]["top1"]
    assert report["accuracy"]["validation"]["hqp_int8_onnxruntime"]["top1"] == pytest.approx(final)
    # the INT8 guard's evaluation returns per-image hits: every round's drop carries its paired standard error
    assert all(r["drop_se"] is not None and r["drop_se"] >= 0 for r in report["rounds"])
    lm = report["latency_model"]
    assert accepted and [x["round"] for x in lm["rounds"]] == [r["round"] for r in accepted]
    for x, r in zip(lm["rounds"], accepted):  # every accepted round: predicted and measured in the engine
        assert x["raw_measured_ms"] == r["latency"] and x["predicted_ms"] == r["predicted_latency"] > 0
        # on the dense model's first timing's scale, as the predictions are: the machine's drift cancels
        assert x["measured_ms"] == pytest.approx(r["latency"] / r["reference_latency"] * lm["dense_ms"])
        assert x["error"] == pytest.approx((x["predicted_ms"] - x["measured_ms"]) / x["measured_ms"])
    assert "Latency model (selection by predicted latency): predicted vs measured" in (out / "report.md").read_text()
    assert list((tmp_path / "cache" / "latency").glob("latency-*.json")), "the layer table is cached on disk"


def test_variants_are_timed_in_alternating_rounds_and_the_median_round_is_kept(monkeypatch, tmp_path):
    from hqp_fx import measure as measurement

    calls = []
    fake = {"a": [5.0, 1.0, 3.0], "b": [2.0, 9.0, 4.0]}

    def measure(path, shape, **kw):
        calls.append(path.name)
        return {"median_ms": fake[path.name].pop(0), "size_mb": 1.0, "peak_rss_mb": 1.0}

    monkeypatch.setattr(measurement, "measure_onnx", measure)
    out = measurement.measure_alternating({"a": tmp_path / "a", "b": tmp_path / "b"}, (1, 3, 8, 8), rounds=3)
    assert calls == ["a", "b", "a", "b", "a", "b"]  # a slow spell hits both files, not one
    assert out["a"]["median_ms"] == 3.0 and out["a"]["rounds_ms"] == [5.0, 1.0, 3.0]
    assert out["b"]["median_ms"] == 4.0


def test_the_loops_pair_runs_by_turns_on_one_shared_thread_pool(monkeypatch):
    """The timing child behind ``measure_interleaved``: every session runs once per step, the order reversed each
    step, all sessions on one global pool; each file's median comes from its own runs' clock readings."""
    from hqp_fx import ort_timing_child as child

    clock, calls, pools, options_seen = [0.0], [], [], []
    costs = {"a.onnx": [2.0, 2.0, 2.0, 2.0, 2.0, 2.0], "b.onnx": [9.0, 9.0, 1.0, 5.0, 3.0, 4.0]}  # seconds

    class Session:
        def __init__(self, path, options, providers):
            self.path = path
            options_seen.append(options.use_per_session_threads)

        def get_inputs(self):
            return [type("Input", (), {"name": "x"})]

        def run(self, outputs, feed):
            assert feed["x"].shape == (1, 3, 8, 8)
            calls.append(self.path)
            clock[0] += costs[self.path].pop(0)

    class Options:
        use_per_session_threads = True

    fake_ort = type("ort", (), {"InferenceSession": Session, "SessionOptions": Options, "set_global_thread_pool_sizes":
                                staticmethod(lambda intra, inter: pools.append((intra, inter)))})
    monkeypatch.setattr(child, "ort", fake_ort)
    monkeypatch.setattr(child.time, "perf_counter", lambda: clock[0])
    out = child.interleaved(["a.onnx", "b.onnx"], [1, 3, 8, 8], 2, 1, 5)
    assert pools == [(2, 1)] and options_seen == [False, False]  # one pool, shared, not one per session
    assert calls == ["a.onnx", "b.onnx"] + ["a.onnx", "b.onnx", "b.onnx", "a.onnx"] * 2 + ["a.onnx", "b.onnx"]
    assert out == {"median_ms": [2000.0, 4000.0]}  # b's timed runs: 9, 1, 5, 3, 4 s (the warm-up's 9 s left out)


def test_onnx_latency_pairs_two_models_in_onnx_runtime(tmp_path):
    """``OnnxLatency.paired`` exports both models and times them in real ONNX Runtime processes, a time per round
    for each; a file ORT cannot load is named in the error."""
    from hqp_fx.core import HQPError
    from hqp_fx.measure import measure_interleaved

    small = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    large = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 4, 3, padding=1)).eval()
    reference_ms, candidate_ms = onnx_latency(torch.randn(1, 3, 16, 16), runs=5).paired(large, small, 2)
    assert len(reference_ms) == len(candidate_ms) == 2
    assert all(np.isfinite(t) and t > 0 for t in reference_ms + candidate_ms)
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(HQPError, match="broken.onnx"):
        measure_interleaved({"a": tmp_path / "broken.onnx", "b": tmp_path / "broken.onnx"}, (1, 3, 8, 8), runs=2,
                            rounds=1)


class _Lookup(torch.nn.Module):
    """Predicts, for each image, the class stored for it: images carry their index in two pixels (high, low byte),
    read back from the loader's normalised batch."""

    def __init__(self, predictions, classes):
        super().__init__()
        self.predictions, self.classes = predictions.clone(), classes

    def forward(self, x):
        from hqp_fx.data import IMAGENET_MEAN, IMAGENET_STD
        pixels = ((x[:, 0, 0, :2] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255).round().long()
        return torch.nn.functional.one_hot(self.predictions[pixels[:, 0] * 256 + pixels[:, 1]], self.classes).float()


def test_the_seen_check_tells_a_held_out_split_the_model_trained_on_from_one_it_did_not():
    """Held-out images that score as well as the training images were trained on; a model that generalises
    scores lower on them by its gap. The check evaluates the dense model on the validation split and on as many
    of the remaining training images, and the report gives its figures only when they say "seen"."""
    from hqp_fx.compress import SEEN_WITHIN_SE, seen_check, seen_message
    from hqp_fx.data import ImageSet
    from hqp_fx.report import _seen_evidence

    n, classes = 2000, 4
    images = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = torch.arange(n) // 256, torch.arange(n) % 256
    labels = torch.arange(n) % classes
    data = ImageSet(images, labels, tuple("abcd"))
    rest, val = data.hold_out(0.1, 200, seed=0)
    assert len(val) == 200 and len(rest) == 1800

    memoriser = _Lookup(labels, classes)  # right on every image: it trained on them all
    seen = seen_check(memoriser, rest, val)
    assert (seen["validation_top1"], seen["train_top1"], seen["gap"], seen["gap_se"]) == (100.0, 100.0, 0.0, 0.0)
    assert seen["train_images"] == 200 and seen["likely_seen"]
    assert "most likely trained on the held-out ones" in seen_message(seen)

    # right on the training images, on 70% of the held-out ones: a model that never saw them
    wrong = (labels + 1) % classes
    predictions = labels.clone()
    held = val.images[:, 0, 0, 0].long() * 256 + val.images[:, 0, 0, 1].long()
    predictions[held[:60]] = wrong[held[:60]]
    generaliser = _Lookup(predictions, classes)
    unseen = seen_check(generaliser, rest, val)
    assert unseen["validation_top1"] == pytest.approx(70.0) and unseen["train_top1"] == 100.0
    assert unseen["gap_se"] == pytest.approx(100 * (0.7 * 0.3 / 200) ** 0.5)  # the training side has no variance
    assert unseen["gap"] > SEEN_WITHIN_SE * unseen["gap_se"] and not unseen["likely_seen"]
    assert "trained on" not in seen_message(unseen)

    assert _seen_evidence({"seen_check": seen}) and not _seen_evidence({"seen_check": unseen})
    assert _seen_evidence({}) == [] and _seen_evidence({"seen_check": unseen, "dense_val_minus_test": 7.5})
