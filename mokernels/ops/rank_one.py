"""Rank-one expert scaling (MoORE, METHODS.md §4): ``out = z ⊙ (σ + g)``.

MoORE's experts are the rank-one pieces ``uᵢ σᵢ vᵢᵀ`` of a weight's thin SVD; each token scales
expert i's coefficient ``zᵢ = (Vᵀ H x)ᵢ`` by ``σᵢ + gᵢ(x)``. This op is that elementwise scaling
(forward and backward); the fused two-GEMM layer builds on it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import acc_dtype, expect, expect_dtype

_OP = "rank_one_scale"


def rank_one_scale(z: Tensor, sigma: Tensor, g: Tensor) -> Tensor:
    """``out[..., r] = z[..., r] * (sigma[r] + g[..., r])``.

    Args:
        z: ``[..., R]`` expert coefficients (fp16, bf16, fp32 or fp64).
        sigma: ``[R]`` singular values, same dtype as ``z``.
        g: ``[..., R]`` per-token gates, same shape and dtype as ``z``.
    Returns:
        ``[..., R]`` contiguous, dtype of ``z``; computed in fp32 (fp64 for fp64 inputs).
    Differentiable in all three inputs. CUDA tensors run the fused kernel; CPU tensors the reference.
    Non-contiguous inputs are copied to contiguous ones first.
    """
    return torch.ops.mokernels.rank_one_scale(z, sigma, g)


def check_args(z: Tensor, sigma: Tensor, g: Tensor) -> None:
    expect(z.dim() >= 1, _OP, "z must be [..., R], got a 0-d tensor")
    R = z.shape[-1]
    expect(sigma.dim() == 1 and sigma.shape[0] == R, _OP, f"sigma must be [R] = [{R}], got {list(sigma.shape)}")
    expect(g.shape == z.shape, _OP, f"g must have z's shape {list(z.shape)}, got {list(g.shape)}")
    expect_dtype(_OP, "z", z)
    expect_dtype(_OP, "sigma", sigma, like=z)
    expect_dtype(_OP, "g", g, like=z)


def _check_backward_args(grad: Tensor, z: Tensor, sigma: Tensor, g: Tensor) -> None:
    check_args(z, sigma, g)
    expect(grad.shape == z.shape, _OP, f"grad must have z's shape {list(z.shape)}, got {list(grad.shape)}")
    expect_dtype(_OP, "grad", grad, like=z)


def rank_one_scale_reference(z: Tensor, sigma: Tensor, g: Tensor) -> Tensor:
    """Pure-torch specification of :func:`rank_one_scale` (fp32 math, or fp64 for fp64)."""
    acc = acc_dtype(z.dtype)
    return (z.to(acc) * (sigma.to(acc) + g.to(acc))).to(z.dtype).contiguous()


def rank_one_scale_backward_reference(grad: Tensor, z: Tensor, sigma: Tensor, g: Tensor):
    """``(dz, dsigma, dg) = (grad ⊙ (σ + g), Σ_rows grad ⊙ z, grad ⊙ z)`` in fp32 (fp64 for fp64)."""
    acc = acc_dtype(z.dtype)
    gr, za = grad.to(acc), z.to(acc)
    prod = gr * za
    dz = gr * (sigma.to(acc) + g.to(acc))
    dsigma = prod.reshape(-1, z.shape[-1]).sum(0)
    return dz.to(z.dtype).contiguous(), dsigma.to(sigma.dtype), prod.to(z.dtype).contiguous()


@torch.library.register_fake("mokernels::rank_one_scale")
def _fake(z, sigma, g):
    check_args(z, sigma, g)
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.register_fake("mokernels::rank_one_scale_backward")
def _fake_backward(grad, z, sigma, g):
    _check_backward_args(grad, z, sigma, g)
    fmt = torch.contiguous_format
    return torch.empty_like(z, memory_format=fmt), torch.empty_like(sigma, memory_format=fmt), torch.empty_like(
        z, memory_format=fmt
    )


@torch.library.register_kernel("mokernels::rank_one_scale", "cpu")
def _cpu(z, sigma, g):
    check_args(z, sigma, g)
    return rank_one_scale_reference(z, sigma, g)


@torch.library.register_kernel("mokernels::rank_one_scale_backward", "cpu")
def _cpu_backward(grad, z, sigma, g):
    _check_backward_args(grad, z, sigma, g)
    return rank_one_scale_backward_reference(grad, z, sigma, g)


def _setup_context(ctx, inputs, output):
    z, sigma, g = inputs
    ctx.save_for_backward(z, sigma, g)


def _backward(ctx, grad):
    z, sigma, g = ctx.saved_tensors
    dz, dsigma, dg = torch.ops.mokernels.rank_one_scale_backward(grad, z, sigma, g)
    need = ctx.needs_input_grad
    return dz if need[0] else None, dsigma if need[1] else None, dg if need[2] else None


torch.library.register_autograd("mokernels::rank_one_scale", _backward, setup_context=_setup_context)
