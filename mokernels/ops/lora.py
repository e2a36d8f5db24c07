"""Segmented multi-adapter LoRA (METHODS.md §1): N adapters stacked contiguously, each token routed to
zero, one or several of them.

Notation: ``x [..., d_in]`` (any leading shape, flattened to ``T`` tokens), ``A [N, r, d_in]``,
``B [N, d_out, r]``, per-adapter ``scale [N]`` (usually ``alpha / r``; a Python float means the same
scale for every adapter). For a token routed to adapters ``i_j`` with weights ``w_j``::

    y[t] = base_out[t] + Σ_j  w_j · scale[i_j] · B[i_j] @ (A[i_j] @ x[t])

Five routing forms (give exactly one; all metadata stays on the device, no host sync in the ops):

* ``ids=``              ``[...]`` (x's leading shape) or ``[T]`` integer: one adapter per token, ``-1`` = none
                        (decode: many adapters, one token each). Weight 1.
* ``segments=``         ``(offsets [S+1], seg_ids [S])``: tokens ``offsets[s] <= t < offsets[s+1]`` use
                        adapter ``seg_ids[s]`` (prefill: contiguous runs). Weight 1.
* ``mixture=``          a :class:`mokernels.ops.Routing` (from ``route`` / ``route_cosine``, taken as is) or
                        ``(ids [..., k], weights [..., k])``: per-token weighted k-mixture, ``-1`` pads.
* ``segment_mixture=``  ``(offsets [S+1], seg_ids [S, k], seg_w [S, k])`` or ``(offsets, Routing)`` with the
                        sentence-level ``route(...)`` result: every token of segment s uses that segment's
                        k adapters and weights (DLP-LoRA's sentence-level fusion).
* shared A:             :func:`lora_shared_apply`, one ``A [r, d_in]`` for all experts ``B [N, d_out, r]``,
                        ``h = A x`` once, ``y[t] += s Σ_i w[t, i] B_i h`` with dense ``[..., N]`` or compact
                        (``mixture=``) expert weights (EffiLoRA / SAMoRA / HydraLoRA).

Validation (METHODS.md "Validation vs. speed"): with ``validate=True`` (default) in eager mode, the
metadata is checked in one fused device pass with one host sync (ids in ``[-1, N)``, offsets
starting at 0, sorted, ending at T, finite weights) and a bad argument raises ValueError naming it.
Under ``torch.compile``, CUDA-graph capture or ``validate=False`` nothing is checked on the host; the
kernels and the reference then treat an invalid id (``< 0`` or ``>= N``), and a token outside every
segment, as "no adapter" — never an out-of-bounds access. A slot whose weight is exactly 0 is
skipped in the forward like a ``-1`` (the kernels do not read its adapter, the reference masks it out:
a NaN-filled adapter routed only with weight 0 leaves y finite on every device; the dense reference
still spreads a non-finite adapter that some token uses with a nonzero weight, see ``_live_only``).
Its weight still gets its true gradient ``scale · (B_i^T dy) · (A_i x)``. Metadata checks are skipped
for meta / fake tensors. Shapes and dtypes are always checked (no sync).

Dtypes: x, A, B share one dtype (fp16, bf16, fp32, fp64); accumulation in fp32 (fp64 for fp64);
mixture weights may have any float dtype (used in fp32). Output: x's dtype.

Autograd: ``lora_apply`` / ``lora_shared_apply`` are differentiable in x, A, B, the mixture weights
and ``base_out``; ``scale`` is a hyperparameter (no gradient). On CUDA the backward runs the kernels of
``csrc/kernels/lora_bwd.cuh`` (ops ``lora_apply_backward`` / ``lora_shared_apply_backward``): a fused
per-token SIMT kernel for dx and the weights' gradient (``u = B_iᵀ dy`` kept on chip, then ``A_iᵀ u``),
and dA / dB as grouped reductions over each adapter's tokens after a device-side counting sort of the
(token, slot) pairs — fp32 accumulation, no atomics, bitwise deterministic run to run. CPU tensors
(and arguments beyond the kernel's shared memory) use the closed-form reference (torch ops, fp32).
``lora_apply_`` (in place, ``Tensor(a!)``) is for inference: with a tensor that requires grad it
raises unless grad mode is off (``torch.no_grad()`` / ``torch.inference_mode()``).

Autocast: the ops run in the activations' dtype; cast fp32 adapter parameters to it before the call
(``MultiLoRALinear`` does: under autocast its fp32 ``lora_A`` / ``lora_B`` are used in the dtype of the
base layer's output, and their gradients flow back to the fp32 parameters through the cast). Mixed
dtypes are a ValueError, never a silent upcast. The ops are autocast-neutral (kernels at the Autocast
keys, end of this file): no argument is cast, and the CPU reference keeps its fp32 accumulation inside
an autocast region.

Kernels: CUDA tensors run ``csrc/kernels/lora.cuh`` — decode: a shrink kernel (h and the resolved ids
to a [T, k, r] workspace) and an expand kernel (shared A: one fused SIMT kernel, h on chip); prefill
(segments averaging >= 32 tokens, fp16/bf16): ``lora_prefill.cuh``'s split-K tensor-core shrink and
expand. :func:`lora_linear` (the whole layer, ``x Wᵀ + bias`` + the adapters) runs the fused pass over W
of ``lora_fused_w.cuh`` at decode sizes. CPU tensors run the references (:func:`lora_apply_reference`).

Several output slices (:func:`lora_apply_sliced`: the q/k/v or gate/up adapters of a fused projection) run
the same decode / prefill kernels once, the slice being grid dimension z (a by-value table of the slices'
A/B pointers: no stacking copy). Mixed ranks (``ranks=[N]`` on lora_apply / lora_apply_ /
lora_apply_sliced): A/B stay padded to ``r = r_max`` and the kernels neither read nor multiply an
adapter's rows/columns past ``ranks[n]`` (prefill: padded to the 16-wide mma tile). Neither is offered by
shared A or the fused pass over W (:func:`lora_linear`). Their backward: the per-slice backward kernels
(once per slice), on A/B masked past the ranks (a masked copy; dA/dB are masked too: zero in the padding).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._checks import FLOAT_DTYPES, acc_dtype, can_sync, expect, expect_dtype, expect_no_tangent, grad_or_tangent
from ._checks import is_eager as _is_eager
from .router import Routing

_OP = "lora"
MAX_RANK = 128  # kernel limit on r (h lives in shared memory); larger ranks: ValueError
MAX_SLICES = 8  # lora_apply_sliced: output slices per launch (the kernels' pointer table)
LINEAR_FUSED_MAX_TOKENS = 32  # lora_linear / MultiLoRALinear: the fused pass over W up to this many tokens (0: off)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

__all__ = [
    "lora_apply",
    "lora_apply_",
    "lora_apply_sliced",
    "lora_linear",
    "lora_shared_apply",
    "lora_shrink",
    "lora_expand",
    "lora_apply_reference",
    "lora_shared_apply_reference",
    "LoraRouting",
    "canonical_routing",
]


# ------------------------------------------------------------------------------------------------
# Argument handling: the five public forms -> the canonical op arguments (ids [R, k] int32,
# weights [R, k] acc dtype or None, offsets [S+1] int32 or None; R = T, or S with offsets)


class LoraRouting(tuple):
    """Canonical routing of the ops: ``(ids [R, k] int32, weights [R, k] or None, offsets [S+1] int32
    or None)``; rows R are tokens (``offsets is None``) or segments."""

    __slots__ = ()

    def __new__(cls, ids, weights, offsets):
        return super().__new__(cls, (ids, weights, offsets))

    ids = property(lambda self: self[0])
    weights = property(lambda self: self[1])
    offsets = property(lambda self: self[2])


def _same_storage(a: Tensor, b: Tensor) -> bool:
    """Conservative alias test for the in-place op: both real tensors on one storage (meta/fake: False)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0 or not (can_sync(a) and can_sync(b)):
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _as_int32(name: str, t, op: str) -> Tensor:
    expect(isinstance(t, Tensor), op, f"{name} must be an integer tensor, got {type(t).__name__}")
    expect(t.dtype in INT_DTYPES, op, f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dtype == torch.int64:  # saturate, never wrap: 2**32 must stay out of range (validation, "no adapter")
        t = t.clamp(-(2**31), 2**31 - 1)
    return t.to(torch.int32).contiguous()


def _lead_match(name: str, t: Tensor, lead: torch.Size, T: int, extra: int, op: str, what: str) -> None:
    """``t`` is ``[*lead, *extra_dims]`` or ``[T, *extra_dims]`` (``extra`` trailing dims)."""
    head = tuple(t.shape[: t.dim() - extra]) if t.dim() >= extra else None
    expect(head == tuple(lead) or head == (T,), op, f"{name} must be {what} with leading shape {list(lead)} (or [T] = "
           f"[{T}]), got {list(t.shape)}")


def canonical_routing(
    lead: torch.Size,
    *,
    ids=None,
    segments=None,
    mixture=None,
    segment_mixture=None,
    op: str = _OP,
) -> LoraRouting:
    """Turns one of the public routing forms into the canonical op arguments (shape checks only, no
    device work beyond dtype conversions). ``lead``: the leading shape of x."""
    T = 1
    for s in lead:
        T *= int(s)
    given = [n for n, v in (("ids", ids), ("segments", segments), ("mixture", mixture),
                            ("segment_mixture", segment_mixture)) if v is not None]
    expect(len(given) == 1, op, "give exactly one routing form: ids=, segments=, mixture= or segment_mixture= "
           f"(got {given or 'none'})")
    form = given[0]
    if form == "ids":
        i = _as_int32("ids", ids, op)
        _lead_match("ids", i, lead, T, 0, op, "[...]")
        return LoraRouting(i.reshape(T, 1), None, None)
    if form == "mixture":
        if isinstance(mixture, Routing):
            mi, mw = mixture.ids, mixture.weights
        else:
            expect(isinstance(mixture, Sequence) and len(mixture) == 2, op,
                   "mixture must be a Routing or a pair (ids [..., k], weights [..., k])")
            mi, mw = mixture
        expect(isinstance(mi, Tensor) and mi.dim() >= 1, op, "mixture ids must be a [..., k] integer tensor")
        _lead_match("mixture ids", mi, lead, T, 1, op, "[..., k]")
        k = mi.shape[-1]
        expect(isinstance(mw, Tensor) and tuple(mw.shape) == tuple(mi.shape), op,
               f"mixture weights must have the ids' shape {list(mi.shape)}, got "
               f"{list(mw.shape) if isinstance(mw, Tensor) else type(mw).__name__}")
        expect_dtype(op, "mixture weights", mw)
        return LoraRouting(_as_int32("mixture ids", mi, op).reshape(T, k), mw.reshape(T, k), None)
    # segment forms
    pair = segments if form == "segments" else segment_mixture
    expect(isinstance(pair, Sequence) and len(pair) in (2, 3), op,
           f"{form} must be (offsets, seg_ids{'' if form == 'segments' else ', seg_w'})")
    offsets = _as_int32(f"{form} offsets", pair[0], op)
    expect(offsets.dim() == 1 and offsets.shape[0] >= 1, op,
           f"{form} offsets must be [S+1] (S >= 0), got {list(offsets.shape)}")
    S = offsets.shape[0] - 1
    if form == "segments":
        expect(len(pair) == 2, op, "segments must be (offsets [S+1], seg_ids [S])")
        sid = pair[1]
        expect(isinstance(sid, Tensor) and tuple(sid.shape) == (S,), op,
               f"segments seg_ids must be [S] = [{S}], got {list(sid.shape) if isinstance(sid, Tensor) else sid}")
        return LoraRouting(_as_int32("segments seg_ids", sid, op).reshape(S, 1), None, offsets)
    if len(pair) == 2:
        expect(isinstance(pair[1], Routing), op, "segment_mixture must be (offsets, seg_ids [S, k], seg_w [S, k]) or "
               "(offsets, Routing)")
        sid, sw = pair[1].ids, pair[1].weights
    else:
        sid, sw = pair[1], pair[2]
    expect(isinstance(sid, Tensor) and sid.dim() == 2 and sid.shape[0] == S, op,
           f"segment_mixture seg_ids must be [S, k] with S = {S}, got {list(sid.shape) if isinstance(sid, Tensor) else sid}")
    expect(isinstance(sw, Tensor) and tuple(sw.shape) == tuple(sid.shape), op,
           f"segment_mixture seg_w must have seg_ids' shape {list(sid.shape)}, got "
           f"{list(sw.shape) if isinstance(sw, Tensor) else type(sw).__name__}")
    expect_dtype(op, "segment_mixture seg_w", sw)
    return LoraRouting(_as_int32("segment_mixture seg_ids", sid, op), sw, offsets)


def _scale_tensor(scale, N: int, like: Tensor, op: str) -> Tensor:
    acc = acc_dtype(like.dtype)
    if isinstance(scale, bool):  # an int subclass: True would silently mean 1.0
        expect(False, op, f"scale must be a float or a [N] tensor, got the bool {scale}")
    if isinstance(scale, (int, float)):
        return torch.full((N,), float(scale), dtype=acc, device=like.device)
    expect(isinstance(scale, Tensor) and tuple(scale.shape) in ((N,), ()), op,
           f"scale must be a float or a [N] = [{N}] tensor, got {list(scale.shape) if isinstance(scale, Tensor) else scale!r}")
    expect_dtype(op, "scale", scale)
    expect(scale.device == like.device, op, f"scale is on {scale.device} but the activations are on {like.device}")
    return scale.detach().to(acc).expand(N).contiguous()


def _check_weights(x: Tensor, A: Tensor, B: Tensor, op: str, shared: bool = False):
    expect(isinstance(x, Tensor) and x.dim() >= 1, op, "x must be a [..., d_in] tensor")
    expect_dtype(op, "x", x)
    d_in = x.shape[-1]
    if shared:
        expect(isinstance(A, Tensor) and A.dim() == 2 and A.shape[1] == d_in, op,
               f"A must be [r, d_in] with d_in = {d_in}, got {list(A.shape) if isinstance(A, Tensor) else A}")
        r = A.shape[0]
    else:
        expect(isinstance(A, Tensor) and A.dim() == 3 and A.shape[2] == d_in, op,
               f"A must be [N, r, d_in] with d_in = {d_in}, got {list(A.shape) if isinstance(A, Tensor) else A}")
        r = A.shape[1]
    expect(isinstance(B, Tensor) and B.dim() == 3 and B.shape[2] == r and (shared or B.shape[0] == A.shape[0]), op,
           f"B must be [N, d_out, r] with {'' if shared else f'N = {A.shape[0]}, '}r = {r}, got "
           f"{list(B.shape) if isinstance(B, Tensor) else B}")
    expect(1 <= r <= MAX_RANK, op, f"rank r must be in [1, {MAX_RANK}], got {r}")
    expect_dtype(op, "A", A, like=x)
    expect_dtype(op, "B", B, like=x)
    for name, t in (("A", A), ("B", B)):
        expect(t.device == x.device, op, f"{name} is on {t.device} but x is on {x.device}")
    return B.shape[0], r, d_in, B.shape[1]


def _check_base(base_out, lead, d_out: int, x: Tensor, op: str, name: str = "base_out"):
    if base_out is None:
        return None
    expect(isinstance(base_out, Tensor) and tuple(base_out.shape) == (*lead, d_out), op,
           f"{name} must be [..., d_out] = {[*lead, d_out]}, got "
           f"{list(base_out.shape) if isinstance(base_out, Tensor) else base_out}")
    expect_dtype(op, name, base_out, like=x)
    expect(base_out.device == x.device, op, f"{name} is on {base_out.device} but x is on {x.device}")
    return base_out.reshape(-1, d_out)


def _check_ranks(ranks, N: int, r: int, x: Tensor, validate: bool, op: str) -> Optional[Tensor]:
    """``ranks [N]`` (any integer dtype) -> int32 on x's device, or None. In eager mode with ``validate``
    (one host sync) every rank must lie in ``[0, r]``; unchecked, the kernels clamp into ``[0, r]``."""
    if ranks is None:
        return None
    expect(isinstance(ranks, Tensor) and tuple(ranks.shape) == (N,), op,
           f"ranks must be a [N] = [{N}] integer tensor, got {list(ranks.shape) if isinstance(ranks, Tensor) else ranks!r}")
    expect(ranks.dtype in INT_DTYPES, op, f"ranks must be an integer tensor, got dtype {ranks.dtype}")
    expect(ranks.device == x.device, op, f"ranks is on {ranks.device} but x is on {x.device}")
    if validate and _is_eager() and can_sync(ranks) and N > 0:
        lo, hi = (int(v) for v in torch.stack([ranks.min(), ranks.max()]).tolist())
        expect(lo >= 0 and hi <= r, op, f"ranks must be in [0, r] = [0, {r}] (A/B hold r_max = {r} rows/columns), got "
               f"values in [{lo}, {hi}]")
    return _as_int32("ranks", ranks, op)


def _rank_masked(A: Tensor, B: Tensor, ranks: Optional[Tensor]):
    """A / B with the rows / columns past each adapter's rank set to exactly 0 (the region the kernels never
    read: a NaN there does not reach the output, and autograd through this gives it zero gradients).
    Ranks are clamped into [0, r] as the kernels do."""
    if ranks is None:
        return A, B
    q = torch.arange(A.shape[-2], device=A.device)
    live = q[None, :] < ranks.to(A.device).long()[:, None]  # [N, r]
    z = torch.zeros((), dtype=A.dtype, device=A.device)
    return torch.where(live[:, :, None], A, z), torch.where(live[:, None, :], B, z)


def validate_routing(rt: LoraRouting, N: int, T: int, op: str = _OP, id_name: str = "ids") -> None:
    """Eager-mode metadata check: ids in [-1, N), offsets[0] = 0, sorted, offsets[S] = T, weights
    finite — one fused device pass, one host sync; raises ValueError naming the bad argument."""
    ids, w, off = rt
    for name, t in (("ids", ids), ("weights", w), ("offsets", off)):
        if t is not None and t.device != ids.device:
            raise ValueError(f"mokernels.{op}: routing {name} is on {t.device} but ids are on {ids.device}")
    if not all(can_sync(t) for t in (ids, w, off) if t is not None):
        return  # meta / fake tensors (tracing, shape propagation): no values to check
    flags = [((ids < -1) | (ids >= N)).any() if ids.numel() else torch.zeros((), dtype=torch.bool, device=ids.device)]
    if w is not None:
        flags.append(~torch.isfinite(w).all())
    if off is not None:
        flags.append((off[0] != 0) | (off[-1] != T) | ((off[1:] < off[:-1]).any() if off.numel() > 1 else False))
    bad = torch.stack([torch.as_tensor(f, device=ids.device) for f in flags]).tolist()  # the one host sync
    if bad[0]:
        lo, hi = int(ids.min()), int(ids.max())
        raise ValueError(f"mokernels.{op}: {id_name} must be in [-1, N) = [-1, {N}) (-1 = no adapter), got values in "
                         f"[{lo}, {hi}]")
    if w is not None and bad[1]:
        raise ValueError(f"mokernels.{op}: mixture weights have a NaN or inf")
    if off is not None and bad[-1]:
        o = off.cpu()
        if int(o.min()) < 0:
            raise ValueError(f"mokernels.{op}: offsets must be >= 0, got a negative offset {int(o.min())}")
        raise ValueError(f"mokernels.{op}: offsets must be sorted (non-overlapping segments) with offsets[0] = 0 and "
                         f"offsets[S] = T = {T}, got {o.tolist()[:16]}{' ...' if o.numel() > 16 else ''}")


def _routing(lead: torch.Size, N: int, forms: dict, device, acc, validate: bool, op: str):
    """The canonical routing of one public form (weights in ``acc``), device-checked and, in eager mode
    with ``validate``, value-checked. Returns ``(T, LoraRouting)``."""
    rt = canonical_routing(lead, op=op, **forms)
    T = int(torch.Size(lead).numel())
    if rt.weights is not None:
        rt = LoraRouting(rt.ids, rt.weights.to(acc), rt.offsets)
    for name, t in (("ids", rt.ids), ("weights", rt.weights), ("offsets", rt.offsets)):
        if t is not None:
            expect(t.device == device, op, f"routing {name} is on {t.device} but the activations are on {device}")
    if validate and _is_eager():
        validate_routing(rt, N, T, op)
    return T, rt


def _prepare(x, A, B, scale, forms: dict, base_out, validate: bool, op: str, base_name: str = "base_out"):
    N, r, d_in, d_out = _check_weights(x, A, B, op)
    lead = x.shape[:-1]
    base = _check_base(base_out, lead, d_out, x, op, base_name)
    T, rt = _routing(lead, N, forms, x.device, acc_dtype(x.dtype), validate, op)
    s = _scale_tensor(scale, N, x, op)
    return lead, T, d_out, rt, s, base


# ------------------------------------------------------------------------------------------------
# Public API


# ------------------------------------------------------------------------------------------------
# Hot path (validate=False, eager or traced): the canonical arguments without the general form
# handling above. Host work per call was ~50 µs of Python (measured on the dev CPU; the benchmark's
# decode rows time it, since ~65 µs of L2 flush is all the head start the host gets) plus ~15 µs of
# the register_autograd Python layer; the CUDA launches per call were: the LoRA kernel, plus clamp and
# int32 conversion for int64 ids (2), plus torch.full for a float scale (1). Now: plain tensors in the
# canonical dtypes (int32 ids/offsets, fp32 weights and scale, or a float scale: cached) take this path
# with one op call and no other ATen op but views; anything else falls back to the general path (same
# results, same errors). The op re-checks every shape, dtype and device (C++ on CUDA, _check_op on CPU).

_SCALE_CACHE: dict = {}


def _cached_scale(scale: float, N: int, like: Tensor) -> Tensor:
    """``torch.full((N,), scale)`` in the accumulation dtype on ``like``'s device, built once (a constant
    input: safe under CUDA-graph capture, never written)."""
    acc = acc_dtype(like.dtype)
    key = (float(scale), N, like.device, acc)
    t = _SCALE_CACHE.get(key)
    if t is None:
        if len(_SCALE_CACHE) > 256:
            _SCALE_CACHE.clear()
        t = _SCALE_CACHE[key] = torch.full((N,), float(scale), dtype=acc, device=like.device)
    return t


def _fast_routing(lead, T: int, ids, segments, mixture, segment_mixture, acc):
    """Canonical ``(ids [R, k], weights, offsets)`` as views when the public form is already in the ops'
    dtypes (int32 ids/offsets, ``acc`` weights) and shapes; else None (the general path decides)."""
    i32 = torch.int32
    if ids is not None:
        if segments is None and mixture is None and segment_mixture is None and type(ids) is Tensor \
                and ids.dtype == i32 and (ids.shape == lead or (ids.dim() == 1 and ids.shape[0] == T)):
            return ids.reshape(T, 1), None, None
        return None
    if segments is not None:
        if mixture is None and segment_mixture is None and type(segments) is tuple and len(segments) == 2:
            off, sid = segments
            if type(off) is Tensor and type(sid) is Tensor and off.dtype == i32 and sid.dtype == i32 \
                    and off.dim() == 1 and sid.dim() == 1 and sid.shape[0] == off.shape[0] - 1:
                return sid.reshape(-1, 1), None, off
        return None
    if mixture is not None:
        if segment_mixture is None and (type(mixture) is Routing or (type(mixture) is tuple and len(mixture) == 2)):
            mi, mw = (mixture.ids, mixture.weights) if type(mixture) is Routing else mixture
            if type(mi) is Tensor and type(mw) is Tensor and mi.dtype == i32 and mw.dtype == acc and mi.dim() >= 1 \
                    and mw.shape == mi.shape and (mi.shape[:-1] == lead or (mi.dim() == 2 and mi.shape[0] == T)):
                k = mi.shape[-1]
                return mi.reshape(T, k), mw.reshape(T, k), None
        return None
    if segment_mixture is not None and type(segment_mixture) is tuple and len(segment_mixture) in (2, 3):
        off = segment_mixture[0]
        if len(segment_mixture) == 3:
            sid, sw = segment_mixture[1], segment_mixture[2]
        elif type(segment_mixture[1]) is Routing:
            sid, sw = segment_mixture[1].ids, segment_mixture[1].weights
        else:
            return None
        if type(off) is Tensor and type(sid) is Tensor and type(sw) is Tensor and off.dtype == i32 and off.dim() == 1 \
                and sid.dtype == i32 and sw.dtype == acc and sid.dim() == 2 and sw.shape == sid.shape \
                and sid.shape[0] == off.shape[0] - 1:
            return sid, sw, off
    return None


def _fast_prepare(x, A, B, scale, ids, segments, mixture, segment_mixture, base_out):
    """``(lead, T, d_out, ids, weights, offsets, scale [N], base [T, d_out] | None)`` or None."""
    if not (type(x) is Tensor and type(A) is Tensor and type(B) is Tensor and x.dim() >= 1 and A.dim() == 3
            and B.dim() == 3):
        return None
    N, d_out = B.shape[0], B.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if type(scale) is Tensor:
        if scale.dtype != acc or scale.shape != (N,) or scale.requires_grad:
            return None
    elif type(scale) is not float and type(scale) is not int:
        return None
    lead = x.shape[:-1]
    T = 1
    for n in lead:
        T *= n
    rt = _fast_routing(lead, T, ids, segments, mixture, segment_mixture, acc)
    if rt is None:
        return None
    s = scale if type(scale) is Tensor else _cached_scale(scale, N, x)
    base = None
    if base_out is not None:
        if type(base_out) is not Tensor or base_out.shape[:-1] != lead or base_out.dim() != x.dim():
            return None
        base = base_out.reshape(T, base_out.shape[-1])
    return lead, T, d_out, rt[0], rt[1], rt[2], s, base


def _prepare_any(x, A, B, scale, ids, segments, mixture, segment_mixture, base_out, validate: bool, op: str,
                 base_name: str = "base_out"):
    """``(lead, T, d_out, ids, weights, offsets, scale, base)``: the hot path when it applies (no
    validation asked, canonical dtypes), else the general form handling with its checks."""
    fast = None if validate and _is_eager() else _fast_prepare(x, A, B, scale, ids, segments, mixture,
                                                               segment_mixture, base_out)
    if fast is not None:
        return fast
    forms = dict(ids=ids, segments=segments, mixture=mixture, segment_mixture=segment_mixture)
    lead, T, d_out, (i, w, off), s, base = _prepare(x, A, B, scale, forms, base_out, validate, op, base_name)
    return lead, T, d_out, i, w, off, s, base


def _call_op(op, name: str, grad_ts, *args):
    """The op through its autograd kernel only when autograd may see an input (the Python layer of
    register_autograd costs ~10-15 µs per call even when nothing needs a gradient)."""
    if grad_or_tangent(*grad_ts) or not _is_eager("cpu"):
        expect_no_tangent(name, grad_ts, "x, the adapters, mixture weights or base_out")
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def lora_apply(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scale,
    *,
    ids: Optional[Tensor] = None,
    segments=None,
    mixture=None,
    segment_mixture=None,
    base_out: Optional[Tensor] = None,
    ranks: Optional[Tensor] = None,
    validate: bool = True,
) -> Tensor:
    """Fused multi-adapter LoRA: ``y = base_out + Σ_j w_j scale[i_j] B[i_j] A[i_j] x`` per token.

    Args:
        x: ``[..., d_in]`` activations (fp16, bf16, fp32, fp64).
        A: ``[N, r, d_in]`` stacked down-projections, x's dtype; ``1 <= r <= 128``.
        B: ``[N, d_out, r]`` stacked up-projections, x's dtype.
        scale: ``[N]`` per-adapter scale (``alpha / r``), or a float for all adapters. No gradient.
        ids: ``[...]`` (x's leading shape) or ``[T]`` adapter per token, -1 = none.
        segments: ``(offsets [S+1], seg_ids [S])``; offsets sorted, ``offsets[0] = 0``, ``offsets[S] = T``.
        mixture: ``Routing`` or ``(ids [..., k], weights [..., k])``; -1 pads.
        segment_mixture: ``(offsets [S+1], seg_ids [S, k], seg_w [S, k])`` or ``(offsets, Routing [S, k])``.
        base_out: optional ``[..., d_out]`` (x's dtype), e.g. the base layer's output, added to the delta
            (one write of y: no extra pass over it).
        ranks: optional ``[N]`` integer tensor (on x's device): mixed ranks in one batch. Adapter n uses
            only the first ``ranks[n] <= r`` rows of ``A[n]`` and columns of ``B[n]`` (A/B stored padded to
            ``r = r_max``); the kernels neither read nor multiply the padding (prefill: padded to the
            16-wide mma tile), rank 0 = no update. The padded region gets zero gradients. ``scale`` is not
            derived from the ranks: pass each adapter's own ``alpha_n / ranks[n]`` (PEFT's scaling), not
            ``alpha / r_max``.
        validate: eager-mode metadata check (one fused pass, one host sync); see the module docstring.
    Returns:
        ``[..., d_out]`` in x's dtype: ``base_out + delta`` (or the delta alone).
    Differentiable in x, A, B, mixture weights and base_out.
    """
    lead, T, d_out, i, w, off, s, base = _prepare_any(x, A, B, scale, ids, segments, mixture, segment_mixture,
                                                      base_out, validate, "lora_apply")
    if ranks is not None:
        ranks = _check_ranks(ranks, B.shape[0], B.shape[2], x, validate, "lora_apply")
    grad_ts = (x, A, B) if w is None and base is None else tuple(t for t in (x, A, B, w, base) if t is not None)
    y = _call_op(torch.ops.mokernels.lora_apply, "lora_apply", grad_ts, x.reshape(T, x.shape[-1]), A, B, s, i, w, off,
                 base, ranks)
    return y.reshape(*lead, d_out)


def lora_apply_sliced(
    x: Tensor,
    As,
    Bs,
    scale,
    *,
    ids: Optional[Tensor] = None,
    segments=None,
    mixture=None,
    segment_mixture=None,
    base_out: Optional[Tensor] = None,
    ranks: Optional[Tensor] = None,
    validate: bool = True,
) -> Tensor:
    """Several output slices in one launch per kernel (the adapters of a fused q/k/v or gate/up projection,
    vLLM's ``add_lora_linear(..., output_slices)``): slice s writes ``y[..., off_s : off_s + d_out_s]``,
    ``off_s = Σ_{s' < s} d_out_s'``, with its own adapters ``As[s]`` / ``Bs[s]`` and the shared routing.

    Args:
        x: ``[..., d_in]``.
        As: a sequence of S (``1 <= S <= 8``) tensors ``[N, r, d_in]``, or a stacked ``[S, N, r, d_in]``.
        Bs: a sequence of S tensors ``[N, d_out_s, r]``, or a stacked ``[S, N, d_out, r]`` (equal widths).
            Neither is copied: the kernels take a table of the slices' pointers (a stacked tensor is
            unbound into views), so keep each slice contiguous (a non-contiguous one is copied per call).
        scale, routing forms, ranks (shared by all slices), validate: as :func:`lora_apply`.
        base_out: optional ``[..., Σ d_out_s]`` (the fused base projection's output).
    Returns:
        ``[..., Σ d_out_s]`` in x's dtype. Equals ``torch.cat([lora_apply(x, As[s], Bs[s], ...)], -1)``.
    Differentiable in x, every A/B slice, mixture weights and base_out (the backward runs the per-slice
    backward kernels once per slice and sums dx / d(weights)).
    """
    op = "lora_apply_sliced"
    for name, t, shape in (("As", As, "[S, N, r, d_in]"), ("Bs", Bs, "[S, N, d_out, r]")):
        # a lone [N, r, d_in] / [N, d_out, r] would otherwise be unbound into N "slices" and fail on their shapes
        expect(not isinstance(t, Tensor) or t.dim() == 4, op, f"{name} as one tensor must be stacked {shape}, got "
               f"{list(t.shape) if isinstance(t, Tensor) else ''} (one slice: pass [{name[0]}] or use lora_apply)")
    As = list(As.unbind(0)) if isinstance(As, Tensor) else list(As) if isinstance(As, Sequence) else As
    Bs = list(Bs.unbind(0)) if isinstance(Bs, Tensor) else list(Bs) if isinstance(Bs, Sequence) else Bs
    expect(isinstance(As, list) and isinstance(Bs, list) and 1 <= len(As) <= MAX_SLICES and len(As) == len(Bs), op,
           f"As and Bs must be sequences (or stacked tensors) of the same length S in [1, {MAX_SLICES}], got "
           f"{len(As) if isinstance(As, list) else type(As).__name__} and "
           f"{len(Bs) if isinstance(Bs, list) else type(Bs).__name__}")
    for s_, (a_, b_) in enumerate(zip(As, Bs)):
        _check_weights(x, a_, b_, f"{op} (slice {s_})")
        expect(tuple(a_.shape) == tuple(As[0].shape), op, f"every As[s] must be [N, r, d_in] = {list(As[0].shape)}, got "
               f"As[{s_}] {list(a_.shape)}")
    N, r = As[0].shape[0], As[0].shape[1]
    d_out = sum(b_.shape[1] for b_ in Bs)
    lead = x.shape[:-1]
    base = _check_base(base_out, lead, d_out, x, op)
    T, (i, w, off) = _routing(lead, N, dict(ids=ids, segments=segments, mixture=mixture,
                                            segment_mixture=segment_mixture), x.device, acc_dtype(x.dtype), validate, op)
    s = _scale_tensor(scale, N, x, op)
    rk = _check_ranks(ranks, N, r, x, validate, op)
    grad_ts = (x, *As, *Bs, *(t for t in (w, base) if t is not None))
    y = _call_op(torch.ops.mokernels.lora_apply_sliced, "lora_apply_sliced", grad_ts, x.reshape(T, x.shape[-1]), As, Bs,
                 s, i, w, off, base, rk)
    return y.reshape(*lead, d_out)


def lora_apply_(
    out: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scale,
    *,
    ids: Optional[Tensor] = None,
    segments=None,
    mixture=None,
    segment_mixture=None,
    ranks: Optional[Tensor] = None,
    validate: bool = True,
) -> Tensor:
    """In-place (inference): ``out += Σ_j w_j scale[i_j] B[i_j] A[i_j] x``; ``out [..., d_out]`` in x's
    dtype and contiguous (e.g. the base layer's output). Returns ``out``. Arguments as :func:`lora_apply`.
    Not differentiable (use :func:`lora_apply` with ``base_out=`` for training)."""
    lead, T, d_out, i, w, off, s, o2 = _prepare_any(x, A, B, scale, ids, segments, mixture, segment_mixture, out,
                                                    validate, "lora_apply_", "out")
    if torch.is_grad_enabled():
        grads = [n for n, t in (("out", out), ("x", x), ("A", A), ("B", B), ("mixture weights", w))
                 if t is not None and t.requires_grad]
        expect(not grads, "lora_apply_", f"{', '.join(grads)} require(s) grad, but the in-place op is for inference "
               "and has no backward (the graph would be dropped silently): use lora_apply(..., base_out=out) for "
               "training, or call it under torch.no_grad() / torch.inference_mode()")
    expect(out.is_contiguous(), "lora_apply_", "out must be contiguous (it is updated in place)")
    expect(not _same_storage(out, x), "lora_apply_", "out must not share memory with x (the kernels still read x "
           "while other blocks write out); pass a copy of x or use lora_apply")
    rk = _check_ranks(ranks, B.shape[0], B.shape[2], x, validate, "lora_apply_")
    torch.ops.mokernels.lora_apply_(o2, x.reshape(T, x.shape[-1]), A, B, s, i, w, off, rk)
    return out


def lora_linear(
    x: Tensor,
    W: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    scale,
    *,
    ids: Optional[Tensor] = None,
    segments=None,
    mixture=None,
    segment_mixture=None,
    validate: bool = True,
) -> Tensor:
    """The whole multi-LoRA linear layer: ``y = x Wᵀ + bias + Σ_j w_j scale[i_j] B[i_j] A[i_j] x``.

    Args:
        x: ``[..., d_in]``; W: ``[d_out, d_in]`` and bias ``[d_out]`` or None (the base layer), x's dtype;
        A, B, scale, routing forms, validate: as :func:`lora_apply`.
    Returns:
        ``[..., d_out]`` in x's dtype.

    Kernels: fp16/bf16 CUDA inputs with at most ``LINEAR_FUSED_MAX_TOKENS`` tokens and no gradient needed
    take the fused pass over W (``csrc/kernels/lora_fused_w.cuh``: W streamed once on tensor cores with
    the LoRA expand in its epilogue, the shrink in a small first kernel); every other case (CPU, fp32,
    larger T, autograd) is ``lora_apply(x, A, B, scale, base_out=F.linear(x, W, bias))`` — the same
    values up to summation order.
    """
    op = "lora_linear"
    expect(isinstance(x, Tensor) and x.dim() >= 1, op, "x must be a [..., d_in] tensor")
    expect(isinstance(W, Tensor) and W.dim() == 2, op, "W must be a [d_out, d_in] tensor")
    expect(W.shape[1] == x.shape[-1], op, f"W must be [d_out, d_in] with d_in = {x.shape[-1]}, got {list(W.shape)}")
    expect(bias is None or (isinstance(bias, Tensor) and tuple(bias.shape) == (W.shape[0],)), op,
           f"bias must be [d_out] = [{W.shape[0]}] or None")
    if (x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16) and x.dim() >= 1
            and x.numel() <= LINEAR_FUSED_MAX_TOKENS * x.shape[-1] and not grad_or_tangent(x, W, A, B)
            and (bias is None or not grad_or_tangent(bias))):
        lead, T, d_out, i, w, off, s, _ = _prepare_any(x, A, B, scale, ids, segments, mixture, segment_mixture, None,
                                                       validate, op)
        y = torch.ops.mokernels.lora_linear(x.reshape(T, x.shape[-1]), W, bias, A, B, s, i, w, off)
        return y.reshape(*lead, d_out)
    base = torch.nn.functional.linear(x, W, bias)
    return lora_apply(x, A, B, scale, ids=ids, segments=segments, mixture=mixture, segment_mixture=segment_mixture,
                      base_out=base, validate=validate)


