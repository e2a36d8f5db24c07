"""LoRA forward speed work (issue 10 items 2, 6, 7): the validate=False hot path of lora_apply (host
overhead: ATen ops per call), and the fused pass over W (lora_linear) vs its reference."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mokernels.ops.lora import lora_apply, lora_apply_

from conftest import SMALL
from test_lora import make_form, naive, weights

VIEW_OPS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.detach.default",
            "aten.expand.default", "aten.alias.default"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _canonical(kw):
    """The forms of make_form in the ops' own dtypes (int32 metadata, fp32 weights): the hot path's input."""
    out = {}
    for name, v in kw.items():
        if isinstance(v, torch.Tensor):
            out[name] = v.to(torch.int32)
        elif hasattr(v, "_fields"):  # Routing
            out[name] = v
        else:
            parts = list(v)
            if hasattr(parts[-1], "_fields"):
                out[name] = (parts[0].to(torch.int32), parts[-1])
            else:
                out[name] = tuple(p.to(torch.int32) if not p.is_floating_point() else p.float() for p in parts)
    return out


@pytest.mark.parametrize("form", ["ids", "segments", "mixture", "routing", "segment_mixture", "segment_routing"])
def test_hot_path_matches_loop_with_one_op(form):
    """validate=False with canonical dtypes: the same values as the per-token loop, and no ATen op but
    views besides the LoRA op itself (before: clamp + int32 conversion of the ids, torch.full for a float
    scale, the scale's dtype conversion)."""
    torch.manual_seed(0)
    A, B, scale = weights(5, 4, 16, 12, torch.float32)
    scale = scale.float()
    x, base = torch.randn(2, 3, 16), torch.randn(2, 3, 12)
    kw, routes = make_form(form, (2, 3), 5)
    kw = _canonical(kw)
    for sc, sc_ref in ((scale, scale), (0.75, torch.full((5,), 0.75))):
        lora_apply(x, A, B, sc, base_out=base, validate=False, **kw)  # builds the cached float scale
        with _Ops() as seen:
            y = lora_apply(x, A, B, sc, base_out=base, validate=False, **kw)
        heavy = [o for o in seen.ops if o not in VIEW_OPS]
        assert heavy == ["mokernels.lora_apply.default"], heavy
        k = 2 if "mixture" in form or form == "routing" else 1
        torch.testing.assert_close(y.double(), naive(x, A, B, sc_ref, routes, base), rtol=1e-5 * k, atol=1e-5 * k)
        out = base.clone()
        lora_apply_(out, x, A, B, sc, validate=False, **kw)
        torch.testing.assert_close(out, y)


def test_hot_path_keeps_gradients_and_shape_errors():
    A, B, scale = weights(3, 4, 8, 6, torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 2, -1, 1], dtype=torch.int32)
    y = lora_apply(x, A, B, scale, ids=ids, validate=False)
    (g,) = torch.autograd.grad(y.sum(), x)
    want = torch.zeros_like(g)
    for t, i in enumerate(ids.tolist()):
        if i >= 0:
            want[t] = scale[i] * (A[i].T @ B[i].T.sum(1))
    torch.testing.assert_close(g, want)
    with pytest.raises(ValueError, match="ids"):
        lora_apply(x.detach(), A, B, scale, ids=ids[:3], validate=False)
    with pytest.raises(ValueError, match="base_out"):
        lora_apply(x.detach(), A, B, scale, ids=ids, base_out=torch.zeros(4, 5, dtype=torch.float64), validate=False)
    with pytest.raises(ValueError, match="A"):
        lora_apply(x.detach(), A[:, :, :7], B, scale, ids=ids, validate=False)


# ------------------------------------------------------------------------------------------------
# The fused pass over W: lora_linear


def _linear_case(dtype, T, N, r, d_in, d_out, form, k=2, bias=True, seed=0):
    torch.manual_seed(seed)
    A, B, scale = weights(N, r, d_in, d_out, dtype)
    x = torch.randn(T, d_in).to(dtype)
    W = (torch.randn(d_out, d_in) * d_in ** -0.5).to(dtype)
    b = torch.randn(d_out).to(dtype) if bias else None
    kw, routes = make_form(form, (T,), N, k=k, S=3)
    return x, W, b, A, B, scale, kw, routes


