"""Wrapped models under torch.distributed (issue 12 item 7): 2-process gloo runs on CPU (one spawn) of DDP
and of FSDP2 (fully_shard per wrapped layer, then the root) give the single-process gradients (EffiLoRA's
shared A included: one parameter, one reduced gradient), and the Reducer draws the same blocks on every rank."""
from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mokernels
from mokernels.methods import Reducer

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(up=nn.Linear(16, 24), down=nn.Linear(24, 16))) for _ in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["down"](torch.tanh(b["up"](x)))
        return x


METHODS = ("effilora", "slora")


def _model(method: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(r=4, dropout=0.0) if method == "effilora" else dict(r=2, num_task=3, init_k=2, top_p=0.6)
    m = mokernels.inject(Net(), method, target_modules=["up", "down"], **cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return m


def _data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)


def _grads(m: nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int, out: str):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for method in METHODS:
            m = _model(method)
            ddp = nn.parallel.DistributedDataParallel(m)
            x, y = _data()
            half = x.shape[0] // world
            sl = slice(rank * half, (rank + 1) * half)
            (ddp(x[sl]) - y[sl]).square().mean().backward()
            res[method] = _grads(m)
            if method == "effilora":
                red = Reducer(m, k_sample=2, seed=42)
                res["draws"] = [red.sample() for _ in range(5)]
        # FSDP2 in the same processes (no second start-up): every wrapped layer its own unit, the root last, so
        # the root unit owns mokernels_shared (EffiLoRA's A) and gathers it around the whole forward
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        warnings.filterwarnings("ignore", message=".*returned a view tensor")  # our outputs are reshapes (no in-place use)
        mesh = init_device_mesh("cpu", (world,))
        for method in METHODS:
            m = _model(method)
            for b in m.blocks:
                for k in ("up", "down"):
                    fully_shard(b[k], mesh=mesh)
            fully_shard(m, mesh=mesh)
            x, y = _data()
            half = x.shape[0] // world
            sl = slice(rank * half, (rank + 1) * half)
            (m(x[sl]) - y[sl]).square().mean().backward()
            res["fsdp2_" + method] = {n: p.grad.full_tensor() for n, p in m.named_parameters() if p.grad is not None}
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_gloo_match_single_process(tmp_path):
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)  # one spawn for both methods (startup cost)
    res = [torch.load(f"{out}.{r}") for r in range(2)]
    for method in METHODS:
        m = _model(method)
        x, y = _data()
        (m(x) - y).square().mean().backward()
        want = _grads(m)
        for rank in range(2):
            for mode in (method, "fsdp2_" + method):
                got = res[rank][mode]
                assert set(got) == set(want)
                for n, g in want.items():
                    # fp32 sums in another order (per-rank partial sums, FSDP2 divides before its reduce-scatter)
                    torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-6 * max(1.0, float(g.abs().max())),
                                               msg=f"{mode} rank {rank}: {n}")
    assert "mokernels_shared.params.effilora__A__16" in res[0]["effilora"]  # the shared A: one DDP parameter
    assert res[0]["draws"] == res[1]["draws"]  # the Reducer draws the same blocks on every rank