def lora_shared_apply(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    *,
    weights: Optional[Tensor] = None,
    mixture=None,
    base_out: Optional[Tensor] = None,
    validate: bool = True,
) -> Tensor:
    """Shared-A experts (EffiLoRA / SAMoRA / HydraLoRA): ``h = A x`` once per token,
    ``y = base_out + scale · Σ_i w[t, i] B_i h``.

    Args:
        x: ``[..., d_in]``; A: ``[r, d_in]`` (one for all experts); B: ``[N, d_out, r]``; all one dtype.
        scale: a float (``alpha / r``).
        weights: dense expert weights ``[..., N]`` (e.g. a softmax gate), any float dtype; or
        mixture: compact ``Routing`` / ``(ids [..., k], weights [..., k])`` (top-k / top-p; -1 pads).
        base_out, validate: as :func:`lora_apply`.
    Returns:
        ``[..., d_out]`` in x's dtype. Differentiable in x, A, B, the weights and base_out.
    """
    op = "lora_shared_apply"
    N, r, d_in, d_out = _check_weights(x, A, B, op, shared=True)
    expect(isinstance(scale, (int, float)) and not isinstance(scale, bool), op,
           f"scale must be a float, got {type(scale).__name__}")
    lead = x.shape[:-1]
    T = int(torch.Size(lead).numel())
    expect((weights is None) != (mixture is None), op, "give exactly one of weights= (dense [..., N]) or mixture=")
    acc = acc_dtype(x.dtype)
    if weights is not None:
        expect(isinstance(weights, Tensor) and weights.dim() >= 1 and weights.shape[-1] == N, op,
               f"weights must be [..., N] with N = {N}, got {list(weights.shape) if isinstance(weights, Tensor) else weights}")
        _lead_match("weights", weights, lead, T, 1, op, "[..., N]")
        expect_dtype(op, "weights", weights)
        i, w = None, weights.reshape(T, N).to(acc)
        expect(w.device == x.device, op, f"weights are on {w.device} but x is on {x.device}")
        if validate and _is_eager() and can_sync(w):
            expect(bool(torch.isfinite(w).all()), op, "weights have a NaN or inf")
    else:
        rt = canonical_routing(lead, mixture=mixture, op=op)
        i, w = rt.ids, rt.weights.to(acc)
        expect(i.device == x.device, op, f"mixture ids are on {i.device} but x is on {x.device}")
        if validate and _is_eager():
            validate_routing(LoraRouting(i, w, None), N, T, op, "mixture ids")
    base = _check_base(base_out, lead, d_out, x, op)
    expect_no_tangent(op, (x, A, B, w, base), "x, A, B, the expert weights or base_out")
    y = torch.ops.mokernels.lora_shared_apply(x.reshape(T, d_in), A, B, float(scale), i, w, base)
    return y.reshape(*lead, d_out)