def _naive_linear(x, W, b, A, B, scale, routes):
    y = x.double() @ W.double().T + (0 if b is None else b.double())
    return y + naive(x, A, B, scale, routes)


@pytest.mark.parametrize("form", ["ids", "segment_mixture"])
def test_lora_linear_cpu_matches_loop_and_unfused_layer(form):
    from mokernels.ops.lora import lora_linear

    x, W, b, A, B, scale, kw, routes = _linear_case(torch.float64, 6, 4, 3, 16, 10, form)
    y = lora_linear(x, W, b, A, B, scale, **kw)
    torch.testing.assert_close(y, _naive_linear(x, W, b, A, B, scale, routes))
    torch.testing.assert_close(y, lora_apply(x, A, B, scale, base_out=torch.nn.functional.linear(x, W, b), **kw))
    with pytest.raises(ValueError, match="bias"):
        lora_linear(x, W, b[:3], A, B, scale, **kw)
    with pytest.raises(ValueError, match="W"):
        lora_linear(x, W[:, :15], b, A, B, scale, **kw)
    with pytest.raises(ValueError, match="W"):
        torch.ops.mokernels.lora_linear(x, W[:, :15], b, A, B, scale.float().double(),
                                        torch.zeros(6, 1, dtype=torch.int32), None, None)


def test_lora_linear_opcheck():
    x, W, b, A, B, scale, _, _ = _linear_case(torch.float32, 5, 4, 3, 8, 6, "ids")
    ids = torch.tensor([[0], [3], [-1], [2], [1]], dtype=torch.int32)
    off = torch.tensor([0, 2, 5], dtype=torch.int32)
    mix = torch.tensor([[1, 3], [-1, 0]], dtype=torch.int32)
    for args in ((ids, None, None), (mix, torch.rand(2, 2), off)):
        torch.library.opcheck(torch.ops.mokernels.lora_linear.default, (x, W, b, A, B, scale.float(), *args),
                              test_utils=("test_schema", "test_faketensor"))


def _emu_canonical(kw, T):
    from mokernels.ops.lora import _routing

    return _routing(torch.Size((T,)), 10**9, kw, torch.device("cpu"), torch.float32, False, "test")[1]


LINEAR_SHAPES = [  # (T, N, r, d_in, d_out, k, bias): cp.async + 16-byte B rows; d_out and T edges
    (5, 4, 16, 64, 40, 1, True),
    (3, 3, 3, 72, 33, 2, False),  # r = 3: scalar B rows; d_in = 72: a partial second K step
    (1, 2, 8, 12, 6, 2, True),  # d_in % 8 != 0: synchronous element loads (ASYNC = false)
    (2, 2, 8, 16, 6, 1, False),  # small enough for the TSan pass: the cp.async ring
]


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["ids", "segment_mixture"])
@pytest.mark.parametrize("T,N,r,d_in,d_out,k,bias", LINEAR_SHAPES)
def test_emulated_lora_linear_matches_reference(emu_ops, dtype, form, T, N, r, d_in, d_out, k, bias):
    from mokernels.ops.lora import lora_linear_reference

    x, W, b, A, B, scale, kw, routes = _linear_case(dtype, T, N, r, d_in, d_out, form, k=k, bias=bias)
    ids, w, off = _emu_canonical(kw, T)
    s = scale.float()
    got = emu_ops.lora_linear(x, W, b, A, B, s, ids, w, off)
    assert got.shape == (T, d_out) and got.dtype == dtype
    # fp32 GEMM + delta rounded once, vs the reference's base rounded, then + delta rounded: <= 2 roundings
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=3e-3, atol=3e-3)
    torch.testing.assert_close(got, lora_linear_reference(x, W, b, A, B, s, ids, w, off), **tol)
    torch.testing.assert_close(got.double(), _naive_linear(x, W, b, A, B, scale, routes), **tol)


