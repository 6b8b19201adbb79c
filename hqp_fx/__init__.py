"""hqp_fx: sensitivity-aware structural pruning + INT8 quantization of CNNs as torch.fx passes."""
from .core import (DumpInstrument, GraphPass, HQPError, PassError, PassResult, Pipeline, PrintInstrument,
                   TimingInstrument, format_graph)
from .count import count_macs, count_params
from .groups import ChannelGroup, ParamSlice
from .serialize import load, save
from .trace import TraceError, trace

__all__ = [
    "trace", "TraceError", "HQPError", "PassError", "GraphPass", "PassResult", "Pipeline",
    "PrintInstrument", "DumpInstrument", "TimingInstrument", "format_graph", "ChannelGroup", "ParamSlice",
    "count_macs", "count_params", "save", "load",
]
