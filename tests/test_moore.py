"""MoORE on the real MiniLM: fresh wrap == base (fp32 SVD round trip), the layer == a plain torch
composition with explicit Householder matrices (forward and gradients), the chain is orthogonal, the
unseen task uses the mean task embedding, merge == unmerged and unmerge is exact, training lowers the
loss, save -> load is bit-exact and takes U, σ, V from the checkpoint."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import mokernels
from mokernels.methods import dlp_lora
from mokernels.methods.moore import MoOREConfig, MoORELinear
from mokernels.ops import householder_apply as householder
from test_samora import TASKS, layers_of, train_few_steps, wrap_with_tasks  # shared MiniLM helpers

TARGETS = [r"encoder\.layer\.[01]\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|"
           r"output\.dense)$"]


def _wrap(minilm, **cfg):
    return wrap_with_tasks(minilm, "moore", TARGETS, **cfg)


def _layers(m):
    return layers_of(m, MoORELinear)


def _randomize(m, seed=1, router=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lay in _layers(m):
            lay.router_P.copy_(torch.randn(lay.router_P.shape, generator=g) * router)
            lay.router_Q.copy_(torch.randn(lay.router_Q.shape, generator=g) * router * 0.1)
            lay.householder_u.add_(torch.randn(lay.householder_u.shape, generator=g) * 0.3)


def test_fresh_wrap_equals_base(minilm, minilm_batch):
    m = _wrap(minilm)
    assert len(_layers(m)) == 12
    with torch.no_grad():
        ref = minilm(**minilm_batch).last_hidden_state
        out = m(**minilm_batch).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    lay = _layers(m)[4]  # intermediate.dense 384 -> 1536: R = 384
    assert lay.svd_U.shape == (1536, 384) and lay.svd_V.shape == (384, 384) and lay.svd_sigma.shape == (384,)


def test_householder_chain_is_orthogonal_and_identity_at_init():
    u = torch.randn(3, 16).repeat_interleave(2, 0)
    eye = torch.eye(16)
    torch.testing.assert_close(householder(eye, u), eye, atol=1e-6, rtol=0)
    u = torch.randn(6, 16)
    H = householder(eye, u).T  # rows e_i -> (H e_i)^T, so householder(I) = H^T
    torch.testing.assert_close(H.T @ H, eye, atol=1e-5, rtol=0)
    Hl = [eye - 2 * torch.outer(v, v) / v.dot(v) for v in u]
    torch.testing.assert_close(H, Hl[0] @ Hl[1] @ Hl[2] @ Hl[3] @ Hl[4] @ Hl[5], atol=1e-5, rtol=0)
    x = torch.randn(5, 16)
    torch.testing.assert_close(householder(x, u, transpose=True), x @ H, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="even"):
        MoORELinear.check_linear(torch.nn.Linear(16, 16), MoOREConfig(householder=7), "l")


@pytest.mark.parametrize("clip", [False, True])
def test_layer_matches_torch_composition(minilm, clip):
    lin = copy.deepcopy(minilm.encoder.layer[0].intermediate.dense)
    m = torch.nn.Sequential(lin)
    m = mokernels.inject(m, "moore", target_modules=["0"], clip=clip)
    mokernels.set_task(m, torch.tensor([0, 3, -1]))
    _randomize(m, router=0.5)
    lay = m[0]
    x = torch.randn(3, 5, 384)
    dy = torch.randn(3, 5, 1536)
    params = [lay.householder_u, lay.task_emb, lay.router_P, lay.router_gamma, lay.router_Q]
    y = lay(x)
    g = torch.autograd.grad((y * dy).sum(), params)
    y_ref = lay.reference_forward(x)
    g_ref = torch.autograd.grad((y_ref * dy).sum(), params)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    assert (y - lay.base_forward(x)).abs().max() > 1e-1
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_unseen_task_uses_the_mean_task_embedding(minilm):
    """Without the clip y is linear in g = P^T e_task + ..., so the unseen task's output is the mean."""
    m = torch.nn.Sequential(copy.deepcopy(minilm.encoder.layer[0].attention.self.query))
    m = mokernels.inject(m, "moore", target_modules=["0"])
    _randomize(m, router=0.5)
    K = m[0].cfg.num_tasks
    mokernels.set_task(m, torch.tensor(list(range(K)) + [-1]))
    x = torch.randn(1, 5, 384).expand(K + 1, 5, 384)
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y[K], y[:K].mean(0), rtol=1e-4, atol=1e-4)
    assert (y[0] - y[1]).abs().max() > 1e-3


def test_merge_equals_unmerged(minilm, minilm_batch):
    m = _wrap(minilm)
    assert MoORELinear.can_merge
    _randomize(m)
    with torch.no_grad():
        out = m(**minilm_batch).last_hidden_state
        mokernels.merge(m)  # H folded into V; the routing stays (merged_keeps_routing)
        assert all(lay.merged for lay in _layers(m))
        merged = m(**minilm_batch).last_hidden_state
        mokernels.set_task(m, torch.tensor([2, 2, 0, 1]))  # still routes while merged
        merged_other = m(**minilm_batch).last_hidden_state
        mokernels.set_task(m, TASKS)
        mokernels.unmerge(m)
        back = m(**minilm_batch).last_hidden_state
        mokernels.set_task(m, torch.tensor([2, 2, 0, 1]))
        other = m(**minilm_batch).last_hidden_state
    assert (out - minilm(**minilm_batch).last_hidden_state).abs().max() > 1e-2  # the adapter is really on
    torch.testing.assert_close(merged, out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged_other, other, rtol=1e-4, atol=1e-4)
    assert (merged_other - merged).abs().max() > 1e-3
    assert torch.equal(back, out)


