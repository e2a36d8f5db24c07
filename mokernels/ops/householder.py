"""Householder chain (METHODS.md §3) and MoORE's rank-one expert layer (METHODS.md §4).

Convention (fixed here, equal to PEFT's HRA):
    ``H = H_1 H_2 … H_L``, ``H_l = I − 2 û_l û_lᵀ``, ``û_l = u_l / ‖u_l‖`` (rows ``u_l`` of ``U [L, D]``).
    ``householder_apply(x, U)`` maps each token's column vector ``x_t`` to ``H x_t`` — as rows,
    ``x ↦ x Hᵀ`` — so the **last** reflection ``u_L`` acts on the token first and ``u_1`` last;
    ``transpose=True`` applies ``Hᵀ = H_L … H_1`` (``x ↦ x H``; ``u_1`` first).
    PEFT's HRA stores ``hra_u [D, r]`` (columns) and builds ``delta = H_1 … H_r`` left to right
    (``get_delta_weight``), then ``y = x (W delta)ᵀ``; with ``U = hra_u.T`` our ``H`` *is* PEFT's
    ``delta``: ``merge_householder(W, U) = W H`` is PEFT's merged weight, ``householder_apply(x, U)``
    followed by the base layer is PEFT's forward. (PEFT's ``apply_GS=True`` variant — Gram-Schmidt
    first — is a different transform and is not what this op computes.)

Compact WY form (what the kernels and the reference compute): ``H = I − Yᵀ T Y`` with ``Y [L, D]``
the normalised rows and ``T [L, L]`` upper triangular — LAPACK larft's ``T`` for ``τ_l = 2`` (forward
direction), obtained here in closed form as ``T = (½ I + striu(Y Yᵀ))⁻¹`` (the "UT transform" of
Joffrain et al.; equal to larft's recurrence ``T[:l, l] = −2 T[:l, :l] Y[:l] û_l``, ``T[l, l] = 2``).
Then ``x Hᵀ = x − ((x Yᵀ) Tᵀ) Y`` and ``x H = x − ((x Yᵀ) T) Y``: two thin GEMMs, ``x`` read once.

Degenerate vectors (documented epsilon): ``û_l = u_l / max(‖u_l‖, eps)``. A zero vector is therefore
the identity (not a reflection), and a vector with ``0 < ‖u‖ < eps`` a non-orthogonal
``I − 2 u uᵀ/eps²``; the chain is orthogonal whenever every ``‖u_l‖ ≥ eps`` (default ``eps = 1e-12``,
well below any trained vector). No host sync is spent on checking this.

Gradients: w.r.t. ``x`` and every ``u_l`` (through the normalisation). The backward formulas
(``householder_apply_backward_reference``) are derived from the WY form:
with ``a = x Yᵀ``, ``b = g Yᵀ`` (``g`` the output gradient), ``M = Tᵀ`` (``T`` if transpose):
``dx = g − b Mᵀ Y`` (the op with the other ``transpose``), ``dM = −aᵀ b``, ``dY = −(Mᵀ aᵀ g + M bᵀ x)``,
``dT`` = ``dMᵀ`` (``dM``), ``dS = −Tᵀ dT Tᵀ``, ``dY += (striu(dS) + striu(dS)ᵀ) Y``,
``du_l = (dy_l − (dy_l·û_l) û_l) / ‖u_l‖`` (``dy_l / eps`` where the norm is clamped).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import (acc_dtype, autocast_like, autocast_off, expect, expect_dtype, expect_same_device,
                      grad_or_tangent, is_eager)

_OP = "householder_apply"
MAX_L = 64  # the fused SIMT kernel's limit (L <= 64); longer chains run in blocks of <= 64 (householder_apply_blocked)
DEFAULT_EPS = 1e-12


# ---------------------------------------------------------------- checks


def check_args(op: str, x: Tensor, U: Tensor, eps: float = DEFAULT_EPS, *, x_name: str = "x",
               u_name: str = "U") -> None:
    """``x [..., D]`` and the reflection vectors ``U [L, D]``; ``x_name`` / ``u_name``: the arguments' names in
    the caller's signature (``rank_one_experts`` has its own ``U``; the chain is ``H_vectors`` there)."""
    expect(isinstance(x, Tensor) and isinstance(U, Tensor), op, f"{x_name} and {u_name} must be tensors")
    expect(x.dim() >= 1, op, f"{x_name} must be [..., D], got a 0-d tensor")
    D = x.shape[-1]
    expect(U.dim() == 2 and U.shape[1] == D, op, f"{u_name} must be [L, D] = [L, {D}] (one reflection vector per row, "
                                                 f"D = {x_name}.shape[-1]), got {list(U.shape)}")
    expect_dtype(op, x_name, x)
    expect_dtype(op, u_name, U, like=x)
    expect_same_device(op, x_name, x, **{u_name: U})
    expect(isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0, op,
           f"eps must be a positive float, got {eps!r}")