def lora_shrink(x: Tensor, A: Tensor, *, ids=None, segments=None, mixture=None, segment_mixture=None,
                validate: bool = True) -> Tensor:
    """Shrink ``h[t, j] = A[i_j] x[t]`` for each of a token's routed adapters (0 where none).

    Returns ``[..., r]`` (``ids=`` / ``segments=``) or ``[..., k, r]`` (mixture forms), in fp32 (fp64
    for fp64 x): the lossless intermediate that :func:`lora_expand` takes. Mixture weights are not
    applied here (they are, with the scale, in the expand). A torch composition (any device,
    differentiable); the fused kernel is :func:`lora_apply`.
    """
    op = "lora_shrink"
    forms = dict(ids=ids, segments=segments, mixture=mixture, segment_mixture=segment_mixture)
    expect(isinstance(x, Tensor) and x.dim() >= 1, op, "x must be a [..., d_in] tensor")
    expect_dtype(op, "x", x)
    expect(isinstance(A, Tensor) and A.dim() == 3 and A.shape[2] == x.shape[-1], op,
           f"A must be [N, r, d_in] with d_in = {x.shape[-1]}, got {list(A.shape) if isinstance(A, Tensor) else A}")
    expect_dtype(op, "A", A, like=x)
    N = A.shape[0]
    lead = x.shape[:-1]
    T, rt = _routing(lead, N, forms, x.device, acc_dtype(x.dtype), validate, op)
    idc, valid, _ = _token_routing(rt, T, N, x.device)
    h = _shrink_all(x.reshape(T, -1), A)  # [T, N, r]
    k = idc.shape[1]
    hk = h.gather(1, idc[:, :, None].expand(T, k, A.shape[1])) * valid[:, :, None]
    single = ids is not None or segments is not None
    return hk.reshape(*lead, A.shape[1]) if single else hk.reshape(*lead, k, A.shape[1])


