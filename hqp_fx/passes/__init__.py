"""Graph passes, one file per stage of the data flow: dependency → sensitivity → align → prune → quantize.

``QuantizePass`` is imported on first use: torchao takes seconds to import and prints registration warnings,
which ``hqp inspect`` and the pruning passes do not need.
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
