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


# ------------------------------------------------------------------------------------------------
# The emulated backward kernels vs the autograd of the reference


def _ref_grads(x, A, B, s, ids, w, off, g):
    """Autograd of lora_apply_reference (an independent path from the closed-form backward)."""
    from mokernels.ops.lora import lora_apply_reference

    xs = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, A, B, w)]
    y = lora_apply_reference(xs[0], xs[1], xs[2], s, ids, xs[3], off)
    inputs = [t for t in xs if t is not None]
    grads = torch.autograd.grad(y, inputs, g, allow_unused=True)
    out = [gr if gr is not None else torch.zeros_like(t) for gr, t in zip(grads, inputs)]
    return out + ([None] if w is None else [])


BWD_TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
           torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float16: dict(rtol=3e-3, atol=3e-3)}
S_VEC = ((6,), 3, 8, 32, 24)  # 16-byte vectors for 16-bit types, several tokens per adapter
S_ODD = ((1,), 2, 1, 7, 5)  # T=1, r=1, odd d: scalar path (the only case the TSan pass keeps: small work)
S_3D = ((2, 3), 5, 4, 12, 48)  # 3-D input, unused adapters
BWD_CASES = [(torch.float32, S_VEC), (torch.bfloat16, S_VEC), (torch.bfloat16, S_ODD), (torch.float32, S_3D)]


def _case(form, dtype, lead, N, r, d_in, d_out, all_none=False):
    from test_lora import _canonical, make_form, weights

    A, B, scale = weights(N, r, d_in, d_out, dtype)
    T = int(torch.Size(lead).numel())
    x = torch.randn(T, d_in).to(dtype)
    g = torch.randn(T, d_out).to(dtype)
    kw, _ = make_form(form, lead, N, k=2, S=3, all_none=all_none)
    ids, w, off = _canonical(kw, lead)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if w is not None:  # no exact-zero weights on valid slots (the reference's masking has no gradient there)
        w = torch.where(ids >= 0, w.to(acc) + 0.25, torch.zeros((), dtype=acc))
    return x, A, B, scale.to(acc), ids, w, off, g


@pytest.mark.emu
@pytest.mark.parametrize("form", ["ids", "segments", "mixture", "segment_mixture"])
@pytest.mark.parametrize("dtype,shape", BWD_CASES)
def test_emulated_backward_matches_reference_autograd(emu_ops, form, dtype, shape):
    lead, N, r, d_in, d_out = shape
    x, A, B, s, ids, w, off, g = _case(form, dtype, lead, N, r, d_in, d_out)
    got = emu_ops.lora_apply_backward(g, x, A, B, s, ids, w, off, True, True, True, True)
    want = _ref_grads(x, A, B, s, ids, w, off, g)
    for name, a, b in zip(("dx", "dA", "dB"), got[:3], want[:3]):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b.to(dtype), **BWD_TOL[dtype], msg=name)
    if w is None:
        assert got[3].numel() == 0
    else:
        assert got[3].shape == w.shape and got[3].dtype == w.dtype
        torch.testing.assert_close(got[3], want[3], **BWD_TOL[dtype], msg="dweights")


@pytest.mark.emu
@pytest.mark.parametrize("compact,dtype,shape", [(False, torch.float32, (5, 4, 4, 8, 12)),  # kept by the TSan pass
                                                 (True, torch.float32, (5, 4, 8, 16, 24)),
                                                 (True, torch.bfloat16, (5, 4, 8, 16, 24)),
                                                 (False, torch.bfloat16, (5, 4, 8, 16, 24))])
