"""Rank-one expert scaling: out = z ⊙ (σ + g) and its backward, kernel (emulated / CUDA) vs reference."""
from __future__ import annotations

import pytest
import torch

from mokernels.ops import rank_one_scale, rank_one_scale_backward_reference, rank_one_scale_reference

from conftest import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (leading shape, R): odd sizes, R not a multiple of any vector width, more rows than one block.
# (leading shape, R): odd sizes, R not a multiple of any vector width; R=2100 needs several column
# blocks (grid.x > 1) and T=4500 makes threads loop over rows (the emulated GPU has 2 SMs).
SHAPES = [((1,), 1), ((7,), 3), ((33,), 8), ((5,), 17), ((130,), 64), ((2, 3), 100), ((300,), 12),
          ((3,), 2100), ((4500,), 3)]
# offsets (elements) misalign the pointers: 1 forces scalar access, 2 (and 4 for 16-bit types) the
# narrower vector widths
KERNEL_CASES = pytest.mark.parametrize(
    "dtype,lead,R,offset",
    [(d, lead, R, o) for d in DTYPES for lead, R in SHAPES for o in (0, 1, 2, 4) if o < 4 or d.itemsize == 2],
)


def dsigma_tol(dtype, rows):
    """dσ sums rows in another order than torch.sum: fp32 reassociation error plus one rounding of
    the output (relative 2 ulp of the dtype)."""
    eps = torch.finfo(dtype).eps
    return dict(rtol=max(TOL[dtype]["rtol"], 2 * eps), atol=max(TOL[dtype]["atol"], 1e-5 * rows**0.5))


def make(lead, R, dtype, device="cpu", offset=0):
    """z, sigma, g; offset > 0 shifts every tensor by that many elements inside its storage, which
    misaligns the pointers (the kernels then pick a narrower vector width)."""

    def t(*shape):
        n = int(torch.tensor(shape).prod())
        return torch.randn(n + offset, dtype=dtype, device=device)[offset:].view(*shape)

    return t(*lead, R), t(R), t(*lead, R)


def exact(z, sigma, g):
    return z.double() * (sigma.double() + g.double())


def test_reference_matches_formula():
    z, s, g = make((9,), 5, torch.float64)
    torch.testing.assert_close(rank_one_scale_reference(z, s, g), z * (s + g), rtol=0, atol=0)
    grad = torch.randn_like(z)
    dz, ds, dg = rank_one_scale_backward_reference(grad, z, s, g)
    torch.testing.assert_close(dz, grad * (s + g))
    torch.testing.assert_close(dg, grad * z)
    torch.testing.assert_close(ds, (grad * z).sum(0))


@pytest.mark.emu
@KERNEL_CASES
def test_emulated_forward(emu_ops, dtype, lead, R, offset):
    z, s, g = make(lead, R, dtype, offset=offset)
    out = emu_ops.rank_one_scale(z, s, g)
    assert out.shape == z.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, rank_one_scale_reference(z, s, g), **TOL[dtype])


