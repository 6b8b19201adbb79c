"""Graph passes, one file per stage of the data flow."""
from .dependency import ChannelDependencyPass
from .prune import PruneChannelsPass
from .align import AlignChannelsPass
from .sensitivity import SensitivityPass, score_channels, select_channels

__all__ = ["ChannelDependencyPass", "SensitivityPass", "score_channels", "select_channels",
           "AlignChannelsPass", "PruneChannelsPass"]
