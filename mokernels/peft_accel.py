"""Accelerate an existing PEFT model in place: ``report = mokernels.accelerate(peft_model)``.

Every ``peft.tuners.lora.Linear`` gets an instance-level ``forward`` that computes PEFT's LoRA
delta with :func:`mokernels.ops.lora_apply` (METHODS.md §1): the layer's adapters are stacked into
``A [N, r, d_in]`` / ``B [N, d_out, r]`` with the per-adapter scale ``[N]`` taken from PEFT's own
``scaling`` dict at every call. Nothing else of the model changes: PEFT keeps owning its
per-adapter Parameters (its optimizer groups, ``state_dict``, ``save_pretrained``,
``add_adapter``/``delete_adapter``/``set_adapter`` all work unchanged) and
:func:`restore` puts PEFT's own ``forward`` back exactly.

Forms routed through the op (one op call per layer):

* one active adapter                          -> ``segments=`` with one segment (all tokens);
* several active adapters (summed, as PEFT)   -> ``segment_mixture=`` with weights 1;
* PEFT's mixed batch ``adapter_names=[...]``  -> ``segments=``, one segment per sequence, ``"__base__"``
  (or an adapter this layer does not have, which PEFT skips too) -> ``-1``. Both PEFT call paths work:
  ``model(..., adapter_names=names)`` (PEFT's forward pre-hooks pass it to each layer) and
  ``layer(x, adapter_names=names)``.

No stale copies. Two weight paths:

* autograd path (grad mode on and an adapter weight that requires grad): the used adapters' own
  Parameters are stacked (zero-padded to a common rank) inside the forward, so gradients land in
  PEFT's Parameters and an optimizer step is seen by the next forward;
* inference path: the stack of all the layer's adapters is cached; before every call the used
  adapters are checked (Parameter identity, ``data_ptr``, ``_version``, shape, scale) and any changed
  slot is refreshed, and the whole stack is rebuilt when adapters are added or deleted. In-place
  updates (optimizer steps, ``load_state_dict``, ``copy_``) bump ``_version``; ``param.data = t``
  changes ``data_ptr``; a new Parameter changes its identity. Cost: one extra copy of the adapter
  weights per layer (``report.cache_bytes``); ``accelerate(model, cache=False)`` trades it for
  stacking the used adapters at every call, as the autograd path does.

Routing metadata is built on the host once per batch (not once per layer: peft #804) and cached on
the device (keyed by the adapter-name tuple, the layer's adapter set and the token layout); the op
is called with ``validate=False`` because the ids are in range by construction.

Left on PEFT's own path (its forward is called; outputs stay PEFT's): layers other than
``peft.tuners.lora.Linear`` (Embedding, Conv, quantized bases such as bnb/GPTQ/AWQ/HQQ/torchao,
tensor-parallel or other subclasses), adapters with a LoRA variant (DoRA, aLoRA, ...), ``lora_bias``,
rank > 128, adapters whose dtypes or devices differ, merged adapters, ``lora_dropout > 0`` in training
mode when more than one adapter is used in the call (one adapter with dropout is accelerated: the
same dropout module is applied, so the RNG stream and masks equal PEFT's), and input-dtype casting
disabled with an input dtype other than the adapters'. Each kind is logged once (logger
``mokernels.peft``, level WARNING) and listed in the report. Mixed ranks are supported (zero padding
to the largest rank is exact).

HRA (``peft.tuners.hra.HRALinear``): PEFT materialises ``delta = H_1 … H_r`` (``D x D``) and ``W delta``
on every forward; here the active adapters' vectors go through :func:`mokernels.ops.householder_apply`
(``x ↦ x deltaᵀ`` in the compact WY form, no ``D x D`` matrix), then ``F.linear`` with the base weight.
``apply_GS=True`` (Gram-Schmidt: a different transform), HRA Conv2d and merged HRA stay on PEFT's path.

Unknown adapter names in ``adapter_names`` raise PEFT's own ``ValueError("Trying to infer with
non-existing adapter(s): ...")`` also when a layer is called directly (PEFT's layer silently returns
the base output there: peft #2090). PEFT's forward-hook context removes its ``adapter_names`` pre-hooks only
when the forward returns; :func:`accelerate` wraps it on each ``LoraModel`` so that a forward that raises
leaves no stale pre-hooks behind (otherwise every later call reuses the failed call's ``adapter_names``).

On CPU the op runs its pure-torch reference, which is dense over the stacked adapters (a correctness
path, not a fast one); the kernels are the CUDA path.
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops._checks import FLOAT_DTYPES
from .ops.lora import MAX_RANK, lora_apply

__all__ = ["accelerate", "restore", "AccelerationReport"]

log = logging.getLogger("mokernels.peft")

_STATE = "_mokernels_accel"  # instance attribute of a patched layer (a plain object: not in state_dict)
_BASE = "__base__"

# Kinds of "stays on PEFT's path" (the report's and the log's keys)
K_LAYER = "layer type"
K_QUANT = "quantized base"
K_VARIANT = "LoRA variant (DoRA, aLoRA, ...)"
K_BIAS = "lora_bias"
K_DROPOUT = "lora_dropout > 0 in training mode with several adapters in one call"
K_RANK = f"rank > {MAX_RANK}"
K_DTYPE = "adapter dtypes or devices differ"
K_MERGED = "merged adapters"
K_CAST = "input dtype casting disabled and x's dtype differs from the adapters'"
K_KWARGS = "variant forward kwargs (alora_offsets)"
K_TUNER = "PEFT tuner type other than LoRA and HRA"
K_HRA_GS = "HRA apply_GS=True (Gram-Schmidt: a different transform)"

_WHY = {
    K_LAYER: "not a peft.tuners.lora.Linear (Embedding/Conv/custom layers run PEFT's forward)",
    K_QUANT: "quantized base layer class: PEFT's forward",
    K_VARIANT: "those adapters run PEFT's forward",
    K_BIAS: "adapters with lora_bias=True run PEFT's forward",
    K_DROPOUT: "PEFT's forward in training mode for multi-adapter / mixed-batch calls (accelerated in eval mode "
               "and with one adapter per call)",
    K_RANK: "the op's rank limit; those adapters run PEFT's forward",
    K_DTYPE: "calls using them run PEFT's forward",
    K_MERGED: "PEFT's forward (base weights already contain the adapters) until unmerged",
    K_CAST: "PEFT's forward",
    K_KWARGS: "PEFT's forward",
    K_HRA_GS: "those adapters run PEFT's HRA forward",
    K_TUNER: "PEFT's forward (no mokernels op for it)",
}
_QUANT_HINTS = ("bnb", "gptq", "awq", "aqlm", "eetq", "hqq", "torchao", "inc", "quant")


@dataclass
class AccelerationReport:
    """What :func:`accelerate` did. ``accelerated``: names of the LoRA Linear layers whose forward now
    runs through mokernels; ``partial``: among those, ``name -> [kind, ...]`` for adapters or modes that
    still take PEFT's path (e.g. one DoRA adapter in the layer); ``not_accelerated``: ``name -> kind``
    for PEFT tuner layers left untouched; ``hra``: HRA layers routed through the Householder op."""

    accelerated: list[str] = field(default_factory=list)
    partial: dict[str, list[str]] = field(default_factory=dict)
    not_accelerated: dict[str, str] = field(default_factory=dict)
    hra: list[str] = field(default_factory=list)
    cache_bytes: int = 0  # upper bound of the inference caches' memory (accelerate(cache=True))

    def kinds(self) -> dict[str, list[str]]:
        """``kind -> [layer names]`` over ``partial`` and ``not_accelerated``."""
        out: dict[str, list[str]] = {}
        for name, ks in self.partial.items():
            for k in ks:
                out.setdefault(k, []).append(name)
        for name, k in self.not_accelerated.items():
            out.setdefault(k, []).append(name)
        return out

    def __str__(self) -> str:
        lines = [f"mokernels.accelerate: {len(self.accelerated)} LoRA layer(s) accelerated"
                 + (f", {len(self.hra)} HRA layer(s)" if self.hra else "")
                 + f", {len(self.not_accelerated)} left on PEFT's path"
                 + (f"; inference cache <= {self.cache_bytes / 2**20:.1f} MiB" if self.cache_bytes else "")]
        for k, names in self.kinds().items():
            lines.append(f"  {k}: {len(names)} layer(s), e.g. {names[0]} -- {_WHY.get(k, '')}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# State shared by the layers of one accelerate() call, and per layer


class _Shared:
    """Per accelerated model: logged kinds, the device metadata cache (shared by layers with the same
    adapter set: built once per batch, not per layer), the root module (for the model-wide adapter-name
    check; a plain reference, so deep copies and pickles of the model point at their own root)."""

    MAX_META = 256

    def __init__(self, root: nn.Module):
        self.root = root
        self.logged: set[str] = set()
        self.meta: OrderedDict = OrderedDict()

    def note(self, kind: str, where: str) -> None:
        if kind not in self.logged:
            self.logged.add(kind)
            log.warning("mokernels.accelerate: %s (%s, first seen in %s) -- %s", kind, "stays on PEFT's path", where,
                        _WHY.get(kind, ""))

    def cached(self, key, build):
        hit = self.meta.get(key)
        if hit is None:
            with torch.inference_mode(False), torch.no_grad():
                hit = build()
            self.meta[key] = hit
            if len(self.meta) > self.MAX_META:
                self.meta.popitem(last=False)
        else:
            self.meta.move_to_end(key)
        return hit

    def __getstate__(self):  # pickling / deepcopy: no device caches
        return {"root": self.root, "logged": set(self.logged)}

    def __setstate__(self, s):
        self.root = s["root"]
        self.logged = s["logged"]
        self.meta = OrderedDict()


class _LayerState:
    def __init__(self, shared: _Shared, name: str, saved_forward):
        self.shared = shared
        self.name = name
        self.saved_forward = saved_forward  # an instance-level forward found at patch time (else None)
        self.cache = True
        self._clear()

    def _clear(self):
        self.keys: Optional[tuple] = None  # the adapter names the stack was built for
        self.slot: dict[str, int] = {}
        self.A = self.B = None  # [N, rmax, d_in], [N, d_out, rmax] (inference path)
        self.sig: list = []  # per slot: weight signature
        self.scale_vals: list = []
        self.scale = None

    def __getstate__(self):
        return {"shared": self.shared, "name": self.name, "saved_forward": self.saved_forward, "cache": self.cache}

    def __setstate__(self, s):
        self.cache = True
        self.__dict__.update(s)
        self._clear()


class _Patched:
    """``fn`` bound to ``module``: what :func:`accelerate` sets as the instance's ``forward`` (a bound method
    would not survive pickling: ``torch.save(model)`` pickles it as ``getattr(module, fn.__name__)``).
    Deep copies bind to the copy."""

    __slots__ = ("module", "fn")

    def __init__(self, module: nn.Module, fn):
        self.module = module
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)

    def __getstate__(self):
        return (self.module, self.fn)

    def __setstate__(self, s):
        self.module, self.fn = s


# ------------------------------------------------------------------------------------------------
# Per-adapter support


def _lora_types():
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    return LoraLayer, Linear


def _dropout_active(d: nn.Module) -> bool:
    return not isinstance(d, nn.Identity) and d.training and getattr(d, "p", 1.0) > 0


def _static_reason(layer, name: str) -> Optional[str]:
    """Why adapter ``name`` of ``layer`` cannot run through the op at all (None: it can)."""
    if name in layer.lora_variant:
        return K_VARIANT
    if layer.lora_bias.get(name, False) or layer.lora_B[name].bias is not None:
        return K_BIAS
    if layer.lora_A[name].weight.shape[0] > MAX_RANK:
        return K_RANK
    if layer.lora_A[name].weight.dtype not in FLOAT_DTYPES:
        return K_DTYPE
    return None


def _weights(layer, name: str):
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _sig(layer, name: str):
    a, b = _weights(layer, name)
    return (a, a.data_ptr(), a._version, a.shape, b, b.data_ptr(), b._version, b.shape)


def _sig_same(s, layer, name: str) -> bool:
    a, b = _weights(layer, name)
    return (s[0] is a and s[1] == a.data_ptr() and s[2] == a._version and s[3] == a.shape and s[4] is b
            and s[5] == b.data_ptr() and s[6] == b._version and s[7] == b.shape)


def _pad_A(a: torch.Tensor, r: int) -> torch.Tensor:
    return a if a.shape[0] == r else F.pad(a, (0, 0, 0, r - a.shape[0]))


def _pad_B(b: torch.Tensor, r: int) -> torch.Tensor:
    return b if b.shape[1] == r else F.pad(b, (0, r - b.shape[1]))


def _build_stack(layer, st: _LayerState, keys: tuple, dtype, device) -> None:
    """(Re)builds the inference-path stack of every adapter of ``layer`` in ``dtype`` on ``device`` (slots
    are filled by :func:`_refresh` when first used)."""
    st._clear()
    st.keys = keys
    st.slot = {n: i for i, n in enumerate(keys)}
    ok = [n for n in keys if _static_reason(layer, n) is None]
    if not ok:
        return
    rmax = max(layer.lora_A[n].weight.shape[0] for n in ok)
    with torch.inference_mode(False), torch.no_grad():
        st.A = torch.zeros((len(keys), rmax, layer.in_features), dtype=dtype, device=device)
        st.B = torch.zeros((len(keys), layer.out_features, rmax), dtype=dtype, device=device)
    st.sig = [None] * len(keys)
    st.scale_vals = [0.0] * len(keys)


def _refresh(layer, st: _LayerState, names, rebuilt: bool = False) -> Optional[str]:
    """Makes the cached stack's slots of ``names`` current; returns a reason when they cannot be used."""
    for n in names:
        i = st.slot[n]
        if st.sig[i] is not None and _sig_same(st.sig[i], layer, n):
            continue
        why = _static_reason(layer, n)
        if why is not None:
            return why
        a, b = _weights(layer, n)
        if a.dtype != st.A.dtype or a.device != st.A.device or a.shape[0] > st.A.shape[1] \
                or a.shape[1] != st.A.shape[2] or b.shape[0] != st.B.shape[1]:
            # model.to(device/dtype), or a larger rank than the stack holds: rebuild (the caller checked that
            # the used adapters share one dtype and device)
            if rebuilt:
                return K_DTYPE
            _build_stack(layer, st, st.keys, a.dtype, a.device)
            return _refresh(layer, st, names, True) if st.A is not None else K_DTYPE
        r = a.shape[0]
        with torch.inference_mode(False), torch.no_grad():
            st.A[i].zero_()
            st.A[i, :r].copy_(a)
            st.B[i].zero_()
            st.B[i, :, :r].copy_(b)
        st.sig[i] = _sig(layer, n)
    return None


