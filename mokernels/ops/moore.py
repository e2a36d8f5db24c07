"""MoORE rank-one experts, fused path (issue 11 item 2, kernels/moore.cuh): the first of the layer's two GEMMs
with the gate formed in its epilogue.

``experts_gate_gemm(x, V, σ, gx, Q, p_task, clip)`` = ``S = (x V) ⊙ c`` with ``c = σ + p_task + gx Q``
(``clip``: ``relu(c)``), ``[T, R]`` in x's dtype; ``c`` (the ``[T, R]`` gate) is never written to memory. The layer
is ``y = S Uᵀ`` (cuBLAS). Its backward ``experts_gate_bwd`` recomputes ``x V`` and ``gx Q`` by mma and writes
``dz = dS ⊙ c``, ``dg = dS ⊙ (x V)`` (clip: both masked by ``c > 0``) and ``dσ = Σ_t dg`` (deterministic column
sum); ``dx = dz Vᵀ``, ``dV = xᵀ dz``, ``dgx = dg Qᵀ``, ``dQ = gxᵀ dg``, ``dp_task = dσ`` (``[R]``) or ``dg``
(``[T, R]``) are cuBLAS GEMMs, each formed only when its input needs a gradient.

CUDA: the kernels (fp16/bf16); CPU: the reference (any float dtype); ``torch.ops.mokernels_emu`` runs the
kernels' source on CPU tensors through the emulator (tests). Public entry: ``householder.rank_one_experts``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import acc_dtype, autocast_off, expect, expect_dtype, expect_no_tangent, expect_same_device

_FWD = "experts_gate_gemm"
_BWD = "experts_gate_bwd"


def _op_defined(name: str) -> bool:
    try:
        getattr(torch.ops.mokernels, name)
        return True
    except (AttributeError, RuntimeError):
        return False


HAS_OP = _op_defined(_FWD) and _op_defined(_BWD)


def check_gate_args(op: str, x, V, sigma, gx, Q, p_task) -> None:
    """The 2-D operands of the gate ops (``x [T, d_in]``; see the module docstring)."""
    expect(isinstance(x, Tensor) and x.dim() == 2, op, "x must be a [T, d_in] tensor")
    expect_dtype(op, "x", x)
    T, d_in = x.shape
    expect(isinstance(V, Tensor) and V.dim() == 2 and V.shape[0] == d_in, op, f"V must be [d_in, R] = [{d_in}, R]")
    R = V.shape[1]
    expect(isinstance(sigma, Tensor) and sigma.shape == (R,), op, f"sigma must be [R] = [{R}]")
    expect_dtype(op, "V", V, like=x)
    expect_dtype(op, "sigma", sigma, like=x)
    expect((gx is None) == (Q is None), op, "gx and Q must both be given or both be None")
    if gx is not None:
        expect(gx.dim() == 2 and gx.shape[0] == T, op, f"gx must be [T, d_s] = [{T}, d_s], got {list(gx.shape)}")
        expect(Q.shape == (gx.shape[1], R), op, f"Q must be [d_s, R] = [{gx.shape[1]}, {R}], got {list(Q.shape)}")
        expect_dtype(op, "gx", gx, like=x)
        expect_dtype(op, "Q", Q, like=x)
    if p_task is not None:
        expect(p_task.shape in ((R,), (T, R)), op, f"p_task must be [R] = [{R}] or [T, R] = [{T}, {R}], "
                                                   f"got {list(p_task.shape)}")
        expect_dtype(op, "p_task", p_task, like=x)
    expect_same_device(op, "x", x, V=V, sigma=sigma, gx=gx, Q=Q, p_task=p_task)


def _gate(x, V, sigma, gx, Q, p_task, acc):
    """(z, c) in ``acc``: ``z = x V``, ``c = σ + p + gx Q`` (before any clip)."""
    z = x.to(acc) @ V.to(acc)
    c = sigma.to(acc)
    if p_task is not None:
        c = c + p_task.to(acc)
    if gx is not None:
        c = c + gx.to(acc) @ Q.to(acc)
    return z, c.expand_as(z)


def experts_gate_reference(x: Tensor, V: Tensor, sigma: Tensor, gx: Tensor | None, Q: Tensor | None,
                           p_task: Tensor | None, clip: bool = False) -> Tensor:
    """``S = (x V) ⊙ c`` in fp32 (fp64 for fp64), rounded once to x's dtype; differentiable."""
    z, c = _gate(x, V, sigma, gx, Q, p_task, acc_dtype(x.dtype))
    if clip:
        c = torch.relu(c)
    return (z * c).to(x.dtype).contiguous()


def experts_gate_bwd_reference(dS: Tensor, x: Tensor, V: Tensor, sigma: Tensor, gx: Tensor | None, Q: Tensor | None,
                               p_task: Tensor | None, clip: bool = False):
    """``(dz, dg, dσ)`` of :func:`experts_gate_reference` (fp32 math, each rounded once to x's dtype)."""
    acc = acc_dtype(x.dtype)
    z, c = _gate(x, V, sigma, gx, Q, p_task, acc)
    d = dS.to(acc)
    if clip:
        d = d * (c > 0)
        c = torch.relu(c)
    dg = d * z
    return (d * c).to(x.dtype).contiguous(), dg.to(x.dtype).contiguous(), dg.sum(0).to(x.dtype)


