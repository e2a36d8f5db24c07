"""Fused router (METHODS.md §2): softmax (temperature or cosine logits) + top-k / top-p selection +
renormalisation, in the compact form the multi-adapter GEMM's mixture form takes.

Every method routes through this: EffiLoRA/HydraLoRA dense softmax gates, SAMoRA's cosine router
with a temperature, DLP-LoRA's top-p over tasks per sentence, SLoRA's top-p over task experts.

Semantics (the reference :func:`route_reference` is the executable spec):

* ``p = softmax(z / τ)`` in fp32 (fp64 for fp64 logits).
* Sort descending, ties -> lower expert index first. Keep the shortest prefix whose mass is
  ``>= top_p``, always at least one expert; ``top_p >= 1`` (or ``None``) keeps all, without any
  cumulative sum; at most ``kmax`` experts, where ``kmax = top_k`` if given, else ``max_k``, else N
  (static: no host sync). With ``top_k`` and no ``top_p`` this is plain top-k; with neither it is a
  dense softmax gate in compact form. A ``max_k``/``top_k`` cap may stop the prefix before it reaches
  ``top_p`` (then the mass property does not hold, by design).
* Experts whose logit is ``-inf`` are masked: never selected (so ``counts`` may be < ``top_k``).
* Renormalisation: ``"sum"`` ``w = p / Σ p_sel`` (default), ``"softmax"`` ``w = softmax(p_sel)``
  (DLP-LoRA's code), ``"none"`` ``w = p_sel``.
* Outputs: ``ids [T, kmax]`` int32 in descending-probability order, ``-1`` pads; ``weights [T, kmax]``
  in the logits' dtype (0 at pads); ``counts [T]`` int32; optional ``dense [T, N]`` (0 where not kept).
  Weights are in the logits' dtype, as ``torch.softmax`` returns; they are computed in fp32.
* Invalid rows (a NaN or +inf in ``z / τ``, or all ``-inf``): :func:`route` raises a ValueError
  naming the row in eager mode (``validate=True``, the default). Under ``torch.compile``, CUDA-graph
  capture or ``validate=False`` the documented fallback applies instead: count 0, ids -1, weights 0,
  dense 0, and a zero gradient.
* Backward: gradient to the logits through the kept, renormalised weights (and the dense weights),
  the selection held fixed.

Public functions: :func:`route` (logits), :func:`route_cosine` (SAMoRA: codes ``h`` and keys, the
cosine logits formed inside the kernel), :func:`route_segments` (one row per sentence, broadcast to
its tokens by offsets, no host sync). CUDA kernels: ``csrc/kernels/router.cuh`` (N <= 4096 experts, fp64 2048;
backward N <= 1024;
larger N runs the reference composition on the GPU). CPU tensors run the reference.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import acc_dtype, expect, expect_dtype

_OP = "route"
RENORMS = ("sum", "softmax", "none")
MAX_EXPERTS_KERNEL = 4096  # the CUDA forward kernels' limit on N (fp64: 2048; shared-memory sort kernel)
MAX_EXPERTS_KERNEL_BWD = 1024  # the CUDA backward kernel's limit on N (larger N: route_bwd_reference)


def _kernel_max_n(dtype: torch.dtype) -> int:
    return MAX_EXPERTS_KERNEL // 2 if dtype == torch.float64 else MAX_EXPERTS_KERNEL


class Routing(NamedTuple):
    """The router's output. ``...`` is the leading shape of the logits (``[T]`` for 2-D logits)."""

    ids: Tensor  # [..., kmax] int32, experts in descending-probability order, -1 pads
    weights: Tensor  # [..., kmax] logits' dtype, 0 at pads
    counts: Tensor  # [...] int32, number of kept experts
    dense: Tensor | None  # [..., N] logits' dtype (0 where not kept), or None unless dense=True


def kmax_for(num_experts: int, top_k: int | None = None, max_k: int | None = None) -> int:
    """The static width of the compact form: ``top_k`` if given, else ``max_k``, else N."""
    expect(top_k is None or max_k is None, _OP, "give top_k or max_k, not both (top_k already caps the count)")
    if top_k is not None:
        expect(isinstance(top_k, int) and top_k >= 1, _OP, f"top_k must be an int >= 1, got {top_k!r}")
        return top_k
    if max_k is not None:
        expect(isinstance(max_k, int) and max_k >= 1, _OP, f"max_k must be an int >= 1, got {max_k!r}")
        return max_k
    return num_experts


