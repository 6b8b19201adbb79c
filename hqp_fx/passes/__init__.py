"""Graph passes, one file per stage of the data flow.

The quantization stage (``quantize``, ``onnx``, ``tensorrt``) is imported on first use, so pruning works on
machines whose torch image lacks torchao/onnxscript.
"""
from .dependency import ChannelDependencyPass
from .prune import PruneChannelsPass
from .align import AlignChannelsPass
from .sensitivity import SensitivityPass, score_channels, select_channels

__all__ = ["ChannelDependencyPass", "SensitivityPass", "score_channels", "select_channels",
           "AlignChannelsPass", "PruneChannelsPass", "QuantizePass", "QuantConfig"]


def __getattr__(name: str):
    if name in ("QuantizePass", "QuantConfig"):
        from . import quantize

        return getattr(quantize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
