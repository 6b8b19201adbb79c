"""Attention: ``F.scaled_dot_product_attention``, and the matmul -> softmax -> matmul it is often written as,
over heads laid out as a leading dim (``[B, H, N, D]``).

Heads are independent, so the unit of pruning is a whole head: its query, key and value channels (and the
output channels the value's carry on to the projection) are one channel class. Removing head ``h`` from q, k and
v removes exactly head ``h`` of the output, which is what masking those channels (zero q and k: uniform
attention over a zero v) computes. Within a head, channels are not pruned: q and k's channels are summed into
one logit and the default scale ``1/sqrt(D)`` counts them, so the head size never changes and no rewrite is
needed. The reshape into heads and back (``reshape(B, N, 3, H, D)``, ``reshape(B, N, C)``) is data movement
whose head count the ordinary view rewrite recomputes.

A matrix product of two activations (``q @ k.transpose(-2, -1)``, ``attn @ v``) is read the same way: where its
batch dims carry channels (the heads), everything at one batch position is one class; otherwise the contracted
dim pairs channel ``e`` of one side with channel ``e`` of the other (dropping one term of every dot product), and
the output keeps the free dims' channels. A product with a parameter is a layer hqp_fx does not model: pinned.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .base import OpRule


def _sdpa(p, node: fx.Node):
    return p.attention(node)


def _matmul(p, node: fx.Node):
    return p.matmul(node)


RULES = (
    OpRule("scaled_dot_product_attention", _sdpa, functions=frozenset({F.scaled_dot_product_attention})),
    OpRule("matmul", _matmul, functions=frozenset({operator.matmul, torch.matmul, torch.bmm}),
           methods=frozenset({"matmul", "bmm"})),
)
