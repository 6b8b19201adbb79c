"""hqp inspect on every kind of MODEL spec."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hqp_fx.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "hqp_fx.cli", *args], capture_output=True, text=True, timeout=300)


def test_inspect_torchvision_summary():
    out = run("inspect", "torchvision:resnet18", "--input-size", "64")
    assert out.returncode == 0, out.stderr
    assert "layer4_1_conv2" in out.stdout and "groups=" in out.stdout
    assert "feeds the network output" in out.stdout
    assert "groups: 14 (12 prunable" in out.stdout and "params: 11.69M" in out.stdout


def test_inspect_cifar_with_real_weights(shared_dir):
    ckpt = shared_dir / "models/cifar-resnet/resnet56_cifar10jpeg.pt"
    out = run("inspect", "cifar:resnet56", "--weights", str(ckpt), "--summary-only")
    assert out.returncode == 0, out.stderr
    assert "MACs: 125.49M" in out.stdout and "params: 853.02K" in out.stdout


def test_inspect_file_factory(tmp_path):
    src = tmp_path / "mynet.py"
    src.write_text(textwrap.dedent("""
        import torch.nn as nn
        INPUT_SHAPE = (1, 3, 16, 16)
        def build():
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    """))
    out = run("inspect", f"{src}:build", "--details")
    assert out.returncode == 0, out.stderr
    assert "0: 8 ch" in out.stdout and "in 2.weight dim 1" in out.stdout


def test_inspect_lists_the_modules_made_leaves_and_why(tmp_path):
    src = tmp_path / "gated.py"
    src.write_text(textwrap.dedent("""
        import torch.nn as nn
        INPUT_SHAPE = (1, 3, 16, 16)

        class Decode(nn.Module):  # shape arithmetic in Python: fx cannot trace it
            def forward(self, x):
                return x * 2 if x.shape[-1] % 2 == 0 else x

        class Head(nn.Module):  # its convolution traces; only the method it calls on self is opaque
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(4, 4, 1)

            def forward(self, x):
                return self._grid(self.conv(x))

            def _grid(self, y):
                return y + 1 if y.shape[-1] > 3 else y

        def build():
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), Decode(), Head())
    """))
    out = run("inspect", f"{src}:build", "--summary-only")
    assert out.returncode == 0, out.stderr
    assert "opaque modules and methods" in out.stdout and "Decode cannot be traced" in out.stdout
    assert "x.shape[-1] % 2 == 0" in out.stdout
    assert "4._grid" in out.stdout and "Head._grid() cannot be traced" in out.stdout and "y.shape[-1] > 3" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["inspect", "resnet18"], "must look like torchvision:resnet18"),
    (["inspect", "torchvision:resnet999"], "torchvision has no classification model 'resnet999'"),
    (["inspect", "cifar:resnet21"], "unknown CIFAR model 'resnet21'"),
    (["inspect", "cifar:resnet20", "--weights", "/nonexistent.pt"], "weights file /nonexistent.pt does not exist"),
    (["inspect", "missing.py:f"], "model file missing.py does not exist"),
])
def test_bad_model_specs_get_one_line_errors(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_wrong_checkpoint_is_explained(shared_dir, capsys):
    ckpt = shared_dir / "models/cifar-resnet/resnet56_cifar10jpeg.pt"
    assert main(["inspect", "cifar:resnet20", "--weights", str(ckpt)]) == 2
    assert "checkpoint arch: cifar_resnet56" in capsys.readouterr().err
