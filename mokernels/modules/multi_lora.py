"""MultiLoRALinear: an ``nn.Linear`` drop-in holding N stacked LoRA adapters, routed per call.

``y = x Wᵀ + b + Σ_j w_j · scaling[i_j] · B[i_j] A[i_j] dropout(x)`` with the routing forms of
:mod:`mokernels.ops.lora` (per-token ids, segments, per-token mixtures, segment mixtures). The base
``weight`` / ``bias`` keep nn.Linear's names (``from_linear`` reuses the very Parameter objects), so
a wrapped model's base state-dict keys do not change; adapters are ``lora_A [N, r, in]``,
``lora_B [N, out, r]`` and the buffer ``scaling [N]`` (alpha / r, fp32).

Forward paths (one dtype everywhere, no autocast, no active dropout): at most
``mokernels.ops.lora.LINEAR_FUSED_MAX_TOKENS`` tokens -> ``lora_linear`` (on CUDA without autograd: one
pass over W applying the adapters too); more tokens without bias -> the LoRA delta first, then the base
GEMM accumulates into it (``addmm_``, beta = 1). Otherwise the base output is computed first and passed
as ``base_out``, so the LoRA kernel writes y once (no extra read+write pass over y). Parameters may be
kept in fp32 while activations are fp16/bf16 (autocast): the adapters are used in the activation dtype.
CPU tensors run the reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import lora as _lora
from ..ops.lora import lora_apply, lora_linear


def _check_config(num_adapters: int, r: int, dropout: float) -> None:
    if not (isinstance(num_adapters, int) and num_adapters >= 1 and isinstance(r, int) and 1 <= r <= 128):
        raise ValueError(f"MultiLoRALinear: need num_adapters >= 1 and 1 <= r <= 128, got {num_adapters}, {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"MultiLoRALinear: dropout must be in [0, 1), got {dropout}")


class MultiLoRALinear(nn.Module):
    """N LoRA adapters over one linear layer.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        num_adapters: N.
        r: rank (1..128).
        alpha: LoRA alpha; ``scaling = alpha / r`` for every adapter (default alpha = r: scaling 1).
        dropout: LoRA dropout probability on the adapter input (training only; the base path sees x).
    ``lora_A`` is initialised like PEFT (Kaiming-uniform, a = sqrt(5)), ``lora_B`` with zeros, so a
    fresh layer equals the base layer.
    """

    def __init__(self, in_features: int, out_features: int, num_adapters: int, r: int, *, alpha: Optional[float] = None,
                 dropout: float = 0.0, bias: bool = True, device=None, dtype=None):
        super().__init__()
        _check_config(num_adapters, r, dropout)
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.num_adapters, self.r = in_features, out_features, num_adapters, r
        self.alpha = float(r if alpha is None else alpha)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self._init_adapters(kw, dropout)

    def _init_adapters(self, kw, dropout):
        N, r = self.num_adapters, self.r
        self.lora_A = nn.Parameter(torch.empty(N, r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(N, self.out_features, r, **kw))
        for i in range(N):
            nn.init.kaiming_uniform_(self.lora_A.data[i], a=math.sqrt(5))
        self.register_buffer("scaling", torch.full((N,), self.alpha / r, dtype=torch.float32, device=kw["device"]))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._merged: list[int] = []
        self._unmerged_weight: Optional[Tensor] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_adapters: int, r: int, alpha: Optional[float] = None,
                    dropout: float = 0.0) -> "MultiLoRALinear":
        """Wraps ``linear``: the new module owns the same ``weight``/``bias`` Parameter objects."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"MultiLoRALinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        _check_config(num_adapters, r, dropout)
        m.in_features, m.out_features, m.num_adapters, m.r = linear.in_features, linear.out_features, num_adapters, r
        m.alpha = float(r if alpha is None else alpha)
        m.weight = linear.weight
        m.bias = linear.bias
        m._init_adapters(dict(device=linear.weight.device, dtype=linear.weight.dtype), dropout)
        return m

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: Tensor, adapter_ids: Optional[Tensor] = None, *, segments=None, mixture=None,
                segment_mixture=None, validate: bool = True) -> Tensor:
        """``x [..., in]`` -> ``[..., out]``. Routing: exactly one of ``adapter_ids [...]`` (-1 = base only),
        ``segments=(offsets, seg_ids)``, ``mixture=Routing | (ids, weights)``,
        ``segment_mixture=(offsets, seg_ids, seg_w) | (offsets, Routing)`` — see mokernels.ops.lora.
        Without routing: the base layer (with any merged adapter). ``validate``: see lora_apply
        (modules deep in a model should get validated metadata and pass False)."""
        forms = dict(ids=adapter_ids, segments=segments, mixture=mixture, segment_mixture=segment_mixture)
        routed = any(v is not None for v in forms.values())
        if not routed:
            return F.linear(x, self.weight, self.bias)
        if self._merged:
            raise ValueError(f"MultiLoRALinear: adapter(s) {self._merged} are merged into the weight; unmerge() "
                             "before routing adapters")
        if self._plain(x):
            T = x.numel() // max(x.shape[-1], 1)
            if T <= _lora.LINEAR_FUSED_MAX_TOKENS:  # decode: one pass over W applies the adapters too (CUDA)
                return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                                   validate=validate, **forms)
            if self.bias is None:
                # prefill: the LoRA delta first, then the base GEMM accumulates into it (beta = 1: cuBLAS
                # reads it in its epilogue) — no pass of the LoRA kernel over a base output
                y = lora_apply(x, self.lora_A, self.lora_B, self.scaling, validate=validate, **forms)
                y.view(T, self.out_features).addmm_(x.reshape(T, self.in_features), self.weight.t())
                return y
        base = F.linear(x, self.weight, self.bias)
        act = base.dtype
        xa = self.lora_dropout(x).to(act)
        return lora_apply(xa, self.lora_A.to(act), self.lora_B.to(act), self.scaling, base_out=base,
                          validate=validate, **forms)

    def _plain(self, x: Tensor) -> bool:
        """One dtype everywhere, no autocast, no active dropout: the layer may take the fused paths."""
        W = self.weight
        return (x.dtype == W.dtype and self.lora_A.dtype == W.dtype and self.lora_B.dtype == W.dtype
                and (self.bias is None or self.bias.dtype == W.dtype)
                and not torch.is_autocast_enabled(x.device.type)
                and (not self.training or isinstance(self.lora_dropout, nn.Identity)))

    # -- merge / unmerge -----------------------------------------------------------------------------

    def delta_weight(self, slot: int) -> Tensor:
        """``scaling[slot] · B[slot] @ A[slot]`` ``[out, in]`` in fp32 (fp64 for fp64 weights)."""
        self._check_slot(slot)
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return float(self.scaling[slot]) * (self.lora_B[slot].detach().to(acc) @ self.lora_A[slot].detach().to(acc))

    def merge(self, slot: int) -> None:
        """Adds adapter ``slot`` into ``weight`` (in fp32, rounded once). One adapter at a time; the
        original weight is kept so :meth:`unmerge` restores it bit-exactly (memory: one weight copy)."""
        self._check_slot(slot)
        if self._merged:
            raise ValueError(f"MultiLoRALinear: adapter {self._merged[0]} is already merged; unmerge() first")
        with torch.no_grad():
            self._unmerged_weight = self.weight.detach().clone()
            self.weight.copy_((self.weight.to(self.delta_weight(slot).dtype) + self.delta_weight(slot)).to(self.weight.dtype))
        self._merged.append(slot)

    def unmerge(self) -> None:
        """Restores the weight saved by :meth:`merge` (bit-exact). No-op when nothing is merged."""
        if not self._merged:
            return
        with torch.no_grad():
            self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self._merged.clear()

    @property
    def merged(self) -> list[int]:
        return list(self._merged)

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.num_adapters:
            raise ValueError(f"MultiLoRALinear: adapter slot must be an int in [0, {self.num_adapters}), got {slot!r}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"num_adapters={self.num_adapters}, r={self.r}, alpha={self.alpha}")
