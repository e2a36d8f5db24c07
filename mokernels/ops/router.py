"""Fused router (METHODS.md §2): softmax (temperature or cosine logits) + top-k / top-p selection +
renormalisation, in the compact form the multi-adapter GEMM's mixture form takes.

Every method routes through this: EffiLoRA/HydraLoRA dense softmax gates, SAMoRA's cosine router
with a temperature, DLP-LoRA's top-p over tasks per sentence, SLoRA's top-p over task experts.

Semantics (the reference :func:`route_reference` is the executable spec):

* ``x = z · r`` with ``r = fl_A(1/τ)`` (1/τ in fp64 rounded once to the accumulation dtype A: fp32,
  fp64 for fp64 logits; τ and r must be finite and r > 0 in A; τ == 1: x = z); ``p = softmax(x)``.
* Order: descending x, ties -> lower expert index (by x, not by p: p underflows to 0 for several
  experts at small τ). Keep the shortest prefix of that order whose *unnormalised* mass reaches the
  threshold: ``Σ_prefix e >= fl_A(top_p · S)`` with ``e = exp(x - max x)``, ``S = Σ e``, the prefix
  summed sequentially in A; always at least one expert; ``top_p >= 1`` (or ``None``) keeps all,
  without any sum; at most ``kmax`` experts, where ``kmax = top_k`` if given, else ``max_k``, else N
  (static: no host sync). With ``top_k`` and no ``top_p`` this is plain top-k; with neither it is a
  dense softmax gate in compact form. A ``max_k``/``top_k`` cap may stop the prefix before it reaches
  ``top_p`` (then the mass property does not hold, by design). These are the router rules every
  kernel implements too: the selection agrees bit for bit, weights up to rounding.
* Experts whose logit is ``-inf`` are masked: never selected (so ``counts`` may be < ``top_k``).
* Renormalisation: ``"sum"`` ``w = p / Σ p_sel`` (default), ``"softmax"`` ``w = softmax(p_sel)``
  (DLP-LoRA's code), ``"none"`` ``w = p_sel``.
* Outputs: ``ids [T, kmax]`` int32 in the order above, ``-1`` pads; ``weights [T, kmax]``
  in the logits' dtype (0 at pads); ``counts [T]`` int32; optional ``dense [T, N]`` (0 where not kept).
  Weights are in the logits' dtype, as ``torch.softmax`` returns; they are computed in fp32.
* Invalid rows (a NaN or +inf in ``x``, or all ``-inf``): :func:`route` raises a ValueError
  naming the row in eager mode (``validate=True``, the default: one fused pass and one host sync;
  never for meta/fake tensors). Under ``torch.compile``, CUDA-graph capture or ``validate=False``
  (model-internal calls) the documented fallback applies instead: count 0, ids -1, weights 0, dense 0,
  and a zero gradient.
* AD, the selection held fixed: reverse mode, double backward (through the differentiable reference
  composition of the backward) and, in eager mode, forward mode (``route_cosine``: not implemented,
  a clear error). Autocast: the router runs in the logits' dtype; route_cosine casts keys to h's dtype.

Public functions: :func:`route` (logits), :func:`route_cosine` (SAMoRA: codes ``h`` and keys, the
cosine logits formed inside the kernel), :func:`route_segments` (one row per sentence, broadcast to
its tokens by offsets, no host sync). CUDA kernels: ``csrc/kernels/router.cuh`` (N <= 4096 experts, fp64 2048,
forward and backward; larger N runs the reference composition on the GPU). CPU tensors: without autograd and without a top-p
cut a native one-pass kernel (``csrc/cpu/cpu_ops.cpp``), else the reference.
"""
from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _C
from ._checks import (FLOAT_DTYPES, acc_dtype, autocast_like, can_sync, expect, expect_dtype, expect_same_device, grad_or_tangent,
                      is_eager, is_number, native_call_ok)

_OP = "route"
RENORMS = ("sum", "softmax", "none")
MAX_EXPERTS_KERNEL = 4096  # the CUDA kernels' limit on N, forward and backward (fp64: 2048; shared memory)


# The native CPU kernel of route without a top-p cut (csrc/cpu/cpu_ops.cpp); None with an extension built
# before it (then the reference path).
_native_route = getattr(_C, "route_topk_cpu", None)
_RENORM_CODE = {"sum": 0, "softmax": 1, "none": 2}


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
        if type(top_k) is int and top_k >= 1:  # the common case, without building a message
            return top_k
        expect(_is_int(top_k) and top_k >= 1, _OP, f"top_k must be an int >= 1, got {top_k!r}")
        return int(top_k)
    if max_k is not None:
        if type(max_k) is int and max_k >= 1:
            return max_k
        expect(_is_int(max_k) and max_k >= 1, _OP, f"max_k must be an int >= 1, got {max_k!r}")
        return int(max_k)
    return num_experts


def _is_int(v) -> bool:
    return is_number(v) and float(v).is_integer() and not isinstance(v, float)