def test_training_reduces_loss(minilm, minilm_batch):
    m = _wrap(minilm)
    params = [p for p in m.parameters() if p.requires_grad]
    names = {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"householder_u", "task_emb", "router_P", "router_gamma", "router_Q"}, names
    losses = train_few_steps(m, minilm_batch, params, lr=1e-3, steps=5)
    assert losses[-1] < 0.9 * losses[0], losses


def test_save_load_bit_exact_from_the_checkpoints_svd(minilm, minilm_batch, tmp_path):
    m = _wrap(minilm)
    _randomize(m)
    with torch.no_grad():
        out = m(**minilm_batch).last_hidden_state
    mokernels.save_adapters(m, tmp_path / "ad")
    m2 = _wrap(minilm)
    with torch.no_grad():  # a reload must not depend on the SVD of the wrap: spoil it
        for lay in _layers(m2):
            lay.svd_U.mul_(-1)
            lay.svd_sigma.add_(1)
            lay.svd_V.mul_(2)
    mokernels.load_adapters(m2, tmp_path / "ad")
    with torch.no_grad():
        out2 = m2(**minilm_batch).last_hidden_state
    assert torch.equal(out, out2)


def test_missing_task_ids_is_an_error(minilm, minilm_batch):
    m = torch.nn.Sequential(copy.deepcopy(minilm.encoder.layer[0].attention.self.query))
    m = mokernels.inject(m, "moore", target_modules=["0"])
    with pytest.raises(RuntimeError, match="task"):
        m[0](torch.randn(2, 3, 384))


# ------------------------------------------------------------------------------------------------
# DDP (issue 12 item 7): the three H12b methods in one 2-process gloo spawn; MoORE's SVD buffers ride along


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 24), torch.nn.Linear(24, 16)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


DDP_METHODS = {"moore": dict(task_dim=8, router_dim=4, householder=2, num_tasks=3),
               "samora": dict(r=4, num_tasks=3), "dlp_lora": dict(num_adapters=3, r=2, trainable_pool=True)}


def _ddp_model(method):
    torch.manual_seed(0)
    m = mokernels.inject(_Net(), method, target_modules=["up", "down"], **DDP_METHODS[method])
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.rsplit(".", 1)[-1] in ("lora_B", "router_P", "router_Q", "gate_w"):
                p.normal_(0, 0.2)
    return m


def _ddp_data():
    g = torch.Generator().manual_seed(5)  # 8 sequences of 3 tokens; per-sequence task ids / sentence logits
    return (torch.randn(8, 3, 16, generator=g), torch.randn(8, 3, 16, generator=g), torch.tensor([0, 1, 2, -1] * 2),
            torch.randn(8, 3, generator=g))


def _ddp_step(m, model, sl):
    x, y, tasks, logits = _ddp_data()
    with contextlib.ExitStack() as stack:
        if isinstance(m.up, dlp_lora.DLPLoRALinear):
            stack.enter_context(dlp_lora.routing(m, logits=logits[sl], top_p=0.9))
        else:
            stack.enter_context(mokernels.routing(m, task_ids=tasks[sl]))
        (model(x[sl]) - y[sl]).square().mean().backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _ddp_worker(rank, world, port, out):
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for method in DDP_METHODS:
            m = _ddp_model(method)
            half = 8 // world
            ddp = torch.nn.parallel.DistributedDataParallel(m)
            res[method] = _ddp_step(m, ddp, slice(rank * half, (rank + 1) * half))
            if method == "moore":
                res["moore_V"] = m.up.svd_V.clone()
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_matches_single_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "res")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    res = [torch.load(f"{out}.{r}") for r in range(2)]
    for method in DDP_METHODS:
        m = _ddp_model(method)
        want = _ddp_step(m, m, slice(0, 8))
        assert want
        for rank in range(2):
            got = res[rank][method]
            assert set(got) == set(want), method
            for n, g in want.items():
                torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-6, msg=f"{method} rank {rank}: {n}")
    assert torch.equal(res[0]["moore_V"], res[1]["moore_V"])


def _toy_moore(seed=0):
    torch.manual_seed(0)  # the same base model, adapters randomised by seed
    net = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 16))
    m = mokernels.inject(net, "moore", target_modules=["0", "2"], num_tasks=2, task_dim=4, router_dim=4, householder=4)
    _randomize(m, seed=seed + 1)
    mokernels.set_task(m, torch.tensor([0, 1, -1]))
    return m


def test_merged_fold_follows_the_householder_vectors():
    """Review: the folded V' = Hᵀ V is a cache of the chain. Before the fix it went stale after
    load_adapters / an optimizer step / copy_ into a merged model (silently wrong outputs), and training
    while merged gave the Householder vectors no gradient."""
    src, dst = _toy_moore(0), _toy_moore(5)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        want = src(x)
    mokernels.merge(dst)
    with torch.no_grad():
        for (_, a), (_, b) in zip(mokernels.methods.adapter_layers(dst), mokernels.methods.adapter_layers(src)):
            a.load_adapter_state_dict(b.adapter_state_dict())  # what load_adapters does, layer by layer
        got = dst(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # training while merged: the chain's vectors get gradients, equal to the unmerged model's
    dst.train()
    dst(x).square().sum().backward()
    g_merged = [lay.householder_u.grad.clone() for _, lay in mokernels.methods.adapter_layers(dst)]
    dst.zero_grad()
    mokernels.unmerge(dst)
    dst(x).square().sum().backward()
    for g, (_, lay) in zip(g_merged, mokernels.methods.adapter_layers(dst)):
        torch.testing.assert_close(g, lay.householder_u.grad, rtol=1e-5, atol=1e-6)
