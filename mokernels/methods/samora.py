"""SAMoRA (METHODS.md "SAMoRA (003)"): semantic-aware mixture of LoRA experts with a shared A.

Per wrapped ``nn.Linear`` (``W [d_out, d_in]``)::

    h      = A x                                  A [r, d_in], shared by the experts
    g_i    = softmax_i(cos(h, k_i) / τ)           keys k [N, r], τ = 0.8 (route_cosine)
    g_task = σ(w_gate · e_task + b)               per-layer task embeddings e [K, d_g]; unseen task (-1):
                                                  the mean of the K task gates
    y      = W x + b_W + (α/r) g_task Σ_i g_i B_i (S ⊙ h)     B [N, d_out, r], S [r]

composed from :func:`mokernels.ops.route_cosine` and :func:`mokernels.ops.lora_shared_apply` (the
diagonal S is folded into the shrink: ``S ⊙ (A x) = (diag(S) A) x``; the task gate into the expert
weights). Init: A = the top-r right singular vectors of W (rows), S = the top-r singular values,
B = 0 (a fresh wrap equals the base layer), keys kaiming-uniform, w_gate = 0 and b = 0 (every task
gate starts at 0.5), task embeddings N(0, 1).

:meth:`SAMoRALinear.extra_losses` returns, already weighted::

    samora_orth  = λ_orth  · (‖A Aᵀ − I‖² + Σ_i ‖B_iᵀ B_i − I‖²)                      λ_orth = 1e-3
    samora_match = λ_match · mean_i KL(P_b,i ‖ P_k,i),  P_b,i = softmax(mean over the rows of B_i)
                   (detached: the target), P_k,i = softmax(k_i)                      λ_match = 1e-2

Routing context: task ids (``mokernels.set_task(model, ids)`` / ``mokernels.routing(model, task_ids=...)``),
one per sequence (``x.shape[0]``) or per token; ``-1`` = unseen task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import lora_shared_apply, route_cosine
from ..ops.lora import MAX_RANK
from .base import AdapterLayer, MethodConfig, register_method


@dataclass
class SAMoRAConfig(MethodConfig):
    """SAMoRA hyperparameters (METHODS.md defaults).

    r: rank of the shared A (<= min(d_in, d_out) and <= 128); num_experts: N experts B_i; alpha: the
    delta is scaled by alpha / r; temperature: τ of the cosine router; num_tasks: K rows of the
    per-layer task-embedding table (task ids in [0, K), -1 = unseen); task_dim: d_g, the task
    embedding size; lambda_orth / lambda_match: weights of the two extra losses; top_k: None = the
    paper's dense softmax over all experts, k = keep the k best experts (renormalised, "sum").
    """

    r: int = 8
    num_experts: int = 3
    alpha: float = 16.0
    temperature: float = 0.8
    num_tasks: int = 8
    task_dim: int = 8
    lambda_orth: float = 1e-3
    lambda_match: float = 1e-2
    top_k: Optional[int] = None


def top_singular(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Top-r singular values ``[r]`` and right singular vectors ``[r, d_in]`` of ``weight`` (fp32 SVD,
    returned in fp32)."""
    _, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return s[:r].clone(), vh[:r].clone()


