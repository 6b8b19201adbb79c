"""Graph passes, one file per stage of the data flow."""
from .dependency import ChannelDependencyPass
from .prune import PruneChannelsPass
from .align import AlignChannelsPass

__all__ = ["ChannelDependencyPass", "PruneChannelsPass", "AlignChannelsPass"]