def _check_options(temperature: float, top_p: float | None, renorm: str) -> float:
    expect(
        isinstance(temperature, (int, float))
        and torch.finfo(torch.float32).tiny <= float(temperature) < float("inf"),
        _OP,
        f"temperature must be a finite number >= {torch.finfo(torch.float32).tiny} (the kernels divide in fp32), "
        f"got {temperature!r}",
    )
    expect(renorm in RENORMS, _OP, f"renorm must be one of {RENORMS}, got {renorm!r}")
    if top_p is None:
        return 1.0
    expect(isinstance(top_p, (int, float)) and float(top_p) >= 0.0, _OP, f"top_p must be a number >= 0, got {top_p!r}")
    return min(float(top_p), 1.0)


def _is_eager() -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def validate_rows(z: Tensor, temperature: float, what: str = "logits") -> None:
    """Raises ValueError naming the first (flattened) row of ``z [T, N]`` that has a NaN or +inf in
    ``z / τ`` or only -inf. One host sync; skipped by :func:`route` under compile / graph capture."""
    if z.numel() == 0:
        return
    x = z.to(acc_dtype(z.dtype)) / temperature
    bad = (torch.isnan(x) | (x == float("inf"))).any(-1) | (x == float("-inf")).all(-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"mokernels.{_OP}: {what} row {row} (flattened) has a NaN or +inf in logits/temperature or only -inf "
            "logits: no expert can be chosen. Mask experts with -inf but keep one finite logit per row "
            "(with validate=False such rows get count 0, ids -1, weights 0)."
        )


def route(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_k: int | None = None,
    renorm: str = "sum",
    dense: bool = False,
    validate: bool = True,
) -> Routing:
    """Fused softmax router: ``p = softmax(logits / temperature)``, top-k / top-p, renormalisation.

    Args:
        logits: ``[..., N]`` router logits (fp16, bf16, fp32 or fp64); ``-inf`` masks an expert.
        temperature: τ > 0, applied once (``softmax(z / τ)``).
        top_k: keep the k most probable experts (also the output width kmax).
        top_p: keep the shortest descending prefix with mass >= top_p (>= 1 keeps all; always >= 1
            expert). With ``top_k`` too: top-p capped at k experts.
        max_k: cap on the number kept and the output width when ``top_k`` is not given.
        renorm: ``"sum"`` (w = p / Σ p_sel), ``"softmax"`` (softmax over p_sel) or ``"none"``.
        dense: also return the dense ``[..., N]`` weights.
        validate: in eager mode, raise ValueError on a row with NaN/+inf or only -inf (one host sync).
    Returns:
        :class:`Routing` ``(ids [..., kmax] int32, weights [..., kmax], counts [...] int32,
        dense [..., N] or None)`` with ``kmax = top_k or max_k or N``; ids in descending-probability
        order, -1 pads. The compact form feeds the multi-adapter GEMM's mixture form directly.
    Differentiable in ``logits`` (selection held fixed). CUDA tensors run the fused kernel
    (N <= 4096, fp64 2048; larger N runs the reference composition); CPU tensors run :func:`route_reference`.
    """
    expect(isinstance(logits, Tensor) and logits.dim() >= 1, _OP, "logits must be a [..., N] tensor")
    expect_dtype(_OP, "logits", logits)
    N = logits.shape[-1]
    expect(N >= 1, _OP, "logits must have N >= 1 experts (last dimension)")
    p = _check_options(temperature, top_p, renorm)
    kmax = kmax_for(N, top_k, max_k)
    lead = logits.shape[:-1]
    z = logits.reshape(-1, N)
    if validate and _is_eager():
        validate_rows(z, float(temperature))
    if N > _kernel_max_n(z.dtype) and z.device.type != "cpu":  # beyond the kernel: the reference (autograd)
        ids, w, counts, d = route_fwd_reference(z, float(temperature), p, kmax, renorm, bool(dense))
    else:
        ids, w, counts, d = torch.ops.mokernels.route_fwd(z, float(temperature), p, kmax, renorm, bool(dense))
    return Routing(
        ids.reshape(*lead, kmax),
        w.reshape(*lead, kmax),
        counts.reshape(lead),
        d.reshape(*lead, N) if dense else None,
    )