def lora_expand(h: Tensor, B: Tensor, scale, *, ids=None, segments=None, mixture=None, segment_mixture=None,
                base_out: Optional[Tensor] = None, validate: bool = True) -> Tensor:
    """Expand-add ``y[t] = base_out[t] + Σ_j w_j scale[i_j] B[i_j] h[t, j]``.

    ``h``: ``[..., r]`` (single-adapter forms) or ``[..., k, r]`` (mixtures), as :func:`lora_shrink`
    returns; ``B [N, d_out, r]``. Returns ``[..., d_out]`` in B's dtype. A torch composition (any
    device, differentiable).
    """
    op = "lora_expand"
    single = ids is not None or segments is not None
    expect(isinstance(h, Tensor) and h.dim() >= (1 if single else 2), op, "h must be [..., r] or [..., k, r]")
    expect(isinstance(B, Tensor) and B.dim() == 3 and B.shape[2] == h.shape[-1], op,
           f"B must be [N, d_out, r] with r = {h.shape[-1]}, got {list(B.shape) if isinstance(B, Tensor) else B}")
    lead = h.shape[:-1] if single else h.shape[:-2]
    N, d_out, r = B.shape
    expect_dtype(op, "B", B)
    forms = dict(ids=ids, segments=segments, mixture=mixture, segment_mixture=segment_mixture)
    T, rt = _routing(lead, N, forms, B.device, acc_dtype(B.dtype), validate, op)
    s = _scale_tensor(scale, N, B, op)
    idc, valid, coef = _token_routing(rt, T, N, B.device, s)
    k = idc.shape[1]
    acc = acc_dtype(B.dtype)
    hk = h.to(acc).reshape(T, k, r)
    y = _expand_all(_scatter_adapters(hk * coef[:, :, None], idc, N), B)
    base = _check_base(base_out, lead, d_out, B, op) if base_out is not None else None
    if base is not None:
        y = y + base.to(acc)
    return y.to(B.dtype).reshape(*lead, d_out)


