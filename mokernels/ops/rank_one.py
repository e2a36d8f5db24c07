"""Rank-one expert scaling (MoORE, METHODS.md §4): ``out = z ⊙ (σ + g)``.

MoORE's experts are the rank-one pieces ``uᵢ σᵢ vᵢᵀ`` of a weight's thin SVD; each token scales
expert i's coefficient ``zᵢ = (Vᵀ H x)ᵢ`` by ``σᵢ + gᵢ(x)``. This op is that elementwise scaling
(forward and backward); the fused two-GEMM layer builds on it.

AD modes: reverse, double backward and forward mode (jvp). In eager mode an autograd.Function
carries all three (the backward's own backward is the differentiable reference composition); under
torch.compile the op's registered autograd gives reverse mode and double backward.
Autocast: ``sigma`` and ``g`` are cast to ``z``'s dtype (README "Autocast").
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

from .. import _C
from ._checks import (FLOAT_DTYPES, acc_dtype, autocast_like, expect, expect_dtype, expect_same_device, grad_or_tangent,
                      is_eager, native_call_ok)

_OP = "rank_one_scale"


def rank_one_scale(z: Tensor, sigma: Tensor, g: Tensor) -> Tensor:
    """``out[..., r] = z[..., r] * (sigma[r] + g[..., r])``.

    Args:
        z: ``[..., R]`` expert coefficients (fp16, bf16, fp32 or fp64).
        sigma: ``[R]`` singular values, same dtype as ``z`` (under ``torch.autocast``: cast to z's dtype).
        g: ``[..., R]`` per-token gates, same shape and dtype as ``z`` (autocast: cast to z's dtype).
    Returns:
        ``[..., R]`` contiguous, dtype of ``z``; computed in fp32 (fp64 for fp64 inputs), rounded once.
    Differentiable in all three inputs: reverse mode, double backward, forward mode. CUDA tensors run
    the fused kernel; CPU tensors the reference's arithmetic (fp16/bf16: native one-pass kernels,
    ``csrc/cpu/cpu_ops.cpp``, bit-identical). Non-contiguous inputs are copied to contiguous ones first.
    """
    if type(z) is Tensor and z.is_cpu and native_call_ok():
        # CPU eager (no FakeTensorMode or other dispatch mode, no jit tracer): fewest Python steps
        if torch.is_autocast_enabled("cpu"):
            sigma, g = autocast_like("cpu", z, sigma, g)
        dt = z.dtype
        if not (isinstance(sigma, Tensor) and isinstance(g, Tensor) and sigma.is_cpu and g.is_cpu
                and g.shape == z.shape and sigma.dim() == 1 and z.dim() >= 1 and sigma.shape[0] == z.shape[-1]
                and sigma.dtype == dt and g.dtype == dt and dt in FLOAT_DTYPES):
            check_args(z, sigma, g)  # raises the ValueError naming the argument
        if dt is torch.float32 or dt is torch.float64:  # the reference: autograd gives every AD mode
            return (z * (sigma + g)).contiguous()
        if grad_or_tangent(z, sigma, g):
            if z.numel() <= _SMALL_AD:  # small: the reference composition, torch's autograd (every AD mode) costs
                return (z * (g + sigma.float())).to(dt).contiguous()  # less than an autograd.Function's ~70 µs
            return _RankOneScaleFn.apply(z, sigma, g)
        if _native_fwd is not None:  # fp16/bf16: the native one-pass kernel, called directly (no dispatcher)
            return _native_fwd(z, sigma, g)
        if z.numel() <= _BLOCK // 4:  # an extension built before the native kernels: the reference
            return (z * (g + sigma.float())).to(dt).contiguous()
        return _scale_cpu(z, sigma, g)
    if isinstance(z, Tensor):
        sigma, g = autocast_like(z.device.type, z, sigma, g)
    if not is_eager(z.device.type if isinstance(z, Tensor) else "cuda"):
        return torch.ops.mokernels.rank_one_scale(z, sigma, g)
    check_args(z, sigma, g)
    if z.device.type == "cpu" and (z.dtype == acc_dtype(z.dtype) or z.numel() <= _BLOCK // 4):
        # fp32/fp64, or small: the reference composition itself, torch's autograd gives every AD mode
        # (no autograd.Function overhead; the blocked kernels pay off only for large fp16/bf16 inputs)
        return rank_one_scale_reference(z, sigma, g)
    if grad_or_tangent(z, sigma, g):
        return _RankOneScaleFn.apply(z, sigma, g)
    return _scale_cpu(z, sigma, g) if z.device.type == "cpu" else torch.ops.mokernels.rank_one_scale(z, sigma, g)


def check_args(z: Tensor, sigma: Tensor, g: Tensor) -> None:
    if (isinstance(z, Tensor) and isinstance(sigma, Tensor) and isinstance(g, Tensor) and z.dim() >= 1
            and sigma.dim() == 1 and sigma.shape[0] == z.shape[-1] and g.shape == z.shape and z.dtype in FLOAT_DTYPES
            and sigma.dtype == z.dtype and g.dtype == z.dtype and sigma.device == z.device and g.device == z.device):
        return  # the common case, without building any message
    expect(all(isinstance(t, Tensor) for t in (z, sigma, g)), _OP, "z, sigma and g must be tensors")
    expect(z.dim() >= 1, _OP, "z must be [..., R], got a 0-d tensor")
    R = z.shape[-1]
    expect(sigma.dim() == 1 and sigma.shape[0] == R, _OP, f"sigma must be [R] = [{R}], got {list(sigma.shape)}")
    expect(g.shape == z.shape, _OP, f"g must have z's shape {list(z.shape)}, got {list(g.shape)}")
    expect_dtype(_OP, "z", z)
    expect_dtype(_OP, "sigma", sigma, like=z)
    expect_dtype(_OP, "g", g, like=z)
    expect_same_device(_OP, "z", z, sigma=sigma, g=g)


def _check_backward_args(grad: Tensor, z: Tensor, sigma: Tensor, g: Tensor) -> None:
    check_args(z, sigma, g)
    expect(grad.shape == z.shape, _OP, f"grad must have z's shape {list(z.shape)}, got {list(grad.shape)}")
    expect_dtype(_OP, "grad", grad, like=z)
    expect_same_device(_OP, "z", z, grad=grad)


def rank_one_scale_reference(z: Tensor, sigma: Tensor, g: Tensor) -> Tensor:
    """Pure-torch specification of :func:`rank_one_scale` (fp32 math, or fp64 for fp64)."""
    acc = acc_dtype(z.dtype)
    if z.dtype == acc:
        return (z * (sigma + g)).contiguous()
    # (z.to(acc) * (sigma.to(acc) + g.to(acc))).to(z.dtype), with fp16/bf16 promoted to fp32 inside the ops
    return (z * (g + sigma.to(acc))).to(z.dtype).contiguous()


# The CPU kernels: the reference's arithmetic exactly (tests compare them bit for bit), organised for
# speed. fp32/fp64 are the plain composition. fp16/bf16 run over blocks of ~64K elements (L2-sized)
# with fp32 scratch reused across blocks: no [T, R] fp32 temporaries (each a fresh mmap and page faults
# per call) and no slow mixed-dtype kernels; ~1.5x the bf16 torch composition z*(s+g), which rounds twice.
_BLOCK = 1 << 17
# With autograd, fp16/bf16 inputs up to this many elements take the reference composition: its 4 small ATen
# ops and torch's autograd cost less than the autograd.Function's fixed Python overhead (~70 µs fwd+bwd);
# above it the native kernels' one pass wins (the composition's fp32 temporaries cost ~8 ns per element).
_SMALL_AD = 1 << 13


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t


_scratch = threading.local()


def _scratch_blocks(n: int, rows: int, R: int, acc: torch.dtype) -> list[Tensor]:
    """``n`` fp32 [rows, R] scratch blocks, reused across calls (per thread): a fresh ~1 MiB buffer per
    call costs an mmap and page faults that are a large part of a 1024x1024 call."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n * rows * R or buf.dtype != acc:
        buf = torch.empty(max(n * rows * R, n * _BLOCK), dtype=acc)
        _scratch.buf = buf
    return [buf[i * rows * R:(i + 1) * rows * R].view(rows, R) for i in range(n)]


# The native CPU kernels (csrc/cpu/cpu_ops.cpp): one fused pass each, the reference's rounding bit for bit,
# dσ summed over fixed row chunks (bits independent of the thread count). None with an extension built
# before them: then the blocked torch compositions below.
_native_fwd = getattr(_C, "rank_one_scale_cpu", None)
_native_bwd = getattr(_C, "rank_one_scale_backward_cpu", None)


def _scale_cpu(z: Tensor, sigma: Tensor, g: Tensor) -> Tensor:
    acc = acc_dtype(z.dtype)
    if z.dtype == acc:
        return (z * (sigma + g)).contiguous()
    if _native_fwd is not None:
        return _native_fwd(z, sigma, g)
    out = torch.empty(z.shape, dtype=z.dtype)
    R = z.shape[-1]
    if out.numel() == 0:
        return out
    z2, g2, o2, s = _rows(z), _rows(g), out.view(-1, R), sigma.to(acc)
    step = max(1, _BLOCK // R)
    a, b = _scratch_blocks(2, min(step, z2.shape[0]), R, acc)
    for i in range(0, z2.shape[0], step):
        j = min(i + step, z2.shape[0])
        aa, bb = a[: j - i], b[: j - i]
        aa.copy_(g2[i:j]).add_(s)
        aa.mul_(bb.copy_(z2[i:j]))
        o2[i:j].copy_(aa)
    return out


def _scale_backward_cpu(grad: Tensor, z: Tensor, sigma: Tensor, g: Tensor):
    acc = acc_dtype(z.dtype)
    if z.dtype == acc:
        prod = grad * z
        dsigma = prod.sum(tuple(range(prod.dim() - 1))) if prod.dim() > 1 else prod
        return (grad * (sigma + g)).contiguous(), dsigma, prod.contiguous()
    if _native_bwd is not None:
        return _native_bwd(grad, z, sigma, g)
    R = z.shape[-1]
    dz = torch.empty(z.shape, dtype=z.dtype)
    dg = torch.empty(z.shape, dtype=z.dtype)
    dsigma = torch.zeros(R, dtype=acc)
    if dz.numel():
        gr2, z2, g2, s = _rows(grad), _rows(z), _rows(g), sigma.to(acc)
        dz2, dg2 = dz.view(-1, R), dg.view(-1, R)
        step = max(1, _BLOCK // R)
        a, b, c = _scratch_blocks(3, min(step, z2.shape[0]), R, acc)
        for i in range(0, z2.shape[0], step):
            j = min(i + step, z2.shape[0])
            aa, bb, cc = a[: j - i], b[: j - i], c[: j - i]
            cc.copy_(gr2[i:j])
            aa.copy_(g2[i:j]).add_(s).mul_(cc)  # grad * (sigma + g)
            dz2[i:j].copy_(aa)
            bb.copy_(z2[i:j]).mul_(cc)  # grad * z: bf16 x bf16 (fp16 x fp16) products are exact in fp32
            dg2[i:j].copy_(bb)  # rounded once, as the reference
            dsigma += bb.sum(0)  # the exact products, summed in fp32
    return dz, dsigma.to(sigma.dtype), dg


def rank_one_scale_backward_reference(grad: Tensor, z: Tensor, sigma: Tensor, g: Tensor):
    """``(dz, dsigma, dg) = (grad ⊙ (σ + g), Σ_rows grad ⊙ z, grad ⊙ z)`` in fp32 (fp64 for fp64);
    differentiable (the double backward of the CUDA path goes through it)."""
    acc = acc_dtype(z.dtype)
    gr, za = grad.to(acc), z.to(acc)
    prod = gr * za
    dz = gr * (sigma.to(acc) + g.to(acc))
    dsigma = prod.sum(tuple(range(prod.dim() - 1))) if prod.dim() > 1 else prod  # R = 0 included
    return dz.to(z.dtype).contiguous(), dsigma.to(sigma.dtype), prod.to(z.dtype).contiguous()


def rank_one_scale_jvp_reference(z: Tensor, sigma: Tensor, g: Tensor, dz, dsigma, dg) -> Tensor:
    """Forward-mode AD: ``dz ⊙ (σ + g) + z ⊙ (dσ + dg)`` (None tangents are zero), in fp32 (fp64)."""
    acc = acc_dtype(z.dtype)
    out = torch.zeros(z.shape, dtype=acc, device=z.device)
    if dz is not None:
        out = out + dz.to(acc) * (sigma.to(acc) + g.to(acc))
    if dsigma is not None or dg is not None:
        d = (dsigma.to(acc) if dsigma is not None else 0) + (dg.to(acc) if dg is not None else 0)
        out = out + z.to(acc) * d
    return out.to(z.dtype)


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
    with torch.no_grad():
        return _scale_cpu(z, sigma, g)


@torch.library.register_kernel("mokernels::rank_one_scale_backward", "cpu")
def _cpu_backward(grad, z, sigma, g):
    _check_backward_args(grad, z, sigma, g)
    with torch.no_grad():
        return _scale_backward_cpu(grad, z, sigma, g)


def _grads(need, grad, z, sigma, g):
    if torch.is_grad_enabled():  # create_graph=True: the differentiable composition (double backward)
        dz, dsigma, dg = rank_one_scale_backward_reference(grad, z, sigma, g)
    elif z.device.type == "cpu":
        _check_backward_args(grad, z, sigma, g)
        dz, dsigma, dg = _scale_backward_cpu(grad.contiguous(), z, sigma, g)
    else:
        dz, dsigma, dg = torch.ops.mokernels.rank_one_scale_backward(grad, z, sigma, g)
    return dz if need[0] else None, dsigma if need[1] else None, dg if need[2] else None


def _setup_context(ctx, inputs, output):
    z, sigma, g = inputs
    ctx.save_for_backward(z, sigma, g)


def _backward(ctx, grad):
    return _grads(ctx.needs_input_grad, grad, *ctx.saved_tensors)


torch.library.register_autograd("mokernels::rank_one_scale", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("mokernels.rank_one_scale_backward is not differentiable: differentiate "
                              "rank_one_scale() instead (its double backward goes through the reference composition)")


torch.library.register_autograd("mokernels::rank_one_scale_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


class _RankOneScaleFn(torch.autograd.Function):
    """The kernel with every AD mode in eager mode (torch.library registers no forward-mode formula)."""

    @staticmethod
    def forward(z, sigma, g):
        return _scale_cpu(z, sigma, g) if z.device.type == "cpu" else torch.ops.mokernels.rank_one_scale(z, sigma, g)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _grads(ctx.needs_input_grad, grad, *ctx.saved_tensors)

    @staticmethod
    def jvp(ctx, dz, dsigma, dg):
        return rank_one_scale_jvp_reference(*ctx.saved_tensors, dz, dsigma, dg)
