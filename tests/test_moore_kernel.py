"""Fused MoORE rank-one experts kernels (csrc/kernels/moore.cuh, mokernels/ops/moore.py): the emulated forward
(S = (x V) ⊙ (σ + p + gx Q)) and backward (dz, dg, dσ) vs the fp32 reference, every gradient of the layer through
the kernel vs fp64 autograd of the reference, the unaligned (synchronous-load) variant, 3-D x, opcheck, bad inputs.
Small shapes: parametrised sizes multiply to <= SMALL_WORK only where the case is about memory behaviour (the TSan
pass keeps those)."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import SMALL

from mokernels.ops import moore, rank_one_experts, rank_one_experts_reference
from mokernels.ops.moore import experts_fused, experts_gate_bwd_reference, experts_gate_reference, gate_backward

EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.fixture
def gops(emu_ops):
    try:
        getattr(emu_ops, "experts_gate_gemm")
    except (AttributeError, RuntimeError):
        msg = "the emulation module lacks experts_gate_gemm: rebuild the extension"
        if os.environ.get("MOKERNELS_REQUIRE_EMU") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return emu_ops


def make(T, d_in, R, d_s, p_kind, dtype, d_out=None, lead=None):
    """Operands of O(1) magnitude; d_s None: no gx/Q; p_kind in {"none", "R", "TR"}."""
    d_out = R + 3 if d_out is None else d_out
    lead = (T,) if lead is None else lead
    f = lambda *s, scale=1.0: (torch.randn(*s, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    x = f(*lead, d_in)
    U, sigma, V = f(d_out, R, scale=R ** -0.5), f(R), f(d_in, R, scale=d_in ** -0.5)
    gx, Q = (None, None) if d_s is None else (f(*lead, d_s), f(d_s, R, scale=d_s ** -0.5))
    p = {"none": None, "R": f(R), "TR": f(*lead, R)}[p_kind]
    return x, U, sigma, V, gx, Q, p


def close_ulp(got, want, dtype, what):
    """The kernel and the reference both accumulate in fp32 and round once: within ~1 ulp of x's dtype."""
    assert got.dtype == dtype and got.shape == want.shape, what
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * EPS[dtype], atol=1e-4, msg=what)


# (T, d_in, R, d_s): sizes multiplying to <= 512 run in the TSan pass: the async pipeline over 2 K steps of x
# (64), the switch from the x steps to the gate step (8, 8, 8), one token.
FWD_CASES = [
    (torch.bfloat16, (1, 64, 8, None), "none", True),
    (torch.float16, (3, 8, 8, 8), "TR", False),
    (torch.bfloat16, (17, 40, 24, 16), "R", False),   # R, d_in, d_s not multiples of the tile; odd T
    (torch.float16, (17, 40, 24, 16), "TR", True),
    (torch.bfloat16, (70, 32, 136, 64), "TR", True),  # two token tiles, two R tiles, MoORE's d_s
    (torch.float16, (3, 264, 16, 8), "R", True),      # one tile on the emulator's 2 SMs: d_in split in 3 (split-K)
    (torch.bfloat16, (1, 160, 4, None), "R", False),  # split in 2, synchronous loads (TSan: the split-K reduce)
]


@pytest.mark.emu
@pytest.mark.parametrize("dtype,shape,p_kind,clip", FWD_CASES)
def test_emulated_forward(gops, dtype, shape, p_kind, clip):
    T, d_in, R, d_s = shape
    x, U, sigma, V, gx, Q, p = make(T, d_in, R, d_s, p_kind, dtype)
    S = gops.experts_gate_gemm(x, V, sigma, gx, Q, p, clip)
    close_ulp(S, experts_gate_reference(x, V, sigma, gx, Q, p, clip), dtype, "S")


