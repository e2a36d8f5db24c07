"""HouseholderChain (an orthogonal input transform, PEFT-HRA compatible) and RankOneExperts (MoORE's
rank-one expert layer over a thin SVD), thin modules over :mod:`mokernels.ops.householder`."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.householder import (DEFAULT_EPS, householder_apply, householder_matrix, merge_householder,
                               rank_one_experts, unmerge_householder)


class HouseholderChain(nn.Module):
    """``x ↦ x Hᵀ`` with ``H = H_1 … H_L``, ``H_l = I − 2 u_l u_lᵀ/‖u_l‖²`` (PEFT HRA's convention, see
    :mod:`mokernels.ops.householder`). Parameter ``U [L, dim]`` (PEFT's ``hra_u`` transposed).

    Args:
        dim: D. L: number of reflections (``L = 0``: identity).
        init: ``"identity"``: pairs of equal vectors ``u_{2i-1} = u_{2i}`` (each pair cancels, so a fresh
            chain is the identity; PEFT HRA's symmetric init) — L must be even; ``"random"``: independent
            Kaiming-uniform vectors (a random orthogonal H).
        eps: norm clamp (a zero vector is the identity, see the op).
    ``forward(x, transpose=False)``: ``x`` ``[..., dim]``; the vectors are used in x's dtype.
    """

    def __init__(self, dim: int, L: int, init: str = "identity", *, eps: float = DEFAULT_EPS, device=None,
                 dtype=None):
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1 and isinstance(L, int) and L >= 0):
            raise ValueError(f"HouseholderChain: need dim >= 1 and L >= 0, got dim={dim!r}, L={L!r}")
        if init not in ("identity", "random"):
            raise ValueError(f"HouseholderChain: init must be 'identity' or 'random', got {init!r}")
        if init == "identity" and L % 2:
            raise ValueError(f"HouseholderChain: identity init pairs equal vectors, so L must be even, got L={L} "
                             "(use an even L or init='random')")
        self.dim, self.L, self.eps = dim, L, float(eps)
        self.U = nn.Parameter(torch.empty(L, dim, device=device, dtype=dtype))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "identity") -> None:
        if self.L == 0:
            return
        if init == "identity":
            if self.L % 2:
                raise ValueError(f"HouseholderChain: identity init needs an even L, got L={self.L}")
            half = torch.empty(self.dim, self.L // 2, device=self.U.device, dtype=self.U.dtype)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))  # PEFT HRA: half_u [D, r/2], repeat_interleave
            self.U.copy_(half.T.repeat_interleave(2, dim=0))
        else:
            tmp = torch.empty(self.dim, self.L, device=self.U.device, dtype=self.U.dtype)
            nn.init.kaiming_uniform_(tmp, a=math.sqrt(5))
            self.U.copy_(tmp.T)

    @classmethod
    def from_hra(cls, hra_u: Tensor, *, eps: float = DEFAULT_EPS) -> "HouseholderChain":
        """A chain holding PEFT HRA's vectors ``hra_u [D, r]`` (``apply_GS=False``): same transform."""
        if not (isinstance(hra_u, Tensor) and hra_u.dim() == 2):
            raise ValueError("HouseholderChain.from_hra: hra_u must be a [D, r] tensor")
        m = cls(hra_u.shape[0], hra_u.shape[1], "random", eps=eps, device=hra_u.device, dtype=hra_u.dtype)
        with torch.no_grad():
            m.U.copy_(hra_u.T)
        return m

    def forward(self, x: Tensor, transpose: bool = False) -> Tensor:
        return householder_apply(x, self.U.to(x.dtype), transpose=transpose, eps=self.eps)

    def matrix(self) -> Tensor:
        """``H`` as a ``[dim, dim]`` fp32 matrix (fp64 for fp64 parameters)."""
        return householder_matrix(self.U, eps=self.eps)

    def merge(self, W: Tensor) -> Tensor:
        """``W H`` for ``W [d_out, dim]`` (the chain folded into the linear layer it feeds)."""
        return merge_householder(W, self.U.to(W.dtype), eps=self.eps)

    def unmerge(self, W: Tensor) -> Tensor:
        """``W Hᵀ`` (inverse of :meth:`merge`)."""
        return unmerge_householder(W, self.U.to(W.dtype), eps=self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, L={self.L}"


class RankOneExperts(nn.Module):
    """MoORE's layer: ``y = U ((σ + g) ⊙ (Vᵀ H x)) + b``, ``g = p_task + Q ᵀ(Γ x)`` (rows: ``gx Q``).

    Built from an ``nn.Linear`` by one thin SVD ``W = U diag(σ) Vᵀ`` (fp32 or fp64, in :meth:`from_linear`):
    buffers ``U [d_out, R]``, ``sigma [R]``, ``V [d_in, R]`` (frozen), ``bias`` (frozen buffer or None).
    **Memory:** the factors hold ``(d_in + d_out)·R + R`` numbers vs ``d_in·d_out`` for W — twice the weight
    for a square layer (``R = d``), 1.37× for 4096→11008; the SVD itself needs a transient fp32 copy of W
    and its workspace (~3× W). Drop the original linear after wrapping.
    Trainable: ``householder`` (:class:`HouseholderChain`, identity init, L even; L = 0: none),
    ``gamma [d_s, d_in]`` (Γ, Kaiming) and ``Q [d_s, R]`` (zeros: a fresh layer equals the base up to the
    SVD's rounding). The task gate ``p_task`` (``[R]`` or ``[..., R]``, MoORE's ``Pᵀ e_task``) is passed to
    :meth:`forward` by the method that owns the task embeddings.
    Inference: :meth:`merge_householder_` folds H into V (``V' = Hᵀ V``); :meth:`unmerge_householder_` undoes it.
    """

    def __init__(self, U: Tensor, sigma: Tensor, V: Tensor, bias: Optional[Tensor] = None, *, num_householder: int = 8,
                 d_s: int = 64, clip: bool = False, eps: float = DEFAULT_EPS):
        super().__init__()
        if not (U.dim() == 2 and V.dim() == 2 and sigma.dim() == 1 and U.shape[1] == V.shape[1] == sigma.shape[0]):
            raise ValueError(f"RankOneExperts: need U [d_out, R], sigma [R], V [d_in, R], got {list(U.shape)}, "
                             f"{list(sigma.shape)}, {list(V.shape)}")
        if not (isinstance(d_s, int) and d_s >= 0):
            raise ValueError(f"RankOneExperts: d_s must be an int >= 0, got {d_s!r}")
        self.out_features, self.rank = U.shape
        self.in_features = V.shape[0]
        self.clip, self.eps = bool(clip), float(eps)
        self.register_buffer("U", U.detach().clone())
        self.register_buffer("sigma", sigma.detach().clone())
        self.register_buffer("V", V.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        kw = dict(device=V.device, dtype=V.dtype)
        self.householder = HouseholderChain(self.in_features, num_householder, "identity", eps=eps, **kw) \
            if num_householder else None
        self.gamma = nn.Parameter(torch.empty(d_s, self.in_features, **kw)) if d_s else None
        self.Q = nn.Parameter(torch.zeros(d_s, self.rank, **kw)) if d_s else None
        if self.gamma is not None:
            nn.init.kaiming_uniform_(self.gamma, a=math.sqrt(5))
        self.householder_merged = False

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, num_householder: int = 8, d_s: int = 64, clip: bool = False,
                    eps: float = DEFAULT_EPS, svd_dtype: torch.dtype = torch.float32) -> "RankOneExperts":
        """Thin SVD of ``linear.weight`` once (in ``svd_dtype``; factors stored in the weight's dtype)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"RankOneExperts.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        W = linear.weight
        Uw, S, Vh = torch.linalg.svd(W.to(svd_dtype), full_matrices=False)
        dt = W.dtype
        return cls(Uw.to(dt), S.to(dt), Vh.T.to(dt), None if linear.bias is None else linear.bias,
                   num_householder=num_householder, d_s=d_s, clip=clip, eps=eps)

    def forward(self, x: Tensor, p_task: Optional[Tensor] = None) -> Tensor:
        if not (isinstance(x, Tensor) and x.dim() >= 1 and x.shape[-1] == self.in_features):
            raise ValueError(f"RankOneExperts: x must be [..., in_features] = [..., {self.in_features}], got "
                             f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        dt = x.dtype
        gx = F.linear(x, self.gamma.to(dt)) if self.gamma is not None else None
        Q = self.Q.to(dt) if self.Q is not None else None
        H = None if (self.householder is None or self.householder_merged) else self.householder.U.to(dt)
        y = rank_one_experts(x, self.U.to(dt), self.sigma.to(dt), self.V.to(dt), gx, Q,
                             None if p_task is None else p_task.to(dt), H, clip=self.clip, eps=self.eps)
        return y if self.bias is None else y + self.bias.to(dt)

    @torch.no_grad()
    def merge_householder_(self) -> "RankOneExperts":
        """``V ← Hᵀ V`` (inference: the chain costs nothing afterwards). No-op without a chain / if merged."""
        if self.householder is not None and not self.householder_merged:
            self.V.copy_(merge_householder(self.V.T, self.householder.U.to(self.V.dtype), eps=self.eps).T)
            self.householder_merged = True
        return self

    @torch.no_grad()
    def unmerge_householder_(self) -> "RankOneExperts":
        """``V ← H V'`` (undoes :meth:`merge_householder_`)."""
        if self.householder is not None and self.householder_merged:
            self.V.copy_(unmerge_householder(self.V.T, self.householder.U.to(self.V.dtype), eps=self.eps).T)
            self.householder_merged = False
        return self

    def get_extra_state(self) -> dict:
        """Whether ``V`` holds ``Hᵀ V`` travels with the buffers in ``state_dict()``: a merged checkpoint loaded
        into a fresh (unmerged) module would otherwise apply H twice, and an unmerged one loaded into a merged
        module not at all (both silently wrong)."""
        return {"householder_merged": bool(self.householder_merged)}

    def set_extra_state(self, state) -> None:
        if not (isinstance(state, dict) and isinstance(state.get("householder_merged"), bool)):
            raise ValueError(f"RankOneExperts: state_dict '_extra_state' must be {{'householder_merged': bool}}, "
                             f"got {state!r}")
        if state["householder_merged"] and self.householder is None:
            raise ValueError("RankOneExperts: the state_dict holds V with a Householder chain merged in, but this "
                             "module has no chain (num_householder=0)")
        self.householder_merged = state["householder_merged"]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"d_s={0 if self.Q is None else self.Q.shape[0]}, clip={self.clip}")