def route_cosine(
    h: Tensor,
    keys: Tensor,
    *,
    temperature: float = 1.0,
    eps: float = 1e-8,
    top_k: int | None = None,
    top_p: float | None = None,
    max_k: int | None = None,
    renorm: str = "sum",
    dense: bool = False,
    validate: bool = True,
) -> Routing:
    """Cosine router (SAMoRA): ``p = softmax(cos(h, keys_i) / τ)``, τ applied once, then as :func:`route`.

    ``cos(h, k) = <h, k> / (max(‖h‖, eps) · max(‖k‖, eps))``.

    Args:
        h: ``[..., r]`` codes (fp16, bf16, fp32 or fp64); keys: ``[N, r]`` expert keys, same dtype.
        Other arguments as :func:`route`.
    Returns:
        The :class:`Routing` of :func:`route` (weights in ``h``'s dtype). Differentiable in ``h`` and
        ``keys`` (selection held fixed). On CUDA the cosine logits are formed inside the routing kernel
        (no ``[T, N]`` logits, no ``[T, N, r]`` intermediate); the backward recomputes them with one
        ``[T, N]`` GEMM in fp32 and goes through ``route_bwd``.
    """
    expect(isinstance(h, Tensor) and h.dim() >= 1 and isinstance(keys, Tensor) and keys.dim() == 2, _OP,
           f"h must be [..., r] and keys [N, r], got {list(h.shape)} and {list(keys.shape)}")
    r = h.shape[-1]
    expect(keys.shape[1] == r and keys.shape[0] >= 1, _OP, f"keys must be [N, r] with N >= 1 and r = {r}, got {list(keys.shape)}")
    expect_dtype(_OP, "h", h)
    expect_dtype(_OP, "keys", keys, like=h)
    expect(isinstance(eps, (int, float)) and eps > 0, _OP, f"eps must be > 0, got {eps!r}")
    N = keys.shape[0]
    p = _check_options(temperature, top_p, renorm)
    kmax = kmax_for(N, top_k, max_k)
    lead = h.shape[:-1]
    hh = h.reshape(-1, r)
    if validate and _is_eager() and hh.numel():
        # the kernel accumulates |h|², |k|² and <h, k> in fp32 (fp64 for fp64): they must stay finite
        acc = acc_dtype(h.dtype)
        bad = ~torch.isfinite(hh.to(acc).square().sum(-1))
        if bool(bad.any()):
            raise ValueError(f"mokernels.{_OP}: h row {int(bad.nonzero()[0, 0])} (flattened) has a NaN or inf, "
                             f"or a squared norm that overflows {acc}")
        expect(bool(torch.isfinite(keys.to(acc).square().sum(-1)).all()), _OP,
               f"keys have a NaN or inf, or a squared norm that overflows {acc}")
    if N > _kernel_max_n(hh.dtype) and hh.device.type != "cpu":  # beyond the kernel: the composition
        z = cosine_logits_reference(hh, keys, float(eps))
        ids, w, counts, d = route_fwd_reference(z, float(temperature), p, kmax, renorm, bool(dense))
        w, d = w.to(h.dtype), d.to(h.dtype)
    else:
        ids, w, counts, d = torch.ops.mokernels.route_cosine_fwd(hh, keys, float(temperature), float(eps), p, kmax,
                                                                 renorm, bool(dense))
    return Routing(ids.reshape(*lead, kmax), w.reshape(*lead, kmax), counts.reshape(lead),
                   d.reshape(*lead, N) if dense else None)