@pytest.mark.emu
@pytest.mark.skipif(SMALL, reason="16 blocks of 256 fibers: split bookkeeping, the TSan pass has the split-K reduce case")
def test_emulated_forward_split_k_cap_and_empty_splits(gops, monkeypatch):
    """The d_in split as an H100 picks it (review R1): 132 SMs and one 64 x 128 tile want 264 splits, capped at 16;
    d_in = 65 K steps of 32 gives 5 steps per split, so splits 13-15 own no x step (z = 0: they add 0 · c) - the
    emulator's default 2 SMs never split more than 4 ways."""
    monkeypatch.setenv("MOKERNELS_EMU_NUM_SMS", "132")
    dtype = torch.bfloat16
    x, U, sigma, V, gx, Q, p = make(3, 65 * 32, 8, 8, "TR", dtype)
    S = gops.experts_gate_gemm(x, V, sigma, gx, Q, p, True)
    close_ulp(S, experts_gate_reference(x, V, sigma, gx, Q, p, True), dtype, "S")


@pytest.mark.emu
@pytest.mark.parametrize("dtype,shape,p_kind,clip", [FWD_CASES[1], FWD_CASES[3], FWD_CASES[4]])
def test_emulated_backward_kernel(gops, dtype, shape, p_kind, clip):
    T, d_in, R, d_s = shape
    x, U, sigma, V, gx, Q, p = make(T, d_in, R, d_s, p_kind, dtype)
    dS = torch.randn(T, R, dtype=torch.float64).to(dtype)
    got = gops.experts_gate_bwd(dS, x, V, sigma, gx, Q, p, clip, True, True, True)
    want = experts_gate_bwd_reference(dS, x, V, sigma, gx, Q, p, clip)
    for name, a, b in zip(("dz", "dg"), got, want):
        close_ulp(a, b, dtype, name)
    # dσ: the deterministic column sum of the fp32 dg (reference: the same sum, another order)
    close_ulp(got[2], want[2], dtype, "dsigma")
    if clip:  # the mask really applies: somewhere c <= 0 and dz, dg vanish there
        c = sigma.float() + (p.float() if p is not None else 0) + (gx.float() @ Q.float() if gx is not None else 0)
        assert (c <= 0).any() and (got[0][c.expand(T, R) <= 0] == 0).all()
    # a gradient not asked for is not formed
    dz, dg, ds = gops.experts_gate_bwd(dS, x, V, sigma, gx, Q, p, clip, False, True, False)
    assert dz.numel() == 0 and ds.numel() == 0
    close_ulp(dg, want[1], dtype, "dg alone")


@pytest.mark.emu
@pytest.mark.parametrize("offset", [True, False])
def test_emulated_unaligned_rows(gops, offset):
    """Rows not 16-byte aligned take the synchronous-load variant: d_in = 13, R = 9 (odd: element-wise epilogue,
    a last column without its pair), d_s = 6; or aligned sizes with x at a 2-byte offset (a contiguous view into a
    larger buffer)."""
    dtype = torch.bfloat16
    T, d_in, R, d_s = (5, 16, 8, 8) if offset else (5, 13, 9, 6)
    x, U, sigma, V, gx, Q, p = make(T, d_in, R, d_s, "TR", dtype)
    if offset:
        buf = torch.empty(T * d_in + 1, dtype=dtype)
        buf[1:] = x.reshape(-1)
        x = buf[1:].view(T, d_in)
        assert x.is_contiguous() and x.data_ptr() % 16 != 0
    S = gops.experts_gate_gemm(x, V, sigma, gx, Q, p, False)
    close_ulp(S, experts_gate_reference(x, V, sigma, gx, Q, p, False), dtype, "S")
    dS = torch.randn(T, R, dtype=torch.float64).to(dtype)
    got = gops.experts_gate_bwd(dS, x, V, sigma, gx, Q, p, False, True, True, True)
    for name, a, b in zip(("dz", "dg", "dsigma"), got, experts_gate_bwd_reference(dS, x, V, sigma, gx, Q, p, False)):
        close_ulp(a, b, dtype, name)


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.emu
@pytest.mark.parametrize("dtype,p_kind,clip,shape", [(torch.bfloat16, "R", True, (17, 40, 24, 16)),
                                                    (torch.float16, "TR", False, (17, 40, 24, 16)),
                                                    (torch.bfloat16, "none", False, (17, 40, 24, None))])
