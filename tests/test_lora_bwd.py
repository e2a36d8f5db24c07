"""LoRA backward (mokernels.ops.lora): review leftovers of the forward (weight-0 slots, in-place op vs
autograd, meta tensors, bool scale, PEFT equality with grads), the emulated backward kernels
(csrc/kernels/lora_bwd.cuh) vs the autograd of the reference, their bitwise determinism across the
emulator's schedules, and MultiLoRALinear's dropout / autocast contract."""
from __future__ import annotations

import pytest
import torch

from mokernels.ops.lora import lora_apply, lora_apply_, lora_shared_apply


def _adapters(N, r, d_in, d_out, dtype=torch.float32):
    A = (torch.randn(N, r, d_in, dtype=torch.float64) * d_in ** -0.5).to(dtype)
    B = (torch.randn(N, d_out, r, dtype=torch.float64) * r ** -0.5).to(dtype)
    return A, B


# ------------------------------------------------------------------------------------------------
# Review leftovers of the forward


def test_weight_zero_slot_skips_a_nan_adapter_in_the_reference():
    """A NaN-filled adapter routed only with weight 0 (and an unused NaN adapter) must not reach y — the
    kernels skip weight-0 slots; the reference agrees (masking, not 0·NaN)."""
    N, r, d_in, d_out, T = 4, 3, 8, 6, 5
    A, B = _adapters(N, r, d_in, d_out)
    A[2] = float("nan")
    B[2] = float("nan")
    B[3] = float("nan")  # unused adapter
    x = torch.randn(T, d_in)
    ids = torch.tensor([[0, 2], [1, 2], [2, -1], [0, 1], [1, 0]])
    w = torch.tensor([[0.5, 0.0], [0.3, 0.0], [0.0, 0.0], [0.2, 0.7], [1.0, 0.4]])
    y = lora_apply(x, A, B, 0.5, mixture=(ids, w))
    assert torch.isfinite(y).all()
    ok = torch.where(ids == 2, torch.zeros_like(ids), ids)  # the same routing without the NaN adapter
    torch.testing.assert_close(y, lora_apply(x, A, B, 0.5, mixture=(ok, w)))
    # shared A, dense weights: a NaN expert with weight 0 everywhere
    As = A[0]
    ws = torch.rand(T, N)
    ws[:, 2:] = 0
    ys = lora_shared_apply(x, As, B, 0.5, weights=ws)
    assert torch.isfinite(ys).all()
    torch.testing.assert_close(ys, lora_shared_apply(x, As, B[:2], 0.5, weights=ws[:, :2]))
    # backward: dx / dA / dB stay finite too (the weight-0 slot's own weight gradient is genuinely NaN)
    xg, Ag, Bg = x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()
    lora_apply(xg, Ag, Bg, 0.5, mixture=(ids, w)).sum().backward()
    assert torch.isfinite(xg.grad).all()
    assert (Ag.grad[2] == 0).all() and (Bg.grad[2] == 0).all() and torch.isfinite(Ag.grad).all()