def gate_backward(ops, dS: Tensor, x: Tensor, V: Tensor, sigma: Tensor, gx: Tensor | None, Q: Tensor | None,
                  p_task: Tensor | None, clip: bool, needs) -> tuple:
    """Gradients ``(dx, dV, dσ, dgx, dQ, dp_task)`` of ``S = experts_gate_gemm(x, V, σ, gx, Q, p_task, clip)`` from
    ``dS``, through ``ops.experts_gate_bwd`` (``torch.ops.mokernels``, or ``torch.ops.mokernels_emu`` in tests) and
    plain GEMMs in x's dtype; ``needs``: which of the six inputs need one (None for the others)."""
    nx, nV, ns, ngx, nQ, np_ = (bool(n) for n in needs)
    per_token_p = p_task is not None and p_task.dim() == 2
    need_dz = nx or nV
    need_dg = ngx or nQ or (np_ and per_token_p)
    need_ds = ns or (np_ and not per_token_p)
    if torch.is_grad_enabled():  # double backward: differentiable reference formulas
        dz, dg, dsig = experts_gate_bwd_reference(dS, x, V, sigma, gx, Q, p_task, clip)
    else:
        dz, dg, dsig = ops.experts_gate_bwd(dS, x, V, sigma, gx, Q, p_task, bool(clip), need_dz, need_dg, need_ds)
    dx = dz @ V.T if nx else None
    dV = x.T @ dz if nV else None
    dgx = dg @ Q.T if ngx else None
    dQ = gx.T @ dg if nQ else None
    dp = (dg if per_token_p else dsig) if np_ else None
    return dx, dV, dsig if ns else None, dgx, dQ, dp


def experts_fused(ops, x: Tensor, U: Tensor, sigma: Tensor, V: Tensor, gx: Tensor | None, Q: Tensor | None,
                  p_task: Tensor | None, clip: bool) -> Tensor:
    """``y = experts_gate_gemm(x, V, σ, gx, Q, p_task) Uᵀ`` for ``x [..., d_in]`` (leading dims flattened; gx and
    a per-token p_task likewise), through the op namespace ``ops``. Arguments as checked by
    ``householder._check_experts``; autograd through ``torch.ops.mokernels`` (the registered formula below)."""
    expect_no_tangent("rank_one_experts", (x, U, sigma, V, gx, Q, p_task), "an input (fused CUDA path)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    gx2 = gx.reshape(-1, gx.shape[-1]) if gx is not None else None
    p2 = p_task.reshape(-1, p_task.shape[-1]) if p_task is not None and p_task.dim() > 1 else p_task
    S = ops.experts_gate_gemm(x2, V, sigma, gx2, Q, p2, bool(clip))
    return (S @ U.T).reshape(*lead, U.shape[0])


if HAS_OP:
    @torch.library.register_fake("mokernels::" + _FWD)
    def _fake_fwd(x, V, sigma, gx, Q, p_task, clip):
        check_gate_args(_FWD, x, V, sigma, gx, Q, p_task)
        return x.new_empty((x.shape[0], V.shape[1]))

    @torch.library.register_fake("mokernels::" + _BWD)
    def _fake_bwd(dS, x, V, sigma, gx, Q, p_task, clip, need_dz, need_dg, need_dsigma):
        check_gate_args(_BWD, x, V, sigma, gx, Q, p_task)
        T, R = x.shape[0], V.shape[1]
        return (x.new_empty((T, R) if need_dz else (0,)), x.new_empty((T, R) if need_dg else (0,)),
                x.new_empty((R,) if need_dsigma else (0,)))

    @torch.library.register_kernel("mokernels::" + _FWD, "cpu")
    def _cpu_fwd(x, V, sigma, gx, Q, p_task, clip):
        check_gate_args(_FWD, x, V, sigma, gx, Q, p_task)
        with torch.no_grad(), autocast_off("cpu"):
            return experts_gate_reference(x, V, sigma, gx, Q, p_task, clip)

    @torch.library.register_kernel("mokernels::" + _BWD, "cpu")
    def _cpu_bwd(dS, x, V, sigma, gx, Q, p_task, clip, need_dz, need_dg, need_dsigma):
        check_gate_args(_BWD, x, V, sigma, gx, Q, p_task)
        expect(dS.shape == (x.shape[0], V.shape[1]), _BWD, f"dS must be [T, R] = [{x.shape[0]}, {V.shape[1]}]")
        with torch.no_grad(), autocast_off("cpu"):
            dz, dg, ds = experts_gate_bwd_reference(dS, x, V, sigma, gx, Q, p_task, clip)
        e = x.new_empty((0,))
        return dz if need_dz else e, dg if need_dg else e, ds if need_dsigma else e

    def _setup_context(ctx, inputs, output):
        x, V, sigma, gx, Q, p_task, clip = inputs
        ctx.clip = clip
        ctx.save_for_backward(x, V, sigma, gx, Q, p_task)

    def _backward(ctx, dS):
        x, V, sigma, gx, Q, p_task = ctx.saved_tensors
        grads = gate_backward(torch.ops.mokernels, dS.contiguous(), x, V, sigma, gx, Q, p_task, ctx.clip,
                              ctx.needs_input_grad[:6])
        return (*grads, None)

    torch.library.register_autograd("mokernels::" + _FWD, _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        raise NotImplementedError("mokernels.experts_gate_bwd is not differentiable: differentiate rank_one_experts() "
                                  "instead (its double backward goes through the reference formulas)")

    torch.library.register_autograd("mokernels::" + _BWD, _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