def _scale_tensor(shared: _Shared, vals: tuple, dtype, device):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return shared.cached(("scale", vals, acc, device), lambda: torch.tensor(vals, dtype=acc, device=device))


# ------------------------------------------------------------------------------------------------
# The patched forward


def _peft_forward(layer, st: _LayerState, x, *args, **kwargs):
    if st.saved_forward is not None:
        return st.saved_forward(x, *args, **kwargs)
    return type(layer).forward(layer, x, *args, **kwargs)


def _check_known(layer, st: _LayerState, missing: set) -> None:
    """PEFT's model-level check, also for direct layer calls: a name no LoRA layer of the model has."""
    root = st.shared.root
    LoraLayer, _ = _lora_types()
    known = set()
    for m in root.modules():
        if isinstance(m, LoraLayer):
            known |= m.lora_A.keys()
            known |= m.lora_embedding_A.keys()
    unknown = missing - known
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")


def _accel_lora_forward(self, x: torch.Tensor, *args, **kwargs):
    st: _LayerState = self.__dict__[_STATE]
    shared = st.shared
    self._check_forward_args(x, *args, **kwargs)  # PEFT's own argument errors, first
    adapter_names = kwargs.get("adapter_names")
    if self.disable_adapters:
        return _peft_forward(self, st, x, *args, **kwargs)
    if self.merged:
        shared.note(K_MERGED, st.name)
        return _peft_forward(self, st, x, *args, **kwargs)
    if kwargs.get("alora_offsets") is not None:
        shared.note(K_KWARGS, st.name)
        return _peft_forward(self, st, x, *args, **kwargs)
    lora_A = self.lora_A
    if adapter_names is None:
        used = [n for n in self.active_adapters if n in lora_A]
    else:
        used = list(dict.fromkeys(n for n in adapter_names if n != _BASE))
        missing = {n for n in used if n not in lora_A}
        if missing:
            _check_known(self, st, missing)
            used = [n for n in used if n in lora_A]
    if not used:  # PEFT: the base layer's output (result.to(its dtype))
        return _peft_forward(self, st, x, *args, **kwargs)
    for n in used:
        why = _static_reason(self, n)
        if why is not None:
            shared.note(why, st.name)
            return _peft_forward(self, st, x, *args, **kwargs)
    drop = [self.lora_dropout[n] for n in used if _dropout_active(self.lora_dropout[n])]
    if drop and (len(used) > 1 or adapter_names is not None):
        shared.note(K_DROPOUT, st.name)
        return _peft_forward(self, st, x, *args, **kwargs)
    wdt = lora_A[used[0]].weight.dtype
    dev = lora_A[used[0]].weight.device
    for n in used:
        a, b = _weights(self, n)
        if a.dtype != wdt or b.dtype != wdt or a.device != dev or b.device != dev or x.device != dev:
            shared.note(K_DTYPE, st.name)
            return _peft_forward(self, st, x, *args, **kwargs)
    xl = x.to(wdt) if adapter_names is not None else self._cast_input_dtype(x, wdt)
    if xl.dtype != wdt or wdt not in FLOAT_DTYPES:
        shared.note(K_CAST, st.name)
        return _peft_forward(self, st, x, *args, **kwargs)

    kw = {k: v for k, v in kwargs.items() if k not in ("adapter_names", "alora_offsets")}
    result = self.base_layer(x, *args, **kw)
    rdt = result.dtype

    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for n in used for p in _weights(self, n))
    if needs_grad or not st.cache:  # stack PEFT's own Parameters in the graph: gradients reach them
        r = max(lora_A[n].weight.shape[0] for n in used)
        A = torch.stack([_pad_A(lora_A[n].weight, r) for n in used])
        B = torch.stack([_pad_B(self.lora_B[n].weight, r) for n in used])
        keys = tuple(used)
        slot = {n: i for i, n in enumerate(used)}
        scale = _scale_tensor(shared, tuple(float(self.scaling[n]) for n in used), wdt, dev)
        slots = tuple(range(len(used)))
    else:
        keys = tuple(lora_A._modules)
        if st.keys != keys or st.A is None:
            _build_stack(self, st, keys, wdt, dev)
        why = _refresh(self, st, used) if st.A is not None else K_DTYPE
        if why is not None:
            shared.note(why, st.name)
            return _peft_forward(self, st, x, *args, **kwargs)
        slot = st.slot
        for n in used:
            i = slot[n]
            st.scale_vals[i] = float(self.scaling[n])
        # slots not used in this call keep their last scale (their coefficient is 0: no effect)
        scale = _scale_tensor(shared, tuple(st.scale_vals), wdt, dev)
        A, B = st.A, st.B
        slots = tuple(slot[n] for n in used)

    if drop:  # one adapter with active dropout: PEFT's own module, same RNG use as PEFT
        xl = drop[0](xl)
    lead = xl.shape[:-1]
    T = lead.numel()
    if adapter_names is None:
        if len(slots) == 1:
            seg = shared.cached(("seg1", T, slots, dev), lambda: (torch.tensor([0, T], dtype=torch.int32, device=dev),
                                                                  torch.tensor(slots, dtype=torch.int32, device=dev)))
            route = dict(segments=seg)
        else:
            acc = torch.float64 if wdt == torch.float64 else torch.float32
            sm = shared.cached(("segk", T, slots, dev, acc), lambda: (
                torch.tensor([0, T], dtype=torch.int32, device=dev),
                torch.tensor([slots], dtype=torch.int32, device=dev),
                torch.ones((1, len(slots)), dtype=acc, device=dev)))
            route = dict(segment_mixture=sm)
    else:
        nb = len(adapter_names)
        L = T // nb if nb else 0
        names_t = tuple(adapter_names)
        seg = shared.cached(("mixed", names_t, keys, L, dev), lambda: (
            (torch.arange(nb + 1, dtype=torch.int32) * L).to(dev),
            torch.tensor([slot.get(n, -1) for n in names_t], dtype=torch.int32).to(dev)))
        route = dict(segments=seg)

    if rdt == wdt:
        return lora_apply(xl, A, B, scale, base_out=result, validate=False, **route)
    delta = lora_apply(xl, A, B, scale, validate=False, **route)
    if adapter_names is not None:  # PEFT: result[idx] += lora_output.to(result dtype)
        return result + delta.to(rdt)
    return (result + delta).to(rdt)  # PEFT: result = result + lora(x) * scaling; result.to(result dtype)