def route_segments(logits: Tensor, offsets: Tensor, num_tokens: int, *, validate: bool = True, **options) -> Routing:
    """Per-sentence routing: route ``S`` rows (one per sentence), then give every token of sentence
    ``s`` (``offsets[s] <= t < offsets[s+1]``) that sentence's routing. No host sync except the
    optional eager validation.

    Args:
        logits: ``[S, N]`` one row per sentence; offsets: ``[S+1]`` int, sorted, ``offsets[0] = 0``,
        ``offsets[S] = num_tokens``; num_tokens: T (a Python int, so output shapes are static);
        options: as :func:`route`.
    Returns: the token-level :class:`Routing` (``ids [T, kmax]`` ...). DLP-LoRA's GEMM can also take
    the sentence-level result ``route(logits)`` with ``offsets`` directly (its segment-mixture form).
    """
    expect(logits.dim() == 2, _OP, f"logits must be [S, N], got {list(logits.shape)}")
    S = logits.shape[0]
    expect(offsets.dim() == 1 and offsets.shape[0] == S + 1, _OP, f"offsets must be [S+1] = [{S + 1}], got {list(offsets.shape)}")
    expect(not offsets.is_floating_point(), _OP, f"offsets must be an integer tensor, got {offsets.dtype}")
    if validate and _is_eager() and S > 0:
        o = offsets.cpu()
        expect(bool((o[1:] >= o[:-1]).all()) and int(o[0]) == 0 and int(o[-1]) == num_tokens, _OP,
               f"offsets must be sorted with offsets[0] = 0 and offsets[S] = num_tokens = {num_tokens}")
    r = route(logits, validate=validate, **options)
    tok = torch.arange(num_tokens, device=logits.device, dtype=offsets.dtype)
    seg = torch.searchsorted(offsets[1:].contiguous(), tok, right=True).clamp_(max=max(S - 1, 0))
    pick = lambda t: t.index_select(0, seg)  # noqa: E731
    return Routing(pick(r.ids), pick(r.weights), pick(r.counts), None if r.dense is None else pick(r.dense))


# ------------------------------------------------------------------------------------------------
# Reference (the CPU kernel and the tests' oracle)


def route_reference(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_k: int | None = None,
    renorm: str = "sum",
    dense: bool = False,
) -> Routing:
    """Pure-torch specification of :func:`route` (no validation: invalid rows get the fallback).
    Differentiable in ``logits`` by autograd (the sort only picks indices)."""
    N = logits.shape[-1]
    p = _check_options(temperature, top_p, renorm)
    kmax = kmax_for(N, top_k, max_k)
    lead = logits.shape[:-1]
    ids, w, counts, d = route_fwd_reference(logits.reshape(-1, N), float(temperature), p, kmax, renorm, dense)
    return Routing(ids.reshape(*lead, kmax), w.reshape(*lead, kmax), counts.reshape(lead),
                   d.reshape(*lead, N) if dense else None)


def cosine_logits_reference(h: Tensor, keys: Tensor, eps: float = 1e-8) -> Tensor:
    """``cos(h_t, keys_i)`` ``[T, N]`` in fp32 (fp64 for fp64), each norm clamped at ``eps``."""
    acc = acc_dtype(h.dtype)
    return F.normalize(h.to(acc), dim=-1, eps=eps) @ F.normalize(keys.to(acc), dim=-1, eps=eps).T


def route_cosine_fwd_reference(h: Tensor, keys: Tensor, temperature: float, eps: float, top_p: float, kmax: int,
                               renorm: str, dense: bool):
    """The op ``route_cosine_fwd``: :func:`route_fwd_reference` on the cosine logits, outputs in h's dtype."""
    ids, w, counts, d = route_fwd_reference(cosine_logits_reference(h, keys, eps), temperature, top_p, kmax, renorm,
                                            dense)
    return ids, w.to(h.dtype), counts, d.to(h.dtype)


def _row_stats(z: Tensor, temperature: float):
    """x = z·r (r = 1/τ in fp64 rounded once to the accumulation dtype; τ == 1: x = z), validity,
    live (selectable) experts and p = softmax(x) (router_rules 1, 3, 5, 6)."""
    acc = acc_dtype(z.dtype)
    x = z.to(acc)
    if temperature != 1.0:
        x = x * torch.tensor(1.0 / temperature, dtype=torch.float64).to(acc)
    ninf = float("-inf")
    valid = ~(torch.isnan(x) | (x == float("inf"))).any(-1) & (x > ninf).any(-1)
    live = (x > ninf) & valid[:, None]
    p = torch.softmax(torch.where(valid[:, None], x, torch.zeros_like(x)), dim=-1)  # finite for invalid rows
    return x, valid, live, p


