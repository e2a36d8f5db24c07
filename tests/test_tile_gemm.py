"""The mma.sync / ldmatrix wrappers, through the tensor-core test GEMM: emulated layouts vs an fp64
GEMM in CI; the same kernel on a GPU (the `cuda` test) validates the emulated fragment layouts."""
from __future__ import annotations

import pytest
import torch

from mokernels.ops.tile_gemm import tile_gemm, tile_gemm_reference


SIZES = [(16, 8, 16), (16, 16, 16), (1, 1, 1), (45, 29, 37), (64, 48, 80), (17, 33, 5)]


def operands(M, N, K, dtype, b_kn, device="cpu"):
    a = torch.randn(M, K, dtype=dtype, device=device)
    b = torch.randn(N, K, dtype=dtype, device=device)
    return a, (b.T.contiguous() if b_kn else b), a.double() @ b.double().T


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b_kn", [False, True])
@pytest.mark.parametrize("M,N,K", SIZES)
def test_emulated_tile_gemm(emu_ops, dtype, b_kn, M, N, K):
    a, b, want = operands(M, N, K, dtype, b_kn)
    got = emu_ops._tile_gemm(a, b, b_kn)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    # exact products, fp32 accumulation over K terms
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * K)


@pytest.mark.emu
def test_emulated_tile_gemm_detects_wrong_layout(emu_ops):
    """A transposed operand must give a different answer (guards against a test that cannot fail)."""
    a, b, want = operands(16, 16, 16, torch.bfloat16, False)
    got = emu_ops._tile_gemm(a, b.T.contiguous(), False)
    assert (got.double() - want).abs().max() > 1e-2


def test_reference_and_errors():
    a, b, want = operands(5, 6, 7, torch.float16, False)
    torch.testing.assert_close(tile_gemm(a, b).double(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="b must be"):
        tile_gemm(a, b[:, :3])
    with pytest.raises(ValueError, match="dtype"):
        tile_gemm(a.float(), b.float())
    torch.library.opcheck(torch.ops.mokernels._tile_gemm.default, (a, b, False))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b_kn", [False, True])
@pytest.mark.parametrize("M,N,K", SIZES + [(256, 128, 512)])
def test_cuda_tile_gemm_matches_matmul(dtype, b_kn, M, N, K):
    a, b, want = operands(M, N, K, dtype, b_kn, device="cuda")
    torch.testing.assert_close(tile_gemm(a, b, b_kn).double(), want, rtol=1e-5, atol=1e-5 * K)
    torch.testing.assert_close(tile_gemm(a, b, b_kn), tile_gemm_reference(a, b, b_kn), rtol=1e-5, atol=1e-5 * K)