# ------------------------------------------------------------------------------------------------
# Public API


def _skip_kind(m: nn.Module) -> str:
    cls = type(m)
    mod = cls.__module__.lower()
    if any(h in mod for h in _QUANT_HINTS) or any(h in cls.__name__.lower() for h in ("8bit", "4bit", "quant")):
        return K_QUANT
    return K_LAYER


def accelerate(model: nn.Module, *, cache: bool = True) -> AccelerationReport:
    """Routes the LoRA layers of a PEFT model (a ``peft.PeftModel``, its ``LoraModel`` or any module
    holding PEFT LoRA layers) through mokernels' multi-adapter op, in place. Returns an
    :class:`AccelerationReport`; unsupported layers/adapters stay on PEFT's path (one WARNING log line
    per kind). Calling it again refreshes the report and the ``cache`` setting (patched layers stay
    patched). :func:`restore` undoes it. Loading, training, ``save_pretrained`` and adapter management
    stay PEFT's.

    ``cache``: keep a stacked copy of each layer's adapters for calls without autograd (one extra copy
    of the adapter weights, ``report.cache_bytes`` at most; refreshed when PEFT's Parameters change).
    ``cache=False``: stack the adapters a call uses at every call instead (no extra memory, one copy of
    the used adapters per layer and call).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mokernels.accelerate: model must be a torch.nn.Module (e.g. a peft.PeftModel), got "
                        f"{type(model).__name__}")
    try:
        LoraLayer, LoraLinear = _lora_types()
    except ImportError as exc:
        raise ImportError("mokernels.accelerate needs the peft package (pip install peft)") from exc
    report = AccelerationReport()
    shared = None
    for name, m in model.named_modules():
        st = m.__dict__.get(_STATE)
        if not isinstance(m, LoraLayer):
            continue
        if type(m) is not LoraLinear:
            report.not_accelerated[name] = _skip_kind(m)
            continue
        if st is None:
            shared = shared or _Shared(model)
            st = _LayerState(shared, name, m.__dict__.get("forward"))
            m.__dict__[_STATE] = st
            m.forward = _Patched(m, _accel_lora_forward)
        if st.cache != cache:
            st.cache = cache
            st._clear()
        report.accelerated.append(name)
        ok = [n for n in m.lora_A if _static_reason(m, n) is None]
        if cache and ok:
            w = m.lora_A[ok[0]].weight
            report.cache_bytes += (len(m.lora_A) * max(m.lora_A[n].weight.shape[0] for n in ok)
                                   * (m.in_features + m.out_features) * w.element_size())
        kinds = []
        for n in m.lora_A:
            why = _static_reason(m, n)
            if why is None and n in m.lora_dropout and not isinstance(m.lora_dropout[n], nn.Identity) \
                    and getattr(m.lora_dropout[n], "p", 0) > 0:
                why = K_DROPOUT
            if why is not None and why not in kinds:
                kinds.append(why)
        if m.merged:
            kinds.append(K_MERGED)
        if kinds:
            report.partial[name] = kinds
    _accelerate_hra(model, report, shared)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in model.named_modules():  # IA3, LoKr, OFT, ...: reported, untouched
        if isinstance(m, BaseTunerLayer) and name not in report.not_accelerated and name not in report.hra \
                and name not in report.accelerated:
            report.not_accelerated[name] = K_TUNER
    if report.accelerated:
        _guard_peft_hooks(model)
    logged = set()
    for kind, names in report.kinds().items():
        if kind not in logged:
            logged.add(kind)
            log.warning("mokernels.accelerate: %s -- %d layer(s) (e.g. %s): %s", kind, len(names), names[0],
                        _WHY.get(kind, ""))
    for m in model.modules():  # runtime notes repeat nothing already said
        st = m.__dict__.get(_STATE)
        if st is not None:
            st.shared.logged |= logged
    if not report.accelerated and not report.hra:
        log.warning("mokernels.accelerate: no PEFT LoRA Linear or HRA Linear layer found in %s", type(model).__name__)
    return report


def _hra_types():
    from peft.tuners.hra.layer import HRALayer, HRALinear

    return HRALayer, HRALinear


def _accel_hra_forward(self, x: torch.Tensor, *args, **kwargs):
    """PEFT's ``HRALinear.forward`` without the ``[D, D]`` transform: PEFT builds ``delta = H_1 … H_r``
    per active adapter (``D x D``, r dense rank-1 updates), multiplies the active deltas left to right,
    merges them into ``W`` and runs ``F.linear``. Here ``x ↦ x deltaᵀ`` is one Householder-chain op over
    the active adapters' vectors (``U = [hra_u[a₁]ᵀ; hra_u[a₂]ᵀ; …]``: ``H`` of the concatenation is the
    product of the deltas in PEFT's order), then ``F.linear`` with PEFT's own (detached) base weight."""
    st: _LayerState = self.__dict__[_STATE]
    shared = st.shared
    if self.disable_adapters or self.merged:
        if self.merged:
            shared.note(K_MERGED, st.name)
        return _peft_forward(self, st, x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.hra_u]
    if not active:
        return _peft_forward(self, st, x, *args, **kwargs)
    if any(self.hra_apply_GS.get(a, False) for a in active):
        shared.note(K_HRA_GS, st.name)
        return _peft_forward(self, st, x, *args, **kwargs)
    us = [self.hra_u[a] for a in active]
    dt, dev = us[0].dtype, us[0].device
    if any(u.dtype != dt or u.device != dev for u in us) or x.device != dev or dt not in FLOAT_DTYPES:
        shared.note(K_DTYPE, st.name)
        return _peft_forward(self, st, x, *args, **kwargs)
    base = self.get_base_layer()
    W = self._cast_input_dtype(base.weight.data, dt)  # PEFT: orig_weight = base.weight.data, cast
    bias = self._cast_input_dtype(base.bias, dt)
    xl = self._cast_input_dtype(x, dt) if self.cast_input_dtype_enabled else x.to(base.weight.data.dtype)
    if xl.dtype != dt or W.dtype != dt or (bias is not None and bias.dtype != dt):
        shared.note(K_CAST, st.name)
        return _peft_forward(self, st, x, *args, **kwargs)
    U = us[0].T if len(us) == 1 else torch.cat([u.T for u in us])
    from .ops.householder import householder_apply

    return F.linear(householder_apply(xl, U), W, bias).to(x.dtype)


def _accelerate_hra(model, report, shared):
    try:
        HRALayer, HRALinear = _hra_types()
    except ImportError:  # an older peft without HRA
        return shared
    for name, m in model.named_modules():
        if not isinstance(m, HRALayer):
            continue
        if type(m) is not HRALinear:
            report.not_accelerated[name] = _skip_kind(m)
            continue
        if _STATE not in m.__dict__:
            shared = shared or _Shared(model)
            m.__dict__[_STATE] = _LayerState(shared, name, m.__dict__.get("forward"))
            m.forward = _Patched(m, _accel_hra_forward)
        report.hra.append(name)
        kinds = [K_HRA_GS] if any(m.hra_apply_GS.values()) else []
        if m.merged:
            kinds.append(K_MERGED)
        if kinds:
            report.partial[name] = kinds
    return shared


_HOOK_GUARD = "_mokernels_hook_guard"


def _peft_hook_fns():
    from peft.tuners.lora import model as lora_model

    return tuple(getattr(lora_model, n) for n in ("_adapter_names_pre_forward_hook", "_alora_offsets_pre_forward_hook")
                 if hasattr(lora_model, n))


@contextlib.contextmanager
def _guarded_forward_hooks(self, *args, **kwargs):
    """PEFT's ``LoraModel._enable_peft_forward_hooks`` with cleanup on error (bound per tuner instance)."""
    orig = type(self)._enable_peft_forward_hooks
    if kwargs.get("adapter_names") is None and kwargs.get("alora_offsets") is None:
        with orig(self, *args, **kwargs):
            yield
        return
    mods = list(self.modules())
    before = [set(m._forward_pre_hooks) for m in mods]
    try:
        with orig(self, *args, **kwargs):
            yield
    except BaseException:
        fns = _peft_hook_fns()
        for m, old in zip(mods, before):
            for k in [k for k, h in m._forward_pre_hooks.items() if k not in old and getattr(h, "func", None) in fns]:
                del m._forward_pre_hooks[k]
                m._forward_pre_hooks_with_kwargs.pop(k, None)
        raise


