"""Multi-adapter LoRA layer (issue 10 workloads): ``y = x Wᵀ + Σ_j w_j s_i B_i A_i x``, d=4096, r=16, bf16.

Workloads (full mode): decode 32 tokens with ids uniform over 26 / 100 adapters; prefill 4096 tokens in
32 segments of 128 (one adapter each, 32 adapters); DLP-LoRA top-2 segment mixture, 32 sentences ×
128 tokens over 26 / 100 adapters; a training step (fwd+bwd) on the prefill shape.

Impls, each the whole layer (base GEMM included):
* ``mokernels``: what ``MultiLoRALinear`` runs (no bias, one dtype): decode rows (T <= 32) the fused pass
  over W, ``lora_linear`` (shrink kernel, then W streamed once on tensor cores with the LoRA expand in the
  epilogue); prefill / segment-mixture rows ``lora_apply`` (the tensor-core prefill kernels: split-K
  shrink, expand) writing the delta, then ``addmm_`` accumulating the base GEMM into it (beta = 1);
  on CPU the references;
* ``mokernels lora_apply(base_out=F.linear)``: the unfused layer — the base GEMM, then ``lora_apply`` reading
  it as ``base_out`` (the split decode kernels at T = 32, the prefill kernels above);
* ``base nn.Linear``: the frozen layer alone (the floor; the issue's targets are ratios to it);
* ``single LoRA (2 matmuls)``: one adapter for every token, ``base + s·(x Aᵀ) Bᵀ`` (what the routed
  layer should approach);
* ``gather+bmm``: per-token gather of A/B rows and two bmm (decode peers do this);
* ``torch._grouped_mm``: segments as groups (CUDA bf16 only, prefill/segment shapes);
* PEFT (LoraModel, ``adapter_names=``) is not installed here: listed in ``params`` as skipped.
On CPU quick mode the shapes shrink (d=256) and two tiny workloads add the emulated kernels (logic only):
the decode kernel (fp32, per-token ids) and the tensor-core prefill kernel (bf16, 2 segments of 128).
On CPU every number describes the reference path, not GPU performance.

Issue 10 item 8 rows (decode, T = 32, ids uniform over 26 adapters):
* ``decode qkv slices``: a fused q/k/v projection (W [3d, d]) with one adapter per slice: ours is ``lora_apply_sliced``
  (one launch per kernel for the 3 slices) reading ``F.linear`` as base_out, vs three ``lora_apply`` calls
  (one per slice, then ``torch.cat``) and the base alone;
* ``decode mixed ranks``: ranks 4 / 8 / 16 over the adapters, stored padded to 16: ``lora_apply(ranks=)``
  (padding neither read nor multiplied) vs the same call treating every adapter as rank 16.

bytes_moved (ideal, per call): W + x + y + the used adapters' A and B (+ base bias ignored).
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

from ._harness import Workload

FAMILY = "lora"
OURS = "mokernels"
OURS_BASE_OUT = "mokernels lora_apply(base_out=F.linear)"
BASE = "base nn.Linear"
SINGLE = "single LoRA (2 matmuls)"
GATHER = "gather+bmm"
GROUPED = "torch._grouped_mm"
EMU = "emulated kernel (logic only)"
PEFT_NOTE = "installed" if importlib.util.find_spec("peft") else "not installed: skipped"


class _Layer:
    """Inputs built on first use (inside the untimed warm-up)."""

    def __init__(self, device, dtype, T, d, r, N, form, grad=False, seed=0):
        self.args = (device, dtype, T, d, r, N, form, grad, seed)
        self._t = None

    def __call__(self):
        if self._t is None:
            device, dtype, T, d, r, N, form, grad, seed = self.args
            g = torch.Generator(device="cpu").manual_seed(seed)
            mk = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)  # noqa: E731
            t = dict(x=mk(T, d), W=mk(d, d, std=d**-0.5), A=mk(N, r, d, std=d**-0.5), B=mk(N, d, r, std=r**-0.5),
                     scale=torch.full((N,), 2.0, device=device))
            if form == "decode":
                ids = torch.randint(0, N, (T,), generator=g)
                t["kw"] = dict(ids=ids.to(device, torch.int32))  # int32 once per step, as a server would
                t["tok_ids"] = ids.to(device)
                t["used"] = int(ids.unique().numel())
            else:
                S = T // 128
                off = torch.arange(0, T + 1, 128, dtype=torch.int32)
                if form == "segments":
                    sid = torch.randperm(N, generator=g)[:S] if N >= S else torch.randint(0, N, (S,), generator=g)
                    t["kw"] = dict(segments=(off.to(device), sid.to(device, torch.int32)))
                    t["tok_ids"] = sid.repeat_interleave(128).to(device)
                    t["seg_ids"] = sid
                else:  # DLP top-2 segment mixture
                    logits = torch.randn(S, N, generator=g)
                    top = logits.topk(2, dim=-1)
                    sid, sw = top.indices.to(torch.int32), torch.softmax(top.values, -1)
                    t["kw"] = dict(segment_mixture=(off.to(device), sid.to(device), sw.to(device)))
                    t["tok_ids"] = sid[:, 0].repeat_interleave(128).to(device)
                    t["seg_ids"] = sid[:, 0]
                t["used"] = int(torch.as_tensor(sid).unique().numel())
            if grad:
                for k in ("x", "A", "B"):
                    t[k].requires_grad_()
                t["dy"] = mk(T, d)
            self._t = t
        return self._t


def _ours(inp):
    """What MultiLoRALinear (no bias, one dtype) runs: at T <= 32 the fused pass over W (lora_linear);
    above, the LoRA delta first and the base GEMM accumulating into it (addmm_, beta = 1)."""
    from mokernels.ops.lora import LINEAR_FUSED_MAX_TOKENS, lora_apply, lora_linear

    def run():
        t = inp()
        x = t["x"]
        if x.shape[0] <= LINEAR_FUSED_MAX_TOKENS:
            return lora_linear(x, t["W"], None, t["A"], t["B"], t["scale"], validate=False, **t["kw"])
        y = lora_apply(x, t["A"], t["B"], t["scale"], validate=False, **t["kw"])
        return y.addmm_(x, t["W"].t())

    return run


def _ours_base_out(inp):
    """The unfused layer: F.linear, then lora_apply reading it as base_out (one write of y)."""
    from mokernels.ops.lora import lora_apply

    def run():
        t = inp()
        base = F.linear(t["x"], t["W"])
        return lora_apply(t["x"], t["A"], t["B"], t["scale"], base_out=base, validate=False, **t["kw"])

    return run


def _base(inp):
    return lambda: F.linear(inp()["x"], inp()["W"])


def _single(inp):
    def run():
        t = inp()
        return F.linear(t["x"], t["W"]) + 2.0 * ((t["x"] @ t["A"][0].T) @ t["B"][0].T)

    return run


def _gather(inp):
    def run():
        t = inp()
        ids = t["tok_ids"]
        h = torch.bmm(t["A"][ids], t["x"][:, :, None])  # [T, r, 1]
        return F.linear(t["x"], t["W"]) + 2.0 * torch.bmm(t["B"][ids], h)[:, :, 0]

    return run


def _grouped(inp):
    def run():
        t = inp()
        x = t["x"]
        sid = t["seg_ids"].to(x.device)
        offs = torch.arange(128, x.shape[0] + 1, 128, dtype=torch.int32, device=x.device)
        h = torch._grouped_mm(x, t["A"][sid].transpose(1, 2), offs=offs)
        return F.linear(x, t["W"]) + 2.0 * torch._grouped_mm(h, t["B"][sid].transpose(1, 2), offs=offs)

    return run


def _train(layer_fn):
    def make(inp):
        fwd = layer_fn(inp)

        def run():
            t = inp()
            return torch.autograd.grad(fwd(), (t["x"], t["A"], t["B"]), t["dy"], allow_unused=True)

        return run

    return make


def _emu(inp):
    import mokernels.emu as emu

    ops = emu.ops()

    def run():
        t = inp()
        base = F.linear(t["x"], t["W"])
        with torch.no_grad():
            if "segments" in t["kw"]:  # segments average 128 tokens: the automatic switch takes the prefill kernel
                off, sid = t["kw"]["segments"]
                return ops.lora_apply(t["x"], t["A"], t["B"], t["scale"], sid.to(torch.int32)[:, None], None, off, base)
            ids = t["tok_ids"].to(torch.int32)[:, None]
            return ops.lora_apply(t["x"], t["A"], t["B"], t["scale"], ids, None, None, base)

    return run


PER_SLICE = "3x lora_apply + cat"  # peers of the item-8 rows (ours: lora_apply_sliced / lora_apply(ranks=))
PADDED = "lora_apply padded to r_max"


class _Item8:
    """Inputs of the item-8 rows, built on first use: qkv slices (3 x [N, r, d] / [N, d, r]) or mixed ranks."""

    def __init__(self, device, dtype, T, d, r, N, seed=0):
        self.args = (device, dtype, T, d, r, N, seed)
        self._t = None

    def __call__(self):
        if self._t is None:
            device, dtype, T, d, r, N, seed = self.args
            g = torch.Generator(device="cpu").manual_seed(seed)
            mk = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)  # noqa: E731
            self._t = dict(
                x=mk(T, d), W=mk(3 * d, d, std=d**-0.5), As=[mk(N, r, d, std=d**-0.5) for _ in range(3)],
                Bs=[mk(N, d, r, std=r**-0.5) for _ in range(3)], scale=torch.full((N,), 2.0, device=device),
                ids=torch.randint(0, N, (T,), generator=g).to(device, torch.int32),
                ranks=torch.tensor([(4, 8, 16)[i % 3] for i in range(N)], dtype=torch.int32, device=device))
        return self._t


def _item8_workloads(device, dtype, T, d, r, N):
    from mokernels.ops.lora import lora_apply, lora_apply_sliced

    inp = _Item8(device, dtype, T, d, r, N)
    elt = torch.empty((), dtype=dtype).element_size()

    def sliced():
        t = inp()
        return lora_apply_sliced(t["x"], t["As"], t["Bs"], t["scale"], ids=t["ids"], validate=False,
                                 base_out=F.linear(t["x"], t["W"]))

    def per_slice():
        t = inp()
        base = F.linear(t["x"], t["W"])
        return torch.cat([lora_apply(t["x"], A, B, t["scale"], ids=t["ids"], validate=False, base_out=base[:, i * d:(i + 1) * d])
                          for i, (A, B) in enumerate(zip(t["As"], t["Bs"]))], -1)

    def ranked(use_ranks):
        def run():
            t = inp()
            return lora_apply(t["x"], t["As"][0], t["Bs"][0], t["scale"], ids=t["ids"], validate=False,
                              base_out=F.linear(t["x"], t["W"][:d]), ranks=t["ranks"] if use_ranks else None)

        return run

    params = dict(T=T, d=d, r=r, N=N, form="decode", dtype=str(dtype).replace("torch.", ""))
    used = min(N, T)
    return [
        Workload(family=FAMILY, name=f"decode qkv slices T={T} N={N} d={d}", ours=OURS,
                 impls={OURS: sliced, PER_SLICE: per_slice, BASE: lambda: F.linear(inp()["x"], inp()["W"])},
                 bytes_moved=(3 * d * d + 4 * T * d + 3 * used * 2 * r * d) * elt, flops=2 * T * d * 3 * d,
                 params=dict(params, slices=3)),
        Workload(family=FAMILY, name=f"decode mixed ranks 4/8/16 T={T} N={N} d={d}", ours=OURS,
                 impls={OURS: ranked(True), PADDED: ranked(False),
                        BASE: lambda: F.linear(inp()["x"], inp()["W"][:d])},
                 bytes_moved=(d * d + 2 * T * d + used * 2 * (28 // 3) * d) * elt, flops=2 * T * d * d,
                 params=dict(params, ranks="4/8/16")),
    ]


def _workload(device, dtype, name, T, d, r, N, form, train=False, emu=False):
    elt = torch.empty((), dtype=dtype).element_size()
    inp = _Layer(device, dtype, T, d, r, N, form, grad=train)
    impls: dict[str, Callable] = {}
    makers = {OURS: _ours, OURS_BASE_OUT: _ours_base_out, BASE: _base, SINGLE: _single}
    if form == "decode":
        makers[GATHER] = _gather
    if form == "segments" and device.type == "cuda" and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16:
        makers[GROUPED] = _grouped
    if emu:
        makers = {OURS: _ours, BASE: _base, EMU: _emu}
    for label, fn in makers.items():
        impls[label] = _train(fn)(inp) if train and label != EMU else fn(inp)
    # used adapters are known only after the inputs exist: count the expected number instead
    used = min(N, T if form == "decode" else 2 * (T // 128) if form == "mixture" else T // 128)
    bytes_moved = (d * d + 2 * T * d + used * 2 * r * d) * elt
    return Workload(family=FAMILY, name=("train fwd+bwd " if train else "") + name, impls=impls, ours=OURS,
                    bytes_moved=bytes_moved * (3 if train else 1),
                    flops=2 * T * d * d * (3 if train else 1),
                    params=dict(T=T, d=d, r=r, N=N, form=form, dtype=str(dtype).replace("torch.", ""),
                                peft=PEFT_NOTE, train=train))


def workloads(device: torch.device, quick: bool) -> list[Workload]:
    bf16 = torch.bfloat16
    if quick:
        d, Tp = 256, 512
    else:
        d, Tp = 4096, 4096
    r = 16
    dt = bf16 if device.type == "cuda" else torch.float32  # CPU: bf16 GEMMs are not representative
    ws = [
        _workload(device, dt, f"decode T=32 N=26 d={d}", 32, d, r, 26, "decode"),
        _workload(device, dt, f"decode T=32 N=100 d={d}", 32, d, r, 100, "decode"),
        _workload(device, dt, f"prefill T={Tp} S={Tp // 128}x128 N=32 d={d}", Tp, d, r, 32, "segments"),
        _workload(device, dt, f"DLP top-2 seg mixture T={Tp} N=26 d={d}", Tp, d, r, 26, "mixture"),
        _workload(device, dt, f"DLP top-2 seg mixture T={Tp} N=100 d={d}", Tp, d, r, 100, "mixture"),
        _workload(device, dt, f"prefill T={Tp} N=32 d={d}", Tp, d, r, 32, "segments", train=True),
        *_item8_workloads(device, dt, 32, d, r, 26),
    ]
    if quick and device.type == "cpu":
        import mokernels.emu as emu

        if emu.available():
            ws.append(_workload(device, torch.float32, "decode T=4 N=8 d=64 (emulated)", 4, 64, 8, 8, "decode", emu=True))
            ws.append(_workload(device, bf16, "prefill T=256 S=2x128 N=4 d=64 bf16 (emulated)", 256, 64, 16, 4,
                                "segments", emu=True))
    return ws