def test_weight_zero_slot_still_gets_its_gradient():
    N, r, d_in, d_out, T = 3, 2, 5, 4, 3
    A, B = _adapters(N, r, d_in, d_out, torch.float64)
    x = torch.randn(T, d_in, dtype=torch.float64)
    ids = torch.tensor([[0, 1], [2, 0], [1, -1]])
    w = torch.tensor([[0.0, 0.5], [0.3, 0.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    g = torch.randn(T, d_out, dtype=torch.float64)
    (lora_apply(x, A, B, 0.7, mixture=(ids, w)) * g).sum().backward()
    for t in range(T):
        for j in range(2):
            i = int(ids[t, j])
            want = 0.0 if i < 0 else float(0.7 * (B[i].T @ g[t]) @ (A[i] @ x[t]))
            assert abs(float(w.grad[t, j]) - want) < 1e-12


def test_inplace_refuses_tensors_that_require_grad():
    A, B = _adapters(2, 2, 4, 3)
    x, out = torch.randn(3, 4), torch.zeros(3, 3)
    ids = torch.tensor([0, 1, -1])
    for name, kw in (("x", dict(x=x.clone().requires_grad_())), ("A", dict(A=A.clone().requires_grad_())),
                     ("out", dict(out=out.clone().requires_grad_()))):
        args = dict(out=out.clone(), x=x, A=A, B=B) | kw
        with pytest.raises(ValueError, match=f"{name} require.*no_grad"):
            lora_apply_(args["out"], args["x"], args["A"], args["B"], 1.0, ids=ids)
    Ag = A.clone().requires_grad_()
    want = lora_apply(x, A, B, 1.0, ids=ids, base_out=out)
    with torch.no_grad():
        torch.testing.assert_close(lora_apply_(out.clone(), x, Ag, B, 1.0, ids=ids), want)
    with torch.inference_mode():
        torch.testing.assert_close(lora_apply_(out.clone(), x, Ag, B, 1.0, ids=ids), want)


def test_meta_tensors_with_validation():
    """validate=True (the default) must not read values of meta tensors: shapes only."""
    m = torch.device("meta")
    A, B = torch.empty(3, 2, 8, device=m), torch.empty(3, 6, 2, device=m)
    x = torch.empty(2, 5, 8, device=m)
    y = lora_apply(x, A, B, 0.5, ids=torch.empty(2, 5, dtype=torch.long, device=m))
    assert y.shape == (2, 5, 6) and y.device == m
    off = torch.empty(3, dtype=torch.long, device=m)
    assert lora_apply(x, A, B, 0.5, segments=(off, torch.empty(2, dtype=torch.long, device=m))).shape == (2, 5, 6)
    mix = (torch.empty(2, 5, 2, dtype=torch.long, device=m), torch.empty(2, 5, 2, device=m))
    assert lora_apply(x, A, B, 0.5, mixture=mix).shape == (2, 5, 6)
    assert lora_shared_apply(x, A[0], B, 0.5, weights=torch.empty(2, 5, 3, device=m)).shape == (2, 5, 6)
    assert lora_shared_apply(x, A[0], B, 0.5, mixture=mix).shape == (2, 5, 6)
    with pytest.raises(ValueError, match="A must be"):  # shapes are still checked
        lora_apply(x, A[:, :, :4], B, 0.5, ids=torch.empty(2, 5, dtype=torch.long, device=m))


def test_bool_scale_is_rejected():
    A, B = _adapters(2, 2, 4, 3)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="scale must be a float.*bool"):
        lora_apply(x, A, B, True, ids=torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match="scale must be a float"):
        lora_shared_apply(x, A[0], B, False, weights=torch.rand(3, 2))
    lora_apply(x, A, B, 1, ids=torch.tensor([0, 1, -1]))  # an int is a scale


@pytest.mark.slow
def test_single_adapter_equals_peft_lora_linear_forward_and_grads():
    """PEFT's LoRA layer (peft.tuners.lora.Linear via get_peft_model) vs lora_apply on the same weights,
    adapter in the middle of the stack: output and the gradients of x, A, B, base weight."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    d_in, d_out, r, alpha = 16, 12, 4, 8
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(d_in, d_out)),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    pa, pb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A, B = _adapters(3, r, d_in, d_out)
    A[1], B[1] = pa.detach(), pb.detach()
    A.requires_grad_(), B.requires_grad_()
    W = layer.base_layer.weight.detach().clone().requires_grad_()
    x = torch.randn(2, 3, d_in)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 3, d_out)
    want = model(x1)
    (want * g).sum().backward()
    y = lora_apply(x2, A, B, layer.scaling["default"], ids=torch.ones(2, 3, dtype=torch.long),
                   base_out=torch.nn.functional.linear(x2, W, layer.base_layer.bias.detach()))
    (y * g).sum().backward()
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(A.grad[1], pa.grad)
    torch.testing.assert_close(B.grad[1], pb.grad)
    torch.testing.assert_close(W.grad, torch.einsum("bto,bti->oi", g, x))
    assert (A.grad[[0, 2]] == 0).all() and (B.grad[[0, 2]] == 0).all()
