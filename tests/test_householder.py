"""Householder chain: H = H_1 … H_L (PEFT HRA's order), x ↦ x Hᵀ. Reference algebra (WY form vs the
sequential loop vs PEFT), properties (orthogonality, identity init, merge), gradients, bad inputs; the
emulated fused kernel vs the sequential reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mokernels.modules import HouseholderChain
from mokernels.ops import (householder_apply, householder_apply_backward_reference, householder_apply_reference,
                           householder_matrix, householder_sequential_reference, householder_wy, hra_vectors,
                           merge_householder, unmerge_householder)
from mokernels.ops.householder import householder_t_larft

from conftest import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def explicit(x, U, transpose=False):
    """x Hᵀ (x H) with H the explicit product H_1 … H_L of reflection matrices, in fp64."""
    D = x.shape[-1]
    H = torch.eye(D, dtype=torch.float64)
    for u in U.double():
        u = u / u.norm()
        H = H @ (torch.eye(D, dtype=torch.float64) - 2 * torch.outer(u, u))
    return x.double() @ (H if transpose else H.T)


@pytest.mark.parametrize("L", [1, 2, 7, 8, 32])
def test_wy_closed_form_equals_larft(L):
    Y, T = householder_wy(rand(L, 37))
    torch.testing.assert_close(T, householder_t_larft(Y), rtol=1e-12, atol=1e-12)
    assert torch.equal(T, torch.triu(T))


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("L,D", [(1, 5), (2, 17), (7, 33), (8, 64), (32, 45)])
def test_references_match_explicit_product(L, D, transpose):
    x, U = rand(3, 4, D), rand(L, D)
    want = explicit(x, U, transpose)
    for f in (householder_apply_reference, householder_sequential_reference):
        got = f(x, U, transpose=transpose)
        assert got.shape == x.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_dtypes_round_once(dtype):
    x, U = rand(9, 21, dtype=dtype), rand(7, 21, dtype=dtype)
    got = householder_apply(x, U)
    assert got.dtype == dtype
    torch.testing.assert_close(got, explicit(x, U).to(dtype), **TOL[dtype])


@given(L=st.integers(1, 12), D=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_orthogonal_and_norm_preserving(L, D, seed):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(L, D, generator=g, dtype=torch.float64)
    H = householder_matrix(U)
    torch.testing.assert_close(H.T @ H, torch.eye(D, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(5, D, generator=g, dtype=torch.float64)
    y = householder_apply(x, U)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(householder_apply(y, U, transpose=True), x, rtol=1e-12, atol=1e-12)  # Hᵀ H x = x


@pytest.mark.parametrize("L", [2, 8])
def test_identity_init(L):
    chain = HouseholderChain(24, L)
    x = torch.randn(6, 24)
    torch.testing.assert_close(chain(x), x, rtol=1e-6, atol=1e-6)
    base = torch.nn.Linear(24, 5)
    torch.testing.assert_close(base(chain(x)), base(x), rtol=1e-5, atol=1e-5)
    rnd = HouseholderChain(24, L, "random")
    assert (rnd(x) - x).abs().max() > 1e-2  # a random chain is not the identity


def test_merge_equals_unmerged_forward():
    chain = HouseholderChain(19, 6, "random", dtype=torch.float64)
    lin = torch.nn.Linear(19, 7, dtype=torch.float64)
    x = rand(4, 19)
    with torch.no_grad():
        W2 = chain.merge(lin.weight)
        torch.testing.assert_close(x @ W2.T, chain(x) @ lin.weight.T)  # (W H) x = W (H x)
        torch.testing.assert_close(chain.unmerge(W2), lin.weight)
        torch.testing.assert_close(unmerge_householder(merge_householder(lin.weight, chain.U), chain.U), lin.weight)


@pytest.mark.parametrize("L", [1, 4, 7])
def test_equals_peft_hra(L):
    from peft import HRAConfig, get_peft_model

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(29, 11))
    peft_model = get_peft_model(model, HRAConfig(r=L, target_modules=["0"], init_weights=False))
    layer = peft_model.base_model.model[0]
    hra_u = layer.hra_u["default"].detach()
    x = torch.randn(5, 29)
    with torch.no_grad():
        want = layer(x)
        chain = HouseholderChain.from_hra(hra_u)
        base = layer.base_layer
        torch.testing.assert_close(base(chain(x)), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(householder_matrix(hra_vectors(hra_u)), layer.get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-5)
        W2 = merge_householder(base.weight, chain.U)
        layer.merge()
        torch.testing.assert_close(W2, base.weight, rtol=1e-5, atol=1e-5)  # PEFT's merged weight
        layer.unmerge()


@pytest.mark.parametrize("transpose", [False, True])
def test_backward_formulas_match_autograd_of_sequential(transpose):
    x = rand(2, 5, 23).requires_grad_()
    U = rand(7, 23).requires_grad_()
    out = householder_sequential_reference(x, U, transpose=transpose)
    g = torch.randn_like(out)
    dx, dU = torch.autograd.grad(out, (x, U), g)
    dx2, dU2 = householder_apply_backward_reference(g, x.detach(), U.detach(), transpose=transpose)
    torch.testing.assert_close(dx2, dx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dU2, dU, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("transpose", [False, True])
def test_gradcheck(transpose):
    x = rand(2, 6).requires_grad_()
    U = rand(3, 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: householder_apply(a, b, transpose=transpose), (x, U))


def test_zero_vector_is_identity_reflection():
    U = rand(3, 10)
    U[1] = 0
    x = rand(4, 10)
    want = householder_apply(x, U[[0, 2]])
    torch.testing.assert_close(householder_apply(x, U), want)
    x.requires_grad_()
    U.requires_grad_()
    dx, dU = torch.autograd.grad(householder_apply(x, U).sum(), (x, U))
    assert torch.isfinite(dU).all() and torch.isfinite(dx).all()


def test_empty_chain_and_empty_tokens():
    x = rand(3, 8)
    torch.testing.assert_close(householder_apply(x, rand(0, 8)), x, rtol=0, atol=0)
    assert householder_apply(rand(0, 8), rand(2, 8)).shape == (0, 8)


def test_bad_inputs():
    x = rand(3, 8)
    with pytest.raises(ValueError, match=r"U must be \[L, D\] = \[L, 8\]"):
        householder_apply(x, rand(2, 7))
    with pytest.raises(ValueError, match="U must have dtype"):
        householder_apply(x, rand(2, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match="0-d"):
        householder_apply(torch.tensor(1.0, dtype=torch.float64), rand(2, 8))
    with pytest.raises(ValueError, match="eps"):
        householder_apply(x, rand(2, 8), eps=0.0)
    with pytest.raises(ValueError, match="L must be even"):
        HouseholderChain(8, 3)
    with pytest.raises(ValueError, match="init"):
        HouseholderChain(8, 2, init="eye")
    HouseholderChain(8, 3, "random")  # odd L is fine without the identity init