def test_emulated_shared_backward_matches_reference_autograd(emu_ops, compact, dtype, shape):
    from mokernels.ops.lora import lora_shared_apply_reference
    from test_lora import random_mixture

    T, N, r, d_in, d_out = shape
    x, g = torch.randn(T, d_in).to(dtype), torch.randn(T, d_out).to(dtype)
    A = (torch.randn(r, d_in) * d_in ** -0.5).to(dtype)
    B = (torch.randn(N, d_out, r) * r ** -0.5).to(dtype)
    if compact:
        ids, w = random_mixture(T, N, 2)
        ids, w = ids.int(), torch.where(ids >= 0, w.float() + 0.25, torch.zeros(()))
        ids[1, 0] = N + 3  # invalid id: no expert
    else:
        ids, w = None, torch.rand(T, N) + 0.1
    xs, As, Bs, ws = (t.clone().requires_grad_() for t in (x, A, B, w))
    y = lora_shared_apply_reference(xs, As, Bs, 0.7, ids, ws)
    want = torch.autograd.grad(y, (xs, As, Bs, ws), g)
    got = emu_ops.lora_shared_apply_backward(g, x, A, B, 0.7, ids, w, True, True, True, True)
    for name, a, b in zip(("dx", "dA", "dB", "dweights"), got, want):
        torch.testing.assert_close(a, b.to(a.dtype), **BWD_TOL[dtype], msg=name)


@pytest.mark.emu
@pytest.mark.parametrize("d_in,d_out", [(16, 40)])  # work > SMALL_WORK: ASan yes, TSan pass no (semantics)
def test_emulated_backward_odd_routing(emu_ops, d_in, d_out):
    """All tokens without adapter, invalid ids (validate=False semantics) and only some gradients."""
    x, A, B, s, ids, w, off, g = _case("mixture", torch.float32, (4,), 3, 4, d_in, d_out, all_none=True)
    dx, dA, dB, dw = emu_ops.lora_apply_backward(g, x, A, B, s, ids, w, off, True, True, True, True)
    assert not dx.any() and not dA.any() and not dB.any() and not dw.any()
    x, A, B, s, ids, w, off, g = _case("mixture", torch.float32, (6,), 3, 4, d_in, d_out)
    ids[0, 0], ids[2, 1], ids[3, 0] = 3, -7, 2**31 - 1  # out of range: no adapter
    want = _ref_grads(x, A, B, s, ids, w, off, g)
    dx, dA, dB, dw = emu_ops.lora_apply_backward(g, x, A, B, s, ids, w, off, False, True, False, True)
    assert dx.numel() == 0 and dB.numel() == 0
    torch.testing.assert_close(dA, want[1], **BWD_TOL[torch.float32])
    torch.testing.assert_close(dw, want[3], **BWD_TOL[torch.float32])
    x, A, B, s, ids, w, off, g = _case("segments", torch.float32, (5,), 3, 4, d_in, d_out)
    off = torch.tensor([0, 2, 2, 9], dtype=torch.int32)  # past T: the tail of the last segment is empty
    ids = torch.tensor([[1], [-1], [0]], dtype=torch.int32)
    want = _ref_grads(x, A, B, s, ids, None, off, g)
    got = emu_ops.lora_apply_backward(g, x, A, B, s, ids, None, off, True, True, True, False)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, **BWD_TOL[torch.float32])


@pytest.mark.emu
@pytest.mark.parametrize("form", ["segment_mixture", "shared"])
@pytest.mark.parametrize("shape", [((9,), 4, 8, 16, 24)])  # not in the TSan pass (its schedule is fixed)
def test_emulated_backward_is_bitwise_deterministic_across_schedules(emu_ops, monkeypatch, form, shape):
    """No atomics: the two emulator schedules (fiber order, reversed block order) give the same bits."""
    if form == "shared":
        x, A, B, s, ids, w, off, g = _case("mixture", torch.bfloat16, *shape)
        run = lambda: emu_ops.lora_shared_apply_backward(g, x, A[0], B, 0.5, ids, w, True, True, True, True)  # noqa: E731
    else:
        x, A, B, s, ids, w, off, g = _case(form, torch.bfloat16, *shape)
        run = lambda: emu_ops.lora_apply_backward(g, x, A, B, s, ids, w, off, True, True, True, True)  # noqa: E731
    monkeypatch.delenv("MOKERNELS_EMU_SCHEDULE", raising=False)
    monkeypatch.delenv("MOKERNELS_EMU_BLOCK_ORDER", raising=False)
    first = run()
    monkeypatch.setenv("MOKERNELS_EMU_SCHEDULE", "forward")
    monkeypatch.setenv("MOKERNELS_EMU_BLOCK_ORDER", "reverse")
    second = run()
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                           b.view(torch.int16) if b.dtype == torch.bfloat16 else b)


