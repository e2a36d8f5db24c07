"""EffiLoRA (METHODS.md): the shared A (one Parameter per input width, counted and saved once), the
layer against an independent formula, the Reducer (suppression, sampled-K gradients, seeded draws,
score updates) and the real MiniLM (fresh wrap == base, training, exact save/load)."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

import mokernels
from conftest import minilm_loss, minilm_train
from mokernels.methods import Reducer, adapter_layers
from mokernels.methods.effilora import EffiLoRALinear

pytestmark = pytest.mark.usefixtures("one_thread")


class Blocks(nn.Module):
    """4 'transformer blocks' of two linears (widths 12 -> 20 -> 12) and an unnumbered head."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict(dict(up=nn.Linear(12, 20), down=nn.Linear(20, 12))) for _ in range(4))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        for b in self.layers:
            x = x + b["down"](torch.tanh(b["up"](x)))
        return self.head(x)


def _wrapped(**cfg):
    torch.manual_seed(0)
    m = mokernels.inject(Blocks(), "effilora", target_modules=["up", "down", "head"], r=4, dropout=0.0, **cfg)
    with torch.no_grad():
        for _, l in adapter_layers(m):
            l.lora_B.normal_(0, 0.3)
    return m


def test_shared_A_is_one_parameter_counted_and_saved_once(tmp_path):
    m = _wrapped()
    ups = [b["up"] for b in m.layers] + [m.head]
    downs = [b["down"] for b in m.layers]
    assert all(l.lora_A is ups[0].lora_A for l in ups) and all(l.lora_A is downs[0].lora_A for l in downs)
    assert ups[0].lora_A is not downs[0].lora_A and sorted(k for k, _ in m.mokernels_shared.items()) == \
        ["effilora.A.12", "effilora.A.20"]
    tr, _ = mokernels.trainable_parameters(m)
    per_layer = sum(4 * l.out_features * 4 + 4 * 4 for _, l in adapter_layers(m))  # B [4, out, r] + W_g [r, 4]
    assert tr == 4 * 12 + 4 * 20 + per_layer
    # one gradient, accumulated from every layer that uses it
    m(torch.randn(3, 12)).sum().backward()
    assert ups[0].lora_A.grad is not None and ups[0].lora_A.grad.abs().sum() > 0
    path = tmp_path / "e.safetensors"
    mokernels.save_adapters(m, path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert sorted(k for k in keys if "lora_A" in k or "A." in k) == ["mokernels_shared.effilora.A.12",
                                                                        "mokernels_shared.effilora.A.20"]
    assert len(keys) == 2 + 2 * len(adapter_layers(m))  # + lora_B and router per layer
    x = torch.randn(2, 12)
    fresh = mokernels.inject(Blocks(), "effilora", target_modules=["up", "down", "head"], r=4, dropout=0.0)
    fresh.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("mokernels")}, strict=False)
    mokernels.load_adapters(fresh, path)
    assert torch.equal(fresh(x), m(x))
    assert fresh.layers[0]["up"].lora_A is fresh.head.lora_A  # still shared after the load


def test_effilora_layer_matches_formula():
    m = _wrapped()
    layer = m.layers[1]["down"]
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    A, B, Wg = (t.detach().double() for t in (layer.lora_A, layer.lora_B, layer.router))
    w = torch.softmax((x @ A.T) @ Wg, -1)  # [2, 3, m]
    delta = torch.einsum("btm,mor,btr->bto", w, B, x @ A.T) * (layer.cfg.alpha / layer.cfg.r)
    want = x @ layer.weight.double().T + layer.bias.double() + delta
    torch.testing.assert_close(layer(x.float()).double(), want, rtol=1e-5, atol=1e-5)
    assert layer.block_index == 1 and m.head.block_index is None