def _guard_peft_hooks(model: nn.Module) -> None:
    """PEFT's ``_enable_peft_forward_hooks`` registers the ``adapter_names`` pre-hooks and removes them after
    the ``yield`` without ``try/finally``: a forward that raises leaves them on every layer, and every later
    call silently reuses the stale ``adapter_names`` (or keeps failing). Each PEFT ``LoraModel`` gets an
    instance-level wrapper (removed by :func:`restore`) that removes the pre-hooks the failed call added."""
    try:
        from peft.tuners.lora.model import LoraModel
    except ImportError:
        return
    for tuner in model.modules():
        if isinstance(tuner, LoraModel) and _HOOK_GUARD not in tuner.__dict__ \
                and "_enable_peft_forward_hooks" not in tuner.__dict__:
            tuner.__dict__[_HOOK_GUARD] = True
            tuner._enable_peft_forward_hooks = _Patched(tuner, _guarded_forward_hooks)


def restore(model: nn.Module) -> int:
    """Puts PEFT's own forward back on every layer :func:`accelerate` patched (the instance attribute
    is removed, or the forward found at patch time is put back) and drops the cached stacks.
    Also removes the guard :func:`accelerate` put on PEFT's forward-hook context. Returns the number of
    layers restored."""
    n = 0
    for m in model.modules():
        if m.__dict__.pop(_HOOK_GUARD, None):
            m.__dict__.pop("_enable_peft_forward_hooks", None)
        st = m.__dict__.pop(_STATE, None)
        if st is None:
            continue
        if st.saved_forward is not None:
            m.forward = st.saved_forward
        else:
            m.__dict__.pop("forward", None)
        n += 1
    return n
