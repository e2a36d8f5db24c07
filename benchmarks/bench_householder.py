"""Householder chain (``householder_apply``) and MoORE's rank-one expert layer (``rank_one_experts``).

Householder workloads (issue 11): x [T, D=4096] bf16, L ∈ {2, 8, 32}, T ∈ {32, 4096}; forward, and
forward+backward at L ∈ {8, 32}; a long chain L = 128 (two blocks of 64, householder_apply_blocked), T = 4096,
forward and forward+backward. Impls: ``mokernels`` (CUDA: gram + WY prologue kernels, then the fused SIMT
kernel; CPU: the reference), ``HRA loop`` (one reflection at a time in x's dtype, what PEFT's HRA does per
vector: L passes over x), ``explicit H + GEMM`` (``H = I − Yᵀ T Y`` built each call, then ``x Hᵀ``).
bytes_moved = x read + out written + U read: ``(2·T·D + L·D)·elt`` (backward adds the dx pass — grad in, dx
out — and the fused dU reduction — grad and x in again: ``+ 4·T·D·elt``); a chain of L > 64 is ``nb = ceil(L/64)``
such passes. Target (H100): L = 8, T = 4096 ≤ 40 µs (≤ 2× the 22 µs roof).

MoORE workloads, H merged into V (inference): d_in = 4096, d_out ∈ {4096, 11008}, T ∈ {32, 4096}, R =
min(d_in, d_out), d_s = 64; plus fwd+bwd rows at T = 4096 (gradients to x, the router Γ, Q and the task gate
p; U, σ, V frozen). Impls: ``mokernels`` (``rank_one_experts``; CUDA: the fused gate GEMM of
csrc/kernels/moore.cuh + cuBLAS ``S Uᵀ``; CPU: the fp32 reference), ``mokernels unfused`` (the composition it
replaced: cuBLAS GEMMs around ``rank_one_scale``, the gate materialised as [T, R]), ``nn.Linear`` (the base
layer, F.linear; fwd+bwd: dx only), ``torch 3-op`` (bf16: ``((x V) * (σ + p + gx Q)) Uᵀ``). bytes_moved =
the factors ``(d_in + d_out)·R·elt`` + x and y. Target: ≤ 1.05× the floor (d_in + d_out)·R / (d_in·d_out) ×
base — 2× (square), 1.37× (4096→11008); backward ≤ 3× forward. The fused kernel's paper estimate (tiles,
occupancy, bytes) is in the header of csrc/kernels/moore.cuh: ~2.2-2.6× base for the square layer (above the
2.1× target: mma.sync 64×128 tiles vs cuBLAS), not measured. CPU rows are labelled (CPU path); in quick mode a
tiny MoORE workload adds the emulated kernels (logic only).

Paper estimate (no GPU lent to this work yet; nothing here is measured on a GPU): L = 8, T = D = 4096, bf16:
HBM 67 MB -> 22 µs at 3.0 TB/s; 2·L FMAs per element (0.27 G FMA, ~9 µs of the FP32 pipe, overlapped with
memory by 24 resident warps per SM: 80 registers and 70 KB of shared memory -> 3 blocks of 256 per SM); 512
blocks = 1.3 waves of 396; the prologue adds two tiny launches (~4-6 µs) -> ~30-40 µs, at the target's
edge (risks: the wave tail, two barriers per tile). Backward: one more kernel pass (dx, b) ~ forward, plus the
fused dU reduction householder_grad_y (g and x read once more in bf16: 67 MB, ~22 µs; partials ≤ 8 MB) ->
~2.2x forward by bytes (before: fp32 copies of x and g and two [L, T] x [T, D] GEMMs, 24·T·D bytes = 6x the
forward's by bytes; csrc/kernels/householder.cuh has the derivation).

On CPU everything is the reference path (labelled); in quick mode a tiny workload adds the real kernel
source run by the emulator (logic only, its time says nothing about the GPU).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ._harness import Workload

FAMILY = "householder"
OURS = "mokernels"
LOOP = "HRA loop"
EXPLICIT = "explicit H + GEMM"
BASE = "nn.Linear (base)"
COMPOSE = "torch 3-op"
UNFUSED = "mokernels unfused (gate as [T, R])"
EMU = "emulated kernel (logic only)"

HH_FULL = [(T, 4096, L) for L in (2, 8, 32) for T in (32, 4096)]
HH_QUICK = [(64, 256, 8)]
HH_LONG = [(4096, 4096, 128)]
MOORE_FULL = [(T, 4096, d_out) for d_out in (4096, 11008) for T in (32, 4096)]
MOORE_QUICK = [(64, 256, 256)]
EMU_SHAPE = (16, 64, 8)
MOORE_EMU_SHAPE = (16, 64, 64)
MOORE_BWD_T = 4096  # fwd+bwd rows (full mode) at this T


class _Lazy:
    """Builds the inputs on first use (inside the untimed warm-up)."""

    def __init__(self, build: Callable[[], tuple]):
        self.build, self._t = build, None

    def __call__(self):
        if self._t is None:
            self._t = self.build()
        return self._t


def _hra_loop(x, U):
    Y = U / U.norm(dim=1, keepdim=True)
    for l in range(U.shape[0] - 1, -1, -1):  # u_L first, as householder_apply
        x = x - 2 * (x @ Y[l]).unsqueeze(-1) * Y[l]
    return x


def _explicit(x, U):
    from mokernels.ops import householder_matrix

    return x @ householder_matrix(U).to(x.dtype).T


def _hh_workload(T, D, L, dtype, device, backward, extra=None, tag=""):
    from mokernels.ops import householder_apply

    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(T, D, generator=gen, device=device, dtype=dtype)
        U = torch.randn(L, D, generator=gen, device=device, dtype=dtype)
        if backward:
            return x.requires_grad_(), U.requires_grad_(), torch.randn(T, D, generator=gen, device=device, dtype=dtype)
        return x, U

    inp = _Lazy(build)

    def wrap(f):
        if not backward:
            return lambda: f(*inp())

        def run():
            x, U, g = inp()
            return torch.autograd.grad(f(x, U), (x, U), g)

        return run

    impls = {OURS: wrap(householder_apply), LOOP: wrap(_hra_loop), EXPLICIT: wrap(_explicit)}
    for label, make in (extra or {}).items():
        impls[label] = make(inp)
    elt = torch.empty((), dtype=dtype).element_size()
    kind = "fwd+bwd" if backward else "fwd"
    nb = -(-L // 64)
    return Workload(
        family=FAMILY, name=f"householder {kind} T={T} D={D} L={L}{tag}", impls=impls, ours=OURS,
        bytes_moved=(nb * (2 * T * D + (4 * T * D if backward else 0)) + L * D) * elt,
        flops=4 * T * D * L * (3 if backward else 1),
        params={"op": "householder", "pass": kind, "T": T, "D": D, "L": L, "dtype": str(dtype).split(".")[-1],
                "target": "≤ 40 µs" if (L, T, D, backward) == (8, 4096, 4096, False) else ""},
    )


def _moore_workload(T, d_in, d_out, dtype, device, backward=False, tag="", emu=False):
    from mokernels.ops import rank_one_experts
    from mokernels.ops.householder import _experts_composed

    R, d_s = min(d_in, d_out), 64

    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=dtype) / s[0] ** 0.5  # noqa: E731
        x, U, V, W = r(T, d_in), r(d_out, R), r(d_in, R), r(d_out, d_in)
        sigma, p = torch.rand(R, generator=gen, device=device, dtype=dtype), r(R)
        gamma, Q = r(d_s, d_in), r(d_s, R)
        if backward:  # MoORE training: x, the router (gamma, Q) and the task gate p learn; U, σ, V are frozen
            x, gamma, Q, p = (t.requires_grad_() for t in (x, gamma, Q, p))
        dy = torch.randn(T, d_out, generator=gen, device=device, dtype=dtype) if backward else None
        return x, U, sigma, V, gamma, Q, p, W, dy

    inp = _Lazy(build)

    def run(f, base=False):
        def call():
            x, U, sigma, V, gamma, Q, p, W, dy = inp()
            y = f(x, U, sigma, V, gamma, Q, p, W)
            if not backward:
                return y
            return torch.autograd.grad(y, (x,) if base else (x, gamma, Q, p), dy)  # base: dx only (W frozen)

        return call

    ours = run(lambda x, U, sigma, V, gamma, Q, p, W: rank_one_experts(x, U, sigma, V, F.linear(x, gamma), Q, p))
    unfused = run(lambda x, U, sigma, V, gamma, Q, p, W: _experts_composed(x, U, sigma, V, F.linear(x, gamma), Q, p,
                                                                           False))
    base = run(lambda x, U, sigma, V, gamma, Q, p, W: F.linear(x, W), base=True)
    compose = run(lambda x, U, sigma, V, gamma, Q, p, W: ((x @ V) * (sigma + p + F.linear(x, gamma) @ Q)) @ U.T)
    impls = {OURS: ours, UNFUSED: unfused, BASE: base, COMPOSE: compose}
    if emu:
        from mokernels import emu as emu_mod
        from mokernels.ops.moore import experts_fused

        ops = emu_mod.ops()
        impls[EMU] = run(lambda x, U, sigma, V, gamma, Q, p, W: experts_fused(ops, x, U, sigma, V, F.linear(x, gamma),
                                                                             Q, p, False))
    elt = torch.empty((), dtype=dtype).element_size()
    floor = (d_in + d_out) * R / (d_in * d_out)
    kind = "fwd+bwd" if backward else "fwd"
    fwd_flops = 2 * T * R * (d_in + d_out + d_s) + 2 * T * d_s * d_in
    return Workload(
        family=FAMILY, name=f"moore merged {kind} T={T} {d_in}->{d_out}{tag}", impls=impls, ours=OURS,
        bytes_moved=((d_in + d_out) * R + d_s * (d_in + R) + T * (d_in + d_out) * (3 if backward else 1)) * elt,
        flops=fwd_flops * (3 if backward else 1),
        params={"op": "rank_one_experts", "pass": kind, "T": T, "d_in": d_in, "d_out": d_out, "R": R,
                "dtype": str(dtype).split(".")[-1],
                "target": f"≤ {1.05 * floor:.2f}× base" if not backward else "≤ 3× the fwd row"},
    )


def _emu_impl(inp):
    import mokernels.emu as emu

    ops = emu.ops()
    return lambda: ops.householder_apply(*inp(), False, 1e-12, False)


def workloads(device: torch.device, quick: bool) -> list[Workload]:
    bf16 = torch.bfloat16
    tag = " (CPU path)" if device.type == "cpu" else ""
    ws = []
    for T, D, L in (HH_QUICK if quick else HH_FULL):
        ws.append(_hh_workload(T, D, L, bf16, device, False, tag=tag))
        if L in (8, 32):
            ws.append(_hh_workload(T, D, L, bf16, device, True, tag=tag))
    for T, D, L in ([] if quick else HH_LONG):
        ws.append(_hh_workload(T, D, L, bf16, device, False, tag=tag))
        ws.append(_hh_workload(T, D, L, bf16, device, True, tag=tag))
    for T, d_in, d_out in (MOORE_QUICK if quick else MOORE_FULL):
        ws.append(_moore_workload(T, d_in, d_out, bf16, device, tag=tag))
        if T == MOORE_BWD_T:
            ws.append(_moore_workload(T, d_in, d_out, bf16, device, backward=True, tag=tag))
    if quick and device.type == "cpu":
        import mokernels.emu as emu

        if emu.available() and hasattr(emu.ops(), "householder_apply"):
            ws.append(_hh_workload(*EMU_SHAPE, bf16, device, False, extra={EMU: _emu_impl}, tag=" (emulated)"))
        if emu.available() and hasattr(emu.ops(), "experts_gate_gemm"):
            ws.append(_moore_workload(*MOORE_EMU_SHAPE, bf16, device, tag=" (CPU path + emulated)", emu=True))
    return ws