def test_reducer_suppression_restores_and_scores():
    m = _wrapped()
    x = torch.randn(6, 12)
    red = Reducer(m, period=2, seed=3)
    assert red.blocks == [0, 1, 2, 3] and red.n_suppress == 2 and red.k_sample == 1
    y = m(x)
    # suppression = those blocks' deltas scaled to 0: the same as a model whose B there are 0
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for b in (0, 1):
            for k in ("up", "down"):
                ref.layers[b][k].lora_B.zero_()
    with pytest.raises(KeyError):
        with red.suppressed([0, 1]):
            assert red.lowest() == [0, 1]
            torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
            raise KeyError("boom")
    assert all(l.delta_scale == 1.0 for _, l in adapter_layers(m))  # restored, also after an exception
    assert torch.equal(m(x), y)
    # a score update raises the suppressed blocks by the loss increase
    calls = iter([1.0, 1.5])
    rec = red.update_scores(lambda: next(calls))
    assert rec["suppressed"] == [0, 1] and rec["increase"] == 0.5
    assert red.scores.tolist() == [0.5, 0.5, 0.0, 0.0] and red.lowest() == [2, 3]
    p = red.probabilities()
    assert p[0] > p[2] and torch.isclose(p.sum(), torch.tensor(1.0, dtype=p.dtype))
    red.literal_sign = True
    assert red.probabilities()[0] < red.probabilities()[2]
    with pytest.raises(ValueError, match="no EffiLoRA layers"):
        Reducer(mokernels.inject(nn.Sequential(nn.Linear(4, 4)), "slora", target_modules=["0"], r=1, num_task=2, init_k=0))


def test_reducer_masks_unsampled_B_grads_and_is_seeded():
    m = _wrapped()
    red = Reducer(m, k_sample=2, period=0, seed=7)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    m(torch.randn(5, 12)).square().sum().backward()
    sampled = red.step()
    assert len(sampled) == 2
    for b, blk in enumerate(m.layers):
        for k in ("up", "down"):
            assert (blk[k].lora_B.grad is not None) == (b in sampled)
            assert blk[k].router.grad is not None  # routers and the shared A always train
    assert m.head.lora_B.grad is not None  # unnumbered layers always train
    opt.step()
    for n, p in m.named_parameters():
        if n in before and ".lora_B" in n and n.startswith("layers."):
            assert torch.equal(p, before[n]) == (int(n.split(".")[1]) not in sampled), n
    draws = lambda seed: [Reducer(m, seed=seed, k_sample=2).sample() for _ in range(1)] + \
        [r.sample() for r in [Reducer(m, seed=seed, k_sample=2)] for _ in range(8)]  # noqa: E731
    assert draws(11) == draws(11) and draws(11) != draws(12)
    # step() runs the suppression round every `period` steps with the callback
    red = Reducer(m, period=2, seed=0)
    vals = iter([2.0, 2.25, 2.0, 1.5])
    for _ in range(4):
        red.step(lambda: next(vals))
    assert [h["step"] for h in red.history] == [2, 4] and red.history[1]["increase"] == -0.5
    assert red.scores.tolist() == [0.25, 0.25, 0.0, 0.0]  # a loss decrease does not raise a score


def test_effilora_minilm(minilm, minilm_fresh, minilm_batch, minilm_target, tmp_path):
    targets = ["query", "value", "intermediate.dense", "output.dense"]
    ref = minilm(**minilm_batch).last_hidden_state
    m = mokernels.inject(minilm_fresh, "effilora", target_modules=targets, exclude_modules=["attention.output.dense"])
    assert not isinstance(m.encoder.layer[0].attention.output.dense, EffiLoRALinear)
    assert len(adapter_layers(m)) == 24
    torch.testing.assert_close(m(**minilm_batch).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    m.train()
    red = Reducer(m, seed=0)
    losses = minilm_train(m, minilm_batch, minilm_target, steps=3, hook=lambda _: red.step())
    assert losses[-1] < 0.8 * losses[0]
    m.eval()
    path = tmp_path / "effilora.safetensors"
    mokernels.save_adapters(m, path)
    fresh = mokernels.inject(copy.deepcopy(minilm), "effilora", target_modules=targets,
                             exclude_modules=["attention.output.dense"])
    mokernels.load_adapters(fresh, path)
    assert torch.equal(fresh(**minilm_batch).last_hidden_state, m(**minilm_batch).last_hidden_state)
    with torch.no_grad():
        assert float(minilm_loss(fresh, minilm_batch, minilm_target)) == float(minilm_loss(m, minilm_batch, minilm_target))
