"""MACs and parameter counts, from torch.utils.flop_counter (one multiply-add = 2 FLOPs)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from . import meta

__all__ = ["count_macs", "count_params", "macs_by_module"]


def _inputs(model: nn.Module, example_inputs: Any) -> tuple:
    if example_inputs is None:
        example_inputs = getattr(model, "meta", {}).get(meta.EXAMPLE_INPUTS)
        if example_inputs is None:
            raise ValueError("count_macs needs example_inputs unless the model comes from hqp_fx.trace")
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _counted(model: nn.Module, example_inputs: Any) -> FlopCounterMode:
    """One forward pass under torch's flop counter."""
    mode = FlopCounterMode(display=False)
    with torch.no_grad(), mode:
        model(*_inputs(model, example_inputs))
    return mode


def macs_by_module(model: nn.Module, example_inputs: Any = None) -> dict[str, int]:
    """MACs of one forward pass per module qualified name ("" = whole model)."""
    out = {}
    for name, ops in _counted(model, example_inputs).get_flop_counts().items():
        if name == "Global":
            continue
        _, _, qual = name.partition(".")  # keys are prefixed with the root module's class name
        out[qual] = sum(int(v) for v in ops.values()) // 2
    return out


def count_macs(model: nn.Module, example_inputs: Any = None) -> int:
    """Total multiply-accumulates of one forward pass on ``example_inputs`` (batch included)."""
    return _counted(model, example_inputs).get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