def _round_to(x: float, acc: torch.dtype) -> float:
    """``x`` rounded once (to nearest) to ``acc`` (fp32 or fp64); inf where it overflows."""
    if acc == torch.float64 or not math.isfinite(x):
        return x
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def inv_temperature(temperature: float, dtype: torch.dtype) -> float:
    """``r = fl_A(1/τ)`` (router rule 1): 1/τ in fp64, rounded once to the accumulation dtype A of
    ``dtype`` logits. ValueError unless τ is a number with τ and r finite and > 0 in A (τ > FLT_MAX is
    inf in fp32; τ below ~1/FLT_MAX makes r inf)."""
    if type(temperature) in (float, int) and temperature == 1.0:  # the default: r = 1 in every dtype
        return 1.0
    acc = acc_dtype(dtype)
    ok = is_number(temperature) and 0.0 < float(temperature) < math.inf
    r = 0.0
    if ok:
        t = float(temperature)
        r = _round_to(1.0 / t, acc)
        ok = math.isfinite(_round_to(t, acc)) and 0.0 < r < math.inf
    if not ok:
        expect(ok, _OP, f"temperature must be a number > 0 with temperature and 1/temperature finite and nonzero in "
                        f"{acc} (the accumulation dtype of {dtype} logits), got {temperature!r}")
    return r


def _threshold(top_p: float, acc: torch.dtype) -> float:
    """``top_p`` rounded to A; below 1 it stays below 1 (1 - 1e-9 is not "keep all"). As the kernels do."""
    if top_p >= 1.0:
        return 1.0
    t = _round_to(top_p, acc)
    return t if t < 1.0 else (1.0 - 2.0**-24 if acc == torch.float32 else math.nextafter(1.0, 0.0))


def _check_options(temperature, top_p, renorm, dtype: torch.dtype) -> tuple[float, float]:
    """Checks route()'s options; returns ``(r, top_p)`` with r = fl_A(1/τ) and top_p capped at 1."""
    r = inv_temperature(temperature, dtype)
    if not (isinstance(renorm, str) and renorm in RENORMS):
        expect(False, _OP, f"renorm must be one of {RENORMS}, got {renorm!r}")
    if top_p is None:
        return r, 1.0
    if not (is_number(top_p) and float(top_p) >= 0.0):
        expect(False, _OP, f"top_p must be a number >= 0, got {top_p!r}")
    return r, min(float(top_p), 1.0)


def _bad_rows(z: Tensor, r: float) -> Tensor:
    """``[T]`` bool, no sync: rows of ``z [T, N]`` whose x = z·r has a NaN or +inf or only -inf (router
    rule 6). One pass over z: r > 0 is monotone, so that is exactly max(z)·r not finite (NaN propagates)."""
    m = z.amax(-1).to(acc_dtype(z.dtype))
    return ~torch.isfinite(m * r if r != 1.0 else m)


def _first(bad: Tensor) -> Tensor:
    """0-d int64: index of the first True of the 1-d ``bad``, or -1 (no sync)."""
    if bad.numel() == 0:
        return torch.full((), -1, dtype=torch.int64, device=bad.device)
    return torch.where(bad.any(), bad.to(torch.uint8).argmax(), -1)


def _raise_bad_row(row: int, what: str = "logits") -> None:
    raise ValueError(
        f"mokernels.{_OP}: {what} row {row} (flattened) has a NaN or +inf in logits/temperature or only -inf "
        "logits: no expert can be chosen. Mask experts with -inf but keep one finite logit per row "
        "(with validate=False such rows get count 0, ids -1, weights 0)."
    )


