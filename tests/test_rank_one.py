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