# ------------------------------------------------------------------------------------------------
# Reference: pure torch, fp32 accumulation (fp64 for fp64). Dense over the adapters: one GEMM against
# all N adapters' A (h_all [T, N, r]), a gather of each token's adapters, a scatter of the weighted
# codes back to [T, N, r] and one GEMM against all B. No host sync, no data-dependent shapes, and the
# same formulas give the backward. Cost T·N·r·(d_in + d_out): an oracle, not a fast path.


def _token_routing(rt: LoraRouting, T: int, N: int, device, scale: Optional[Tensor] = None):
    """Per token: ``idc [T, k]`` (adapter ids clamped into [0, N)), ``valid [T, k]`` (acc 0/1 mask:
    the id was in range and the token in a segment) and ``coef [T, k] = valid · w · scale[id]``."""
    ids, w, off = rt
    if off is not None:
        S = off.shape[0] - 1
        t = torch.arange(T, device=device, dtype=torch.int32)
        seg = torch.searchsorted(off[1:].contiguous(), t, right=True)  # first s with offsets[s+1] > t
        inseg = seg < S
        segc = seg.clamp(max=max(S - 1, 0))
        inseg = inseg & (t >= off.gather(0, segc.long())) if S > 0 else torch.zeros_like(inseg)
        if S > 0:
            ids_t = ids.index_select(0, segc.long())
            w_t = None if w is None else w.index_select(0, segc.long())
        else:
            ids_t = torch.full((T, ids.shape[1]), -1, dtype=ids.dtype, device=device)
            w_t = None if w is None else torch.zeros((T, ids.shape[1]), dtype=w.dtype, device=device)
        ids_t = torch.where(inseg[:, None], ids_t, torch.full_like(ids_t, -1))
    else:
        ids_t, w_t = ids, w
    ok = (ids_t >= 0) & (ids_t < N)
    idc = torch.where(ok, ids_t, torch.zeros_like(ids_t)).long()
    acc = scale.dtype if scale is not None else (w.dtype if w is not None else torch.float32)
    valid = ok.to(acc)
    coef = valid
    if w_t is not None:
        coef = coef * w_t.to(acc)
    if scale is not None and N > 0:  # N = 0: every slot is invalid (coef 0) and scale is empty
        coef = coef * scale.to(acc)[idc]
    return idc, valid, coef


