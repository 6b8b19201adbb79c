"""ONNX Runtime on the CPU: an ONNX file behind the nn.Module interface, and top-1 as the shipped file scores it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..lower_onnx import export_onnx
from ..train import evaluate

__all__ = ["OrtModel", "onnxruntime_top1"]


class OrtModel(torch.nn.Module):
    """An ONNX file behind the nn.Module call interface, so ``train.evaluate`` scores what actually ships.

    A static-batch model is fed in slices of its batch size, the last one padded.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 2):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        dim0 = self.session.get_inputs()[0].shape[0]
        self.batch = dim0 if isinstance(dim0, int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The model's output, or the tuple of its outputs in the file's order (detectors return several)."""
        outs = []
        for piece in (x.split(self.batch) if self.batch else (x,)):
            n = len(piece)
            if self.batch and n < self.batch:  # the last slice: padded to the static batch, the padding dropped
                piece = torch.cat([piece, piece.new_zeros((self.batch - n, *piece.shape[1:]))])
            outs.append([o[:n] for o in self.session.run(None, {self.input_name: piece.numpy()})])
        joined = tuple(torch.from_numpy(np.concatenate(parts)) for parts in zip(*outs))
        return joined[0] if len(joined) == 1 else joined


def onnxruntime_top1(example: torch.Tensor, evaluation: Iterable, threads: int = 2,
                     dynamic_batch: bool = False) -> Callable[..., float]:
    """Top-1 of a model exported to ONNX and run in ONNX Runtime: how the hybrid fallback judges a candidate.
    ``top1(model, hits=list)`` also appends the per-image hits (``evaluate``'s ``hits``).

    PyTorch's reference INT8 model is not what ships: its top-1 differs from ORT's on the same file by enough to
    let an over-budget model through (benchmarks/RESULTS.md).
    """
    evaluation = [(x, y) for x, y in evaluation]

    def top1(model: torch.nn.Module, hits: list[torch.Tensor] | None = None) -> float:
        with tempfile.TemporaryDirectory(prefix="hqp_candidate_") as tmp:
            path = Path(tmp) / "candidate.onnx"
            export_onnx(model, (example,), path, dynamic_batch=dynamic_batch)
            return evaluate(OrtModel(path, threads), evaluation, hits=hits)["top1"]
    return top1
