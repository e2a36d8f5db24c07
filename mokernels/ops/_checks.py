"""Argument checks shared by the reference (CPU) and fake kernels of every op: the same errors, naming
the argument and the expected shape/dtype, on every device and at trace time."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def expect(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"mokernels.{op}: {msg}")


def expect_dtype(op: str, name: str, t: torch.Tensor, allowed=FLOAT_DTYPES, like: torch.Tensor | None = None) -> None:
    if like is not None:
        expect(t.dtype == like.dtype, op, f"{name} must have dtype {like.dtype}, got {t.dtype}")
    expect(t.dtype in allowed, op, f"{name} has unsupported dtype {t.dtype} (expected one of {list(allowed)})")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the references: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