def _weigh(v: Tensor, coef: Tensor) -> Tensor:
    """``v [T, k, r] · coef [T, k]`` with the slots of coefficient 0 set to exactly 0: like the kernels,
    a weight-0 slot is skipped, so a non-finite code of its adapter does not reach the output (0·NaN)."""
    return torch.where((coef != 0)[:, :, None], v * coef[:, :, None], torch.zeros((), dtype=v.dtype, device=v.device))


def _live_adapters(idc: Tensor, coef: Tensor, N: int) -> Tensor:
    """``[N]`` bool: the adapter is used by at least one slot with a nonzero coefficient (no host sync)."""
    live = (coef != 0).reshape(-1).to(coef.dtype)
    return torch.zeros(N, dtype=coef.dtype, device=coef.device).index_add(0, idc.reshape(-1), live) > 0


def _live_only(W: Tensor, live: Tensor) -> Tensor:
    """The stacked adapter weights with the adapters no slot uses set to 0: the dense reference then reads an
    unused (e.g. NaN-filled) adapter as the kernels do — not at all. Caveat of the dense oracle: a
    non-finite value in an adapter that some token does use still reaches every token's output through
    0·NaN in the dense GEMM, where the kernels confine it to the tokens that use that adapter."""
    return torch.where(live.reshape(-1, *([1] * (W.dim() - 1))), W, torch.zeros((), dtype=W.dtype, device=W.device))


def _shrink_all(x2: Tensor, A: Tensor) -> Tensor:
    """``[T, N, r]`` codes of every token under every adapter (fp32 / fp64)."""
    acc = acc_dtype(x2.dtype)
    N, r, d_in = A.shape
    return (x2.to(acc) @ A.to(acc).reshape(N * r, d_in).T).reshape(-1, N, r)


def _scatter_adapters(v: Tensor, idc: Tensor, N: int) -> Tensor:
    """``[T, k, r]`` per routed slot -> ``[T, N, r]`` summed into each slot's adapter."""
    T, k, r = v.shape
    return torch.zeros((T, N, r), dtype=v.dtype, device=v.device).scatter_add(1, idc[:, :, None].expand(T, k, r), v)


def _expand_all(z: Tensor, B: Tensor) -> Tensor:
    """``y[t] = Σ_i B_i z[t, i]``: ``z [T, N, r]`` -> ``[T, d_out]`` (acc dtype)."""
    N, d_out, r = B.shape
    return z.reshape(-1, N * r) @ B.to(z.dtype).permute(0, 2, 1).reshape(N * r, d_out)


def lora_apply_reference(x, A, B, scale, ids, weights=None, offsets=None, base_out=None, ranks=None) -> Tensor:
    """The op ``lora_apply`` on canonical arguments: ``x [T, d_in]``, ``ids [R, k]`` int, ``weights
    [R, k]`` or None (= 1), ``offsets [S+1]`` or None (rows = tokens), ``scale [N]``, ``base_out [T, d_out]``
    or None, ``ranks [N]`` or None (mixed ranks: A/B masked past each rank). Returns ``[T, d_out]`` in x's
    dtype, computed in fp32 (fp64 for fp64)."""
    A, B = _rank_masked(A, B, ranks)
    N, d_out, r = B.shape
    T = x.shape[0]
    acc = acc_dtype(x.dtype)
    if N == 0:  # an empty adapter pool (every id is -1 or out of range): no update, as the kernels
        y = x.new_zeros((T, d_out), dtype=acc)
        return (y if base_out is None else y + base_out.to(acc)).to(x.dtype)
    idc, _, coef = _token_routing(LoraRouting(ids, weights, offsets), T, N, x.device, scale.to(acc))
    k = idc.shape[1]
    h = _shrink_all(x, A).gather(1, idc[:, :, None].expand(T, k, r))  # [T, k, r]
    y = _expand_all(_scatter_adapters(_weigh(h, coef), idc, N), _live_only(B, _live_adapters(idc, coef, N)))
    if base_out is not None:
        y = y + base_out.to(acc)
    return y.to(x.dtype)


def lora_apply_sliced_reference(x, As, Bs, scale, ids, weights=None, offsets=None, base_out=None, ranks=None):
    """The op ``lora_apply_sliced``: the slices' :func:`lora_apply_reference` side by side."""
    ys, c = [], 0
    for A, B in zip(As, Bs):
        d = B.shape[1]
        base = None if base_out is None else base_out[:, c:c + d]
        ys.append(lora_apply_reference(x, A, B, scale, ids, weights, offsets, base, ranks))
        c += d
    return torch.cat(ys, 1) if ys else x.new_empty((x.shape[0], 0))


def _lora_apply_backward_reference(g, x, A, B, scale, ids, weights, offsets, need_w: bool):
    """(dx, dA, dB, dweights) of :func:`lora_apply_reference` in closed form (torch ops, fp32)."""
    N, d_out, r = B.shape
    T, d_in = x.shape
    acc = acc_dtype(x.dtype)
    if N == 0:  # an empty adapter pool: the output did not depend on x or the weights
        dw = None if not (need_w and weights is not None) else torch.zeros_like(weights)
        return x.new_zeros(x.shape), A.new_zeros(A.shape), B.new_zeros(B.shape), dw
    rt = LoraRouting(ids, weights, offsets)
    idc, valid, coef = _token_routing(rt, T, N, x.device, scale.to(acc))
    k = idc.shape[1]
    G = g.to(acc)
    xa, Aa, Ba = x.to(acc), A.to(acc), B.to(acc)
    gather = lambda all_: all_.gather(1, idc[:, :, None].expand(T, k, r))  # noqa: E731
    u = gather((G @ Ba.permute(0, 2, 1).reshape(N * r, d_out).T).reshape(T, N, r))  # B_i^T g   [T, k, r]
    h = gather(_shrink_all(x, A))  # A_i x [T, k, r]
    Zu = _scatter_adapters(_weigh(u, coef), idc, N).reshape(T, N * r)
    Zh = _scatter_adapters(_weigh(h, coef), idc, N).reshape(T, N * r)
    dx = Zu @ _live_only(Aa, _live_adapters(idc, coef, N)).reshape(N * r, d_in)
    dA = (Zu.T @ xa).reshape(N, r, d_in)
    dB = (G.T @ Zh).reshape(d_out, N, r).permute(1, 0, 2)
    dw = None
    if need_w and weights is not None:
        dw_tok = (u * h).sum(-1) * valid * scale.to(acc)[idc]  # [T, k]
        if offsets is None:
            dw = dw_tok
        else:  # sum over each segment's tokens
            S = offsets.shape[0] - 1
            t = torch.arange(T, device=x.device, dtype=torch.int32)
            seg = torch.searchsorted(offsets[1:].contiguous(), t, right=True).clamp(max=max(S - 1, 0))
            dw = torch.zeros((S, k), dtype=acc, device=x.device).index_add(0, seg.long(), dw_tok)
        dw = dw.to(weights.dtype)
    return dx.to(x.dtype), dA.to(A.dtype), dB.to(B.dtype).contiguous(), dw


def _shared_coef(T: int, N: int, ids, weights, scale: float, acc):
    """Dense ``[T, N]`` coefficients ``scale · w`` of the shared-A form (compact ids scattered)."""
    if ids is None:
        return weights.to(acc) * scale
    ok = (ids >= 0) & (ids < N)
    idc = torch.where(ok, ids, torch.zeros_like(ids)).long()
    wv = torch.where(ok, weights.to(acc), torch.zeros((), dtype=acc, device=weights.device))
    return torch.zeros((T, N), dtype=acc, device=weights.device).scatter_add(1, idc, wv) * scale


def lora_shared_apply_reference(x, A, B, scale: float, ids, weights, base_out=None) -> Tensor:
    """The op ``lora_shared_apply``: ``x [T, d_in]``, ``A [r, d_in]``, ``B [N, d_out, r]``, ``ids [T, k]``
    int (compact weights ``[T, k]``) or None (dense weights ``[T, N]``). fp32 (fp64) math."""
    N, d_out, r = B.shape
    T = x.shape[0]
    acc = acc_dtype(x.dtype)
    h = x.to(acc) @ A.to(acc).T  # [T, r]
    c = _shared_coef(T, N, ids, weights, scale, acc)
    y = _expand_all(c[:, :, None] * h[:, None, :], _live_only(B, (c != 0).any(0)))  # weight-0 experts skipped
    if base_out is not None:
        y = y + base_out.to(acc)
    return y.to(x.dtype)


def _lora_shared_backward_reference(g, x, A, B, scale, ids, weights):
    N, d_out, r = B.shape
    T = x.shape[0]
    acc = acc_dtype(x.dtype)
    G, xa, Aa = g.to(acc), x.to(acc), A.to(acc)
    h = xa @ Aa.T
    c = _shared_coef(T, N, ids, weights, scale, acc)
    U = (G @ B.to(acc).permute(0, 2, 1).reshape(N * r, d_out).T).reshape(T, N, r)  # B_i^T g
    dh = _weigh(U, c).sum(1)
    dx, dA = dh @ Aa, dh.T @ xa
    dB = (G.T @ (c[:, :, None] * h[:, None, :]).reshape(T, N * r)).reshape(d_out, N, r).permute(1, 0, 2)
    dw_dense = (U * h[:, None, :]).sum(-1) * scale  # [T, N]
    if ids is None:
        dw = dw_dense
    else:
        ok = (ids >= 0) & (ids < N)
        idc = torch.where(ok, ids, torch.zeros_like(ids)).long()
        dw = torch.where(ok, dw_dense.gather(1, idc), torch.zeros((), dtype=acc, device=x.device))
    return dx.to(x.dtype), dA.to(A.dtype), dB.to(B.dtype).contiguous(), dw.to(weights.dtype)


