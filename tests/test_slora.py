"""SLoRA (METHODS.md): constraint-space init, routed general + task experts with cross-expert attention
(against an independent per-token reference), errors, and the real MiniLM (fresh wrap == base,
training, exact save/load)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import mokernels
from conftest import minilm_loss, minilm_train
from mokernels.methods.slora import SLoRALinear, constraint_init

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", [(48, 32), (24, 40)])  # d_out >= d_in and d_out < d_in
def test_constraint_init(shape):
    W = torch.randn(*shape, dtype=torch.float64)
    A = constraint_init(W, 3, 4, 6).reshape(12, shape[1])
    torch.testing.assert_close(A @ A.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-10)  # orthonormal rows
    Vh = torch.linalg.svd(W, full_matrices=False).Vh
    assert (A @ Vh[:6].T).abs().max() < 1e-10  # orthogonal to the top-6 right singular vectors
    assert (A @ Vh[6:].T).abs().max() > 1e-2  # ... but not to the rest


def _reference(layer: SLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Per-token fp64 loop over METHODS.md's formula (own top-p selection, no mokernels op)."""
    c = layer.cfg
    G = c.num_general
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    out = []
    for t in x.reshape(-1, x.shape[-1]).double():
        p = torch.softmax((layer.router.detach().double() @ t) / c.router_temperature, -1)
        order = sorted(range(c.num_task), key=lambda i: (-float(p[i]), i))
        sel, mass = [], 0.0
        for i in order:
            sel.append(i)
            mass += float(p[i])
            if mass >= c.top_p:
                break
        ws = p[sel] / p[sel].sum()
        experts = list(range(G)) + [G + i for i in sel]
        w = torch.cat([torch.ones(G, dtype=torch.float64), ws])
        h = torch.stack([A[e] @ t for e in experts])  # [k, r]
        if c.cross_attention:
            h = torch.softmax(h @ h.T / math.sqrt(c.r), -1) @ h
        d = sum(w[j] * (B[e] @ h[j]) for j, e in enumerate(experts))
        out.append(layer.weight.double() @ t + layer.bias.double() + layer.scaling * d)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("cross", [True, False])
def test_slora_layer_matches_reference(cross):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 24))
    mokernels.inject(m, "slora", target_modules=["0"], r=2, num_general=1, num_task=4, init_k=4, cross_attention=cross)
    layer = m[0]
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.mul_(3.0)
    x = torch.randn(2, 5, 32)
    y = layer(x)
    torch.testing.assert_close(y.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
    s = layer.stats()
    assert s["tokens"] == 10 and 1 <= s["mean_active_task_experts"] <= 4
    assert s["mean_active_experts"] == 1 + s["mean_active_task_experts"]
    # gradients reach A, B and the router (through the kept weights)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.lora_A, layer.lora_B, layer.router))


def test_slora_errors_and_ortho_penalty():
    lin = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"layer '0': the constraint-space init needs \(G\+N\)·r \+ k <= d_in, got "
                                         r"\(1\+4\)·16 \+ 8 = 88 > 64"):
        mokernels.inject(lin, "slora", target_modules=["0"], init_k=8)
    with pytest.raises(ValueError, match=r"init_k = 9 must be in \[0, min\(d_in, d_out\)\] = \[0, 8\]"):
        mokernels.inject(lin, "slora", target_modules=["0"], r=2, init_k=9)
    assert type(lin[0]) is nn.Linear
    m = mokernels.inject(lin, "slora", target_modules=["0"], r=4, init_k=8, ortho_lambda=0.5)
    A = m[0].lora_A
    assert float(mokernels.extra_losses(m)) < 1e-10  # orthonormal init: A_i A_jᵀ = 0
    with torch.no_grad():
        A.add_(0.1 * torch.randn_like(A))
    want = 0.5 * sum((A[i] @ A[j].T).square().sum() for i in range(5) for j in range(5) if i != j)
    torch.testing.assert_close(mokernels.extra_losses(m), want)
    with pytest.raises(NotImplementedError, match="'slora' cannot merge"):
        mokernels.merge(m)


def test_slora_minilm(minilm, minilm_fresh, minilm_batch, minilm_target, tmp_path):
    targets = ["query", "value"]
    ref = minilm(**minilm_batch).last_hidden_state
    m = mokernels.inject(minilm_fresh, "slora", target_modules=targets)
    torch.testing.assert_close(m(**minilm_batch).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    tr, tot = mokernels.trainable_parameters(m)
    assert tr == 12 * (5 * 16 * 384 + 4 * 384 + 5 * 384 * 16)  # A, router, B
    stats = [l.stats()["mean_active_task_experts"] for _, l in mokernels.methods.adapter_layers(m)]
    assert 1.5 < sum(stats) / len(stats) < 2.4  # the paper's ≈1.9 at init (router_init_std = 2)
    m.train()
    losses = minilm_train(m, minilm_batch, minilm_target, steps=3)
    assert losses[-1] < 0.8 * losses[0]
    m.eval()
    path = tmp_path / "slora.safetensors"
    mokernels.save_adapters(m, path)
    fresh = mokernels.inject(copy.deepcopy(minilm), "slora", target_modules=targets)
    mokernels.load_adapters(fresh, path)
    assert torch.equal(fresh(**minilm_batch).last_hidden_state, m(**minilm_batch).last_hidden_state)
    with torch.no_grad():
        assert float(minilm_loss(fresh, minilm_batch, minilm_target)) == float(minilm_loss(m, minilm_batch, minilm_target))


def test_active_stats_survive_half():
    """Review: ``model.half()`` turned the fp64 token counters into fp16 (they stop counting at 2048 tokens)."""
    net = nn.Sequential(nn.Linear(32, 16))
    m = mokernels.inject(net, "slora", target_modules=["0"], r=2, init_k=4)
    lay = m[0]
    with torch.no_grad():
        lay(torch.randn(3, 32))
    m.to(torch.float64).to(torch.float16)
    assert lay.active_stats.dtype == torch.float64 and lay.stats()["tokens"] == 3
    lay.active_stats[1] = 4097.0  # counts that fp16 cannot hold
    m.to(torch.float32)
    assert lay.stats()["tokens"] == 4097
