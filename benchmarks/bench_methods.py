"""The methods' layers (issue 12): DLP-LoRA, SAMoRA and MoORE as drop-ins for one ``nn.Linear``,
forward and forward+backward, vs the base layer and vs a straightforward torch implementation.

Shape (full mode): ``d_in = d_out = 4096``, 8 sequences × 512 tokens (T = 4096), bf16 on a GPU (fp32 on
CPU, whose bf16 matmuls are not representative). Quick mode: d = 256, 4 × 32 tokens. Each method at its
METHODS.md defaults, with its adapter state randomised (B != 0, gates on) so no branch is trivially
zero; routing context: task ids ``[0, 1, ..., -1]`` (one per sequence) for SAMoRA / MoORE, for DLP-LoRA a
pool of 8 LoRAs (r = 16) with a top-p (0.8, softmax renorm) mixture per sequence (sentence).

Impls, each the whole layer (base GEMM included where the method has one):
* ``mokernels``: the wrapped layer's ``forward`` (ops: route_cosine + lora_shared_apply for SAMoRA,
  lora_apply(segment_mixture=) for DLP-LoRA, Householder chain + rank_one_scale for MoORE; CPU tensors
  run the ops' references);
* ``base nn.Linear``: the frozen layer alone (``F.linear``), the floor;
* ``torch composition``: the same method as plain torch: SAMoRA / DLP-LoRA = the layer's
  ``reference_forward`` (every expert / adapter evaluated densely with its per-token coefficient),
  MoORE = the Householder loop, ``(x' V) * (σ + g)`` and ``@ Uᵀ`` in torch, the gates computed the same way.
forward+backward: ``torch.autograd.grad`` of ``<y, dy>`` w.r.t. x and the trainable adapter tensors
(the base frozen: for ``base nn.Linear`` w.r.t. x only). No bytes/flops columns: the methods differ in
what they move; read the ratios to the base layer. On CPU the numbers describe the reference paths only.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ._harness import Workload

FAMILY = "methods"
OURS = "mokernels"
BASE = "base nn.Linear"
METHODS = ("samora", "moore", "dlp_lora")
TORCH = "torch composition"

FULL = dict(d=4096, B=8, L=512)
QUICK = dict(d=256, B=4, L=32)
DLP_POOL = dict(num_adapters=8, r=16)


class _Layer:
    """Builds the wrapped layer, its inputs and its routing on first use (the untimed warm-up call):
    the SVDs of SAMoRA / MoORE at d = 4096 take seconds and the runner drops each workload once measured."""

    def __init__(self, method: str, d: int, B: int, L: int, dtype: torch.dtype, device: torch.device):
        self.args = (method, d, B, L, dtype, device)
        self._built = None

    def __call__(self):
        if self._built is None:
            self._built = _build(*self.args)
        return self._built


def _build(method: str, d: int, B: int, L: int, dtype: torch.dtype, device: torch.device):
    import mokernels
    from mokernels.methods import dlp_lora

    gen = torch.Generator(device="cpu").manual_seed(0)
    lin = torch.nn.Linear(d, d, device=device, dtype=torch.float32)
    model = torch.nn.Sequential(lin.to(dtype))
    cfg = DLP_POOL if method == "dlp_lora" else {}
    model = mokernels.inject(model, method, target_modules=[r"^0$"], **cfg)
    lay = model[0]
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=gen) * std).to(device=device, dtype=dtype)  # noqa: E731
    with torch.no_grad():
        if method == "samora":
            lay.lora_B.copy_(rnd(*lay.lora_B.shape, std=0.01))
            lay.gate_w.copy_(rnd(*lay.gate_w.shape))
        elif method == "moore":
            lay.router_P.copy_(rnd(*lay.router_P.shape, std=0.01))
            lay.router_Q.copy_(rnd(*lay.router_Q.shape, std=0.01))
            lay.householder_u.add_(rnd(*lay.householder_u.shape, std=0.3))
        else:
            lay.lora_B.copy_(rnd(*lay.lora_B.shape, std=0.01))
    if method == "dlp_lora":
        dlp_lora.set_routing(model, logits=rnd(B, DLP_POOL["num_adapters"], std=2.0).float(), top_p=0.8)
    else:
        K = lay.cfg.num_tasks
        mokernels.set_task(model, torch.tensor([i % K for i in range(B - 1)] + [-1], device=device))
    x = rnd(B, L, d)
    dy = rnd(B, L, d)
    if method == "dlp_lora":  # the pool is frozen by default: the gradient goes to x (and the classifier upstream)
        params = []
    else:
        params = [p for n, p in lay.named_parameters() if p.requires_grad and n not in ("weight", "bias")]
    return lay, x, dy, params


def moore_torch(lay, x: torch.Tensor) -> torch.Tensor:
    """MoORE in plain torch: the Householder loop on x, ``(x' V) * (σ + g)``, ``@ Uᵀ``."""
    u = lay.householder_u / lay.householder_u.norm(dim=-1, keepdim=True)
    xh = x
    for i in range(u.shape[0] - 1, -1, -1):
        xh = xh - 2.0 * (xh @ u[i])[..., None] * u[i]
    g = lay.gates(x)
    s = lay.svd_sigma + g
    if lay.cfg.clip:
        s = torch.relu(s)
    return F.linear((xh @ lay.svd_V) * s, lay.svd_U, lay.bias)


def _impl(kind: str, method: str):
    if kind == OURS:
        return lambda lay, x: lay(x)
    if kind == BASE:
        return lambda lay, x: F.linear(x, lay.weight, lay.bias)
    if method == "moore":
        return moore_torch
    return lambda lay, x: lay.reference_forward(x)


def _run(fn: Callable, built: _Layer, backward: bool, base: bool) -> Callable[[], object]:
    if not backward:
        def fwd():
            lay, x, _, _ = built()
            with torch.no_grad():
                return fn(lay, x)
        return fwd

    def fwd_bwd():
        lay, x, dy, params = built()
        xg = x.detach().requires_grad_()
        y = fn(lay, xg)
        return torch.autograd.grad(y, [xg] + ([] if base else params), dy)

    return fwd_bwd


def workloads(device: torch.device, quick: bool) -> list[Workload]:
    shape = QUICK if quick else FULL
    d, B, L = shape["d"], shape["B"], shape["L"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dname = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    tag = "" if device.type == "cuda" else " (CPU)"
    ws: list[Workload] = []
    for method in METHODS:
        built = _Layer(method, d, B, L, dtype, device)
        for backward in (False, True):
            kind = "fwd+bwd" if backward else "fwd"
            impls = {label: _run(_impl(label, method), built, backward, label == BASE)
                     for label in (OURS, BASE, TORCH)}
            ws.append(Workload(family=FAMILY, name=f"{method} {kind} T={B * L} d={d} {dname}{tag}", impls=impls,
                               ours=OURS, params={"method": method, "pass": kind, "T": B * L, "d": d, "dtype": dname,
                                                  "sequences": B, **(DLP_POOL if method == "dlp_lora" else {})}))
    return ws