# ------------------------------------------------------------------------------------------------
# Op registration: argument checks (the same errors on every device and at trace time), fake
# kernels, CPU kernels (the reference), autograd.


def _check_op(x, A, B, scale, ids, weights, offsets, op="lora_apply"):
    expect(x.dim() == 2, op, f"x must be [T, d_in], got {list(x.shape)}")
    N, r, d_in, d_out = _check_weights(x, A, B, op)
    T = x.shape[0]
    acc = acc_dtype(x.dtype)
    expect(scale.dim() == 1 and scale.shape[0] == N, op, f"scale must be [N] = [{N}], got {list(scale.shape)}")
    expect(scale.dtype == acc, op, f"scale must have dtype {acc}, got {scale.dtype}")
    expect(ids.dim() == 2 and ids.dtype == torch.int32, op, f"ids must be [R, k] int32, got {list(ids.shape)} {ids.dtype}")
    R = T if offsets is None else offsets.shape[0] - 1
    if offsets is not None:
        expect(offsets.dim() == 1 and offsets.shape[0] >= 1 and offsets.dtype == torch.int32, op,
               f"offsets must be [S+1] int32, got {list(offsets.shape)} {offsets.dtype}")
    expect(ids.shape[0] == R, op, f"ids must have {R} rows ({'tokens' if offsets is None else 'segments'}), "
           f"got {list(ids.shape)}")
    if weights is not None:
        expect(weights.shape == ids.shape, op, f"weights must be {list(ids.shape)}, got {list(weights.shape)}")
        expect(weights.dtype == acc, op, f"weights must have dtype {acc}, got {weights.dtype}")
    return T, d_out


def _check_op_ranks(ranks, B, op="lora_apply"):
    if ranks is not None:
        expect(ranks.dim() == 1 and ranks.shape[0] == B.shape[0] and ranks.dtype == torch.int32, op,
               f"ranks must be [N] = [{B.shape[0]}] int32, got {list(ranks.shape)} {ranks.dtype}")


def _check_op_base(x, base, T, d_out, op="lora_apply"):
    if base is not None:
        expect(tuple(base.shape) == (T, d_out), op, f"base_out must be [T, d_out] = [{T}, {d_out}], got {list(base.shape)}")
        expect_dtype(op, "base_out", base, like=x)


@torch.library.register_fake("mokernels::lora_apply")
def _fake(x, A, B, scale, ids, weights, offsets, base_out, ranks=None):
    T, d_out = _check_op(x, A, B, scale, ids, weights, offsets)
    _check_op_base(x, base_out, T, d_out)
    _check_op_ranks(ranks, B)
    return x.new_empty((T, d_out))


@torch.library.register_kernel("mokernels::lora_apply", "cpu")
def _cpu(x, A, B, scale, ids, weights, offsets, base_out, ranks=None):
    T, d_out = _check_op(x, A, B, scale, ids, weights, offsets)
    _check_op_base(x, base_out, T, d_out)
    _check_op_ranks(ranks, B)
    with torch.no_grad():
        return lora_apply_reference(x, A, B, scale, ids, weights, offsets, base_out, ranks).contiguous()


@torch.library.register_fake("mokernels::lora_apply_")
def _fake_(out, x, A, B, scale, ids, weights, offsets, ranks=None):
    T, d_out = _check_op(x, A, B, scale, ids, weights, offsets, "lora_apply_")
    _check_op_base(x, out, T, d_out, "lora_apply_")
    _check_op_ranks(ranks, B, "lora_apply_")


@torch.library.register_kernel("mokernels::lora_apply_", "cpu")
def _cpu_(out, x, A, B, scale, ids, weights, offsets, ranks=None):
    T, d_out = _check_op(x, A, B, scale, ids, weights, offsets, "lora_apply_")
    _check_op_base(x, out, T, d_out, "lora_apply_")
    _check_op_ranks(ranks, B, "lora_apply_")
    with torch.no_grad():
        out.copy_(lora_apply_reference(x, A, B, scale, ids, weights, offsets, out, ranks))


def _check_sliced_op(x, As, Bs, scale, ids, weights, offsets, base_out, ranks):
    op = "lora_apply_sliced"
    expect(1 <= len(As) <= MAX_SLICES and len(As) == len(Bs), op,
           f"A and B must be lists of the same length S in [1, {MAX_SLICES}], got {len(As)} and {len(Bs)}")
    d_out = 0
    for s_, (a_, b_) in enumerate(zip(As, Bs)):
        T, d = _check_op(x, a_, b_, scale, ids, weights, offsets, op)
        expect(tuple(a_.shape) == tuple(As[0].shape), op, f"every A[s] must be {list(As[0].shape)}, got A[{s_}] "
               f"{list(a_.shape)}")
        d_out += d
    _check_op_base(x, base_out, x.shape[0], d_out, op)
    _check_op_ranks(ranks, Bs[0], op)
    return x.shape[0], d_out


@torch.library.register_fake("mokernels::lora_apply_sliced")
def _fake_sliced(x, As, Bs, scale, ids, weights, offsets, base_out, ranks=None):
    T, d_out = _check_sliced_op(x, As, Bs, scale, ids, weights, offsets, base_out, ranks)
    return x.new_empty((T, d_out))


@torch.library.register_kernel("mokernels::lora_apply_sliced", "cpu")
def _cpu_sliced(x, As, Bs, scale, ids, weights, offsets, base_out, ranks=None):
    _check_sliced_op(x, As, Bs, scale, ids, weights, offsets, base_out, ranks)
    with torch.no_grad():
        return lora_apply_sliced_reference(x, As, Bs, scale, ids, weights, offsets, base_out, ranks).contiguous()


def _check_linear_op(x, W, bias, A, B, scale, ids, weights, offsets):
    op = "lora_linear"
    T, d_out = _check_op(x, A, B, scale, ids, weights, offsets, op)
    expect(W.dim() == 2 and tuple(W.shape) == (d_out, x.shape[1]), op,
           f"W must be [d_out, d_in] = [{d_out}, {x.shape[1]}], got {list(W.shape)}")
    expect_dtype(op, "W", W, like=x)
    expect(W.device == x.device, op, f"W is on {W.device} but x is on {x.device}")
    if bias is not None:
        expect(tuple(bias.shape) == (d_out,), op, f"bias must be [d_out] = [{d_out}], got {list(bias.shape)}")
        expect_dtype(op, "bias", bias, like=x)
        expect(bias.device == x.device, op, f"bias is on {bias.device} but x is on {x.device}")
    return T, d_out


@torch.library.register_fake("mokernels::lora_linear")
def _fake_linear(x, W, bias, A, B, scale, ids, weights, offsets):
    T, d_out = _check_linear_op(x, W, bias, A, B, scale, ids, weights, offsets)
    return x.new_empty((T, d_out))


def lora_linear_reference(x, W, bias, A, B, scale, ids, weights=None, offsets=None) -> Tensor:
    """The op ``lora_linear`` on canonical arguments: ``F.linear(x, W, bias)`` rounded to x's dtype (as
    the unfused layer computes it), plus the LoRA delta of :func:`lora_apply_reference` in fp32."""
    return lora_apply_reference(x, A, B, scale, ids, weights, offsets, torch.nn.functional.linear(x, W, bias))


@torch.library.register_kernel("mokernels::lora_linear", "cpu")
def _cpu_linear(x, W, bias, A, B, scale, ids, weights, offsets):
    _check_linear_op(x, W, bias, A, B, scale, ids, weights, offsets)
    with torch.no_grad():
        return lora_linear_reference(x, W, bias, A, B, scale, ids, weights, offsets).contiguous()


def _setup(ctx, inputs, output):
    x, A, B, scale, ids, weights, offsets, base_out, ranks = (*inputs, None)[:9]
    ctx.save_for_backward(x, A, B, scale, ids, weights, offsets, ranks)
    ctx.has_w = weights is not None


def _bwd_kernel_fits(x: Tensor, k: int, r: int, shared: bool) -> bool:
    """Whether the CUDA backward kernels run these arguments: CUDA tensors and the token kernel's shared
    memory ``(k·r + (2r if shared else k·r) + k)·acc + 4k <= 48 KiB`` (csrc/kernels/lora_bwd.cuh,
    token_tail_bytes); otherwise the reference composition (e.g. a dense shared-A gate over many experts)."""
    acc = 8 if x.dtype == torch.float64 else 4
    return x.device.type == "cuda" and (k * r + (2 * r if shared else k * r) + k) * acc + 4 * k <= 48 * 1024


def _nonempty(t: Tensor, need: bool):
    return t if need else None


def _apply_backward(g, x, A, B, scale, ids, weights, offsets, ranks, need_dx, need_dA, need_dB, need_w):
    """(dx, dA, dB, dweights) of one lora_apply (one slice): the CUDA backward kernels when they fit, else
    the closed-form reference. Mixed ranks: both run on A/B masked past each rank (a masked copy: the
    backward kernels take no ranks yet) and dA/dB are masked the same way (zero in the padding)."""
    Am, Bm = _rank_masked(A, B, ranks)
    if _bwd_kernel_fits(x, ids.shape[1], A.shape[1], False):
        dx, dA, dB, dw = torch.ops.mokernels.lora_apply_backward(g.contiguous(), x, Am, Bm, scale, ids, weights, offsets,
                                                                 need_dx, need_dA, need_dB, need_w)
    else:
        dx, dA, dB, dw = _lora_apply_backward_reference(g, x, Am, Bm, scale, ids, weights, offsets, need_w)
    if ranks is not None:
        dA = _rank_masked(dA, dB, ranks)[0] if need_dA else dA
        dB = _rank_masked(Am, dB, ranks)[1] if need_dB else dB
    return dx, dA, dB, dw


