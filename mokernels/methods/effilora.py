"""EffiLoRA (METHODS.md, paper 001): one ``A [r, d_in]`` shared by every wrapped layer of the same input
width (a model-level parameter, ``model.mokernels_shared["effilora.A.<d_in>"]``), per layer ``m`` expert
``B_i [d_out, r]`` and a router on the code::

    h  = A x,   w = softmax(W_gᵀ h)        (W_g [r, m]; dense gate over the m experts)
    y  = W x + b + (α/r) · c · Σ_i w_i B_i A dropout(x)

``c`` is the layer's ``delta_scale`` (1; the :class:`~mokernels.methods.reducer.Reducer` sets it to ~0 to
suppress a block while it measures importance). The delta is one :func:`~mokernels.ops.lora.lora_shared_apply`
(``h`` computed once, dense weights, base output passed in: one write of y).

Defaults (paper): r = 16, m = 4, α = 32, dropout 0.05, targets q, k, v, up, down. Init: A Kaiming-uniform
(a = sqrt(5), like PEFT's lora_A), B = 0 (a fresh wrap equals the base), W_g Kaiming-uniform over r.
The shared A is one Parameter (counted once by trainable_parameters, saved once by save_adapters, one
gradient under DDP). EffiLoRA routes per token on x: it cannot merge, and needs no routing context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.lora import MAX_RANK, lora_shared_apply
from .base import AdapterLayer, MethodConfig, register_method

__all__ = ["EffiLoRAConfig", "EffiLoRALinear"]


@dataclass
class EffiLoRAConfig(MethodConfig):
    """EffiLoRA hyperparameters (paper defaults): r (16) rank of the shared A; num_experts m (4) B experts
    per layer; alpha (32) scale α/r; dropout (0.05) on the adapter input."""

    r: int = 16
    num_experts: int = 4
    alpha: float = 32.0
    dropout: float = 0.05


@register_method("effilora")
class EffiLoRALinear(AdapterLayer):
    Config = EffiLoRAConfig
    can_merge = False

    def __init__(self, linear: nn.Linear, cfg: EffiLoRAConfig, **kw):
        super().__init__(linear, cfg, **kw)
        if self.shared is None:
            raise ValueError("effilora: the layer needs the model's SharedParams (wrap with mokernels.inject)")
        w = linear.weight
        d_in, r = self.in_features, cfg.r

        def make_A():
            A = torch.empty(r, d_in, dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            return A

        self.shared_key = f"effilora.A.{d_in}"
        self.shared.get_or_create(self.shared_key, make_A)
        self.lora_B = nn.Parameter(torch.zeros(cfg.num_experts, self.out_features, r, dtype=w.dtype, device=w.device))
        g = torch.empty(cfg.num_experts, r, dtype=w.dtype, device=w.device)
        nn.init.kaiming_uniform_(g, a=math.sqrt(5))
        self.router = nn.Parameter(g.T.contiguous())  # W_g [r, m]
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling = cfg.alpha / r
        self.delta_scale = 1.0  # the Reducer's suppression knob

    @property
    def lora_A(self) -> nn.Parameter:
        """The shared A of this input width (the same Parameter object in every such layer)."""
        return self.shared[self.shared_key]

    @classmethod
    def check_linear(cls, linear: nn.Linear, cfg: EffiLoRAConfig, name: str) -> None:
        if not (1 <= cfg.r <= MAX_RANK) or cfg.num_experts < 1 or not 0 <= cfg.dropout < 1:
            raise ValueError(f"effilora: layer {name!r}: need 1 <= r <= {MAX_RANK}, num_experts >= 1, 0 <= dropout < 1; "
                             f"got r={cfg.r}, num_experts={cfg.num_experts}, dropout={cfg.dropout}")

    def gate(self, x: Tensor) -> Tensor:
        """Dense expert weights ``[..., m]`` = softmax(W_gᵀ A x)."""
        A = self.lora_A.to(x.dtype)
        return torch.softmax(F.linear(F.linear(x, A), self.router.T.to(x.dtype)), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_forward(x)
        act = base.dtype
        w = self.gate(x.to(act))
        return lora_shared_apply(self.lora_dropout(x).to(act), self.lora_A.to(act), self.lora_B.to(act),
                                 self.scaling * self.delta_scale, weights=w, base_out=base, validate=False)

    def extra_repr(self) -> str:
        c = self.cfg
        return super().extra_repr() + f", r={c.r}, experts={c.num_experts}, alpha={c.alpha}, shared_A={self.shared_key!r}"