def test_emulated_layer_gradients(gops, dtype, p_kind, clip, shape):
    """Every gradient of y = experts_gate_gemm(...) Uᵀ through the emulated kernels (dS = dy U and dU = dyᵀ S as
    the op's autograd forms them) vs fp64 autograd of the reference layer."""
    T, d_in, R, d_s = shape
    gate = d_s is not None
    x, U, sigma, V, gx, Q, p = make(T, d_in, R, d_s, p_kind, dtype)
    S = gops.experts_gate_gemm(x, V, sigma, gx, Q, p, clip)
    y = S @ U.T
    dy = torch.randn(T, U.shape[0], dtype=torch.float64).to(dtype)
    ins = [t.double().requires_grad_() if t is not None else None for t in (x, U, sigma, V, gx, Q, p)]
    want_y = rank_one_experts_reference(*ins, clip=clip)
    assert rel_err(y, want_y) < 8 * EPS[dtype]
    live = [t for t in ins if t is not None]
    want = dict(zip([n for n, t in zip("x U sigma V gx Q p".split(), ins) if t is not None],
                    torch.autograd.grad(want_y, live, dy.double())))
    dS = dy @ U
    dU = dy.T @ S
    grads = gate_backward(gops, dS, x, V, sigma, gx, Q, p, clip, [True, True, True, gate, gate, p is not None])
    got = dict(zip(("x", "V", "sigma", "gx", "Q", "p"), grads), U=dU)
    for name, w in want.items():
        g = got[name]
        assert g is not None and g.dtype == dtype and g.shape == w.shape, name
        assert rel_err(g, w) < 8 * EPS[dtype], (name, rel_err(g, w))


@pytest.mark.emu
@pytest.mark.skipif(SMALL, reason="wrapper early returns and loop bounds, not memory ordering")
@pytest.mark.parametrize("T,d_in,R,d_s", [(0, 16, 8, 8), (4, 16, 0, 8), (4, 0, 8, 8), (4, 16, 8, 0)])
def test_emulated_empty_extents(gops, T, d_in, R, d_s):
    """Zero-sized extents (review R1): T = 0 / R = 0 return without a launch (dsigma of no tokens is 0, not
    garbage); d_in = 0 runs only the gate steps (z = 0), d_s = 0 only the x steps; V a non-contiguous view."""
    dtype = torch.bfloat16
    f = lambda *shape: (torch.randn(*shape, dtype=torch.float64) * 0.5).to(dtype)  # noqa: E731
    x, sigma, gx, Q, p = f(T, d_in), f(R), f(T, d_s), f(d_s, R), f(T, R)
    V = f(R, d_in).T  # column-major view: the wrapper's contiguous copy
    S = gops.experts_gate_gemm(x, V, sigma, gx, Q, p, True)
    assert S.shape == (T, R)
    close_ulp(S, experts_gate_reference(x, V, sigma, gx, Q, p, True), dtype, "S")
    dS = torch.randn(T, R, dtype=torch.float64).to(dtype)
    got = gops.experts_gate_bwd(dS, x, V, sigma, gx, Q, p, True, True, True, True)
    for name, a, b in zip(("dz", "dg", "dsigma"), got, experts_gate_bwd_reference(dS, x, V, sigma, gx, Q, p, True)):
        close_ulp(a, b, dtype, name)


@pytest.mark.emu
def test_emulated_3d_input(gops):
    """x [2, 3, d_in] with per-token gx and p_task [2, 3, R]: leading dims flattened around the kernel."""
    dtype = torch.bfloat16
    x, U, sigma, V, gx, Q, p = make(6, 16, 8, 8, "TR", dtype, lead=(2, 3))
    y = experts_fused(gops, x, U, sigma, V, gx, Q, p, False)
    want = rank_one_experts_reference(x, U, sigma, V, gx, Q, p)
    assert y.shape == (2, 3, U.shape[0]) and y.dtype == dtype
    assert rel_err(y, want) < 8 * EPS[dtype]