def _backward(ctx, g):
    x, A, B, scale, ids, weights, offsets, ranks = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_w = bool(need[5]) and weights is not None
    dx, dA, dB, dw = _apply_backward(g, x, A, B, scale, ids, weights, offsets, ranks, bool(need[0]), bool(need[1]),
                                     bool(need[2]), need_w)
    return (_nonempty(dx, need[0]), _nonempty(dA, need[1]), _nonempty(dB, need[2]), None, None,
            dw if need_w else None, None, g if need[7] else None, None)


def _setup_sliced(ctx, inputs, output):
    x, As, Bs, scale, ids, weights, offsets, base_out, ranks = (*inputs, None)[:9]
    ctx.save_for_backward(x, scale, ids, weights, offsets, ranks, *As, *Bs)
    ctx.nslices = len(As)
    ctx.has_w = weights is not None


def _backward_sliced(ctx, g):
    """Per slice: the lora_apply backward (kernels or reference) on that slice's columns of g; dx and the
    weights' gradient are summed over the slices."""
    x, scale, ids, weights, offsets, ranks, *ab = ctx.saved_tensors
    S = ctx.nslices
    As, Bs = ab[:S], ab[S:]
    need = ctx.needs_input_grad
    need_w = bool(need[5]) and weights is not None
    dx = dw = None
    dAs, dBs, c = [], [], 0
    for A, B in zip(As, Bs):
        d = B.shape[1]
        dxs, dA, dB, dws = _apply_backward(g[:, c:c + d], x, A, B, scale, ids, weights, offsets, ranks, bool(need[0]),
                                           bool(need[1]), bool(need[2]), need_w)
        c += d
        dAs.append(dA if need[1] else None)
        dBs.append(dB if need[2] else None)
        if need[0]:
            dx = dxs if dx is None else dx + dxs
        if need_w:
            dw = dws if dw is None else dw + dws
    return (dx, dAs if need[1] else None, dBs if need[2] else None, None, None, dw, None, g if need[7] else None, None)


torch.library.register_autograd("mokernels::lora_apply_sliced", _backward_sliced, setup_context=_setup_sliced)


torch.library.register_autograd("mokernels::lora_apply", _backward, setup_context=_setup)


def _check_shared_op(x, A, B, scale, ids, weights, base_out):
    op = "lora_shared_apply"
    expect(x.dim() == 2, op, f"x must be [T, d_in], got {list(x.shape)}")
    N, r, d_in, d_out = _check_weights(x, A, B, op, shared=True)
    T = x.shape[0]
    acc = acc_dtype(x.dtype)
    if ids is None:
        expect(tuple(weights.shape) == (T, N), op, f"weights must be [T, N] = [{T}, {N}], got {list(weights.shape)}")
    else:
        expect(ids.dim() == 2 and ids.shape[0] == T and ids.dtype == torch.int32, op,
               f"ids must be [T, k] int32 with T = {T}, got {list(ids.shape)} {ids.dtype}")
        expect(weights.shape == ids.shape, op, f"weights must be {list(ids.shape)}, got {list(weights.shape)}")
    expect(weights.dtype == acc, op, f"weights must have dtype {acc}, got {weights.dtype}")
    _check_op_base(x, base_out, T, d_out, op)
    return T, d_out


@torch.library.register_fake("mokernels::lora_shared_apply")
def _fake_shared(x, A, B, scale, ids, weights, base_out):
    T, d_out = _check_shared_op(x, A, B, scale, ids, weights, base_out)
    return x.new_empty((T, d_out))


@torch.library.register_kernel("mokernels::lora_shared_apply", "cpu")
def _cpu_shared(x, A, B, scale, ids, weights, base_out):
    _check_shared_op(x, A, B, scale, ids, weights, base_out)
    with torch.no_grad():
        return lora_shared_apply_reference(x, A, B, scale, ids, weights, base_out).contiguous()


def _setup_shared(ctx, inputs, output):
    x, A, B, scale, ids, weights, base_out = inputs
    ctx.save_for_backward(x, A, B, ids, weights)
    ctx.scale = scale


def _backward_shared(ctx, g):
    x, A, B, ids, weights = ctx.saved_tensors
    need = ctx.needs_input_grad
    k = B.shape[0] if ids is None else ids.shape[1]
    if _bwd_kernel_fits(x, k, A.shape[0], True):
        dx, dA, dB, dw = torch.ops.mokernels.lora_shared_apply_backward(
            g.contiguous(), x, A, B, ctx.scale, ids, weights, bool(need[0]), bool(need[1]), bool(need[2]), bool(need[5]))
    else:
        dx, dA, dB, dw = _lora_shared_backward_reference(g, x, A, B, ctx.scale, ids, weights)
    return (_nonempty(dx, need[0]), _nonempty(dA, need[1]), _nonempty(dB, need[2]), None, None,
            _nonempty(dw, need[5]), g if need[6] else None)


# The backward ops (CUDA: csrc/lora_bwd.cu; here: CPU = the closed-form reference, fake = shapes).
# An output not asked for is an empty [0] tensor.


def _bwd_outputs(x, A, B, R, k, needs, has_w):
    acc = acc_dtype(x.dtype)
    T, d_in = x.shape
    e = lambda dt: x.new_empty((0,), dtype=dt)  # noqa: E731
    return (x.new_empty((T, d_in)) if needs[0] else e(x.dtype),
            A.new_empty(A.shape) if needs[1] else e(x.dtype),
            B.new_empty(B.shape) if needs[2] else e(x.dtype),
            x.new_empty((R, k), dtype=acc) if needs[3] and has_w else e(acc))


def _bwd_pick(ref, needs, has_w):
    dx, dA, dB, dw = ref
    like = dx
    e = lambda dt: like.new_empty((0,), dtype=dt)  # noqa: E731
    acc = acc_dtype(like.dtype)
    return (dx if needs[0] else e(like.dtype), dA if needs[1] else e(like.dtype), dB if needs[2] else e(like.dtype),
            dw.to(acc) if needs[3] and has_w and dw is not None else e(acc))


@torch.library.register_fake("mokernels::lora_apply_backward")
def _fake_bwd(grad, x, A, B, scale, ids, weights, offsets, need_dx, need_dA, need_dB, need_dw):
    T, d_out = _check_op(x, A, B, scale, ids, weights, offsets, "lora_apply_backward")
    _check_op_base(x, grad, T, d_out, "lora_apply_backward")
    return _bwd_outputs(x, A, B, ids.shape[0], ids.shape[1], (need_dx, need_dA, need_dB, need_dw), weights is not None)


@torch.library.register_kernel("mokernels::lora_apply_backward", "cpu")
def _cpu_bwd(grad, x, A, B, scale, ids, weights, offsets, need_dx, need_dA, need_dB, need_dw):
    T, d_out = _check_op(x, A, B, scale, ids, weights, offsets, "lora_apply_backward")
    _check_op_base(x, grad, T, d_out, "lora_apply_backward")
    has_w = weights is not None
    with torch.no_grad():
        ref = _lora_apply_backward_reference(grad, x, A, B, scale, ids, weights, offsets, need_dw and has_w)
    return _bwd_pick(ref, (need_dx, need_dA, need_dB, need_dw), has_w)


@torch.library.register_fake("mokernels::lora_shared_apply_backward")
def _fake_shared_bwd(grad, x, A, B, scale, ids, weights, need_dx, need_dA, need_dB, need_dw):
    T, d_out = _check_shared_op(x, A, B, scale, ids, weights, None)
    _check_op_base(x, grad, T, d_out, "lora_shared_apply_backward")
    return _bwd_outputs(x, A, B, weights.shape[0], weights.shape[1], (need_dx, need_dA, need_dB, need_dw), True)


@torch.library.register_kernel("mokernels::lora_shared_apply_backward", "cpu")
def _cpu_shared_bwd(grad, x, A, B, scale, ids, weights, need_dx, need_dA, need_dB, need_dw):
    T, d_out = _check_shared_op(x, A, B, scale, ids, weights, None)
    _check_op_base(x, grad, T, d_out, "lora_shared_apply_backward")
    with torch.no_grad():
        ref = _lora_shared_backward_reference(grad, x, A, B, scale, ids, weights)
    return _bwd_pick(ref, (need_dx, need_dA, need_dB, need_dw), True)


torch.library.register_autograd("mokernels::lora_shared_apply", _backward_shared, setup_context=_setup_shared)


# Autocast: the LoRA ops are autocast-neutral. Their arguments are not cast (the caller picks the
# activation dtype, see the module docstring), and what runs below them — the CPU reference's fp32
# matmuls, the CUDA backward's fallback — runs with autocast off, so "fp32 accumulation" also holds
# inside a torch.autocast region (without this, the CPU reference's fp32 GEMMs were silently autocast
# to bf16). The ops are redispatched below the Autocast keys; autograd still records them.


def _autocast_neutral(name: str):
    op = getattr(torch.ops.mokernels, name).default

    def kernel(*args):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return op(*args)

    return kernel


for _name in ("lora_apply", "lora_apply_", "lora_apply_sliced", "lora_shared_apply", "lora_linear", "lora_apply_backward",
              "lora_shared_apply_backward"):
    for _key in ("AutocastCPU", "AutocastCUDA"):
        torch.library.impl(f"mokernels::{_name}", _key)(_autocast_neutral(_name))
