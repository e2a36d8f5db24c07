"""Test op for the tensor-core helpers (csrc/kernels/common/mma.cuh): a small mma.sync GEMM whose only
job is to prove the ldmatrix/mma fragment layouts — emulated in CI, on the hardware in the `cuda` test.
Not a fast GEMM and not public API."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import expect, expect_dtype

_OP = "_tile_gemm"
_DTYPES = (torch.float16, torch.bfloat16)


def tile_gemm(a: Tensor, b: Tensor, b_kn: bool = False) -> Tensor:
    """fp32 ``[M, N] = a [M, K] @ bᵀ`` with b ``[N, K]``, or ``a @ b`` with b ``[K, N]`` if ``b_kn``."""
    return torch.ops.mokernels._tile_gemm(a, b, b_kn)


def _check(a: Tensor, b: Tensor, b_kn: bool) -> tuple[int, int]:
    expect(a.dim() == 2 and b.dim() == 2, _OP, f"a and b must be 2-D, got {list(a.shape)} and {list(b.shape)}")
    expect_dtype(_OP, "a", a, allowed=_DTYPES)
    expect_dtype(_OP, "b", b, allowed=_DTYPES, like=a)
    K = a.shape[1]
    expect((b.shape[0] if b_kn else b.shape[1]) == K, _OP, f"b must be {'[K, N]' if b_kn else '[N, K]'} with K = {K}")
    return a.shape[0], (b.shape[1] if b_kn else b.shape[0])


def tile_gemm_reference(a: Tensor, b: Tensor, b_kn: bool = False) -> Tensor:
    return a.float() @ (b.float() if b_kn else b.float().T)


@torch.library.register_fake("mokernels::_tile_gemm")
def _fake(a, b, b_kn=False):
    M, N = _check(a, b, b_kn)
    return a.new_empty((M, N), dtype=torch.float32)


@torch.library.register_kernel("mokernels::_tile_gemm", "cpu")
def _cpu(a, b, b_kn=False):
    _check(a, b, b_kn)
    return tile_gemm_reference(a, b, b_kn).contiguous()