def validate_rows(z: Tensor, temperature: float, what: str = "logits") -> None:
    """Raises ValueError naming the first (flattened) row of ``z [T, N]`` that has a NaN or +inf in
    ``z / τ`` or only -inf. One fused pass over z and one host sync; nothing for meta/fake tensors."""
    if z.numel() == 0 or not can_sync(z):
        return
    row = int(_first(_bad_rows(z, inv_temperature(temperature, z.dtype))))  # the one host sync
    if row >= 0:
        _raise_bad_row(row, what)


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
        temperature: τ > 0, applied once as ``x = z · fl(1/τ)`` (τ and 1/τ finite in fp32, or fp64 for
            fp64 logits).
        top_k: keep the k experts with the largest logits (also the output width kmax).
        top_p: keep the shortest descending prefix with mass >= top_p (>= 1 keeps all; always >= 1
            expert). With ``top_k`` too: top-p capped at k experts.
        max_k: cap on the number kept and the output width when ``top_k`` is not given.
        renorm: ``"sum"`` (w = p / Σ p_sel), ``"softmax"`` (softmax over p_sel) or ``"none"``.
        dense: also return the dense ``[..., N]`` weights.
        validate: in eager mode, raise ValueError on a row with NaN/+inf or only -inf (one fused pass
            and one host sync; never for meta/fake tensors, under torch.compile or graph capture).
            Pass ``validate=False`` inside models (every layer): invalid rows then get the fallback.
    Returns:
        :class:`Routing` ``(ids [..., kmax] int32, weights [..., kmax], counts [...] int32,
        dense [..., N] or None)`` with ``kmax = top_k or max_k or N``; ids in descending-logit order
        (ties: lower index), -1 pads. The compact form feeds the multi-adapter GEMM's mixture form.
    Differentiable in ``logits`` (selection held fixed): reverse mode, double backward, forward mode.
    CUDA tensors run the fused kernels (N <= 4096, fp64 2048; larger N runs the reference
    composition); CPU tensors run a native one-pass kernel when no autograd is needed and there is no
    top-p cut, else :func:`route_reference`.
    """
    if (type(logits) is Tensor and logits.is_cpu and _native_route is not None and logits.dim() >= 1
            and (top_p is None or (type(top_p) in (float, int) and top_p >= 1.0)) and logits.dtype in FLOAT_DTYPES
            and native_call_ok() and not grad_or_tangent(logits)):
        # CPU, no autograd, no top-p cut (top-k / keep-all): the native one-pass kernel (csrc/cpu/cpu_ops.cpp),
        # called directly; validity comes out of the same pass (issue 9: a few µs per call, not ~30)
        N = logits.shape[-1]
        expect(N >= 1, _OP, "logits must have N >= 1 experts (last dimension)")
        r, _ = _check_options(temperature, None, renorm, logits.dtype)
        kmax = kmax_for(N, top_k, max_k)
        z = logits if logits.dim() == 2 else logits.reshape(-1, N)
        ids, w, counts, d, bad = _native_route(z, r, kmax, _RENORM_CODE[renorm], bool(dense))
        if bad >= 0 and validate:
            _raise_bad_row(bad)
        if logits.dim() == 2:
            return Routing(ids, w, counts, d if dense else None)
        lead = logits.shape[:-1]
        return Routing(ids.view(*lead, kmax), w.view(*lead, kmax), counts.view(lead), d.view(*lead, N) if dense else None)
    expect(isinstance(logits, Tensor) and logits.dim() >= 1, _OP, "logits must be a [..., N] tensor")
    expect_dtype(_OP, "logits", logits)
    N = logits.shape[-1]
    expect(N >= 1, _OP, "logits must have N >= 1 experts (last dimension)")
    r, p = _check_options(temperature, top_p, renorm, logits.dtype)
    kmax = kmax_for(N, top_k, max_k)
    dense = bool(dense)
    lead = logits.shape[:-1]
    flat = logits.dim() == 2  # [T, N]: no reshapes in or out
    z = logits if flat else logits.reshape(-1, N)
    dev = z.device.type
    eager = is_eager(dev)
    real = eager and can_sync(z)  # eager, not meta / fake: values may be read
    check = validate and real
    if dev == "cpu" and real:
        # CPU: the reference itself, differentiable by torch's autograd in every mode; validity comes
        # out of the same pass (one host check, free on CPU).
        ids, w, counts, d, valid = _route_core(z, r, p, kmax, renorm, dense)
        if check and valid is not None and not bool(valid.all()):  # None: the top-k fast path, all valid
            _raise_bad_row(int(_first(~valid)))
    else:
        if check and z.numel():
            row = int(_first(_bad_rows(z, r)))  # one fused pass, one host sync
            if row >= 0:
                _raise_bad_row(row)
        if N > _kernel_max_n(z.dtype) and dev not in ("cpu", "meta"):  # beyond the kernel: the reference
            ids, w, counts, d, _ = _route_core(z, r, p, kmax, renorm, dense)
        elif eager and grad_or_tangent(z):
            ids, w, counts, d = _RouteFn.apply(z, float(temperature), p, kmax, renorm, dense)
        else:
            ids, w, counts, d = torch.ops.mokernels.route_fwd(z, float(temperature), p, kmax, renorm, dense)
    if flat:
        return Routing(ids, w, counts, d if dense else None)
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
        h: ``[..., r]`` codes (fp16, bf16, fp32 or fp64), r >= 1; keys: ``[N, r]`` expert keys, same
        dtype (under ``torch.autocast`` keys are cast to h's dtype). Other arguments as :func:`route`.
    Returns:
        The :class:`Routing` of :func:`route` (weights in ``h``'s dtype). Differentiable in ``h`` and
        ``keys`` (selection held fixed; reverse mode and double backward; forward mode raises
        NotImplementedError). On CUDA the cosine logits are formed inside the routing kernel (no
        ``[T, N]`` logits, no ``[T, N, r]`` intermediate); the backward recomputes them with one
        ``[T, N]`` GEMM in fp32 and goes through ``route_bwd``.
    """
    expect(isinstance(h, Tensor) and h.dim() >= 1 and isinstance(keys, Tensor) and keys.dim() == 2, _OP,
           f"h must be [..., r] and keys [N, r], got {list(h.shape) if isinstance(h, Tensor) else h!r} and "
           f"{list(keys.shape) if isinstance(keys, Tensor) else keys!r}")
    (keys,) = autocast_like(h.device.type, h, keys)
    r = h.shape[-1]
    expect(r >= 1, _OP, f"h must be [..., r] with r >= 1 features, got {list(h.shape)}")
    expect(keys.shape[1] == r and keys.shape[0] >= 1, _OP, f"keys must be [N, r] with N >= 1 and r = {r}, got {list(keys.shape)}")
    expect_dtype(_OP, "h", h)
    expect_dtype(_OP, "keys", keys, like=h)
    expect_same_device(_OP, "h", h, keys=keys)
    expect(is_number(eps) and eps > 0, _OP, f"eps must be a number > 0, got {eps!r}")
    N = keys.shape[0]
    rr, p = _check_options(temperature, top_p, renorm, h.dtype)
    kmax = kmax_for(N, top_k, max_k)
    dense = bool(dense)
    lead = h.shape[:-1]
    hh = h.reshape(-1, r)
    if validate and is_eager() and hh.numel() and can_sync(hh):
        # the kernel accumulates |h|², |k|² and <h, k> in fp32 (fp64 for fp64): they must stay finite.
        # One pass over h and one over keys, one host sync for both.
        acc = acc_dtype(h.dtype)
        hbad = _first(~torch.isfinite(hh.to(acc).square().sum(-1)))
        kbad = ~torch.isfinite(keys.to(acc).square().sum(-1)).all()
        hrow, kb = torch.stack([hbad, kbad.to(torch.int64)]).tolist()
        if hrow >= 0:
            raise ValueError(f"mokernels.{_OP}: h row {hrow} (flattened) has a NaN or inf, "
                             f"or a squared norm that overflows {acc}")
        expect(not kb, _OP, f"keys have a NaN or inf, or a squared norm that overflows {acc}")
    if N > _kernel_max_n(hh.dtype) and hh.device.type not in ("cpu", "meta"):  # beyond the kernel: the composition
        z = cosine_logits_reference(hh, keys, float(eps))
        ids, w, counts, d, _ = _route_core(z, rr, p, kmax, renorm, dense)
        w, d = w.to(h.dtype), d.to(h.dtype)
    elif is_eager() and grad_or_tangent(hh, keys):
        ids, w, counts, d = _RouteCosineFn.apply(hh, keys, float(temperature), float(eps), p, kmax, renorm, dense)
    else:
        ids, w, counts, d = torch.ops.mokernels.route_cosine_fwd(hh, keys, float(temperature), float(eps), p, kmax,
                                                                 renorm, dense)
    return Routing(ids.reshape(*lead, kmax), w.reshape(*lead, kmax), counts.reshape(lead),
                   d.reshape(*lead, N) if dense else None)