def _top_p_threshold(top_p: float, acc: torch.dtype) -> Tensor:
    """top_p in the accumulation dtype, kept below 1 after rounding (as the kernels take it)."""
    t = torch.tensor(top_p, dtype=acc)
    return t if bool(t < 1) else torch.nextafter(torch.tensor(1.0, dtype=acc), torch.tensor(0.0, dtype=acc))


def route_fwd_reference(z: Tensor, temperature: float, top_p: float, kmax: int, renorm: str, dense: bool):
    """The op ``route_fwd`` on ``z [T, N]`` in fp32 (fp64 for fp64); see the module docstring."""
    T, N = z.shape
    x, valid, live, p = _row_stats(z, temperature)
    # order: x descending, ties -> lower index (stable sort; -0 keyed as +0); masked last (rule 2)
    key = torch.where(live, x.detach(), torch.full_like(x, float("-inf")))
    key = torch.where(key == 0, torch.zeros_like(key), key)
    _, order = torch.sort(key, dim=-1, descending=True, stable=True)
    n_live = live.sum(-1)
    if top_p >= 1.0:
        count = n_live  # keep all: no cumulative sum involved
    else:
        # rule 4: the shortest prefix whose running sum of e = exp(x - max x), summed sequentially in
        # the accumulation dtype (torch.cumsum accumulates fp32 in fp64 on CPU), reaches fl(top_p·S)
        m = torch.where(valid, key.max(-1).values, torch.zeros((), dtype=key.dtype))
        e = torch.where(live, torch.exp(key - m[:, None]), torch.zeros((), dtype=key.dtype))
        es = e.gather(1, order)
        thr = _top_p_threshold(top_p, key.dtype) * e.sum(-1)
        cap = n_live.clamp(max=kmax)
        count = cap.clone()
        cum = torch.zeros(T, dtype=key.dtype, device=z.device)
        found = ~valid
        for j in range(min(N, kmax)):
            cum = cum + es[:, j]
            hit = ~found & (cum >= thr) & (j < cap)
            count = torch.where(hit, torch.full_like(count, j + 1), count)
            found = found | hit
            # on CPU, outside compile: stop once every row is cut (a sync every 8 columns)
            if j % 8 == 7 and z.device.type == "cpu" and not torch.compiler.is_compiling() and bool(found.all()):
                break
    count = count.clamp(max=kmax)
    K = min(kmax, N)
    sel = order[:, :K]
    keep = torch.arange(K, device=z.device)[None, :] < count[:, None]
    psel = torch.where(keep, p.gather(1, sel), torch.zeros((), dtype=p.dtype, device=z.device))
    if renorm == "sum":
        w = psel / psel.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    elif renorm == "softmax":
        e = torch.where(keep, torch.exp(psel - psel[:, :1]), torch.zeros_like(psel))
        w = e / e.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    else:
        w = psel
    w = torch.where(keep, w, torch.zeros_like(w))
    ids = torch.where(keep, sel, torch.full_like(sel, -1)).to(torch.int32)
    if kmax > K:
        ids = torch.cat([ids, ids.new_full((T, kmax - K), -1)], dim=1)
        w = torch.cat([w, w.new_zeros((T, kmax - K))], dim=1)
    dense_out = (
        torch.zeros((T, N), dtype=w.dtype, device=z.device).scatter(1, sel, w[:, :K]).to(z.dtype)
        if dense
        else z.new_empty((0,))
    )
    return ids.contiguous(), w.to(z.dtype).contiguous(), count.to(torch.int32).contiguous(), dense_out.contiguous()


