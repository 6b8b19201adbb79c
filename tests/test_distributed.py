"""Under torch.distributed (gloo, 2 CPU processes) Fisher scores, and fine-tuning through hqp_fx.train, equal one
process on the same data."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hqp_fx
from hqp_fx import meta
from hqp_fx.models import CifarResNet
from hqp_fx.data import BatchLoader, ImageSet
from hqp_fx.passes import ChannelDependencyPass, score_channels, select_channels
from hqp_fx.train import FinetuneConfig, finetune

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


def _run_gloo(rank: int, world: int, port: int, out: str, job):
    """One rank of a 2-process gloo group: run ``job(rank, world)``; rank 0 saves what it returns."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        result = job(rank, world)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(job, tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_run_gloo, args=(2, _free_port(), str(out), job), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def score_shard(rank: int, world: int):
    gm, batches = setup()
    return {c: score_channels(gm, c, batches[rank::world]) for c in CRITERIA}


def test_ddp_scores_and_decisions_equal_single_process(tmp_path):
    distributed = run_distributed(score_shard, tmp_path)
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


def finetune_setup():
    """A BN-free net (BN statistics are per process under DDP, by design) and 64 seeded images."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(32, 4))
    gen = torch.Generator().manual_seed(3)
    data = ImageSet(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=gen),
                    torch.randint(0, 4, (64,), generator=gen), ("a", "b", "c", "d"))
    return net, data


FT = FinetuneConfig(epochs=2, lr=0.05)


def finetune_shard(rank: int, world: int):
    net, data = finetune_setup()
    finetune(net, BatchLoader(data, 8, shuffle=True, seed=1, rank=rank, world_size=world), FT)
    return net.state_dict()


def test_ddp_finetune_equals_single_process(tmp_path):
    """Rank r's i-th batch holds the r-th half of the single run's i-th (twice as large) batch, so the averaged
    DDP gradient is the single run's gradient and the weights must agree after every step."""
    distributed = run_distributed(finetune_shard, tmp_path)
    net, data = finetune_setup()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    losses = finetune(net, BatchLoader(data, 16, shuffle=True, seed=1), FT)
    assert len(losses) == 8
    for k, v in net.state_dict().items():
        assert not torch.allclose(v, before[k]), f"{k} did not train"
        torch.testing.assert_close(distributed[k], v, rtol=1e-5, atol=1e-6)
