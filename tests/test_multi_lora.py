"""MultiLoRALinear: nn.Linear drop-in over the multi-adapter LoRA ops (CPU: the reference)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mokernels.modules import MultiLoRALinear


def wrapped(N=4, r=3, d_in=12, d_out=10, alpha=6.0, dropout=0.0, randomize=True):
    lin = nn.Linear(d_in, d_out)
    m = MultiLoRALinear.from_linear(lin, N, r, alpha=alpha, dropout=dropout)
    if randomize:
        with torch.no_grad():
            m.lora_B.normal_()
    return lin, m


def per_token(m, x, ids):
    """Naive: base + scaling · B_i A_i x per token (fp64)."""
    xs = x.reshape(-1, x.shape[-1]).double()
    y = xs @ m.weight.double().T + m.bias.double()
    for t, i in enumerate(ids.reshape(-1).tolist()):
        if i >= 0:
            y[t] += float(m.scaling[i]) * (m.lora_B[i].double() @ (m.lora_A[i].double() @ xs[t]))
    return y.reshape(*x.shape[:-1], -1)


def test_from_linear_keeps_parameters_and_fresh_layer_equals_base():
    lin, m = wrapped(randomize=False)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert {"weight", "bias", "lora_A", "lora_B", "scaling"} <= set(m.state_dict())
    assert m.lora_A.shape == (4, 3, 12) and m.lora_B.shape == (4, 10, 3)
    torch.testing.assert_close(m.scaling, torch.full((4,), 2.0))
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(m(x, torch.randint(-1, 4, (2, 5))), lin(x))
    torch.testing.assert_close(m(x), lin(x))  # no routing: the base layer


def test_forward_forms_match_naive():
    lin, m = wrapped()
    x = torch.randn(2, 3, 12)
    ids = torch.tensor([[0, -1, 3], [2, 2, 1]])
    want = per_token(m, x, ids)
    torch.testing.assert_close(m(x, ids).double(), want, rtol=1e-5, atol=1e-5)
    mix = (ids[..., None], torch.ones(2, 3, 1))
    torch.testing.assert_close(m(x, mixture=mix).double(), want, rtol=1e-5, atol=1e-5)
    seg = (torch.tensor([0, 2, 6]), torch.tensor([1, -1]))
    want_seg = per_token(m, x, torch.tensor([1, 1, -1, -1, -1, -1]))
    torch.testing.assert_close(m(x, segments=seg).double(), want_seg, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_bit_exact_and_routing_while_merged_is_an_error():
    lin, m = wrapped()
    x = torch.randn(7, 12)
    w0 = m.weight.detach().clone()
    routed = m(x, torch.full((7,), 2))
    m.merge(2)
    assert m.merged == [2]
    torch.testing.assert_close(m(x), routed, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        m(x, torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="already merged"):
        m.merge(1)
    m.unmerge()
    assert torch.equal(m.weight, w0) and m.merged == []
    with pytest.raises(ValueError, match="slot"):
        m.merge(4)


def test_training_grads_dropout_and_mixed_precision():
    lin, m = wrapped(dropout=0.5)
    x = torch.randn(6, 12)
    ids = torch.tensor([0, 1, 2, 3, -1, 0])
    m.eval()
    torch.testing.assert_close(m(x, ids).double(), per_token(m, x, ids), rtol=1e-5, atol=1e-5)
    m.train()
    torch.manual_seed(1)
    y = m(x, ids)
    assert not torch.allclose(y, m.eval()(x, ids))  # dropout on the adapter input in training
    m.train()
    y.sum().backward()
    assert m.lora_A.grad is not None and m.lora_B.grad is not None and m.lora_A.grad[0].abs().sum() > 0
    assert m.lora_A.grad[3].abs().sum() > 0
    m.eval()
    yb = m(x.to(torch.bfloat16).float(), ids)  # fp32 params, autocast-style use in another dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = m(x, ids)
    assert ya.dtype == torch.bfloat16
    torch.testing.assert_close(ya.float(), yb, rtol=5e-2, atol=5e-2)


def test_constructor_and_bad_arguments():
    m = MultiLoRALinear(8, 6, num_adapters=2, r=2, alpha=4, bias=False)
    assert m.bias is None and m(torch.randn(3, 8), torch.tensor([0, 1, -1])).shape == (3, 6)
    with pytest.raises(ValueError, match="r <= 128"):
        MultiLoRALinear(8, 6, num_adapters=2, r=0)
    with pytest.raises(ValueError, match="nn.Linear"):
        MultiLoRALinear.from_linear(nn.Conv1d(2, 2, 1), 2, 2)
    with pytest.raises(ValueError, match="ids must be in"):
        m(torch.randn(3, 8), torch.tensor([0, 2, -1]))
