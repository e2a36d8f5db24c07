"""SLoRA (METHODS.md, paper 000): multitask MoE-LoRA with general + routed task experts, cross-expert
attention and a constraint-solution-space initialisation.

For a token ``x`` (``E = G + N`` experts, each ``A_i [r, d_in]``, ``B_i [d_out, r]``)::

    p        = top_p(softmax(W_r x / τ))            # task router on x (family 2), renorm "sum"
    active   = {G general experts, weight 1} ∪ {selected task experts, weight p_i}
    h_i      = A_i dropout(x)                         (i active)
    a_ij     = softmax_j∈active(h_i · h_j / sqrt(r))  # cross-expert attention, one head, Q = K = V = h
    y        = W x + b + (α/r) Σ_i∈active  w_i B_i (Σ_j a_ij h_j)

Composed from the ops: :func:`~mokernels.ops.route` (top-p), :func:`~mokernels.ops.lora.lora_shrink`
(codes of the active experts, ``[T, k, r]``) and :func:`~mokernels.ops.lora.lora_expand` (the weighted
expand-add into the base output; the attention sits between them, so no fused kernel covers it yet).
With ``cross_attention=False`` it is a plain routed MoE-LoRA through the fused
:func:`~mokernels.ops.lora.lora_apply` (mixture form).

Init (constraint solution space): the rows of all ``E`` experts' ``A`` are orthonormal, orthogonal to the
top-``init_k`` right singular vectors of ``W`` and to each other (a QR of a Gaussian projected off
those directions); ``B = 0``, so a fresh wrap equals the base layer. Needs ``E·r + init_k <= d_in``;
otherwise :meth:`check_linear` raises naming the numbers. MiniLM (d_in = 384) with the defaults:
5·16 + 64 = 144 <= 384.

Router: ``W_r [N, d_in]`` (no bias), initialised N(0, (router_init_std / sqrt(d_in))²).
Optional orthogonality penalty ``ortho_lambda · Σ_{i≠j} ‖A_i A_jᵀ‖²_F`` in :meth:`extra_losses`.
:meth:`stats` reports the mean number of active experts (general + task) since the last
:meth:`reset_stats`. SLoRA routes per token on x: it cannot merge, and needs no routing context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.lora import MAX_RANK, lora_apply, lora_expand, lora_shrink
from ..ops.router import route
from .base import AdapterLayer, MethodConfig, register_method

__all__ = ["SLoRAConfig", "SLoRALinear", "constraint_init"]


@dataclass
class SLoRAConfig(MethodConfig):
    """SLoRA hyperparameters (METHODS.md defaults).

    r: rank of every expert (16). num_general: G always-on experts (1). num_task: N routed task experts
    (4). top_p: router mass threshold (0.6). alpha: scale α/r (32). dropout on the adapter input (0.0).
    init_k: number of top right singular directions of W the experts' A avoid (64; the paper gives no
    value; MiniLM's d_in = 384 fits 5·16 + 64). cross_attention: on (True). router_temperature: τ (1.0).
    router_init_std: router weights ~ N(0, (router_init_std / sqrt(d_in))²) (2.0: on the
    MiniLM this activates ≈1.9 task experts per token at init, the paper's figure). ortho_lambda: weight of
    the optional orthogonality penalty (0 = off).
    """

    r: int = 16
    num_general: int = 1
    num_task: int = 4
    top_p: float = 0.6
    alpha: float = 32.0
    dropout: float = 0.0
    init_k: int = 64
    cross_attention: bool = True
    router_temperature: float = 1.0
    router_init_std: float = 2.0
    ortho_lambda: float = 0.0


def constraint_init(W: Tensor, num: int, r: int, k: int, generator=None) -> Tensor:
    """``[num, r, d_in]`` with all ``num·r`` rows orthonormal and orthogonal to the top-``k`` right singular
    vectors of ``W [d_out, d_in]`` (computed in fp64)."""
    d_in = W.shape[1]
    Wd = W.detach().to(torch.float64)
    if k > 0:  # span of the top-k right singular vectors, from the smaller Gram matrix (eigh: far cheaper than an SVD)
        if W.shape[0] >= d_in:
            _, vecs = torch.linalg.eigh(Wd.T @ Wd)  # ascending eigenvalues; columns = right singular vectors
            V = vecs[:, -k:].T.contiguous()  # [k, d_in]
        else:  # d_out < d_in: left singular vectors U_k from W Wᵀ; span(V_k) = span(Wᵀ U_k)
            _, vecs = torch.linalg.eigh(Wd @ Wd.T)
            V = torch.linalg.qr(Wd.T @ vecs[:, -k:]).Q.T.contiguous()
    else:
        V = Wd.new_zeros(0, d_in)
    M = torch.randn(num * r, d_in, dtype=torch.float64, device=W.device, generator=generator)
    for _ in range(2):  # project off span(V) twice (re-orthogonalisation)
        M = M - (M @ V.T) @ V
    Q, _ = torch.linalg.qr(M.T)  # [d_in, num·r], orthonormal columns in the complement of span(V)
    Q = Q - V.T @ (V @ Q)
    Q, _ = torch.linalg.qr(Q)
    return Q.T.reshape(num, r, d_in).to(W.dtype)


@register_method("slora")
class SLoRALinear(AdapterLayer):
    Config = SLoRAConfig
    can_merge = False

    def __init__(self, linear: nn.Linear, cfg: SLoRAConfig, **kw):
        super().__init__(linear, cfg, **kw)
        w = linear.weight
        E = cfg.num_general + cfg.num_task
        self.num_experts = E
        self.scaling = cfg.alpha / cfg.r
        self.lora_A = nn.Parameter(constraint_init(w, E, cfg.r, cfg.init_k))
        self.lora_B = nn.Parameter(torch.zeros(E, self.out_features, cfg.r, dtype=w.dtype, device=w.device))
        self.router = nn.Parameter(torch.randn(cfg.num_task, self.in_features, dtype=w.dtype, device=w.device)
                                   * (cfg.router_init_std / math.sqrt(self.in_features)))
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.register_buffer("general_ids", torch.arange(cfg.num_general, dtype=torch.int32, device=w.device),
                             persistent=False)
        self.register_buffer("active_stats", torch.zeros(2, dtype=torch.float64, device=w.device), persistent=False)

    @classmethod
    def check_linear(cls, linear: nn.Linear, cfg: SLoRAConfig, name: str) -> None:
        E = cfg.num_general + cfg.num_task
        if not (1 <= cfg.r <= MAX_RANK) or cfg.num_general < 0 or cfg.num_task < 1 or not 0 <= cfg.dropout < 1:
            raise ValueError(f"slora: need 1 <= r <= {MAX_RANK}, num_general >= 0, num_task >= 1, 0 <= dropout < 1; got "
                             f"r={cfg.r}, num_general={cfg.num_general}, num_task={cfg.num_task}, dropout={cfg.dropout}")
        d_in = linear.in_features
        if cfg.init_k < 0 or cfg.init_k > min(d_in, linear.out_features):
            raise ValueError(f"slora: layer {name!r}: init_k = {cfg.init_k} must be in [0, min(d_in, d_out)] = "
                             f"[0, {min(d_in, linear.out_features)}]")
        if E * cfg.r + cfg.init_k > d_in:
            raise ValueError(f"slora: layer {name!r}: the constraint-space init needs (G+N)·r + k <= d_in, got "
                             f"({cfg.num_general}+{cfg.num_task})·{cfg.r} + {cfg.init_k} = {E * cfg.r + cfg.init_k} > "
                             f"{d_in}; lower r, the expert counts or init_k")

    # -- forward -----------------------------------------------------------------------------------

    def _routing(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``ids [..., G + N]`` (general experts first, then the selected task experts + G, -1 pads),
        ``weights`` (1 for general experts) and the router's counts ``[...]``."""
        cfg = self.cfg
        G = cfg.num_general
        logits = F.linear(x, self.router.to(x.dtype))
        rt = route(logits, temperature=cfg.router_temperature, top_p=cfg.top_p, validate=False)
        tids = torch.where(rt.ids >= 0, rt.ids + G, rt.ids)
        lead = x.shape[:-1]
        gids = self.general_ids.expand(*lead, G)
        ids = torch.cat([gids, tids], -1)
        w = torch.cat([torch.ones(*lead, G, dtype=rt.weights.dtype, device=x.device), rt.weights], -1)
        return ids, w, rt.counts

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_forward(x)
        ids, w, counts = self._routing(x)
        with torch.no_grad():
            self.active_stats[0] += counts.sum().to(torch.float64)
            self.active_stats[1] += counts.numel()
        act = base.dtype
        if not self.cfg.cross_attention:  # a plain routed mixture: the fused multi-adapter kernel
            return lora_apply(self.lora_dropout(x).to(act), self.lora_A.to(act), self.lora_B.to(act), self.scaling,
                              mixture=(ids, w), base_out=base, validate=False)
        h = lora_shrink(self.lora_dropout(x).to(act), self.lora_A.to(act), mixture=(ids, w), validate=False)
        if self.cfg.cross_attention:  # [..., k, r]: the active codes attend to each other
            mask = (ids >= 0)[..., None, :]
            scores = (h @ h.transpose(-1, -2)) * (1.0 / math.sqrt(self.cfg.r))
            att = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            h = att @ h
        return lora_expand(h, self.lora_B.to(act), self.scaling, mixture=(ids, w), base_out=base, validate=False)

    # -- extras ------------------------------------------------------------------------------------

    def extra_losses(self) -> dict[str, Tensor]:
        if not self.cfg.ortho_lambda:
            return {}
        E, r, d = self.lora_A.shape
        A = self.lora_A.reshape(E * r, d)
        gram = (A @ A.T).reshape(E, r, E, r).square().sum(dim=(1, 3))  # [E, E]: ‖A_i A_jᵀ‖²
        off = gram.sum() - gram.diagonal().sum()
        return {"slora_ortho": self.cfg.ortho_lambda * off}

    def stats(self) -> dict:
        s, n = self.active_stats.tolist()
        task = s / n if n else float("nan")
        return {"mean_active_experts": self.cfg.num_general + task, "mean_active_task_experts": task, "tokens": int(n)}

    def reset_stats(self) -> None:
        self.active_stats.zero_()

    def _apply(self, fn, recurse=True):
        """``model.half()`` / ``.to(dtype)`` convert every floating buffer: keep the token counters in fp64
        (in fp16 they stop counting at 2048 tokens and overflow past 65504)."""
        before = self._buffers.get("active_stats")
        out = super()._apply(fn, recurse)
        st = self._buffers.get("active_stats")
        if st is not None and before is not None and st.dtype != torch.float64:
            self._buffers["active_stats"] = before.to(st.device)
        return out

    def extra_repr(self) -> str:
        c = self.cfg
        return (super().extra_repr() + f", r={c.r}, general={c.num_general}, task={c.num_task}, top_p={c.top_p}, "
                f"alpha={c.alpha}, cross_attention={c.cross_attention}")