# ---------------------------------------------------------------- references


def householder_wy(U: Tensor, eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor]:
    """Compact WY factors of ``H = H_1 … H_L``: ``(Y [L, D], T [L, L])`` with ``H = I − Yᵀ T Y``, in fp32
    (fp64 for fp64 ``U``); ``Y`` the normalised rows (norms clamped at ``eps``), ``T`` upper triangular,
    ``T = (½ I + striu(Y Yᵀ))⁻¹`` (= LAPACK larft, forward, τ = 2). Differentiable."""
    acc = acc_dtype(U.dtype)
    Uf = U.to(acc)
    Y = Uf / Uf.norm(dim=1, keepdim=True).clamp_min(eps)
    L = U.shape[0]
    S = torch.triu(Y @ Y.T, diagonal=1) + 0.5 * torch.eye(L, dtype=acc, device=U.device)
    T = torch.linalg.solve_triangular(S, torch.eye(L, dtype=acc, device=U.device), upper=True)
    return Y, T


def householder_t_larft(Y: Tensor) -> Tensor:
    """larft's recurrence for ``T`` (τ = 2, forward), from normalised rows ``Y [L, D]``: the
    textbook definition, used by the tests to check the closed form of :func:`householder_wy`."""
    L = Y.shape[0]
    T = torch.zeros(L, L, dtype=Y.dtype, device=Y.device)
    for i in range(L):
        T[i, i] = 2.0
        if i:
            T[:i, i] = -2.0 * T[:i, :i] @ (Y[:i] @ Y[i])
    return T