@register_method("samora")
class SAMoRALinear(AdapterLayer):
    """SAMoRA drop-in for ``nn.Linear`` (see the module docstring). Adapter state: ``lora_A [r, d_in]``,
    ``lora_S [r]``, ``lora_B [N, d_out, r]``, ``keys [N, r]``, ``task_emb [K, d_g]``, ``gate_w [d_g]``,
    ``gate_b [1]``, all trainable."""

    method = "samora"
    Config = SAMoRAConfig
    can_merge = False  # token- and task-dependent mixture: no single delta weight

    @classmethod
    def check_linear(cls, linear: nn.Linear, cfg: SAMoRAConfig, name: str) -> None:
        d_in, d_out = linear.in_features, linear.out_features
        if not (1 <= cfg.r <= min(d_in, d_out, MAX_RANK)):
            raise ValueError(f"samora: layer {name!r} ({d_in} -> {d_out}) needs 1 <= r <= min(d_in, d_out, "
                             f"{MAX_RANK}) (A holds the top-r right singular vectors of W), got r = {cfg.r}")
        for k in ("num_experts", "num_tasks", "task_dim"):
            if getattr(cfg, k) < 1:
                raise ValueError(f"samora: {k} must be >= 1, got {getattr(cfg, k)}")
        if not cfg.temperature > 0:
            raise ValueError(f"samora: temperature must be > 0, got {cfg.temperature}")
        if cfg.top_k is not None and not (1 <= cfg.top_k <= cfg.num_experts):
            raise ValueError(f"samora: top_k must be None or in [1, num_experts = {cfg.num_experts}], got {cfg.top_k}")

    @classmethod
    def routing_limits(cls, cfg: SAMoRAConfig) -> dict:
        return {"task_ids": cfg.num_tasks}

    @classmethod
    def demo_config(cls, num_tasks: int) -> dict:
        return {"num_tasks": num_tasks}

    def __init__(self, linear: nn.Linear, cfg: SAMoRAConfig, *, name: str, state, shared):
        self.check_linear(linear, cfg, name)  # also for direct construction (inject checks in its dry run)
        super().__init__(linear, cfg, name=name, state=state, shared=shared)
        w = linear.weight
        dev, dt = w.device, w.dtype
        s, vh = top_singular(w, cfg.r)
        self.lora_A = nn.Parameter(vh.to(dt))
        self.lora_S = nn.Parameter(s.to(dt))
        self.lora_B = nn.Parameter(torch.zeros(cfg.num_experts, self.out_features, cfg.r, device=dev, dtype=dt))
        keys = torch.empty(cfg.num_experts, cfg.r, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(keys, a=math.sqrt(5))
        self.keys = nn.Parameter(keys.to(dt))
        self.task_emb = nn.Parameter(torch.randn(cfg.num_tasks, cfg.task_dim, device=dev).to(dt))
        self.gate_w = nn.Parameter(torch.zeros(cfg.task_dim, device=dev, dtype=dt))
        self.gate_b = nn.Parameter(torch.zeros(1, device=dev, dtype=dt))
        self.scaling = cfg.alpha / cfg.r

    def task_gates(self) -> Tensor:
        """``[K + 1]``: σ(w_gate · e_k + b) for every task k, then their mean (the unseen-task gate), so
        that indexing with a task id of -1 picks the mean."""
        g = torch.sigmoid(self.task_emb @ self.gate_w + self.gate_b)
        return torch.cat([g, g.mean(0, keepdim=True)])

    def forward(self, x: Tensor) -> Tensor:
        y0 = self.base_forward(x)
        act = y0.dtype  # the activation dtype (autocast's, if on); .to is a no-op otherwise
        xa = x.to(act)
        T = y0.numel() // self.out_features
        tid = self.routing_state.token_task_ids(x, self.layer_name)  # [T] long, -1 = unseen
        gate = self.task_gates()[tid]  # [T]
        A = self.lora_A.to(act)
        h = F.linear(xa, A)  # [..., r]: the router's codes
        rt = route_cosine(h, self.keys.to(act), temperature=self.cfg.temperature, top_k=self.cfg.top_k, validate=False)
        k = rt.ids.shape[-1]
        w = rt.weights.reshape(T, k) * gate.to(rt.weights.dtype)[:, None]
        a_s = (self.lora_A * self.lora_S[:, None]).to(act)  # diag(S) A: S ⊙ (A x) inside the shared shrink
        return lora_shared_apply(xa, a_s, self.lora_B.to(act), self.scaling, mixture=(rt.ids.reshape(T, k), w),
                                 base_out=y0, validate=False)

    def reference_forward(self, x: Tensor) -> Tensor:
        """The same layer as a straightforward torch composition (every expert evaluated densely, no
        mokernels op): the tests' oracle and the benchmark's torch peer."""
        tid = self.routing_state.token_task_ids(x, self.layer_name).reshape(x.shape[:-1])
        gate = self.task_gates()[tid]  # [...]
        h = x @ self.lora_A.T  # [..., r]
        cos = (h / h.norm(dim=-1, keepdim=True).clamp_min(1e-8)) @ (
            self.keys / self.keys.norm(dim=-1, keepdim=True).clamp_min(1e-8)).T
        p = torch.softmax(cos.float() / self.cfg.temperature, dim=-1)
        if self.cfg.top_k is not None:
            v, i = p.topk(self.cfg.top_k, dim=-1)
            p = torch.zeros_like(p).scatter(-1, i, v / v.sum(-1, keepdim=True))
        hs = (h * self.lora_S).float()
        delta = sum((p[..., i, None] * hs) @ self.lora_B[i].float().T for i in range(self.lora_B.shape[0]))
        return self.base_forward(x) + (self.scaling * gate[..., None] * delta).to(x.dtype)

    def extra_losses(self) -> dict[str, Tensor]:
        A = self.lora_A.float()
        B = self.lora_B.float()
        eye = torch.eye(A.shape[0], device=A.device)
        orth = (A @ A.T - eye).square().sum() + (B.transpose(1, 2) @ B - eye).square().sum()
        p_b = torch.softmax(B.detach().mean(dim=1), dim=-1)  # [N, r], the target
        log_pk = torch.log_softmax(self.keys.float(), dim=-1)
        match = F.kl_div(log_pk, p_b, reduction="none").sum(-1).mean()  # mean_i KL(P_b,i || P_k,i)
        return {"samora_orth": self.cfg.lambda_orth * orth, "samora_match": self.cfg.lambda_match * match}

    def stats(self) -> dict:
        with torch.no_grad():
            g = self.task_gates()
        return {"task_gates": g[:-1].tolist(), "mean_gate": float(g[-1])}

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={c.r}, experts={c.num_experts}, "
                f"tau={c.temperature}, tasks={c.num_tasks}")