def test_backward_ops_cpu_match_autograd_and_opcheck():
    """The CPU kernels of the backward ops (the reference) and their fake kernels (opcheck)."""
    x, A, B, s, ids, w, off, g = _case("segment_mixture", torch.float32, (7,), 3, 4, 8, 12)
    got = torch.ops.mokernels.lora_apply_backward(g, x, A, B, s, ids, w, off, True, True, True, True)
    for a, b in zip(got, _ref_grads(x, A, B, s, ids, w, off, g)):
        torch.testing.assert_close(a, b)
    none = torch.ops.mokernels.lora_apply_backward(g, x, A, B, s, ids, w, off, False, False, True, False)
    assert none[0].numel() == 0 and none[1].numel() == 0 and none[3].numel() == 0 and none[2].shape == B.shape
    torch.library.opcheck(torch.ops.mokernels.lora_apply_backward, (g, x, A, B, s, ids, w, off, True, True, True, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.mokernels.lora_shared_apply_backward,
                          (g, x, A[0], B, 0.5, None, torch.rand(7, 3), True, False, True, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
@pytest.mark.parametrize("form", ["ids", "segments", "mixture", "segment_mixture"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backward_matches_reference(form, dtype):
    x, A, B, s, ids, w, off, g = _case(form, dtype, (300,), 7, 16, 256, 136)
    want = _ref_grads(x, A, B, s, ids, w, off, g)
    c = lambda t: None if t is None else t.cuda()  # noqa: E731
    got = torch.ops.mokernels.lora_apply_backward(*(c(t) for t in (g, x, A, B, s, ids, w, off)), True, True, True, True)
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a.cpu(), b.to(a.dtype), **BWD_TOL[dtype])
    again = torch.ops.mokernels.lora_apply_backward(*(c(t) for t in (g, x, A, B, s, ids, w, off)), True, True, True, True)
    assert all(torch.equal(p, q) for p, q in zip(got, again))  # run-to-run bitwise determinism


@pytest.mark.cuda
def test_cuda_autograd_uses_backward_kernels():
    x, A, B, s, ids, w, off, g = _case("mixture", torch.bfloat16, (64,), 5, 8, 128, 96)
    leaves = [t.cuda().requires_grad_() for t in (x, A, B, w)]
    y = lora_apply(leaves[0], leaves[1], leaves[2], s.cuda(), mixture=(ids.cuda(), leaves[3]))
    got = torch.autograd.grad(y, leaves, g.cuda())
    for a, b in zip(got, _ref_grads(x, A, B, s, ids, w, off, g)):
        torch.testing.assert_close(a.cpu(), b.to(a.dtype), **BWD_TOL[torch.bfloat16])


# ------------------------------------------------------------------------------------------------
# MultiLoRALinear: LoRA dropout (adapter path only, like PEFT) and the autocast contract


@pytest.mark.slow
def test_multilora_dropout_equals_peft_in_training():
    """dropout(x) feeds only the adapter path: with the same RNG state, MultiLoRALinear in training mode
    equals PEFT's LoRA layer with the same lora_dropout (output and grads)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from mokernels.modules import MultiLoRALinear

    torch.manual_seed(3)
    d_in, d_out, r = 16, 12, 4
    lin = torch.nn.Linear(d_in, d_out)
    model = get_peft_model(torch.nn.Sequential(lin), LoraConfig(r=r, lora_alpha=8, lora_dropout=0.4,
                                                                target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    m = MultiLoRALinear.from_linear(layer.base_layer, 2, r, alpha=8, dropout=0.4)
    with torch.no_grad():
        m.lora_A[1].copy_(layer.lora_A["default"].weight)
        m.lora_B[1].copy_(layer.lora_B["default"].weight)
    model.train(), m.train()
    x = torch.randn(5, d_in)
    torch.manual_seed(7)
    want = model(x)
    torch.manual_seed(7)
    got = m(x, torch.ones(5, dtype=torch.long))
    torch.testing.assert_close(got, want)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(m.lora_A.grad[1], layer.lora_A["default"].weight.grad)
    torch.testing.assert_close(m.lora_B.grad[1], layer.lora_B["default"].weight.grad)
    # the dropout really acts on the adapter input only: eval mode differs, the base path is untouched
    m.eval()
    assert not torch.allclose(m(x, torch.ones(5, dtype=torch.long)), got)
    torch.testing.assert_close(m(x), lin(x))


def test_multilora_autocast_uses_fp32_adapters_in_activation_dtype():
    from mokernels.modules import MultiLoRALinear

    m = MultiLoRALinear(12, 10, num_adapters=3, r=4, alpha=8)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(6, 12)
    ids = torch.tensor([0, 1, 2, -1, 0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, ids)
    assert y.dtype == torch.bfloat16
    # the same computation written out: everything in bf16, adapters cast from fp32
    bf = torch.bfloat16
    with torch.autocast("cpu", dtype=bf):
        base = torch.nn.functional.linear(x, m.weight, m.bias)
    want = lora_apply(x.to(bf), m.lora_A.to(bf), m.lora_B.to(bf), m.scaling, ids=ids, base_out=base)
    torch.testing.assert_close(y, want)
    y.float().sum().backward()
    assert m.lora_A.grad.dtype == torch.float32 and m.lora_B.grad.dtype == torch.float32
    assert (m.lora_A.grad[1] != 0).any() and torch.isfinite(m.lora_B.grad).all()


@pytest.mark.emu
@pytest.mark.parametrize("d_in,d_out", [(16, 40)])  # work > SMALL_WORK: ASan yes, TSan pass no (semantics)
def test_emulated_forward_and_backward_skip_nan_adapter_with_weight_zero(emu_ops, d_in, d_out):
    """Kernel and reference agree on a NaN adapter routed only with weight 0: y, dx, dA, dB finite (the
    adapter is not read); its slot's own weight gradient is NaN — the true gradient."""
    from mokernels.ops.lora import lora_apply_reference

    N, r, T = 3, 4, 4
    A, B = _adapters(N, r, d_in, d_out)
    A[1], B[1] = float("nan"), float("nan")
    x, g = torch.randn(T, d_in), torch.randn(T, d_out)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [1, -1]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.0], [0.0, 0.3], [0.2, 0.7], [0.0, 0.0]])
    s = torch.tensor([0.5, 1.0, 2.0])
    y = emu_ops.lora_apply(x, A, B, s, ids, w, None, None)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, lora_apply_reference(x, A, B, s, ids, w, None, None))
    dx, dA, dB, dw = emu_ops.lora_apply_backward(g, x, A, B, s, ids, w, None, True, True, True, True)
    assert torch.isfinite(dx).all() and torch.isfinite(dA).all() and torch.isfinite(dB).all()
    assert (dA[1] == 0).all() and (dB[1] == 0).all()
    assert torch.isnan(dw[ids == 1]).all() and torch.isfinite(dw[ids != 1]).all()
    ref = torch.ops.mokernels.lora_apply_backward(g, x, A, B, s, ids, w, None, True, True, True, True)
    for a, b in zip((dx, dA, dB, dw), ref):
        torch.testing.assert_close(a, b, equal_nan=True)
