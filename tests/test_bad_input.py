"""Bad arguments, bad files and careless commands: a clear one-line error (exit code 2 from the CLI), nothing
half-written, the user's files untouched; and resumes that refuse to mix runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import hqp_fx
from hqp_fx import meta
from hqp_fx.cli import _times, main
from hqp_fx.core import HQPError
from hqp_fx.data import load_split
from hqp_fx.artifacts import StagedOutput, write_json
from hqp_fx.prune_loop import STATE_FILE, PruneLoopConfig, prune_loop
from hqp_fx.models import CifarResNet, build_model
from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass
from hqp_fx.passes.quantize import CALIBRATIONS, QuantConfig, QuantizeError, quantize

from helpers import realistic_random


def _folder(root, classes, per_class=2, size=32):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HQP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---- arguments, refused by the parser before any work ----------------------------------------------------

@pytest.mark.parametrize("command, extra, message", [
    ("compress", ["--delta-max", "nan"], "argument --delta-max: expected a finite number >= 0, got 'nan'"),
    ("compress", ["--delta-max", "-1"], "argument --delta-max: expected a finite number >= 0, got '-1'"),
    ("compress", ["--finetune-epochs", "nan"], "argument --finetune-epochs: expected a finite number >= 0"),
    ("compress", ["--recover-epochs", "-1"], "argument --recover-epochs: expected 'auto' or a finite number >= 0"),
    ("compress", ["--recover-epochs", "soon"], "argument --recover-epochs: expected 'auto' or a finite number >= 0"),
    ("compress", ["--threads", "0"], "argument --threads: expected a finite number >= 1, got '0'"),
    ("compress", ["--threads", "-3"], "argument --threads: expected a finite number >= 1, got '-3'"),
    ("compress", ["--batch-size", "0"], "argument --batch-size: expected a finite number >= 1"),
    ("compress", ["--max-rounds", "-1"], "argument --max-rounds: expected a finite number >= 1"),
    ("compress", ["--time-budget", "0"], "argument --time-budget: expected a finite number > 0, got '0'"),
    ("compress", ["--margin", "-1"], "argument --margin: expected a finite number >= 0, got '-1'"),
    ("compress", ["--input-size", "0"], "argument --input-size: expected a finite number >= 1"),
    ("compress", ["--step", "1.5"], "argument --step: expected a finite number > 0 and < 1"),
    ("compress", ["--target-latency", "1.5"], "argument --target-latency: expected a finite number > 0 and < 1"),
    ("compress", ["--distill", "1.5"], "argument --distill: expected a finite number >= 0 and <= 1"),
    ("compress", ["--lr", "inf"], "argument --lr: expected a finite number > 0"),
    ("compress", ["--samples", "1.5"], "argument --samples: expected an integer >= 1, got '1.5'"),
    ("compress", ["--align", "7"], "--align: expected 'auto' or a power-of-two channel multiple"),
    ("quantize", ["--eval-samples", "-5"], "argument --eval-samples: expected a finite number >= 1, got '-5'"),
    ("quantize", ["--threads", "0"], "argument --threads: expected a finite number >= 1"),
    ("quantize", ["--percentile", "0"], "argument --percentile: expected a finite number > 50 and <= 100"),
    ("quantize", ["--max-drop", "nan"], "argument --max-drop: expected a finite number >= 0"),
])
def test_bad_arguments_are_refused_up_front(tmp_path, capsys, command, extra, message):
    with pytest.raises(SystemExit) as exit_:
        main([command, "cifar:resnet20", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_demo_refuses_bad_arguments_too(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "out"), "--delta-max", "nan"])
    assert "expected a finite number >= 0, got 'nan'" in capsys.readouterr().err


def test_an_automatic_recovery_without_a_time_budget_is_refused_before_any_work(tmp_path, capsys):
    """``hqp demo`` has no time budget by default, so ``--recover-epochs auto`` has nothing to fill: refused
    before the demo model is trained (``compress`` has a budget by default: its defaults test)."""
    assert main(["demo", "--out", str(tmp_path / "out"), "--recover-epochs", "auto"]) != 0
    out, err = capsys.readouterr()
    assert "--recover-epochs auto fills what --time-budget leaves after the rounds: give --time-budget" in err
    assert "Traceback" not in err and "training a small CNN" not in out and not list(tmp_path.iterdir())


def test_summary_says_slower_when_it_is():
    assert _times(2.0) == "2.00x faster" and _times(0.49) == "2.04x slower"


def test_sidecar_is_always_valid_json(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "hqp.json", {"delta_max": float("nan")})
    assert not list(tmp_path.iterdir())


def test_a_float_channel_index_is_refused():
    gm = hqp_fx.trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), torch.randn(1, 3, 8, 8))
    ChannelDependencyPass()(gm)
    gid = next(g.id for g in meta.channel_groups(gm) if g.prunable)
    with pytest.raises(ValueError, match=r"channel indices must be integers, got \[1.9\]"):
        PruneChannelsPass({gid: [1.9]})(gm)
    with pytest.raises(ValueError, match="must be integers"):
        PruneChannelsPass({gid: [True]})(gm)
    kept = PruneChannelsPass({gid: torch.tensor([1, 2])})(gm).graph_module  # integer tensors are fine
    assert kept.get_submodule("0").out_channels == 6


# ---- files -------------------------------------------------------------------------------------------------

def test_corrupt_or_truncated_images_are_fatal_and_named(tmp_path, cache, capsys):
    data = _folder(tmp_path / "data", [f"c{i}" for i in range(10)])
    (data / "train" / "c3" / "garbage.jpg").write_bytes(b"not a jpeg at all")
    good = data / "train" / "c4" / "0.png"
    Image.open(good).convert("RGB").save(data / "train" / "c4" / "cut.jpg")
    whole = (data / "train" / "c4" / "cut.jpg").read_bytes()
    (data / "train" / "c4" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"2 image\(s\) in .*train cannot be decoded, e\.g\. .*garbage\.jpg"):
        load_split(data / "train")
    out = tmp_path / "out"
    assert main(["compress", "cifar:resnet20", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cut.jpg" in err and "remove or replace them" in err and "Traceback" not in err
    assert not out.exists()


def test_decode_cache_follows_the_files_not_their_sizes(tmp_path, cache):
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    black, white = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    Image.fromarray(black).save(root / "a" / "0.bmp")  # BMP: equal sizes whatever the pixels
    Image.fromarray(white).save(root / "a" / "1.bmp")
    assert (root / "a" / "0.bmp").stat().st_size == (root / "a" / "1.bmp").stat().st_size
    first = load_split(root)
    assert first.images[0].max() == 0 and first.images[1].min() == 255
    os.replace(root / "a" / "0.bmp", root / "tmp.bmp")  # swap: same names, same sizes, same mtimes
    os.replace(root / "a" / "1.bmp", root / "a" / "0.bmp")
    os.replace(root / "tmp.bmp", root / "a" / "1.bmp")
    swapped = load_split(root)
    assert swapped.images[0].min() == 255 and swapped.images[1].max() == 0
    stat = (root / "a" / "0.bmp").stat()  # rewritten in place with its old mtime restored
    Image.fromarray(black).save(root / "a" / "0.bmp")
    os.utime(root / "a" / "0.bmp", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_split(root).images[0].max() == 0


def test_a_checkpoint_that_does_not_fit_names_the_tensors(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(textwrap.dedent("""
        from hqp_fx.models import CifarResNet
        INPUT_SHAPE = (1, 3, 32, 32)
        def hundred():
            return CifarResNet(20, num_classes=100)
    """))
    ckpt = tmp_path / "ten.pt"
    torch.save(CifarResNet(20).state_dict(), ckpt)
    with pytest.raises(ValueError, match=r"2 tensor\(s\) have other shapes \(linear\.weight \[10, 64\] in the file, "
                                         r"\[100, 64\] in the model; linear\.bias"):
        build_model(f"{src}:hundred", str(ckpt))
    with pytest.raises(ValueError, match="is a folder; pass the checkpoint file inside it"):
        build_model("cifar:resnet20", str(tmp_path))


def test_torchvision_weight_names_and_an_unreachable_hub(monkeypatch):
    with pytest.raises(ValueError, match="has no weights 'NOTAWEIGHT'; its weights are DEFAULT, IMAGENET1K_V1"):
        build_model("torchvision:resnet18", "NOTAWEIGHT")
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ValueError, match=r"cannot fetch torchvision's resnet18 weights 'DEFAULT' \(URLError.*"
                                         r"unreachable from this machine"):
        build_model("torchvision:resnet18", "DEFAULT")


@pytest.mark.parametrize("calibration", CALIBRATIONS)
def test_nan_weights_give_the_same_per_layer_error_for_every_calibrator(calibration):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(QuantizeError, match=r"calibration ranges are not usable — 2: weight observer \S+ saw 1 "
                                            r"NaN/Inf values"):
        quantize(model, torch.randn(1, 3, 16, 16), [torch.randn(4, 3, 16, 16)],
                 QuantConfig(backend="onnxruntime", calibration=calibration))


# ---- output folders ----------------------------------------------------------------------------------------

def test_output_folder_honours_the_umask_and_cleans_abandoned_stages(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / ".out.partial-dead"
    dead.mkdir()
    (dead / StagedOutput.OWNER).write_text(done.stdout.strip())  # its process has exited
    orphan = tmp_path / ".out.partial-noowner"
    orphan.mkdir()
    live = tmp_path / ".out.partial-live"
    live.mkdir()
    (live / StagedOutput.OWNER).write_text(str(os.getpid()))
    other = tmp_path / ".other.partial-x"  # another output's stage is not ours to judge
    other.mkdir()
    old = os.umask(0o027)
    try:
        with StagedOutput(out) as stage:
            (stage / "result.txt").write_text("ok")
    finally:
        os.umask(old)
    assert (out / "result.txt").read_text() == "ok" and not (out / StagedOutput.OWNER).exists()
    assert out.stat().st_mode & 0o777 == 0o750
    assert not dead.exists() and not orphan.exists() and live.exists() and other.exists()


def test_an_out_created_meanwhile_says_where_the_results_are(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(HQPError, match=r"created by something else while this run was going, so the results were "
                                       r"left in .*\.out\.partial-"):
        with StagedOutput(out) as stage:
            (stage / "report.md").write_text("results")
            out.mkdir()
            (out / "theirs.txt").write_text("someone else's")
    assert (stage / "report.md").read_text() == "results"
    assert (out / "theirs.txt").read_text() == "someone else's"


def test_an_unwritable_out_location_is_one_line(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses even root
        out = "/sys/hqp_test_out"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = str(locked / "out")
    with pytest.raises(HQPError, match="cannot write the output folder .*; pick an --out in a folder you can write"):
        with StagedOutput(out):
            pass


# ---- checkpoints and resume --------------------------------------------------------------------------------

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CALIB = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10)]


def _loop(ckpt, *, depth=20, resume=False, fail=False, **cfg):
    torch.manual_seed(0)
    model = realistic_random(CifarResNet(depth), X)

    def finetune(m, rnd):
        if fail and rnd == 1:
            raise KeyboardInterrupt("simulated kill")

    config = PruneLoopConfig(**{"delta_max": 50.0, "align": 4, "max_rounds": 3, **cfg})
    return prune_loop(model, X, calibration=CALIB, finetune_fn=finetune,
                      evaluate_fn=lambda m: {"top1": 90.0 * hqp_fx.count_params(m) / 300000},
                      config=config, checkpoint_dir=ckpt, resume=resume, fingerprint={"data": "set A"})


@pytest.fixture
def interrupted(tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        _loop(ckpt, fail=True)
    assert (ckpt / STATE_FILE).is_file()
    return ckpt


def test_resume_refuses_another_model_config_or_data(interrupted, monkeypatch):
    with pytest.raises(HQPError, match=r"refusing to resume: .*config\.criterion: \"fisher\" then, \"l1\" now; "
                                       r"model weights: "):
        _loop(interrupted, depth=32, resume=True, criterion="l1")
    with pytest.raises(HQPError, match=r"refusing to resume: .*\(data: \"set A\" then, \"set B\" now\)"):
        torch.manual_seed(0)
        prune_loop(realistic_random(CifarResNet(20), X), X, calibration=CALIB, finetune_fn=lambda m, r: None,
                   evaluate_fn=lambda m: {"top1": 1.0}, config=PruneLoopConfig(delta_max=50.0, align=4, max_rounds=3),
                   checkpoint_dir=interrupted, resume=True, fingerprint={"data": "set B"})
    resumed = _loop(interrupted, resume=True, max_rounds=4)  # the same run (max_rounds may grow) continues
    assert len(resumed.history) == 4


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(interrupted):
    before = sorted(p.name for p in interrupted.iterdir())
    with pytest.raises(HQPError, match="holds the checkpoints of an earlier run; pass resume=True"):
        _loop(interrupted)
    assert sorted(p.name for p in interrupted.iterdir()) == before


def test_a_damaged_or_planted_state_file_is_refused_by_name(interrupted, tmp_path):
    state_path = interrupted / STATE_FILE
    state = json.loads(state_path.read_text())
    planted = tmp_path / "planted.hqp"
    hqp_fx.save(hqp_fx.trace(nn.Identity(), torch.randn(1, 3)), planted)
    for name in ("../planted.hqp", str(planted), ".hidden.hqp", "round_000.pt"):
        state_path.write_text(json.dumps({**state, "model": name}))
        with pytest.raises(HQPError, match=r"names the checkpoint .*; a state file may only name a \.hqp file inside"):
            _loop(interrupted, resume=True)
    state_path.write_text(json.dumps(state)[:-20])
    with pytest.raises(HQPError, match=rf"{state_path} is damaged \(.*\); remove .*ckpt to start over"):
        _loop(interrupted, resume=True)
    state_path.write_text(json.dumps({**state, "history": [{"round": "x"}]}))
    with pytest.raises(HQPError, match=f"{state_path} is damaged"):
        _loop(interrupted, resume=True)


def test_cli_resume_refuses_another_model_and_a_rerun_refuses_old_rounds(tmp_path, cache, monkeypatch, capsys):
    """The issue's case: `cifar:resnet56 --resume` over a resnet20 run's checkpoints used to exit 0 with a report
    mixing the two. The run is interrupted after its rounds (in shipping), which leaves the checkpoints."""
    data = _folder(tmp_path / "data", [f"c{i}" for i in range(10)])
    out = tmp_path / "out"
    args = ["--data", str(data), "--out", str(out), "--finetune-epochs", "0", "--max-rounds", "1", "--align", "8"]

    def killed(*a, **k):
        raise KeyboardInterrupt("simulated kill while shipping")

    monkeypatch.setattr("hqp_fx.compress.ship_quantized", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["compress", "cifar:resnet20", *args])
    checkpoints = tmp_path / "out.checkpoints"
    rounds = sorted(p.name for p in checkpoints.iterdir())
    assert STATE_FILE in rounds and not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    capsys.readouterr()

    assert main(["compress", "cifar:resnet20", *args]) == 2
    assert "holds the checkpoints of an interrupted run; add --resume to continue it" in capsys.readouterr().err
    assert main(["compress", "cifar:resnet32", *args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "model spec: \"cifar:resnet20\" then, \"cifar:resnet32\" now" in err
    assert "model weights" in err and "Traceback" not in err
    assert main(["compress", "cifar:resnet20", *args, "--resume", "--criterion", "l1"]) == 2
    assert "config.criterion: \"taylor\" then, \"l1\" now" in capsys.readouterr().err
    assert sorted(p.name for p in checkpoints.iterdir()) == rounds and not out.exists()


def test_compress_takes_leaf_modules_and_resumes_with_them(tmp_path, cache, monkeypatch):
    src = tmp_path / "gated.py"
    src.write_text(textwrap.dedent("""
        import torch
        import torch.nn as nn
        from hqp_fx.models import CifarResNet
        INPUT_SHAPE = (1, 3, 32, 32)

        class Gate(nn.Module):  # fx cannot iterate a traced shape; torch.export (ONNX) can
            def forward(self, x):
                return torch.stack([x[:, i] * (i + 1) for i in range(x.shape[1])], 1)

        class Gated(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = CifarResNet(20)
                self.gate = Gate()

            def forward(self, x):
                return self.net(self.gate(x))

        def build():
            torch.manual_seed(0)  # the same weights in every call: a resume must see the same model
            return Gated()
    """))
    data = _folder(tmp_path / "data", [f"c{i}" for i in range(10)])
    # the latency table and the INT8 guard have tests of their own; here they would only time and quantize
    args = [f"{src}:build", "--data", str(data), "--out", str(tmp_path / "out"), "--finetune-epochs", "0",
            "--max-rounds", "1", "--align", "8", "--select", "channels", "--guard", "fp32"]
    shipped = []

    def killed(model, *a, **k):
        shipped.append(model)
        raise KeyboardInterrupt("simulated kill while shipping")

    monkeypatch.setattr("hqp_fx.compress.ship_quantized", killed)
    auto_args = [a if a != str(tmp_path / "out") else str(tmp_path / "auto") for a in args]
    with pytest.raises(KeyboardInterrupt):  # without --leaf, tracing makes the gate a leaf by itself
        main(["compress", *auto_args])
    auto = shipped.pop()
    assert [n.target for n in auto.graph.nodes if n.op == "call_module"][0] == "gate"
    assert type(auto.get_submodule("gate")).__name__ == "Gate"
    with pytest.raises(KeyboardInterrupt):
        main(["compress", *args, "--leaf", "gate"])
    with pytest.raises(KeyboardInterrupt):  # the resume loads the checkpoint, whose Gate comes from the model file
        main(["compress", *args, "--leaf", "gate", "--resume"])
    assert [type(m.get_submodule("gate")).__name__ for m in shipped] == ["Gate", "Gate"]
    assert hqp_fx.count_params(shipped[1]) == hqp_fx.count_params(shipped[0])


def test_backend_auto_picks_the_engine_this_machine_can_build(monkeypatch, capsys):
    from hqp_fx.cli import build_parser

    base = ["compress", "cifar:resnet20", "--data", "d", "--out", "o"]
    monkeypatch.setattr("hqp_fx.engines.tensorrt.tensorrt_unavailable_reason", lambda: "TensorRT: not run (no GPU)")
    assert build_parser().parse_args(base).backend == "onnxruntime"  # the default is auto
    monkeypatch.setattr("hqp_fx.engines.tensorrt.tensorrt_unavailable_reason", lambda: None)
    assert build_parser().parse_args(base + ["--backend", "auto"]).backend == "tensorrt"
    assert build_parser().parse_args(base + ["--backend", "x86-inductor"]).backend == "x86-inductor"
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--backend", "openvino"])
    assert "expected auto or one of tensorrt, onnxruntime, x86-inductor, got 'openvino'" in capsys.readouterr().err


def test_compress_defaults_are_the_benchmarked_recipe(monkeypatch):
    """The command without flags runs the recipe of benchmarks/RESULTS.md's "The default recipe": selection by
    measured ONNX Runtime latency (the engine its table times; channels for the other backends), depth pruning,
    taylor, the stem whole, distillation, one epoch per round (one more for a round just over delta_max) and one of
    recovery filling what an hour leaves, rounds judged on the INT8 model, quantize-only measured beside."""
    from hqp_fx.cli import build_parser, compress_config

    base = ["compress", "cifar:resnet20", "--data", "d", "--out", "o"]
    monkeypatch.setattr("hqp_fx.engines.tensorrt.tensorrt_unavailable_reason", lambda: "TensorRT: not run (no GPU)")
    config = compress_config(build_parser().parse_args(base), lr=0.01, augment=True)
    p = config.prune
    assert (p.select, p.criterion, p.remove_branches, p.keep_stem, p.steps, p.align, p.patience, p.time_budget,
            p.margin) == ("latency", "taylor", True, True, (0.1, 0.02, 0.01), 16, 1, 3600.0, 0.0)
    assert config.guard == "int8" and p.drop_branch_bias
    assert not compress_config(build_parser().parse_args(base + ["--no-drop-branch-bias"]), lr=0.01,
                               augment=True).prune.drop_branch_bias
    assert (config.finetune.epochs, config.finetune.distill, config.recover_epochs, config.ablation) == (
        1.0, 0.9, "auto", True)
    assert config.quant.backend == "onnxruntime"
    expert = compress_config(build_parser().parse_args(base + ["--no-remove-branches", "--no-keep-stem", "--select",
                                                               "channels", "--no-ablation", "--guard", "fp32",
                                                               "--patience", "0", "--time-budget", "50",
                                                               "--margin", "1.5"]),
                             lr=0.01, augment=True)
    assert (expert.prune.remove_branches, expert.prune.keep_stem, expert.prune.select, expert.ablation,
            expert.guard, expert.prune.patience, expert.prune.time_budget, expert.prune.margin) == (
        False, False, "channels", False, "fp32", 0, 3000.0, 1.5)
    monkeypatch.setattr("hqp_fx.engines.tensorrt.tensorrt_unavailable_reason", lambda: None)
    assert compress_config(build_parser().parse_args(base), lr=0.01, augment=True).prune.select == "channels"


def test_ort_model_feeds_a_static_batch_file_any_number_of_images(tmp_path):
    """A file exported at batch 4 scores 10 images: the last slice is padded, not refused by ONNX Runtime."""
    from hqp_fx.engines.ort import OrtModel
    from hqp_fx.lower_onnx import export_onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    export_onnx(model, (torch.randn(4, 3, 8, 8),), tmp_path / "b4.onnx")
    x = torch.randn(10, 3, 8, 8)
    out = OrtModel(tmp_path / "b4.onnx", threads=1)(x)
    assert out.shape == (10, 3)
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-5)
