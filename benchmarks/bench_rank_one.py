"""Rank-one expert scaling (MoORE): ``out = z ⊙ (σ + g)``, z, g: [T, R], σ: [R].

Impls: ``mokernels.ops.rank_one_scale`` (ours; on CPU its pure-torch reference) vs the torch
composition ``z * (sigma + g)``, forward and forward+backward (``torch.autograd.grad`` w.r.t. all
three inputs, so no ``.grad`` accumulation is timed). On CPU in quick mode a tiny workload adds the
real kernel source run by the emulator (``mokernels.emu``) -- logic only, one fiber per CUDA thread,
its time says nothing about the GPU.

bytes_moved is what an ideal fused kernel must move: forward reads z, g, σ and writes out:
(3·T·R + R)·elt; backward reads grad, z, g, σ and writes dz, dg, dσ: (5·T·R + 2·R)·elt. The table's
``H100 roof µs`` is that at 3.0 TB/s; target (issue 8): fwd and bwd ≤ 1.5× it. Paper estimate of the
kernels (no GPU yet): forward and the backward's main kernel stream 16-byte vectors at ~6 instructions
per 8 elements (memory bound); the backward adds the dσ partial sums, ≤ 256 fp32 rows of R written and
read again (T=65536, R=4096 bf16: 8 MB on 2.7 GB, +0.3 %), and a column-sum kernel of R/32 blocks
(256 threads each, ≤ 32 loads per thread) instead of one thread per column chaining ~partial-rows
dependent L2 loads (the old column_sum: ~20-35 µs) -> ≈ 1.0-1.1× roofline on paper.
"""
from __future__ import annotations

from typing import Callable

import torch

from ._harness import Workload

FAMILY = "rank_one"
OURS = "mokernels"
TORCH = "torch z*(σ+g)"
EMU = "emulated kernel (logic only)"

FULL_SHAPES = [(t, r) for t in (4096, 16384, 65536) for r in (1024, 4096)]
FP32_SHAPE = (16384, 4096)
QUICK_SHAPES = [(1024, 1024)]
EMU_SHAPE = (64, 64)
CPU_SHAPE = (1024, 1024)  # issue 9: the CPU path within 1.5x of z*(s+g) (quick mode has it in QUICK_SHAPES)
TINY_SHAPE = (4, 8)  # issue 9: fixed overhead, within 2x

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class _Inputs:
    """Builds the workload's tensors on first use (inside the untimed warm-up), so a full run does
    not hold every shape's tensors at once; the runner drops each workload after measuring it."""

    def __init__(self, T: int, R: int, dtype: torch.dtype, device: torch.device, grad: bool):
        self.args = (T, R, dtype, device, grad)
        self._t: tuple[torch.Tensor, ...] | None = None

    def __call__(self) -> tuple[torch.Tensor, ...]:
        if self._t is None:
            T, R, dtype, device, grad = self.args
            gen = torch.Generator(device=device).manual_seed(0)
            z = torch.randn(T, R, generator=gen, device=device, dtype=dtype)
            g = torch.randn(T, R, generator=gen, device=device, dtype=dtype) * 0.1
            sigma = torch.rand(R, generator=gen, device=device, dtype=dtype) + 0.5
            if grad:
                dout = torch.randn(T, R, generator=gen, device=device, dtype=dtype)
                z, sigma, g = (t.requires_grad_() for t in (z, sigma, g))
                self._t = (z, sigma, g, dout)
            else:
                self._t = (z, sigma, g)
        return self._t


def _fwd(op: Callable, inp: _Inputs) -> Callable[[], object]:
    def run():
        z, sigma, g = inp()
        return op(z, sigma, g)

    return run


def _fwd_bwd(op: Callable, inp: _Inputs) -> Callable[[], object]:
    def run():
        z, sigma, g, dout = inp()
        out = op(z, sigma, g)
        return torch.autograd.grad(out, (z, sigma, g), dout)

    return run


def _torch_composition(z, sigma, g):
    return z * (sigma + g)


def _workload(T: int, R: int, dtype: torch.dtype, device: torch.device, backward: bool,
              extra: dict[str, Callable] | None = None, tag: str = "") -> Workload:
    elt = torch.empty((), dtype=dtype).element_size()
    fwd_bytes = (3 * T * R + R) * elt
    bwd_bytes = (5 * T * R + 2 * R) * elt
    kind = "fwd+bwd" if backward else "fwd"
    inp = _Inputs(T, R, dtype, device, grad=backward)
    wrap = _fwd_bwd if backward else _fwd
    from mokernels.ops import rank_one_scale  # bound here: no import lookup inside the timed call

    impls = {OURS: wrap(rank_one_scale, inp), TORCH: wrap(_torch_composition, inp)}
    for label, op in (extra or {}).items():
        impls[label] = op(inp)
    return Workload(
        family=FAMILY,
        name=f"{kind} T={T} R={R} {_DTYPE_NAMES[dtype]}{tag}",
        impls=impls,
        ours=OURS,
        bytes_moved=fwd_bytes + (bwd_bytes if backward else 0),
        params={"pass": kind, "T": T, "R": R, "dtype": _DTYPE_NAMES[dtype], "elt_size": elt,
                "target": "≤ 1.5× roof" if device.type == "cuda" or not extra else ""},
    )


def _emu_impls(backward: bool) -> dict[str, Callable]:
    """The emulated kernel (mokernels_emu ops) on the same CPU inputs. Backward runs the emulated
    forward and backward kernels directly (no autograd: the emu ops have none)."""
    import mokernels.emu as emu

    ops = emu.ops()

    def make(inp: _Inputs):
        if not backward:
            return _fwd(ops.rank_one_scale, inp)

        def run():
            z, sigma, g, dout = inp()
            with torch.no_grad():
                out = ops.rank_one_scale(z, sigma, g)
                return out, ops.rank_one_scale_backward(dout, z, sigma, g)

        return run

    return {EMU: make}


def workloads(device: torch.device, quick: bool) -> list[Workload]:
    bf16 = torch.bfloat16
    ws: list[Workload] = []
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    for backward in (False, True):
        for T, R in shapes:
            ws.append(_workload(T, R, bf16, device, backward))
        if not quick:
            ws.append(_workload(*FP32_SHAPE, torch.float32, device, backward))
    if device.type == "cpu":  # issue 9's CPU-path targets (reference path): 1024x1024 bf16 and a tiny shape
        for backward in (False, True):
            if not quick:
                ws.append(_workload(*CPU_SHAPE, bf16, device, backward, tag=" (CPU path)"))
            ws.append(_workload(*TINY_SHAPE, bf16, device, backward, tag=" (CPU path)"))
    if quick and device.type == "cpu":
        import mokernels.emu as emu

        if emu.available():
            for backward in (False, True):
                ws.append(_workload(*EMU_SHAPE, bf16, device, backward, extra=_emu_impls(backward)))
    return ws
