"""MoORE's rank-one expert layer y = U((σ + p_task + gx Q) ⊙ (Vᵀ H x)): reference vs the explicit formula,
fresh wrap == base, H merged into V == unmerged, gradients, bad inputs."""
from __future__ import annotations

import pytest
import torch

from mokernels.modules import RankOneExperts
from mokernels.ops import householder_apply, merge_householder, rank_one_experts, rank_one_experts_reference



def make(T=5, d_in=12, d_out=9, R=None, d_s=4, L=4, dtype=torch.float64, per_token_task=False):
    R = min(d_in, d_out) if R is None else R
    f = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype)  # noqa: E731
    p = f(T, R) if per_token_task else f(R)
    return f(T, d_in), f(d_out, R), f(R), f(d_in, R), f(T, d_s), f(d_s, R), p, f(L, d_in)


@pytest.mark.parametrize("per_token_task", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_reference_matches_formula(per_token_task, clip):
    x, U, s, V, gx, Q, p, Hv = make(per_token_task=per_token_task)
    xh = householder_apply(x, Hv)
    gate = s + p + gx @ Q
    if clip:
        gate = gate.relu()
    want = ((xh @ V) * gate) @ U.T
    torch.testing.assert_close(rank_one_experts(x, U, s, V, gx, Q, p, Hv, clip=clip), want)
    # gx/Q and p_task optional
    torch.testing.assert_close(rank_one_experts(x, U, s, V, None, None, None), ((x @ V) * s) @ U.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    args = make(dtype=dtype)
    got = rank_one_experts(*args)
    want = rank_one_experts_reference(*[a.double() for a in args])
    assert got.dtype == dtype and got.shape == (5, 9)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4e-2, atol=4e-2)
    torch.testing.assert_close(got, want.to(dtype), **tol)


def test_merged_householder_equals_unmerged():
    x, U, s, V, gx, Q, p, Hv = make()
    Vm = merge_householder(V.T, Hv).T  # V' = Hᵀ V
    torch.testing.assert_close(rank_one_experts(x, U, s, Vm, gx, Q, p), rank_one_experts(x, U, s, V, gx, Q, p, Hv))


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_module_fresh_wrap_equals_base_and_merge(shape):
    torch.manual_seed(0)
    lin = torch.nn.Linear(*shape)
    m = RankOneExperts.from_linear(lin, num_householder=4, d_s=8)
    x = torch.randn(2, 3, shape[0])
    torch.testing.assert_close(m(x), lin(x), rtol=1e-5, atol=1e-5)  # H = I, Q = 0: the SVD round trip
    with torch.no_grad():  # train-like perturbation, then merge == unmerged
        m.householder.reset_parameters("identity")
        m.householder.U.add_(0.3 * torch.randn_like(m.householder.U))
        m.Q.normal_()
    p = torch.randn(m.rank)
    before = m(x, p)
    m.merge_householder_()
    torch.testing.assert_close(m(x, p), before, rtol=1e-5, atol=1e-5)
    m.unmerge_householder_()
    torch.testing.assert_close(m(x, p), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merged_src", [True, False])
def test_module_state_dict_carries_merged_flag(merged_src):
    """A checkpoint saved after merge_householder_() (V holds Hᵀ V) loaded into a fresh module must not apply H
    again, and an unmerged one loaded into a merged module must apply it: the flag travels in the state_dict."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 12)
    src = RankOneExperts.from_linear(lin, num_householder=4, d_s=8)
    with torch.no_grad():
        src.householder.U.normal_()
        src.Q.normal_()
    x = torch.randn(3, 16)
    want = src(x)
    if merged_src:
        src.merge_householder_()
    dst = RankOneExperts.from_linear(lin, num_householder=4, d_s=8)
    if not merged_src:
        dst.merge_householder_()
    dst.load_state_dict(src.state_dict())
    assert dst.householder_merged == merged_src
    torch.testing.assert_close(dst(x), want, rtol=1e-5, atol=1e-5)
    dst.unmerge_householder_()
    torch.testing.assert_close(dst(x), want, rtol=1e-5, atol=1e-5)
    bare = RankOneExperts.from_linear(lin, num_householder=0, d_s=8)
    if merged_src:
        with pytest.raises(ValueError, match="no chain"):
            bare.load_state_dict(src.state_dict(), strict=False)


def test_module_gradients_reach_trainables():
    lin = torch.nn.Linear(10, 6)
    m = RankOneExperts.from_linear(lin, num_householder=2, d_s=3)
    p = torch.zeros(m.rank, requires_grad=True)
    m(torch.randn(4, 10), p).square().sum().backward()
    for t in (m.householder.U, m.gamma, m.Q, p):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert m.Q.grad.abs().sum() > 0 and p.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in (m.U, m.V, m.sigma))


def test_gradcheck():
    args = [a.requires_grad_() for a in make(T=3, d_in=5, d_out=4, d_s=2, L=2)]
    assert torch.autograd.gradcheck(lambda *a: rank_one_experts(*a), args)


def test_bad_inputs():
    x, U, s, V, gx, Q, p, Hv = make()
    with pytest.raises(ValueError, match=r"V must be \[d_in, R\]"):
        rank_one_experts(x, U, s, V[:-1], gx, Q, p)
    with pytest.raises(ValueError, match="U must be"):
        rank_one_experts(x, U[:, :-1], s, V, gx, Q, p)
    with pytest.raises(ValueError, match="sigma"):
        rank_one_experts(x, U, s[:-1], V, gx, Q, p)
    with pytest.raises(ValueError, match="both"):
        rank_one_experts(x, U, s, V, gx, None, p)
    with pytest.raises(ValueError, match="Q must be"):
        rank_one_experts(x, U, s, V, gx, Q[:-1], p)
    with pytest.raises(ValueError, match="p_task"):
        rank_one_experts(x, U, s, V, gx, Q, p[:-1])
    # the chain is named H_vectors (rank_one_experts has its own U: naming U here sent users to the wrong tensor)
    with pytest.raises(ValueError, match=r"H_vectors must be \[L, D\] = \[L, 12\]"):
        rank_one_experts(x, U, s, V, gx, Q, p, Hv[:, :-1])
    with pytest.raises(ValueError, match="H_vectors must have dtype"):
        rank_one_experts(x, U, s, V, gx, Q, p, Hv.float())
    with pytest.raises(ValueError, match=r"W must be \[\.\.\., D\]"):
        merge_householder(torch.tensor(1.0, dtype=torch.float64), Hv)
    m = RankOneExperts.from_linear(torch.nn.Linear(12, 9), num_householder=2, d_s=4)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., in_features\] = \[\.\.\., 12\]"):
        m(torch.randn(3, 11))
    with pytest.raises(ValueError, match="dtype"):
        rank_one_experts(x, U.float(), s, V, gx, Q, p)
    with pytest.raises(ValueError, match="nn.Linear"):
        RankOneExperts.from_linear(torch.nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("per_token_task", [False, True])
@pytest.mark.parametrize("gate", ["full", "no_router", "none"])
def test_half_precision_composition_path(per_token_task, gate):
    """The CUDA fp16/bf16 path (GEMMs in x's dtype around rank_one_scale), run here on CPU tensors."""
    from mokernels.ops.householder import _experts_composed

    x, U, s, V, gx, Q, p, _ = make(dtype=torch.bfloat16, per_token_task=per_token_task)
    if gate != "full":
        gx = Q = None
    if gate == "none":
        p = None
    for clip in (False, True):
        got = _experts_composed(x, U, s, V, gx, Q, p, clip)
        want = rank_one_experts_reference(*[None if a is None else a.double() for a in (x, U, s, V, gx, Q, p)],
                                          clip=clip)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2 * want.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_reference(dtype):
    args = [a.cuda() for a in make(T=64, d_in=96, d_out=80, d_s=8, L=8, dtype=dtype)]
    got = rank_one_experts(*args)
    want = rank_one_experts_reference(*[a.double() for a in args])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2 * want.abs().max().item())
    torch.testing.assert_close(got.double(), want, **tol)


def test_autocast_keeps_fp32_math_and_casts_params():
    """README "Autocast": under torch.autocast every parameter follows x's dtype (differentiable cast: fp32
    params get fp32 grads) and the math stays fp32 — before, the CPU path's fp32 GEMMs (householder_apply,
    rank_one_experts and the registered ops' CPU kernels) ran in bf16 inside the region (fp32 x: ~1e-2 error)."""
    from mokernels.ops import moore

    torch.manual_seed(0)
    x, U, s, V, gx, Q, p, Hv = make(T=6, d_in=48, d_out=20, d_s=8, L=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_h = householder_apply(x, Hv)
        y_r = rank_one_experts(x, U, s, V, gx, Q, p, Hv)
        y_op = torch.ops.mokernels.householder_apply(x, Hv, False, 1e-12, False)[0]
        if moore.HAS_OP:
            S_op = torch.ops.mokernels.experts_gate_gemm(x, V, s, gx, Q, p, False)
    torch.testing.assert_close(y_h, householder_apply(x, Hv), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_op, householder_apply(x, Hv), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_r, rank_one_experts(x, U, s, V, gx, Q, p, Hv), rtol=1e-6, atol=1e-6)
    if moore.HAS_OP:
        torch.testing.assert_close(S_op, moore.experts_gate_reference(x, V, s, gx, Q, p), rtol=1e-6, atol=1e-6)
    # bf16 activations, fp32 parameters: cast to bf16, gradients reach the fp32 parameters
    xb = x.bfloat16()
    params = [t.clone().requires_grad_() for t in (U, s, V, Q, p, Hv)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rank_one_experts(xb, params[0], params[1], params[2], gx.bfloat16(), params[3], params[4], params[5])
    assert y.dtype == torch.bfloat16
    want = rank_one_experts(xb, *(t.bfloat16() for t in (U, s, V)), gx.bfloat16(), Q.bfloat16(), p.bfloat16(),
                            Hv.bfloat16())
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in params)