def route_segments(logits: Tensor, offsets: Tensor, num_tokens: int, *, validate: bool = True, **options) -> Routing:
    """Per-sentence routing: route ``S`` rows (one per sentence), then give every token of sentence
    ``s`` (``offsets[s] <= t < offsets[s+1]``) that sentence's routing. No host sync except the
    optional eager validation (offsets and logits together: one host sync).

    Args:
        logits: ``[S, N]`` one row per sentence; offsets: ``[S+1]`` int32/int64, sorted, ``offsets[0] = 0``,
        ``offsets[S] = num_tokens``; num_tokens: T (a Python int, so output shapes are static);
        options: as :func:`route`.
    Returns: the token-level :class:`Routing` (``ids [T, kmax]`` ...). DLP-LoRA's GEMM can also take
    the sentence-level result ``route(logits)`` with ``offsets`` directly (its segment-mixture form).
    """
    expect(isinstance(logits, Tensor) and logits.dim() == 2, _OP,
           f"logits must be [S, N], got {list(logits.shape) if isinstance(logits, Tensor) else logits!r}")
    S = logits.shape[0]
    expect(isinstance(offsets, Tensor) and offsets.dim() == 1 and offsets.shape[0] == S + 1, _OP,
           f"offsets must be [S+1] = [{S + 1}], got {list(offsets.shape) if isinstance(offsets, Tensor) else offsets!r}")
    expect(offsets.dtype in (torch.int32, torch.int64), _OP, f"offsets must be int32 or int64, got {offsets.dtype}")
    expect(_is_int(num_tokens) and num_tokens >= 0, _OP, f"num_tokens must be an int >= 0, got {num_tokens!r}")
    expect(S > 0 or num_tokens == 0, _OP, f"offsets = [0] (no sentence) needs num_tokens = 0, got {num_tokens}")
    expect_same_device(_OP, "logits", logits, offsets=offsets)
    if validate and is_eager() and S > 0 and can_sync(offsets) and can_sync(logits):
        # offsets and the logit rows in one fused check, one host sync
        r = inv_temperature(options.get("temperature", 1.0), logits.dtype)
        o = offsets
        off_bad = (o[1:] < o[:-1]).any() | (o[0] != 0) | (o[-1] != num_tokens)
        off_bad, row = torch.stack([off_bad.to(torch.int64), _first(_bad_rows(logits, r))]).tolist()
        expect(not off_bad, _OP, f"offsets must be sorted with offsets[0] = 0 and offsets[S] = num_tokens = {num_tokens}")
        if row >= 0:
            _raise_bad_row(row)
    r = route(logits, validate=False, **options)
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
    r, p = _check_options(temperature, top_p, renorm, logits.dtype)
    kmax = kmax_for(N, top_k, max_k)
    lead = logits.shape[:-1]
    ids, w, counts, d, _ = _route_core(logits.reshape(-1, N), r, p, kmax, renorm, bool(dense))
    return Routing(ids.reshape(*lead, kmax), w.reshape(*lead, kmax), counts.reshape(lead),
                   d.reshape(*lead, N) if dense else None)


def cosine_logits_reference(h: Tensor, keys: Tensor, eps: float = 1e-8) -> Tensor:
    """``cos(h_t, keys_i)`` ``[T, N]`` in fp32 (fp64 for fp64), each norm clamped at ``eps``."""
    acc = acc_dtype(h.dtype)
    return F.normalize(h.to(acc), dim=-1, eps=eps) @ F.normalize(keys.to(acc), dim=-1, eps=eps).T


def _cosine_logits_exact(h: Tensor, keys: Tensor, eps: float) -> Tensor:
    """:func:`cosine_logits_reference` (no autograd) where identical keys give bit-identical columns, so
    they tie and the lower index wins, as in the kernel: a GEMM may round identical columns differently
    (blocking), so the product is taken with the distinct normalised keys only."""
    acc = acc_dtype(h.dtype)
    hn, kn = F.normalize(h.to(acc), dim=-1, eps=eps), F.normalize(keys.to(acc), dim=-1, eps=eps)
    ku, inv = torch.unique(kn, dim=0, return_inverse=True)
    if ku.shape[0] == kn.shape[0]:
        return _gemm(hn, kn.T)
    return _gemm(hn, ku.T).index_select(1, inv)


