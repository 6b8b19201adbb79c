"""Fisher scores under torch.distributed (gloo, 2 CPU processes) equal one process on the same data."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hqp_fx
from hqp_fx import meta
from hqp_fx.models import CifarResNet
from hqp_fx.passes import ChannelDependencyPass, score_channels, select_channels

from helpers import realistic_random

CRITERIA = ("fisher", "group-fisher", "taylor")


def setup():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    gm = hqp_fx.trace(realistic_random(CifarResNet(20), x), x)
    ChannelDependencyPass()(gm)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(6, 3, 32, 32, generator=gen), torch.randint(0, 10, (6,), generator=gen)) for _ in range(4)]
    return gm, batches


def worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        gm, batches = setup()
        shard = batches[rank::world]
        result = {c: score_channels(gm, c, shard) for c in CRITERIA}
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_ddp_scores_and_decisions_equal_single_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "scores.pt"
    mp.spawn(worker, args=(2, port, str(out)), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)
    gm, batches = setup()
    groups = meta.channel_groups(gm)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float32 reduction order as the workers
    try:
        singles = {c: score_channels(gm, c, batches) for c in CRITERIA}
    finally:
        torch.set_num_threads(threads)
    for c, single in singles.items():
        assert single.keys() == distributed[c].keys()
        for k in single:  # float64 sums of float32 gradients: only the summation order differs
            torch.testing.assert_close(distributed[c][k], single[k], rtol=1e-9, atol=1e-15)
        assert select_channels(groups, distributed[c], 0.3) == select_channels(groups, single, 0.3)