def route_bwd_reference(grad_w: Tensor, grad_dense: Tensor | None, z: Tensor, ids: Tensor, temperature: float,
                        renorm: str) -> Tensor:
    """The op ``route_bwd``: dlogits from the gradients of the compact (and dense) weights, the
    selection ``ids`` held fixed (entries outside [0, N) are "no expert")."""
    T, N = z.shape
    _, valid, _, p = _row_stats(z, temperature)
    acc = p.dtype
    inr = (ids >= 0) & (ids < N)
    idc = torch.where(inr, ids, torch.zeros_like(ids)).long()
    zero = torch.zeros((), dtype=acc, device=z.device)
    psel = torch.where(inr, p.gather(1, idc), zero)
    gw = grad_w.to(acc)
    if grad_dense is not None:
        gw = gw + grad_dense.to(acc).gather(1, idc)
    gw = torch.where(inr, gw, zero)
    S = psel.sum(-1, keepdim=True)
    ok = valid[:, None] & (S > 0)
    Ss = torch.where(ok, S, torch.ones_like(S))
    if renorm == "none":
        g = gw
    elif renorm == "sum":
        D = (gw * psel).sum(-1, keepdim=True) / Ss
        g = (gw - D) / Ss
    else:
        pm = psel.max(-1, keepdim=True).values
        e = torch.where(inr, torch.exp(psel - pm), zero)
        Z = e.sum(-1, keepdim=True)
        wv = e / torch.where(ok, Z, torch.ones_like(Z))
        D = (gw * wv).sum(-1, keepdim=True)
        g = wv * (gw - D)
    g = torch.where(inr, g, zero)
    gd = torch.zeros((T, N), dtype=acc, device=z.device).scatter_add(1, idc, g)
    c = (gd * p).sum(-1, keepdim=True)
    dz = p * (gd - c) / temperature
    return torch.where(ok, dz, zero).to(z.dtype).contiguous()


# ------------------------------------------------------------------------------------------------
# Op registration: fake kernels, CPU kernels (the reference), autograd


def _check_select(temperature, top_p, kmax, renorm):
    """The selection options of the route ops (route_fwd, route_cosine_fwd; route_bwd's temperature/renorm)."""
    expect(0.0 < temperature < float("inf"), _OP, f"temperature must be > 0 and finite, got {temperature}")
    expect(top_p >= 0.0, _OP, f"top_p must be >= 0, got {top_p}")
    expect(kmax >= 1, _OP, f"kmax must be >= 1, got {kmax}")
    expect(renorm in RENORMS, _OP, f"renorm must be one of {RENORMS}, got {renorm!r}")


def _check_fwd(logits, temperature, top_p, kmax, renorm):
    expect(logits.dim() == 2, _OP, f"logits must be [T, N], got {list(logits.shape)}")
    expect(logits.shape[1] >= 1, _OP, "logits must have N >= 1 experts")
    expect_dtype(_OP, "logits", logits)
    _check_select(temperature, top_p, kmax, renorm)


def _empty_routing(like: Tensor, T: int, N: int, kmax: int, dense: bool):
    """Uninitialised outputs of the forward ops: ids, weights, counts, dense ([T, N] or [0])."""
    return (
        like.new_empty((T, kmax), dtype=torch.int32),
        like.new_empty((T, kmax)),
        like.new_empty((T,), dtype=torch.int32),
        like.new_empty((T, N) if dense else (0,)),
    )


def _check_bwd(grad_w, grad_dense, logits, ids, temperature, renorm):
    _check_fwd(logits, temperature, 1.0, 1, renorm)
    T = logits.shape[0]
    expect(ids.dim() == 2 and ids.shape[0] == T and ids.shape[1] >= 1, _OP,
           f"ids must be [T, kmax] with T = {T}, got {list(ids.shape)}")
    expect(ids.dtype == torch.int32, _OP, f"ids must have dtype torch.int32, got {ids.dtype}")
    expect(grad_w.shape == ids.shape, _OP, f"grad_weights must be [T, kmax] = {list(ids.shape)}, got {list(grad_w.shape)}")
    expect_dtype(_OP, "grad_weights", grad_w, like=logits)
    if grad_dense is not None:
        expect(grad_dense.shape == logits.shape, _OP,
               f"grad_dense must be [T, N] = {list(logits.shape)}, got {list(grad_dense.shape)}")
        expect_dtype(_OP, "grad_dense", grad_dense, like=logits)


@torch.library.register_fake("mokernels::route_fwd")
def _fake_fwd(logits, temperature, top_p, kmax, renorm, dense):
    _check_fwd(logits, temperature, top_p, kmax, renorm)
    return _empty_routing(logits, *logits.shape, kmax, dense)


@torch.library.register_fake("mokernels::route_bwd")
def _fake_bwd(grad_w, grad_dense, logits, ids, temperature, renorm):
    _check_bwd(grad_w, grad_dense, logits, ids, temperature, renorm)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_kernel("mokernels::route_fwd", "cpu")
def _cpu_fwd(logits, temperature, top_p, kmax, renorm, dense):
    _check_fwd(logits, temperature, top_p, kmax, renorm)
    with torch.no_grad():
        return route_fwd_reference(logits, temperature, top_p, kmax, renorm, dense)