_gemm = torch.matmul  # the BLAS call of _cosine_logits_exact (tests substitute one that rounds per column)


def route_cosine_fwd_reference(h: Tensor, keys: Tensor, temperature: float, eps: float, top_p: float, kmax: int,
                               renorm: str, dense: bool):
    """The op ``route_cosine_fwd``: :func:`route_fwd_reference` on the cosine logits, outputs in h's dtype."""
    z = _cosine_logits_exact(h, keys, eps)
    ids, w, counts, d, _ = _route_core(z, inv_temperature(temperature, h.dtype), top_p, kmax, renorm, dense)
    return ids, w.to(h.dtype), counts, d.to(h.dtype)


def _scaled(z: Tensor, r: float) -> Tensor:
    """x = z · r in the accumulation dtype (router rule 1); r == 1: x = z, no multiply."""
    acc = acc_dtype(z.dtype)
    x = z if z.dtype == acc else z.to(acc)
    return x * r if r != 1.0 else x


def _order(x: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """The first K of every row of ``x [T, N]`` (no autograd) in the order of router rule 2: descending,
    ties -> lower index (NaN first). On CPU, for K well below N, ``topk(K + 1)``, and a stable sort only
    for the rows with a tie among those K + 1 (topk's tie order is unspecified)."""
    T, N = x.shape
    if x.device.type != "cpu" or 2 * K >= N:
        vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
        return vals[:, :K], idx[:, :K]
    vals, idx = torch.topk(x, K + 1, dim=-1, largest=True, sorted=True)
    tie = ((vals[:, 1:] == vals[:, :-1]) & (vals[:, 1:] > float("-inf"))).any(-1)
    if bool(tie.any()):
        rows = tie.nonzero().squeeze(1)
        sv, si = torch.sort(x.index_select(0, rows), dim=-1, descending=True, stable=True)
        vals[rows] = sv[:, : K + 1]
        idx[rows] = si[:, : K + 1]
    return vals[:, :K], idx[:, :K]


# CPU inputs with at most this many logits: fixed per-op costs dominate, and small ops on
# non-contiguous views cost several µs more than on contiguous tensors (a second tiny topk is cheaper)
_TINY = 1024


def _top_k_fast(x: Tensor, K: int, dense: bool, out_dtype: torch.dtype):
    """CPU top-k with renorm "sum" when every row has K + 1 finite, distinct largest logits (the common
    case): those rows are valid, keep exactly K experts, and topk's order is rule 2's. The weights are
    softmax over the selected logits (= e_sel / Σ e_sel up to rounding). None: take the general path."""
    small = x.numel() <= _TINY
    if small:  # the check on a topk of its own; topk(K) again below gives contiguous ids and values
        top = (x.detach() if x.requires_grad else x).topk(K + 1, dim=-1, largest=True, sorted=True)[0]
    else:
        vals, idx = x.topk(K + 1, dim=-1, largest=True, sorted=True)  # values differentiable in x
        top = vals.detach() if vals.requires_grad else vals
    # the differences of the sorted K + 1 largest are all < 0 and finite iff those are finite and
    # distinct (NaN / inf give NaN or -inf; an overflowing difference only sends the call to the
    # general path)
    lo, hi = torch.aminmax(torch.diff(top, dim=-1))
    if not (float(hi) < 0.0 and float(lo) > -math.inf):
        return None
    T, N = x.shape
    if small:  # distinct values: topk(K) is exactly rule 2's first K
        vals, idx = x.topk(K, dim=-1, largest=True, sorted=True)
    else:
        vals, idx = vals[:, :K], idx[:, :K]
    w = torch.softmax(vals, dim=-1)
    counts = torch.full((T,), K, dtype=torch.int32)
    d = torch.zeros((T, N), dtype=w.dtype).scatter(1, idx, w).to(out_dtype) if dense else x.new_empty((0,), dtype=out_dtype)
    return idx.to(torch.int32), w.to(out_dtype), counts, d, None  # valid None: every row is valid


def _route_core(z: Tensor, r: float, top_p: float, kmax: int, renorm: str, dense: bool):
    """route_fwd on ``z [T, N]`` with ``r = fl_A(1/τ)`` (router_rules.md), differentiable in z by autograd.
    Returns ``(ids, weights, counts, dense or [0], valid [T])``."""
    T, N = z.shape
    x = _scaled(z, r)
    acc = x.dtype
    K = min(kmax, N)
    if top_p >= 1.0 and renorm == "sum" and z.device.type == "cpu" and 2 * K < N and T > 0:
        fast = _top_k_fast(x, K, dense, z.dtype)
        if fast is not None:
            return fast
    vals, idx = _order(x.detach(), K)
    m = vals[:, :1]  # the row max (NaN sorts first; +inf / all -inf give a non-finite max)
    valid = torch.isfinite(m)
    if z.device.type != "cpu" or not bool(valid.all()):  # keep invalid rows finite (and their gradient 0);
        # off CPU unconditionally: no host sync in the N > 4096 (fp64 2048) GPU fallback (graph capture, compile)
        x = torch.where(valid, x, 0.0)
        m = torch.where(valid, m, 0.0)
    if top_p < 1.0 or renorm != "sum":
        e = torch.exp(x - m)  # rule 3
        S = e.sum(-1, keepdim=True)
        valid = valid[:, 0] & torch.isfinite(S[:, 0])
        e_sel = e.gather(1, idx)  # [T, K] in the order of rule 2
    else:  # top-k / keep-all with w = e_sel / Σ e_sel: S is not needed (a NaN sorts first: m is NaN)
        S, valid = None, valid[:, 0]
        e_sel = torch.exp(x.gather(1, idx) - m)
    live = vals > float("-inf")
    count = live.sum(-1)
    if top_p < 1.0:  # rule 4: unnormalised running sum, sequential in A, against fl_A(top_p * S)
        ed, thr = e_sel.detach(), S.detach()[:, 0] * _threshold(top_p, acc)
        if z.device.type == "cpu":
            cum, reached = torch.zeros(T, dtype=acc), torch.zeros(T, dtype=torch.bool)
            for j in range(K):
                cum = cum + ed[:, j]
                hit = (cum >= thr) & ~reached
                count = torch.where(hit & (count > j), j + 1, count)
                reached |= hit
                if bool(reached.all()):
                    break
        else:  # the GPU fallback for N > 4096 (no kernel to agree with): a parallel scan
            cs = torch.cumsum(ed, -1)
            count = torch.minimum((cs < thr[:, None]).sum(-1) + 1, count)
    count = torch.where(valid, count, 0)
    keep = torch.arange(K, device=z.device)[None, :] < count[:, None]
    zero = torch.zeros((), dtype=acc, device=z.device)
    tiny = torch.finfo(acc).tiny
    if renorm == "sum":
        w = e_sel / torch.where(keep, e_sel, zero).sum(-1, keepdim=True).clamp(min=tiny)
    elif renorm == "softmax":
        psel = e_sel / S
        es = torch.where(keep, torch.exp(psel - psel[:, :1]), zero)
        w = es / es.sum(-1, keepdim=True).clamp(min=tiny)
    else:
        w = e_sel / S
    w = torch.where(keep, w, zero)
    ids = torch.where(keep, idx, -1).to(torch.int32)
    if kmax > K:
        ids = torch.cat([ids, ids.new_full((T, kmax - K), -1)], dim=1)
        w = torch.cat([w, w.new_zeros((T, kmax - K))], dim=1)
    dense_out = (
        torch.zeros((T, N), dtype=acc, device=z.device).scatter(1, idx, w[:, :K]).to(z.dtype)
        if dense
        else z.new_empty((0,))
    )
    return ids.contiguous(), w.to(z.dtype).contiguous(), count.to(torch.int32), dense_out, valid


def route_fwd_reference(z: Tensor, temperature: float, top_p: float, kmax: int, renorm: str, dense: bool):
    """The op ``route_fwd`` on ``z [T, N]`` in fp32 (fp64 for fp64); see the module docstring."""
    ids, w, counts, d, _ = _route_core(z, inv_temperature(temperature, z.dtype), top_p, kmax, renorm, dense)
    return ids, w, counts, d


def _softmax_rows(z: Tensor, r: float):
    """(x = z·r, valid [T], p = softmax(x) with invalid rows replaced by 0 so everything stays finite)."""
    x = _scaled(z, r)
    valid = torch.isfinite(x.detach().amax(-1)) if x.shape[0] else torch.zeros(0, dtype=torch.bool, device=x.device)
    p = torch.softmax(torch.where(valid[:, None], x, 0.0), dim=-1)
    return x, valid, p


class _Kept(NamedTuple):
    """The kept experts of a fixed selection ``ids`` and the renormalisation's pieces (backward, jvp)."""

    inr: Tensor  # [T, kmax] id in [0, N)
    idc: Tensor  # [T, kmax] int64 ids, 0 where not in range
    psel: Tensor  # [T, kmax] p of the kept experts, 0 elsewhere
    ok: Tensor  # [T, 1] valid row with a nonzero kept mass
    S: Tensor  # [T, 1] Σ psel (1 where not ok)
    wv: Tensor | None  # renorm "softmax": the weights softmax(psel) over the kept experts


def _kept(p: Tensor, valid: Tensor, ids: Tensor, renorm: str) -> _Kept:
    N = p.shape[1]
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    inr = (ids >= 0) & (ids < N)
    idc = torch.where(inr, ids, 0).long()
    psel = torch.where(inr, p.gather(1, idc), zero)
    S = psel.sum(-1, keepdim=True)
    ok = valid[:, None] & (S > 0)
    wv = None
    if renorm == "softmax":
        e = torch.where(inr, torch.exp(psel - psel.max(-1, keepdim=True).values), zero)
        Z = e.sum(-1, keepdim=True)
        wv = e / torch.where(ok, Z, torch.ones_like(Z))
    return _Kept(inr, idc, psel, ok, torch.where(ok, S, torch.ones_like(S)), wv)


def route_bwd_reference(grad_w: Tensor, grad_dense: Tensor | None, z: Tensor, ids: Tensor, temperature: float,
                        renorm: str) -> Tensor:
    """The op ``route_bwd``: dlogits from the gradients of the compact (and dense) weights, the
    selection ``ids`` held fixed (entries outside [0, N) are "no expert"). Differentiable itself (the
    double backward of :func:`route` goes through it)."""
    T, N = z.shape
    r = inv_temperature(temperature, z.dtype)
    _, valid, p = _softmax_rows(z, r)
    acc = p.dtype
    zero = torch.zeros((), dtype=acc, device=z.device)
    inr, idc, psel, ok, Ss, wv = _kept(p, valid, ids, renorm)
    gw = grad_w.to(acc)
    if grad_dense is not None:
        gw = gw + grad_dense.to(acc).gather(1, idc)
    gw = torch.where(inr, gw, zero)
    if renorm == "none":
        g = gw
    elif renorm == "sum":
        D = (gw * psel).sum(-1, keepdim=True) / Ss
        g = (gw - D) / Ss
    else:
        g = wv * (gw - (gw * wv).sum(-1, keepdim=True))
    g = torch.where(inr, g, zero)
    gd = torch.zeros((T, N), dtype=acc, device=z.device).scatter_add(1, idc, g)
    c = (gd * p).sum(-1, keepdim=True)
    dz = p * (gd - c) * r
    return torch.where(ok, dz, zero).to(z.dtype).contiguous()


def route_jvp_reference(dz: Tensor, z: Tensor, ids: Tensor, temperature: float, renorm: str, dense: bool):
    """Forward-mode AD of ``route_fwd``: the tangents ``(dweights [T, kmax], ddense [T, N] or None)`` for a
    logit tangent ``dz [T, N]``, the selection ``ids`` held fixed."""
    T, N = z.shape
    r = inv_temperature(temperature, z.dtype)
    _, valid, p = _softmax_rows(z, r)
    dx = dz.to(p.dtype) * r
    dp = p * (dx - (p * dx).sum(-1, keepdim=True))
    zero = torch.zeros((), dtype=p.dtype, device=z.device)
    inr, idc, psel, ok, Ss, wv = _kept(p, valid, ids, renorm)
    dsel = torch.where(inr, dp.gather(1, idc), zero)
    if renorm == "none":
        dw = dsel
    elif renorm == "sum":
        dw = (dsel - psel / Ss * dsel.sum(-1, keepdim=True)) / Ss
    else:
        dw = wv * (dsel - (wv * dsel).sum(-1, keepdim=True))
    dw = torch.where(inr & ok, dw, zero)
    dd = torch.zeros((T, N), dtype=p.dtype, device=z.device).scatter_add(1, idc, dw).to(z.dtype) if dense else None
    return dw.to(z.dtype), dd


# ------------------------------------------------------------------------------------------------
# Op registration: fake kernels, CPU kernels (the reference), autograd


def _check_select(temperature, top_p, kmax, renorm, dtype):
    """The selection options of the route ops (route_fwd, route_cosine_fwd; route_bwd's temperature/renorm)."""
    inv_temperature(temperature, dtype)
    expect(top_p >= 0.0, _OP, f"top_p must be >= 0, got {top_p}")
    expect(kmax >= 1, _OP, f"kmax must be >= 1, got {kmax}")
    expect(renorm in RENORMS, _OP, f"renorm must be one of {RENORMS}, got {renorm!r}")


def _check_fwd(logits, temperature, top_p, kmax, renorm):
    expect(logits.dim() == 2, _OP, f"logits must be [T, N], got {list(logits.shape)}")
    expect(logits.shape[1] >= 1, _OP, "logits must have N >= 1 experts")
    expect_dtype(_OP, "logits", logits)
    _check_select(temperature, top_p, kmax, renorm, logits.dtype)


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
    expect_same_device(_OP, "logits", logits, ids=ids, grad_weights=grad_w, grad_dense=grad_dense)
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
    expect(h.dim() == 2 and keys.dim() == 2 and keys.shape[1] == h.shape[1] and keys.shape[0] >= 1
           and h.shape[1] >= 1, _OP, f"h must be [T, r] and keys [N, r] with r >= 1, got {list(h.shape)} and "
                                     f"{list(keys.shape)}")
    expect_dtype(_OP, "h", h)
    expect_dtype(_OP, "keys", keys, like=h)
    expect_same_device(_OP, "h", h, keys=keys)
    expect(eps > 0, _OP, f"eps must be > 0, got {eps}")
    _check_select(temperature, top_p, kmax, renorm, h.dtype)


@torch.library.register_fake("mokernels::route_cosine_fwd")
def _fake_cosine(h, keys, temperature, eps, top_p, kmax, renorm, dense):
    _check_cosine(h, keys, temperature, eps, top_p, kmax, renorm)
    return _empty_routing(h, h.shape[0], keys.shape[0], kmax, dense)


@torch.library.register_kernel("mokernels::route_cosine_fwd", "cpu")
def _cpu_cosine(h, keys, temperature, eps, top_p, kmax, renorm, dense):
    _check_cosine(h, keys, temperature, eps, top_p, kmax, renorm)
    with torch.no_grad():
        return route_cosine_fwd_reference(h, keys, temperature, eps, top_p, kmax, renorm, dense)


# Backward formulas. With grad mode on (create_graph=True: a double backward) they use the
# differentiable reference composition instead of the route_bwd op, whose own backward is not
# implemented (registered below to say so, instead of torch's silent zeros).


def _route_grad(g_w, g_dense, logits, ids, temperature, renorm, dense):
    if g_w is None:
        g_w = torch.zeros(ids.shape, dtype=logits.dtype, device=logits.device)
    gd = g_dense if (dense and g_dense is not None) else None
    if torch.is_grad_enabled() or logits.shape[-1] > _kernel_max_n(logits.dtype):  # double backward / beyond the kernel
        return route_bwd_reference(g_w, gd, logits, ids, temperature, renorm)
    return torch.ops.mokernels.route_bwd(g_w.contiguous(), None if gd is None else gd.contiguous(), logits, ids,
                                         temperature, renorm)


def _cosine_grad(ctx_need, g_w, g_dense, h, keys, ids, temperature, eps, renorm, dense):
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        hh = h if (create_graph and h.requires_grad) else h.detach().requires_grad_(True)
        kk = keys if (create_graph and keys.requires_grad) else keys.detach().requires_grad_(True)
        z = cosine_logits_reference(hh, kk, eps)  # [T, N] fp32: one GEMM, recomputed
        gw = torch.zeros(ids.shape, dtype=z.dtype, device=z.device) if g_w is None else g_w.to(z.dtype)
        gd = g_dense.to(z.dtype) if (dense and g_dense is not None) else None
        if create_graph or z.shape[-1] > _kernel_max_n(z.dtype):  # double backward / beyond the kernel
            dz = route_bwd_reference(gw, gd, z if create_graph else z.detach(), ids, temperature, renorm)
        else:
            dz = torch.ops.mokernels.route_bwd(gw.contiguous(), None if gd is None else gd.contiguous(), z.detach(),
                                               ids, temperature, renorm)
        dh, dk = torch.autograd.grad(z, (hh, kk), dz, create_graph=create_graph)
    return dh if ctx_need[0] else None, dk if ctx_need[1] else None


def _setup_context_cosine(ctx, inputs, output):
    h, keys, temperature, eps, _top_p, _kmax, renorm, dense = inputs
    ctx.save_for_backward(h, keys, output[0])
    ctx.temperature, ctx.eps, ctx.renorm, ctx.dense = temperature, eps, renorm, dense


def _backward_cosine(ctx, _g_ids, g_w, _g_counts, g_dense):
    h, keys, ids = ctx.saved_tensors
    return _cosine_grad(ctx.needs_input_grad, g_w, g_dense, h, keys, ids, ctx.temperature, ctx.eps, ctx.renorm,
                        ctx.dense) + (None,) * 6


torch.library.register_autograd("mokernels::route_cosine_fwd", _backward_cosine, setup_context=_setup_context_cosine)


def _setup_context(ctx, inputs, output):
    logits, temperature, _top_p, _kmax, renorm, dense = inputs
    ctx.save_for_backward(logits, output[0])
    ctx.temperature, ctx.renorm, ctx.dense = temperature, renorm, dense


def _backward(ctx, _g_ids, g_w, _g_counts, g_dense):
    logits, ids = ctx.saved_tensors
    return _route_grad(g_w, g_dense, logits, ids, ctx.temperature, ctx.renorm, ctx.dense), None, None, None, None, None


torch.library.register_autograd("mokernels::route_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "mokernels.route_bwd is not differentiable: differentiate route()/route_cosine() instead (their double "
        "backward goes through the reference composition)")


def _setup_nothing(ctx, inputs, output):
    pass


torch.library.register_autograd("mokernels::route_bwd", _no_double_backward, setup_context=_setup_nothing)


class _RouteFn(torch.autograd.Function):
    """route_fwd with every AD mode in eager mode (torch.library has no forward-mode AD registration):
    backward as the op's, forward mode by :func:`route_jvp_reference`."""

    @staticmethod
    def forward(z, temperature, top_p, kmax, renorm, dense):
        return torch.ops.mokernels.route_fwd(z, temperature, top_p, kmax, renorm, dense)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, temperature, _top_p, _kmax, renorm, dense = inputs
        ids, _w, counts, d = output
        ctx.mark_non_differentiable(ids, counts, *(() if dense else (d,)))
        ctx.save_for_backward(z, ids)
        ctx.save_for_forward(z, ids)
        ctx.temperature, ctx.renorm, ctx.dense = temperature, renorm, dense

    @staticmethod
    def backward(ctx, _g_ids, g_w, _g_counts, g_dense):
        z, ids = ctx.saved_tensors
        return _route_grad(g_w, g_dense, z, ids, ctx.temperature, ctx.renorm, ctx.dense), None, None, None, None, None

    @staticmethod
    def jvp(ctx, dz, *_):
        z, ids = ctx.saved_tensors
        dw, dd = route_jvp_reference(dz, z, ids, ctx.temperature, ctx.renorm, ctx.dense)
        return None, dw, None, dd


class _RouteCosineFn(torch.autograd.Function):
    """route_cosine_fwd in eager mode: reverse mode and double backward; forward mode is a clear error."""

    @staticmethod
    def forward(h, keys, temperature, eps, top_p, kmax, renorm, dense):
        return torch.ops.mokernels.route_cosine_fwd(h, keys, temperature, eps, top_p, kmax, renorm, dense)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, keys, temperature, eps, _top_p, _kmax, renorm, dense = inputs
        ids, _w, counts, d = output
        ctx.mark_non_differentiable(ids, counts, *(() if dense else (d,)))
        ctx.save_for_backward(h, keys, ids)
        ctx.temperature, ctx.eps, ctx.renorm, ctx.dense = temperature, eps, renorm, dense

    @staticmethod
    def backward(ctx, _g_ids, g_w, _g_counts, g_dense):
        h, keys, ids = ctx.saved_tensors
        return _cosine_grad(ctx.needs_input_grad, g_w, g_dense, h, keys, ids, ctx.temperature, ctx.eps, ctx.renorm,
                            ctx.dense) + (None,) * 6

    @staticmethod
    def jvp(ctx, *_):
        raise NotImplementedError(
            "mokernels.route_cosine: forward-mode AD is not implemented (reverse mode and double backward are); "
            "for a jvp, route the cosine logits with route(cosine_logits, ...) instead")
