"""Attention: ``F.scaled_dot_product_attention`` over heads laid out as a leading dim (``[B, H, N, D]``).

Heads are independent, so the unit of pruning is a whole head: its query, key and value channels (and the
output channels the value's carry on to the projection) are one channel class. Removing head ``h`` from q, k and
v removes exactly head ``h`` of the output, which is what masking those channels (zero q and k: uniform
attention over a zero v) computes. Within a head, channels are not pruned: q and k's channels are summed into
one logit and the default scale ``1/sqrt(D)`` counts them, so the head size never changes and no rewrite is
needed. The reshape into heads and back (``reshape(B, N, 3, H, D)``, ``reshape(B, N, C)``) is data movement
whose head count the ordinary view rewrite recomputes.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from .base import OpRule


def _sdpa(p, node: fx.Node):
    return p.attention(node)


RULES = (
    OpRule("scaled_dot_product_attention", _sdpa, functions=frozenset({F.scaled_dot_product_attention})),
)