@torch.library.register_kernel("mokernels::route_bwd", "cpu")
def _cpu_bwd(grad_w, grad_dense, logits, ids, temperature, renorm):
    _check_bwd(grad_w, grad_dense, logits, ids, temperature, renorm)
    with torch.no_grad():
        return route_bwd_reference(grad_w, grad_dense, logits, ids, temperature, renorm)


def _check_cosine(h, keys, temperature, eps, top_p, kmax, renorm):
    expect(h.dim() == 2 and keys.dim() == 2 and keys.shape[1] == h.shape[1] and keys.shape[0] >= 1, _OP,
           f"h must be [T, r] and keys [N, r], got {list(h.shape)} and {list(keys.shape)}")
    expect_dtype(_OP, "h", h)
    expect_dtype(_OP, "keys", keys, like=h)
    expect(eps > 0, _OP, f"eps must be > 0, got {eps}")
    _check_select(temperature, top_p, kmax, renorm)


@torch.library.register_fake("mokernels::route_cosine_fwd")
def _fake_cosine(h, keys, temperature, eps, top_p, kmax, renorm, dense):
    _check_cosine(h, keys, temperature, eps, top_p, kmax, renorm)
    return _empty_routing(h, h.shape[0], keys.shape[0], kmax, dense)


@torch.library.register_kernel("mokernels::route_cosine_fwd", "cpu")
def _cpu_cosine(h, keys, temperature, eps, top_p, kmax, renorm, dense):
    _check_cosine(h, keys, temperature, eps, top_p, kmax, renorm)
    with torch.no_grad():
        return route_cosine_fwd_reference(h, keys, temperature, eps, top_p, kmax, renorm, dense)


def _setup_context_cosine(ctx, inputs, output):
    h, keys, temperature, eps, _top_p, _kmax, renorm, dense = inputs
    ctx.save_for_backward(h, keys, output[0])
    ctx.temperature, ctx.eps, ctx.renorm, ctx.dense = temperature, eps, renorm, dense


def _backward_cosine(ctx, _g_ids, g_w, _g_counts, g_dense):
    h, keys, ids = ctx.saved_tensors
    with torch.enable_grad():
        hh, kk = h.detach().requires_grad_(True), keys.detach().requires_grad_(True)
        z = cosine_logits_reference(hh, kk, ctx.eps)  # [T, N] fp32: one GEMM, recomputed
        gw = torch.zeros(ids.shape, dtype=z.dtype, device=z.device) if g_w is None else g_w.to(z.dtype)
        gd = g_dense.to(z.dtype).contiguous() if (ctx.dense and g_dense is not None) else None
        bwd = route_bwd_reference if z.shape[-1] > MAX_EXPERTS_KERNEL_BWD else torch.ops.mokernels.route_bwd
        dz = bwd(gw.contiguous(), gd, z.detach(), ids, ctx.temperature, ctx.renorm)
        dh, dk = torch.autograd.grad(z, (hh, kk), dz)
    need = ctx.needs_input_grad
    return (dh if need[0] else None, dk if need[1] else None) + (None,) * 6


torch.library.register_autograd("mokernels::route_cosine_fwd", _backward_cosine, setup_context=_setup_context_cosine)


def _setup_context(ctx, inputs, output):
    logits, temperature, _top_p, _kmax, renorm, dense = inputs
    ctx.save_for_backward(logits, output[0])
    ctx.temperature, ctx.renorm, ctx.dense = temperature, renorm, dense


def _backward(ctx, _g_ids, g_w, _g_counts, g_dense):
    logits, ids = ctx.saved_tensors
    if g_w is None:
        g_w = torch.zeros(ids.shape, dtype=logits.dtype, device=logits.device)
    gd = g_dense if (ctx.dense and g_dense is not None) else None
    bwd = route_bwd_reference if logits.shape[-1] > MAX_EXPERTS_KERNEL_BWD else torch.ops.mokernels.route_bwd
    dz = bwd(g_w.contiguous(), None if gd is None else gd.contiguous(), logits, ids, ctx.temperature, ctx.renorm)
    return dz, None, None, None, None, None


torch.library.register_autograd("mokernels::route_fwd", _backward, setup_context=_setup_context)