@pytest.mark.emu
def test_emulated_bad_inputs(gops):
    x, U, sigma, V, gx, Q, p = make(4, 16, 8, 8, "R", torch.bfloat16)
    with pytest.raises(ValueError, match="V must be"):
        gops.experts_gate_gemm(x, V[:-1], sigma, gx, Q, p, False)
    with pytest.raises(ValueError, match="Q must be"):
        gops.experts_gate_gemm(x, V, sigma, gx, Q[:, :-1], p, False)
    with pytest.raises(ValueError, match="gx and Q"):
        gops.experts_gate_gemm(x, V, sigma, gx, None, p, False)
    with pytest.raises(ValueError, match="p_task must be"):
        gops.experts_gate_gemm(x, V, sigma, gx, Q, p[:-1], False)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        gops.experts_gate_gemm(x.float(), V.float(), sigma.float(), None, None, None, False)
    with pytest.raises(ValueError, match="dS must be"):
        gops.experts_gate_bwd(torch.zeros(3, 8, dtype=x.dtype), x, V, sigma, gx, Q, p, False, True, True, True)


needs_op = pytest.mark.skipif(not moore.HAS_OP, reason="extension built without experts_gate_gemm")


@needs_op
def test_opcheck():
    x, U, sigma, V, gx, Q, p = make(5, 12, 8, 4, "TR", torch.float64)
    args = [t.requires_grad_() if t is not None else None for t in (x, V, sigma, gx, Q, p)]
    torch.library.opcheck(torch.ops.mokernels.experts_gate_gemm, (*args, True))


@needs_op
def test_cpu_op_gradients_match_reference():
    """The registered autograd of experts_gate_gemm (CPU kernel = reference) gives the reference's gradients."""
    x, U, sigma, V, gx, Q, p = make(5, 12, 8, 4, "R", torch.float64)
    ins = [t.requires_grad_() for t in (x, V, sigma, gx, Q, p)]
    dS = torch.randn(5, 8, dtype=torch.float64)
    got = torch.autograd.grad(torch.ops.mokernels.experts_gate_gemm(*ins, True), ins, dS)
    want = torch.autograd.grad(experts_gate_reference(*ins, True), ins, dS)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fused_layer(dtype):
    args = [t.cuda() if t is not None else None for t in make(70, 40, 24, 16, "TR", dtype)]
    args = [t.requires_grad_() if t is not None else None for t in args]
    y = rank_one_experts(*args, clip=True)
    ref_in = [t.detach().double().requires_grad_() for t in args]
    want = rank_one_experts_reference(*ref_in, clip=True)
    assert rel_err(y, want) < 8 * EPS[dtype]
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, args, dy)
    ref = torch.autograd.grad(want, ref_in, dy.double())
    for g, w in zip(got, ref):
        assert rel_err(g, w) < 8 * EPS[dtype]


@needs_op
def test_cpu_op_gradcheck_and_double_backward():
    """fp64 gradcheck and gradgradcheck of the op's registered autograd (the backward's own backward goes through
    the differentiable reference formulas)."""
    x, U, sigma, V, gx, Q, p = make(3, 5, 4, 2, "TR", torch.float64)
    ins = [t.requires_grad_() for t in (x, V, sigma, gx, Q, p)]
    f = lambda *a: torch.ops.mokernels.experts_gate_gemm(*a, False)  # noqa: E731
    assert torch.autograd.gradcheck(f, ins)
    assert torch.autograd.gradgradcheck(f, ins)


def test_fused_path_rejects_forward_mode_ad():
    """experts_fused (the CUDA path of rank_one_experts) has reverse-mode autograd only: a forward-mode tangent
    was dropped silently (no tangent on y); now a clear error. The CPU reference path keeps forward mode."""
    import torch.autograd.forward_ad as fwAD

    if not moore.HAS_OP:
        pytest.skip("extension without experts_gate_gemm")
    x, U, sigma, V, gx, Q, p = make(3, 8, 4, 2, "R", torch.float32)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            experts_fused(torch.ops.mokernels, xd, U, sigma, V, gx, Q, p, False)
        t = fwAD.unpack_dual(rank_one_experts(xd, U, sigma, V, gx, Q, p)).tangent  # CPU: the reference
        want = ((torch.ones_like(x) @ V) * (sigma + p + gx @ Q)) @ U.T
        torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-5)