def householder_matrix(U: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    """``H = H_1 … H_L`` as an explicit ``[D, D]`` matrix (fp32, fp64 for fp64 ``U``). Differentiable."""
    Y, T = householder_wy(U, eps)
    return torch.eye(U.shape[1], dtype=Y.dtype, device=U.device) - Y.T @ T @ Y


def householder_apply_reference(x: Tensor, U: Tensor, *, transpose: bool = False, eps: float = DEFAULT_EPS) -> Tensor:
    """Pure-torch specification of :func:`householder_apply` through the WY form, fp32 math (fp64 for fp64),
    rounded once to ``x``'s dtype; differentiable in ``x`` and ``U`` (torch autograd)."""
    check_args(_OP, x, U, eps)
    acc = acc_dtype(x.dtype)
    if U.shape[0] == 0:
        return x.clone(memory_format=torch.contiguous_format)
    Y, T = householder_wy(U, eps)
    xf = x.to(acc)
    s = xf @ Y.T  # [..., L]
    t = s @ (T if transpose else T.T)
    return (xf - t @ Y).to(x.dtype).contiguous()


def householder_sequential_reference(x: Tensor, U: Tensor, *, transpose: bool = False,
                                     eps: float = DEFAULT_EPS) -> Tensor:
    """The chain one reflection at a time (what PEFT's HRA loop does), fp32 (fp64) math: an oracle
    independent of the WY algebra. ``transpose=False``: ``u_L`` first, ``u_1`` last."""
    check_args(_OP, x, U, eps)
    acc = acc_dtype(x.dtype)
    Uf = U.to(acc)
    Y = Uf / Uf.norm(dim=1, keepdim=True).clamp_min(eps)
    out = x.to(acc)
    order = range(U.shape[0]) if transpose else range(U.shape[0] - 1, -1, -1)
    for l in order:
        out = out - 2.0 * (out @ Y[l]).unsqueeze(-1) * Y[l]
    return out.to(x.dtype).contiguous()


def _grads_from_projections(a: Tensor, b: Tensor, dy_main, U: Tensor, transpose: bool, eps: float,
                            grad_s: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(dx_extra, dU)`` from the projections ``a = x Yᵀ``, ``b = g Yᵀ`` ([N, L], acc dtype): the derived
    formulas of the module docstring. The two [L, D] products over the tokens, ``Mᵀ aᵀ g + M bᵀ x − gsᵀ x``,
    are one reduction ``αᵀ g + βᵀ x`` with ``α = a M``, ``β = b Mᵀ − gs``; ``dy_main(α, β)`` computes it (torch
    GEMMs in the reference, the fused ``householder_grad_y`` kernel in the device backward). ``dx_extra`` is the
    contribution of ``grad_s`` (the gradient of the op's projection output ``s = a``) to dx, or None."""
    acc = a.dtype
    L = U.shape[0]
    Uf = U.to(acc)
    n = Uf.norm(dim=1, keepdim=True)
    nc = n.clamp_min(eps)
    Y = Uf / nc
    S = torch.triu(Y @ Y.T, diagonal=1) + 0.5 * torch.eye(L, dtype=acc, device=U.device)
    T = torch.linalg.solve_triangular(S, torch.eye(L, dtype=acc, device=U.device), upper=True)
    M = T if transpose else T.T
    dM = -(a.T @ b)
    alpha, beta = a @ M, b @ M.T
    dx_extra = None
    if grad_s is not None:
        gs = grad_s.to(acc)
        beta = beta - gs
        dx_extra = gs @ Y
    dY = -dy_main(alpha, beta)
    dT = dM if transpose else dM.T
    dS = -(T.T @ dT @ T.T)
    dG = torch.triu(dS, diagonal=1)
    dY = dY + (dG + dG.T) @ Y
    du = torch.where(n < eps, dY, dY - (dY * Y).sum(1, keepdim=True) * Y) / nc
    return dx_extra, du.to(U.dtype)


def householder_apply_backward_reference(grad: Tensor, x: Tensor, U: Tensor, *, transpose: bool = False,
                                         eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor]:
    """``(dx, dU)`` of :func:`householder_apply` by the derived formulas (module docstring), fp32 (fp64) math;
    ``dx`` in ``x``'s dtype, ``dU`` in ``U``'s. The tests check it against autograd of the sequential
    reference; the device backward follows it (dx and ``b`` by the fused kernel, the rest thin GEMMs)."""
    check_args(_OP, x, U, eps)
    return _reference_backward(grad, x, U, transpose, eps, None)


def _reference_backward(grad: Tensor, x: Tensor, U: Tensor, transpose: bool, eps: float,
                        grad_s: Tensor | None) -> tuple[Tensor, Tensor]:
    """The op's backward in torch ops (CPU kernel, tracing, double backward), including the gradient of
    its projection output ``s``."""
    acc = acc_dtype(x.dtype)
    D, L = x.shape[-1], U.shape[0]
    if L == 0:
        return grad.to(x.dtype).contiguous(), torch.zeros_like(U)
    Y, T = householder_wy(U, eps)
    M = T if transpose else T.T
    g2, x2 = grad.reshape(-1, D).to(acc), x.reshape(-1, D).to(acc)
    a, b = x2 @ Y.T, g2 @ Y.T
    dx = g2 - (b @ M.T) @ Y
    dx_extra, dU = _grads_from_projections(a, b, lambda al, be: al.T @ g2 + be.T @ x2, U, transpose, eps, grad_s)
    if dx_extra is not None:
        dx = dx + dx_extra
    return dx.to(x.dtype).reshape(x.shape).contiguous(), dU


# ---------------------------------------------------------------- public ops


def householder_apply(x: Tensor, U: Tensor, *, transpose: bool = False, eps: float = DEFAULT_EPS) -> Tensor:
    """Apply the Householder chain ``H = H_1 … H_L`` to every token: ``x ↦ x Hᵀ`` (``transpose=True``: ``x H``).

    Args:
        x: ``[..., D]`` tokens (fp16, bf16, fp32 or fp64).
        U: ``[L, D]`` reflection vectors (unnormalised; PEFT HRA's ``hra_u.T``), x's dtype (under
            ``torch.autocast``: cast to x's dtype). ``L = 0`` is the identity.
        transpose: apply ``Hᵀ = H⁻¹`` instead.
        eps: norms are clamped at ``eps`` (module docstring: a zero vector is the identity).
    Returns:
        ``[..., D]`` contiguous, x's dtype; fp32 math (fp64 for fp64), rounded once.
    Differentiable in ``x`` and ``U`` (reverse mode; double backward through the reference formulas).
    Order: ``H x_t = H_1(H_2(…H_L x_t))`` (module docstring).
    Paths: CUDA with ``1 <= L <= 64``: the fused kernels (csrc/kernels/householder.cuh: Gram + WY prologue,
    then one pass over x); the backward runs the kernel once more for ``dx`` and ``b = g Yᵀ`` and gets ``dU``
    from the fused ``householder_grad_y`` reduction (x and g read once more in their own dtype, no copies).
    CUDA with ``L > 64``: blocked — the chain split into ``ceil(L / 64)`` consecutive blocks of ≤ 64
    reflections, each applied by the fused kernel (forward and backward; autograd saves each block's input,
    ``ceil(L/64)·N·D`` elements); x's dtype is rounded once per block (:func:`householder_apply_blocked`).
    CPU: the reference composition (torch autograd).
    """
    if isinstance(x, Tensor):
        (U,) = autocast_like(x.device.type, x, U)
    check_args(_OP, x, U, eps)
    with autocast_off(x.device.type):  # fp32 math inside an autocast region too (README "Autocast")
        return _householder_apply(x, U, transpose, eps)


def _householder_apply(x: Tensor, U: Tensor, transpose: bool, eps: float) -> Tensor:
    if x.device.type != "cuda" or not _HAS_OP or U.shape[0] == 0:
        return householder_apply_reference(x, U, transpose=transpose, eps=eps)
    if U.shape[0] > MAX_L:
        return householder_apply_blocked(x, U, bool(transpose), float(eps),
                                         lambda xb, Ub, t, e: householder_apply(xb, Ub, transpose=t, eps=e))
    if not is_eager("cuda"):
        return torch.ops.mokernels.householder_apply(x, U, bool(transpose), float(eps), False)[0]
    return fused_apply(torch.ops.mokernels, x, U, bool(transpose), float(eps))


def fused_apply(ops, x: Tensor, U: Tensor, transpose: bool, eps: float) -> Tensor:
    """The eager fused path of the op namespace ``ops`` (``torch.ops.mokernels`` on CUDA,
    ``torch.ops.mokernels_emu`` in the tests), differentiable through :class:`_HouseholderFn` (1 <= L <= 64)."""
    if grad_or_tangent(x, U):
        return _HouseholderFn.apply(x, U, transpose, eps, ops)[0]
    return ops.householder_apply(x, U, transpose, eps, False)[0]


def householder_apply_blocked(x: Tensor, U: Tensor, transpose: bool, eps: float, apply_block) -> Tensor:
    """A chain of any length as ``nb = ceil(L / 64)`` chains of ≤ 64 reflections (balanced sizes) applied in
    sequence by ``apply_block(x, U_block, transpose, eps)`` (the fused kernel): ``H = H_A H_B …`` with ``A`` the
    first rows of ``U``, so ``x Hᵀ`` applies the last block first and ``x H`` the first block first; the
    backward is autograd's reverse of that sequence (each block's fused backward).

    Why blocks and not the two thin GEMMs ``x − ((x Yᵀ) K) Y`` for ``L > 64``: per block the fused kernel moves
    ``2·N·D·elt`` bytes (x in, out out), so blocked costs ``2·nb·N·D·elt``; the GEMM pair reads x twice and
    writes once (``3·N·D·elt``) *if* both GEMMs could take x's dtype with fp32 math — but the second one
    multiplies fp32 ``t = (x Yᵀ) K`` with the 16-bit ``U`` (cuBLAS has no mixed bf16 × fp32 GEMM): either ``t`` is
    rounded to 16 bits (an error of the size of the output rounding in the correction term) or x is copied to
    fp32 (``+N·D·(elt + 4)`` in and ``+2·N·D·4`` for the GEMMs: ≥ 7·N·D·elt at bf16). For 65 ≤ L ≤ 128
    (``nb = 2``, ``4·N·D·elt``) blocked is within 1.33× of the ideal GEMM pair and cheaper than the fp32-exact
    one; it also reuses the tested, emulated kernel (forward and backward) and keeps fp32 math per block. The
    price: x's dtype is rounded once per block (``nb`` roundings instead of one; exact for fp32/fp64 up to the
    usual fp32 error)."""
    L = U.shape[0]
    nb = -(-L // MAX_L)
    size = -(-L // nb)
    blocks = [U[i:i + size] for i in range(0, L, size)]
    out = x
    for Ub in (blocks if transpose else reversed(blocks)):
        out = apply_block(out, Ub, transpose, eps)
    return out


def merge_householder(W: Tensor, U: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    """``W' = W H`` for a weight ``W [d_out, D]`` (so ``W' x = W (H x)``: the chain merged into the layer it
    feeds; PEFT HRA's merge). Returns W's dtype (fp32 math). For MoORE's ``V' = Hᵀ V`` (``V [D, R]``) use
    ``merge_householder(V.T, U).T``."""
    check_args("merge_householder", W, U, eps, x_name="W")
    expect(W.dim() == 2, "merge_householder", f"W must be [d_out, D], got {list(W.shape)}")
    return householder_apply(W, U, transpose=True, eps=eps)


def unmerge_householder(W: Tensor, U: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    """Inverse of :func:`merge_householder`: ``W = W' Hᵀ`` (H is orthogonal)."""
    check_args("unmerge_householder", W, U, eps, x_name="W")
    expect(W.dim() == 2, "unmerge_householder", f"W must be [d_out, D], got {list(W.shape)}")
    return householder_apply(W, U, transpose=False, eps=eps)


# ---------------------------------------------------------------- MoORE rank-one experts

_OP_R1 = "rank_one_experts"


def _check_experts(x, U, sigma, V, gx, Q, p_task, H_vectors, eps):
    op = _OP_R1
    expect(isinstance(x, Tensor) and x.dim() >= 1, op, "x must be a [..., d_in] tensor")
    expect_dtype(op, "x", x)
    d_in = x.shape[-1]
    expect(isinstance(V, Tensor) and V.dim() == 2 and V.shape[0] == d_in, op,
           f"V must be [d_in, R] = [{d_in}, R], got {list(V.shape) if isinstance(V, Tensor) else type(V)}")
    R = V.shape[1]
    expect(isinstance(U, Tensor) and U.dim() == 2 and U.shape[1] == R, op,
           f"U must be [d_out, R] = [d_out, {R}], got {list(U.shape) if isinstance(U, Tensor) else type(U)}")
    expect(isinstance(sigma, Tensor) and sigma.dim() == 1 and sigma.shape[0] == R, op,
           f"sigma must be [R] = [{R}], got {list(sigma.shape) if isinstance(sigma, Tensor) else type(sigma)}")
    for name, t in (("U", U), ("sigma", sigma), ("V", V)):
        expect_dtype(op, name, t, like=x)
    expect((gx is None) == (Q is None), op, "gx and Q must both be given or both be None")
    if gx is not None:
        expect(isinstance(gx, Tensor) and isinstance(Q, Tensor), op, "gx and Q must be tensors")
        expect(gx.shape[:-1] == x.shape[:-1] and gx.dim() == x.dim(), op,
               f"gx must be [..., d_s] with x's leading shape {list(x.shape[:-1])}, got {list(gx.shape)}")
        expect(Q.dim() == 2 and Q.shape == (gx.shape[-1], R), op,
               f"Q must be [d_s, R] = [{gx.shape[-1]}, {R}], got {list(Q.shape)}")
        expect_dtype(op, "gx", gx, like=x)
        expect_dtype(op, "Q", Q, like=x)
    if p_task is not None:
        expect(isinstance(p_task, Tensor), op, "p_task must be a tensor or None")
        ok = p_task.dim() >= 1 and p_task.shape[-1] == R and (
            p_task.dim() == 1 or (p_task.dim() == x.dim() and p_task.shape[:-1] == x.shape[:-1]))
        expect(ok, op, f"p_task must be [R] = [{R}] (one task for all tokens) or [..., R] with x's leading shape "
                       f"{list(x.shape[:-1])}, got {list(p_task.shape)}")
        expect_dtype(op, "p_task", p_task, like=x)
    if H_vectors is not None:
        check_args(op, x, H_vectors, eps, u_name="H_vectors")
    expect_same_device(op, "x", x, U=U, sigma=sigma, V=V, gx=gx, Q=Q, p_task=p_task, H_vectors=H_vectors)


def rank_one_experts_reference(x: Tensor, U: Tensor, sigma: Tensor, V: Tensor, gx: Tensor | None, Q: Tensor | None,
                               p_task: Tensor | None, H_vectors: Tensor | None = None, *, clip: bool = False,
                               eps: float = DEFAULT_EPS) -> Tensor:
    """Pure-torch specification of :func:`rank_one_experts`, fp32 math (fp64 for fp64), one rounding at the
    end (the Householder step, when present, is rounded to x's dtype first, as the op's first stage)."""
    _check_experts(x, U, sigma, V, gx, Q, p_task, H_vectors, eps)
    acc = acc_dtype(x.dtype)
    xh = x if H_vectors is None else householder_apply_reference(x, H_vectors, eps=eps)
    z = xh.to(acc) @ V.to(acc)  # [..., R]
    g = sigma.to(acc)
    if p_task is not None:
        g = g + p_task.to(acc)
    if gx is not None:
        g = g + gx.to(acc) @ Q.to(acc)
    if clip:
        g = torch.relu(g)
    return ((z * g) @ U.to(acc).T).to(x.dtype).contiguous()


def rank_one_experts(x: Tensor, U: Tensor, sigma: Tensor, V: Tensor, gx: Tensor | None, Q: Tensor | None,
                     p_task: Tensor | None, H_vectors: Tensor | None = None, *, clip: bool = False,
                     eps: float = DEFAULT_EPS) -> Tensor:
    """MoORE's rank-one expert layer: ``y = ((x' V) ⊙ (σ + g)) Uᵀ``, ``g = p_task + gx Q``, ``x' = x Hᵀ``.

    Each token scales expert i (the SVD piece ``u_i σ_i v_iᵀ`` of ``W = U diag(σ) Vᵀ``) by ``σ_i + g_i(x)``.
    Args:
        x: ``[..., d_in]`` tokens (fp16, bf16, fp32, fp64).
        U: ``[d_out, R]`` left singular vectors; sigma: ``[R]``; V: ``[d_in, R]`` right singular vectors
            (``R = min(d_in, d_out)`` for a thin SVD; any R works).
        gx: ``[..., d_s]`` input-router codes ``Γx`` (d_s = 64 in MoORE) and Q: ``[d_s, R]``; both None: no term.
        p_task: ``[R]`` task gate ``Pᵀ e_task`` (one task for every token) or ``[..., R]`` per token; None: 0.
        H_vectors: ``[L, d_in]`` Householder vectors (:func:`householder_apply`); None: no transform (also the
            inference path with H merged: ``V' = Hᵀ V = merge_householder(V.T, H_vectors).T``).
        clip: use ``relu(σ + g)`` (MoORE's official code) instead of ``σ + g``.
    All tensors share x's dtype (``U``, ``V``, ``sigma`` frozen buffers are usually cast once by the module).
    Returns ``[..., d_out]`` in x's dtype. Differentiable in every tensor input.

    Status — CUDA fp16/bf16: two GEMMs (:mod:`mokernels.ops.moore`): a tensor-core kernel computes
    ``S = (x'V) ⊙ (σ + g)`` with ``g = p_task + gx Q`` formed in its epilogue (never materialised as ``[T, R]``),
    then ``y = S Uᵀ`` (cuBLAS); the backward recomputes ``x'V`` and ``gx Q`` in a second fused kernel (dz, dg, dσ)
    around cuBLAS GEMMs. ``S`` is rounded to x's dtype (the error of the same-dtype torch composition).
    The kernels are compiled (sm_80/sm_90a) and run through the CPU emulator in the tests; they have NOT yet run
    on a GPU. The Householder step runs the fused chain kernel on CUDA before them. fp32/fp64 and CPU: the
    reference (fp32 math, one rounding). An extension built without the ``experts_gate_gemm`` op: the older
    composition (``rank_one_scale`` between cuBLAS GEMMs, the gate materialised).
    """
    if isinstance(x, Tensor):
        U, sigma, V, gx, Q, p_task, H_vectors = autocast_like(x.device.type, x, U, sigma, V, gx, Q, p_task, H_vectors)
    _check_experts(x, U, sigma, V, gx, Q, p_task, H_vectors, eps)
    with autocast_off(x.device.type):  # fp32 math inside an autocast region too (README "Autocast")
        return _rank_one_experts(x, U, sigma, V, gx, Q, p_task, H_vectors, clip, eps)


def _rank_one_experts(x, U, sigma, V, gx, Q, p_task, H_vectors, clip, eps):
    xh = x if H_vectors is None else householder_apply(x, H_vectors, eps=eps)
    if x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16):
        from . import moore

        if moore.HAS_OP:
            return moore.experts_fused(torch.ops.mokernels, xh, U, sigma, V, gx, Q, p_task, clip)
        return _experts_composed(xh, U, sigma, V, gx, Q, p_task, clip)
    return rank_one_experts_reference(xh, U, sigma, V, gx, Q, p_task, None, clip=clip, eps=eps)


def _experts_composed(x, U, sigma, V, gx, Q, p_task, clip):
    """The unfused fp16/bf16 composition (benchmark peer; CUDA path of an extension without the fused op):
    ``rank_one_scale(x V, σ, p + gx Q) Uᵀ`` with GEMMs in x's dtype."""
    from .rank_one import rank_one_scale

    z = x @ V
    if gx is not None:
        g = gx @ Q if p_task is None else torch.add(gx @ Q, p_task)
    elif p_task is not None:
        g = p_task.expand(z.shape)
    else:
        g = torch.zeros_like(z)
    if clip:
        return (z * torch.relu(sigma + g)) @ U.T
    return rank_one_scale(z, sigma, g.contiguous()) @ U.T


def hra_vectors(hra_u: Tensor) -> Tensor:
    """PEFT HRA's ``hra_u [D, r]`` (one vector per column) as this module's ``U [r, D]``."""
    expect(isinstance(hra_u, Tensor) and hra_u.dim() == 2, "hra_vectors", "hra_u must be [D, r]")
    return hra_u.T.contiguous()


# ---------------------------------------------------------------- the torch.ops.mokernels op
# `householder_apply(x, U, transpose, eps, return_s) -> (out, s)` and its backward's `householder_grad_y(alpha, beta,
# g, x) -> Z`: CUDA = the fused kernels (csrc/householder.cu), CPU = the reference. Registered only when the loaded
# extension defines both schemas (a checkout running an older prebuilt _C keeps working on the reference path).


def _op_defined(ns: str) -> bool:
    try:
        for name in ("householder_apply", "householder_grad_y"):
            getattr(getattr(torch.ops, ns), name)
        return True
    except (AttributeError, RuntimeError):
        return False


_HAS_OP = _op_defined("mokernels")


def _fake_outputs(x, U, return_s):
    N = x.numel() // x.shape[-1] if x.shape[-1] else 0
    L = U.shape[0]
    s = x.new_empty((N, L) if return_s else (0, 0), dtype=acc_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), s


def _cpu_op(x, U, transpose, eps, return_s):
    check_args(_OP, x, U, eps)
    with torch.no_grad(), autocast_off("cpu"):
        out = householder_apply_reference(x, U, transpose=transpose, eps=eps)
        _, s = _fake_outputs(x, U, return_s)
        if return_s and U.shape[0]:
            Y, _ = householder_wy(U, eps)
            s = x.reshape(-1, x.shape[-1]).to(Y.dtype) @ Y.T
        return out, s


def kernel_backward(ops, grad: Tensor, x: Tensor, U: Tensor, transpose: bool, eps: float, a: Tensor | None = None,
                    grad_s: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(dx, dU)`` through the fused kernels of the op namespace ``ops`` (``torch.ops.mokernels`` on CUDA,
    ``torch.ops.mokernels_emu`` in the tests): ``dx`` and ``b = g Yᵀ`` in one kernel pass (the op with the
    other orientation), ``a = x Yᵀ`` saved by the forward (recomputed by a kernel pass when None), then the
    fused dU reduction ``householder_grad_y`` (``αᵀ g + βᵀ x`` from x and g in their own dtype: partials per
    block and a fixed-order reduce, deterministic) and [L, L] / [L, D] torch glue
    (:func:`_grads_from_projections`). Byte counts: csrc/kernels/householder.cuh."""
    D = x.shape[-1]
    g2 = grad.reshape(-1, D).contiguous()
    dx, b = ops.householder_apply(g2, U, not transpose, eps, True)
    x2 = x.reshape(-1, D).contiguous()
    if a is None:
        _, a = ops.householder_apply(x2, U, transpose, eps, True)
    dx_extra, dU = _grads_from_projections(a, b, lambda al, be: ops.householder_grad_y(al, be, g2, x2), U,
                                           transpose, eps, grad_s)
    if dx_extra is not None:
        dx = (dx.to(dx_extra.dtype) + dx_extra).to(x.dtype)
    return dx.reshape(x.shape), dU


def _grad_y_reference(alpha: Tensor, beta: Tensor, g: Tensor, x: Tensor) -> Tensor:
    """``householder_grad_y``'s specification (its CPU kernel): ``αᵀ g + βᵀ x`` in α's (fp32 / fp64) dtype."""
    with autocast_off(alpha.device.type):
        return alpha.T @ g.to(alpha.dtype) + beta.T @ x.to(alpha.dtype)


if _HAS_OP:
    torch.library.register_fake("mokernels::householder_apply")(
        lambda x, U, transpose, eps, return_s: (check_args(_OP, x, U, eps), _fake_outputs(x, U, return_s))[1])
    torch.library.register_kernel("mokernels::householder_apply", "cpu")(_cpu_op)
    torch.library.register_fake("mokernels::householder_grad_y")(
        lambda alpha, beta, g, x: alpha.new_empty((alpha.shape[1], x.shape[1])))
    torch.library.register_kernel("mokernels::householder_grad_y", "cpu")(_grad_y_reference)

    def _setup_context(ctx, inputs, output):
        x, U, transpose, eps, return_s = inputs
        ctx.transpose, ctx.eps, ctx.return_s = transpose, eps, return_s
        ctx.save_for_backward(x, U, output[1] if return_s else None)

    def _backward(ctx, grad_out, grad_s):
        x, U, a = ctx.saved_tensors
        grad_s = grad_s if ctx.return_s else None
        if grad_out is None:
            grad_out = torch.zeros_like(x)
        if x.device.type == "cpu" or torch.is_grad_enabled():  # the differentiable torch formulas
            dx, dU = _reference_backward(grad_out, x, U, ctx.transpose, ctx.eps, grad_s)
        else:
            dx, dU = kernel_backward(torch.ops.mokernels, grad_out, x, U, ctx.transpose, ctx.eps, a, grad_s)
        return dx, dU, None, None, None

    torch.library.register_autograd("mokernels::householder_apply", _backward, setup_context=_setup_context)


class _HouseholderFn(torch.autograd.Function):
    """Eager fused path with autograd (op namespace ``ops``): the forward saves ``a = x Yᵀ`` ([N, L] fp32)."""

    @staticmethod
    def forward(x, U, transpose, eps, ops):
        return ops.householder_apply(x, U, transpose, eps, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, U, transpose, eps, ops = inputs
        ctx.transpose, ctx.eps, ctx.ops = transpose, eps, ops
        ctx.save_for_backward(x, U, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad, _grad_s):
        x, U, a = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiable reference formulas
            dx, dU = householder_apply_backward_reference(grad, x, U, transpose=ctx.transpose, eps=ctx.eps)
        else:
            dx, dU = kernel_backward(ctx.ops, grad, x, U, ctx.transpose, ctx.eps, a)
        return dx, dU, None, None, None