@pytest.mark.emu
@pytest.mark.skipif(SMALL, reason="T = 33 tokens: too slow for the TSan pass (the small linear cases cover the ring)")
def test_emulated_lora_linear_two_token_tiles_and_invalid_metadata(emu_ops):
    """T = 33: a second token tile (grid.y); ids out of range, zero weights and a token outside every
    segment contribute nothing and are never read (the emulator checks every access)."""
    from mokernels.ops.lora import lora_linear_reference

    x, W, b, A, B, scale, _, _ = _linear_case(torch.bfloat16, 33, 3, 4, 16, 8, "ids", bias=False)
    s = scale.float()
    ids = torch.randint(-1, 3, (33, 1), dtype=torch.int32)
    ids[0, 0], ids[1, 0], ids[2, 0] = 3, 2**31 - 1, -(2**31)
    got = emu_ops.lora_linear(x, W, None, A, B, s, ids, None, None)
    torch.testing.assert_close(got, lora_linear_reference(x, W, None, A, B, s, ids), rtol=2e-2, atol=2e-2)
    off = torch.tensor([0, 4, 30], dtype=torch.int32)  # tokens 30..32 in no segment
    mix = torch.tensor([[0, 7], [2, 1]], dtype=torch.int32)
    mw = torch.tensor([[0.5, 1.0], [0.0, 2.0]])
    got = emu_ops.lora_linear(x, W, None, A, B, s, mix, mw, off)
    want = lora_linear_reference(x, W, None, A, B, s, mix, mw, off)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[30:], (x[30:].float() @ W.float().T).to(torch.bfloat16), rtol=2e-2, atol=2e-2)
    with pytest.raises(Exception, match="float16/bfloat16"):
        emu_ops.lora_linear(x.float(), W.float(), None, A.float(), B.float(), s, ids, None, None)


# ------------------------------------------------------------------------------------------------
# MultiLoRALinear's fast paths (CPU runs the same dispatch; the kernels behind it are the references)


@pytest.mark.parametrize("T", [3, 40])  # decode (lora_linear) / prefill without bias (delta, then addmm_)
@pytest.mark.parametrize("with_bias", [True, False])
def test_module_paths_match_naive_with_gradients(T, with_bias):
    from mokernels.modules import MultiLoRALinear

    torch.manual_seed(1)
    lin = torch.nn.Linear(12, 10, bias=with_bias).double()
    m = MultiLoRALinear.from_linear(lin, 4, 3, alpha=6.0)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(T, 12, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(-1, 4, (T,))
    y = m(x, ids)
    # naive per token in fp64, differentiable
    want = x @ m.weight.T + (m.bias if with_bias else 0)
    rows = []
    for t, i in enumerate(ids.tolist()):
        rows.append(m.scaling[i] * (m.lora_B[i] @ (m.lora_A[i] @ x[t])) if i >= 0 else torch.zeros(10, dtype=x.dtype))
    want = want + torch.stack(rows)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, m.weight, m.lora_A, m.lora_B), g)
    exp = torch.autograd.grad(want, (x, m.weight, m.lora_A, m.lora_B), g)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e)
    with torch.no_grad():
        torch.testing.assert_close(m(x, ids), want)


# ------------------------------------------------------------------------------------------------
# The split kernels' results do not depend on the grid: the prefill shrink's d_in split (ksplit) and
# the decode shrink's grid-stride loop follow the SM count (the emulator's MOKERNELS_EMU_NUM_SMS)


@pytest.mark.emu
@pytest.mark.skipif(SMALL, reason="5 launches of 79 tokens: too slow for the TSan pass; a grid property, not a race one")
def test_emulated_split_kernels_independent_of_sm_count(emu_ops, monkeypatch):
    from test_lora import _prefill_args

    from mokernels.ops.lora import lora_apply_reference

    # d_in = 144: 5 K steps of 32; with many SMs ksplit = 5 (one step each), with 3 SMs an uneven split
    x, A, B, s, ids, w, off, base = _prefill_args([40, 30, 9], 8, 144, 24, 2, torch.bfloat16)
    want = lora_apply_reference(x, A, B, s, ids, w, off, base)
    got = {}
    for sms in ("1", "3", "64"):
        monkeypatch.setenv("MOKERNELS_EMU_NUM_SMS", sms)
        for path in ("prefill", "decode") if sms != "3" else ("prefill",):
            monkeypatch.setenv("MOKERNELS_LORA_PATH", path)
            got[sms, path] = emu_ops.lora_apply(x, A, B, s, ids, w, off, base)
            torch.testing.assert_close(got[sms, path], want, rtol=3.2e-2, atol=3.2e-2)
    for path in ("prefill", "decode"):  # fp32 partials summed in split order: equal up to fp32 rounding
        torch.testing.assert_close(got["1", path], got["64", path], rtol=1e-2, atol=1e-2)