@pytest.mark.emu
@KERNEL_CASES
def test_emulated_backward(emu_ops, dtype, lead, R, offset):
    z, s, g = make(lead, R, dtype, offset=offset)
    grad = torch.randn_like(z)
    got = emu_ops.rank_one_scale_backward(grad, z, s, g)
    want = rank_one_scale_backward_reference(grad, z, s, g)
    for name, a, b in zip(("dz", "dsigma", "dg"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        tol = dsigma_tol(dtype, z.numel() // R) if name == "dsigma" else TOL[dtype]
        torch.testing.assert_close(a, b, **tol, msg=name)


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_error_within_twice_torch_composition(emu_ops, dtype):
    """ARCHITECTURE rule: max error vs fp64 <= 2x the same-dtype torch composition's."""
    z, s, g = make((64,), 40, dtype)
    ref = exact(z, s, g)
    err_kernel = (emu_ops.rank_one_scale(z, s, g).double() - ref).abs().max()
    err_torch = ((z * (s + g)).double() - ref).abs().max()
    assert err_kernel <= 2 * err_torch


@pytest.mark.emu
def test_emulated_non_contiguous_and_empty(emu_ops):
    z, s, g = make((6,), 10, torch.float32)
    zt, gt = z.t().contiguous().t(), g[:, :].t().contiguous().t()  # column-major views
    assert not zt.is_contiguous()
    torch.testing.assert_close(emu_ops.rank_one_scale(zt, s, gt), rank_one_scale_reference(z, s, g))
    e = torch.empty(0, 10)
    assert emu_ops.rank_one_scale(e, s, e).shape == (0, 10)
    dz, ds, dg = emu_ops.rank_one_scale_backward(e, e, s, e)
    assert dz.shape == (0, 10) and torch.equal(ds, torch.zeros(10))


BAD = [
    ("sigma", lambda z, s, g: (z, s[:-1], g), "sigma must be"),
    ("g shape", lambda z, s, g: (z, s, g[:-1]), "g must have z's shape"),
    ("dtype", lambda z, s, g: (z, s.double(), g), "sigma must have dtype"),
    ("int", lambda z, s, g: (z.int(), s.int(), g.int()), "dtype"),
    ("0-d", lambda z, s, g: (z[0, 0], s, g), "z must be"),
]


@pytest.mark.parametrize("name,mutate,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_reference_path(name, mutate, msg):
    z, s, g = make((4,), 6, torch.float32)
    with pytest.raises(ValueError, match=msg):
        rank_one_scale(*mutate(z, s, g))


@pytest.mark.emu
@pytest.mark.parametrize("name,mutate,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_kernel_path(emu_ops, name, mutate, msg):
    """The C++ wrapper (shared by the CUDA build) rejects the same inputs with ValueError."""
    z, s, g = make((4,), 6, torch.float32)
    with pytest.raises(ValueError, match=msg):
        emu_ops.rank_one_scale(*mutate(z, s, g))


def test_gradcheck_reference():
    z, s, g = (t.requires_grad_() for t in make((5,), 7, torch.float64))
    assert torch.autograd.gradcheck(rank_one_scale, (z, s, g))


def test_autograd_nd_input_matches_composition():
    z, s, g = (t.requires_grad_() for t in make((2, 3), 5, torch.float64))
    out = rank_one_scale(z, s, g)
    grads = torch.autograd.grad(out.square().sum(), (z, s, g))
    z2, s2, g2 = (t.detach().clone().requires_grad_() for t in (z, s, g))
    want = torch.autograd.grad((z2 * (s2 + g2)).square().sum(), (z2, s2, g2))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    z, s, g = (t.requires_grad_() for t in make((3, 2), 9, dtype))
    torch.library.opcheck(torch.ops.mokernels.rank_one_scale.default, (z, s, g))
    grad = torch.randn_like(z)
    torch.library.opcheck(torch.ops.mokernels.rank_one_scale_backward.default, (grad, z.detach(), s.detach(), g.detach()))


@pytest.mark.slow
def test_torch_compile_fullgraph_cpu():
    class Scale(torch.nn.Module):
        def __init__(self, R):
            super().__init__()
            self.sigma = torch.nn.Parameter(torch.rand(R))

        def forward(self, z, g):
            return rank_one_scale(torch.tanh(z), self.sigma, g) * 2

    m = Scale(6)
    z, g = torch.randn(4, 6), torch.randn(4, 6)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(z, g), m(z, g))
    compiled(z, g).sum().backward()
    assert m.sigma.grad is not None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,R", SHAPES + [((4096,), 4096), ((1000,), 1000)])
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_matches_reference(dtype, lead, R, offset):
    z, s, g = make(lead, R, dtype, device="cuda", offset=offset)
    torch.testing.assert_close(rank_one_scale(z, s, g), rank_one_scale_reference(z, s, g), **TOL[dtype])
    grad = torch.randn_like(z)
    got = torch.ops.mokernels.rank_one_scale_backward(grad, z, s, g)
    want = rank_one_scale_backward_reference(grad, z, s, g)
    for name, a, b in zip(("dz", "dsigma", "dg"), got, want):
        tol = dsigma_tol(dtype, z.numel() // R) if name == "dsigma" else TOL[dtype]
        torch.testing.assert_close(a, b, **tol, msg=name)


@pytest.mark.cuda
def test_cuda_backward_is_deterministic():
    """dσ uses per-block partial sums and a fixed-order second pass (no atomics): bitwise repeatable
    on one device for one input alignment."""
    z, s, g = make((4099,), 1000, torch.bfloat16, device="cuda")
    grad = torch.randn_like(z)
    a = torch.ops.mokernels.rank_one_scale_backward(grad, z, s, g)[1]
    b = torch.ops.mokernels.rank_one_scale_backward(grad, z, s, g)[1]
    assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_gradcheck_and_errors():
    z, s, g = (t.requires_grad_() for t in make((6,), 5, torch.float64, device="cuda"))
    assert torch.autograd.gradcheck(rank_one_scale, (z, s, g))
    with pytest.raises(ValueError, match="sigma"):
        rank_one_scale(z.detach(), s.detach().cpu(), g.detach())


# ------------------------------------------------------------------------------------------------
# Issue 9: regression tests (each failed on the code before the fix)

from mokernels.ops import rank_one as RO  # noqa: E402


def _f64(lead, R, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((*lead, R), (R,), (*lead, R)))


def test_issue9_double_backward():
    """Defect 1: second derivatives (d/dz of dσ, d/dσ of dz, ...) on the public function and the op."""
    z, s, g = _f64((3, 2), 5, 0)
    assert torch.autograd.gradgradcheck(rank_one_scale, (z, s, g))
    assert torch.autograd.gradgradcheck(torch.ops.mokernels.rank_one_scale, (z, s, g))
    (gs,) = torch.autograd.grad((rank_one_scale(z, s, g) ** 2).sum(), s, create_graph=True)
    (hz,) = torch.autograd.grad(gs.sum(), z)
    (gs2,) = torch.autograd.grad(((z * (s + g)) ** 2).sum(), s, create_graph=True)
    (hz2,) = torch.autograd.grad(gs2.sum(), z)
    assert hz2.abs().max() > 0.1
    torch.testing.assert_close(hz, hz2)
    grad = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    dz = torch.ops.mokernels.rank_one_scale_backward(grad, z, s, g)[0]
    with pytest.raises(NotImplementedError, match="not differentiable"):
        torch.autograd.grad(dz.sum(), grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_issue9_forward_mode(dtype):
    """Defect 2: torch.func.jvp gave zero tangents; expected dz(σ+g) + z(dσ+dg)."""
    z, s, g = (t.detach().to(dtype) for t in _f64((4,), 6, 1))
    dz, ds, dg = (t.detach().to(dtype) for t in _f64((4,), 6, 2))
    _, t = torch.func.jvp(lambda a: rank_one_scale(z, a, g), (s,), (torch.ones_like(s),))
    torch.testing.assert_close(t, z)
    _, t = torch.func.jvp(rank_one_scale, (z, s, g), (dz, ds, dg))
    want = rank_one_scale_reference(dz, s, g).double() + z.double() * (ds.double() + dg.double())
    torch.testing.assert_close(t.double(), want, **TOL[dtype])
    # the autograd.Function the CUDA path uses (here with the CPU implementation inside)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = RO._RankOneScaleFn.apply(fwAD.make_dual(z, dz), s, fwAD.make_dual(g, dg))
        want = rank_one_scale_reference(dz, s, g).double() + z.double() * dg.double()
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent.double(), want, **TOL[dtype])


def test_issue9_mixed_devices_raise():
    """Defect 3: a meta sigma with CPU z, g returned uninitialised CPU memory."""
    with pytest.raises(ValueError, match="sigma is on meta"):
        rank_one_scale(torch.ones(2, 4), torch.ones(4, device="meta"), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="on meta"):
        torch.ops.mokernels.rank_one_scale(torch.ones(2, 4), torch.ones(4), torch.zeros(2, 4, device="meta"))
    with pytest.raises(ValueError, match="on meta"):
        torch.ops.mokernels.rank_one_scale_backward(torch.ones(2, 4, device="meta"), torch.ones(2, 4), torch.ones(4),
                                                    torch.zeros(2, 4))
    out = rank_one_scale(*(torch.ones(*s, device="meta") for s in ((2, 4), (4,), (2, 4))))
    assert out.device.type == "meta" and out.shape == (2, 4)


def test_issue9_autocast_casts_parameters_to_z():
    """Defect 6: under autocast an fp32 sigma (and fp32 gates) follow z's dtype instead of raising."""
    z = torch.randn(5, 8).bfloat16()
    s = (torch.rand(8) + 0.5).requires_grad_(True)
    g = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rank_one_scale(z, s, g)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, rank_one_scale_reference(z, s.detach().bfloat16(), g.detach().bfloat16()),
                               rtol=0, atol=0)
    ds, dg = torch.autograd.grad(out.float().sum(), (s, g))
    assert ds.dtype == torch.float32 and dg.dtype == torch.float32
    torch.testing.assert_close(dg, z.float(), rtol=0, atol=0)


def test_issue9_backward_with_r_zero():
    """Defect 9: the backward with R = 0 failed in a reshape."""
    z, s, g = (torch.zeros(*shape, requires_grad=True) for shape in ((3, 0), (0,), (3, 0)))
    dz, ds, dg = torch.autograd.grad(rank_one_scale(z, s, g).sum(), (z, s, g), allow_unused=True)
    assert dz.shape == (3, 0) and ds.shape == (0,) and dg.shape == (3, 0)
    out = rank_one_scale_backward_reference(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(0), torch.zeros(3, 0))
    assert out[1].shape == (0,)
    assert torch.ops.mokernels.rank_one_scale_backward(*(torch.zeros(*sh) for sh in ((2, 3, 0), (2, 3, 0), (0,),
                                                                                    (2, 3, 0))))[1].shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("lead,R", [((3,), 5), ((700,), 384), ((2, 9), 70000), ((1,), 1)])
def test_cpu_fast_path_equals_reference_bitwise(dtype, lead, R):
    """The blocked CPU kernels compute exactly the reference's fp32 arithmetic (one rounding), over
    several blocks and on non-contiguous inputs; dσ up to the fp32 summation order."""
    gen = torch.Generator().manual_seed(R)
    z = torch.randn(*lead, R, generator=gen).to(dtype)
    s = torch.randn(R, generator=gen).to(dtype)
    g = (torch.randn(*lead, R, generator=gen) * 10).to(dtype)
    gr = torch.randn(*lead, R, generator=gen).to(dtype)
    for zz, gg in ((z, g), (z.mT.contiguous().mT if z.dim() > 1 else z, g[..., :]),):
        spec = (zz.float() * (s.float() + gg.float())).to(dtype)  # fp32 math, one rounding
        assert torch.equal(rank_one_scale_reference(zz, s, gg), spec)
        assert torch.equal(rank_one_scale(zz, s, gg), spec)
        got = RO._scale_backward_cpu(gr, zz, s, gg)
        want = rank_one_scale_backward_reference(gr, zz, s, gg)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        torch.testing.assert_close(got[1].double(), want[1].double(), **dsigma_tol(dtype, z.numel() // R))


def test_issue9_cuda_path_wrapper_on_cpu():
    """The eager autograd.Function of the CUDA path: gradcheck and gradgradcheck with the CPU op inside."""
    z, s, g = _f64((3,), 4, 5)
    assert torch.autograd.gradcheck(RO._RankOneScaleFn.apply, (z, s, g))
    assert torch.autograd.gradgradcheck(RO._RankOneScaleFn.apply, (z, s, g))


@pytest.mark.emu
@pytest.mark.parametrize("dtype,lead,R", [(torch.float32, (4500,), 3), (torch.bfloat16, (3001,), 40),
                                          (torch.float32, (700,), 2100), (torch.float64, (1030,), 12)])
def test_emulated_dsigma_bits_independent_of_sm_count(emu_ops, monkeypatch, dtype, lead, R):
    """dσ is summed over fixed row chunks chosen from the shape alone; the SM count (hence the grid)
    only decides which block sums which chunk, so dσ is bitwise equal on every GPU (issue 8)."""
    z, s, g = make(lead, R, dtype)
    grad = torch.randn_like(z)
    outs = []
    for sms in ("1", "2", "3", "7", "132"):
        monkeypatch.setenv("MOKERNELS_EMU_NUM_SMS", sms)
        outs.append(emu_ops.rank_one_scale_backward(grad, z, s, g))
    for dz, ds, dg in outs[1:]:
        assert torch.equal(ds, outs[0][1]) and torch.equal(dz, outs[0][0]) and torch.equal(dg, outs[0][2])
    torch.testing.assert_close(outs[0][1], rank_one_scale_backward_reference(grad, z, s, g)[1],
                               **dsigma_tol(dtype, z.numel() // R))


def test_native_cpu_kernels_used_and_special_values():
    """The fp16/bf16 eager CPU path runs the native one-pass kernel (csrc/cpu/cpu_ops.cpp) and gives the
    reference's bits, also for inf/NaN/huge values (bf16 rounding overflow to inf, NaN kept NaN) and
    for fp16 subnormals."""
    assert RO._native_fwd is not None and RO._native_bwd is not None
    calls = []
    real = RO._native_fwd
    try:
        RO._native_fwd = lambda *a: calls.append(1) or real(*a)
        for dtype in (torch.bfloat16, torch.float16):
            big = torch.finfo(dtype).max
            z = torch.tensor([[1.0, big, -big, float("inf"), 0.0, 3e-5, float("nan"), 2.0]], dtype=dtype)
            s = torch.tensor([1.0, 1.0, 1.0, 1.0, float("inf"), 1e-4, 1.0, -2.0], dtype=dtype)
            g = torch.tensor([[0.5, 0.75, 0.75, -1.0, 1.0, 2e-3, 0.0, 2.0]], dtype=dtype)
            got, want = rank_one_scale(z, s, g), rank_one_scale_reference(z, s, g)
            assert torch.equal(got.isnan(), want.isnan())
            assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    finally:
        RO._native_fwd = real
    assert len(calls) == 2


def test_native_backward_dsigma_bits_independent_of_threads():
    """dσ of the native CPU backward sums fixed row chunks in order: the same bits at 1 and 2 threads."""
    gen = torch.Generator().manual_seed(3)
    z, s, g, gr = (torch.randn(*shape, generator=gen).bfloat16() for shape in ((3000, 40), (40,), (3000, 40),
                                                                               (3000, 40)))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = RO._native_bwd(gr, z, s, g)
        torch.set_num_threads(2)
        b = RO._native_bwd(gr, z, s, g)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.testing.assert_close(a[1].double(), rank_one_scale_backward_reference(gr, z, s, g)[1].double(),
                               **dsigma_tol(torch.bfloat16, 3000))


def test_cpu_path_under_a_dispatch_mode():
    """With a TorchDispatchMode active (FakeTensorMode, a logging mode) the eager fast path, which calls
    native code directly, is not taken: the op sees the mode and the result is right."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    z, s, g = make((5,), 6, torch.bfloat16)
    with Log():
        out = rank_one_scale(z, s, g)
    assert seen and torch.equal(out, rank_one_scale_reference(z, s, g))


def test_jit_trace_records_the_cpu_path():
    """Under torch.jit.trace the native kernel (a direct pybind call the tracer cannot see) is not used:
    the trace records torch ops and recomputes for new inputs instead of replaying a constant."""
    z, s, g = make((3,), 5, torch.bfloat16)
    traced = torch.jit.trace(lambda a, b, c: rank_one_scale(a, b, c), (z, s, g), check_trace=False)
    z2, s2, g2 = make((3,), 5, torch.bfloat16)
    assert torch.equal(traced(z2, s2, g2), rank_one_scale_reference(z2, s2, g2))
