"""The contract every method layer implements (issue 12; /work/briefs/methods_api.md).

Contract additions by H12a (additive: nothing of the agreed contract changed):

* ``AdapterLayer.__init__(linear, cfg, *, name, state, shared)`` does the common part of a wrap
  (same ``weight``/``bias`` Parameter objects, ``in_features``/``out_features``, ``cfg``,
  ``routing_state``, ``shared``, ``layer_name``, ``block_index``, ``merged = False``). Subclasses call it
  first in their own ``__init__``; the default :meth:`AdapterLayer.from_linear` is
  ``cls(linear, cfg, name=name, state=state, shared=shared)``.
* ``routing_limits(cfg) -> {"task_ids": n, "adapter_ids": n}`` (classmethod, default ``{}``): the ranges
  the routing context checks the user's ids against when they enter (``[-1, n)``).
* ``routing_keys: ClassVar[tuple[str, ...]]``: method-specific keys accepted into ``RoutingState.extra``
  (other unknown keys are a ValueError naming the accepted ones); ``validate_routing_extra(key, value,
  cfg) -> value`` (classmethod) validates/normalises one of them once, when it enters.
* Merge: a method with ``can_merge = True`` either implements :meth:`delta_weight` (the default
  :meth:`merge` adds it to the weight in fp32 and keeps the original, so :meth:`unmerge` is bit-exact)
  or overrides ``merge``/``unmerge``. ``self.merged`` is True while merged; ``forward`` must then return
  :meth:`base_forward` (the default merge relies on it) and routing is refused by the context.
  ``merged_keeps_routing = True`` (ClassVar; MoORE: only H is folded into V, the gates still route):
  ``mokernels.merge`` then neither clears nor locks the routing state.
* ``SharedParams`` parameter names are the keys with "." replaced by "__" (ParameterDict rule);
  :meth:`SharedParams.items` gives the original keys.
* Demo hooks (optional classmethods, used by ``python -m mokernels.demo``): ``demo_config(num_tasks) -> dict``
  (hyperparameters for a run on the demo's toy multitask set, default ``{}``), ``demo_targets() -> list``
  (default ``["query", "value"]``), ``demo_routing(cfg, task_ids) -> dict`` (the routing context for a batch
  whose sentences have ``task_ids [B]``; default: ``task_ids`` and/or ``adapter_ids`` = the task ids, for
  whichever of the two ``routing_limits`` names, else ``{}``).
* ``task_ids``, ``adapter_ids`` and ``segments`` are accepted for every method; ``mokernels.set_adapter_ids``
  exists beside ``set_task``. ``SharedParams.forward`` is the identity (a wrapped ``nn.Sequential`` runs).
  inject gives every new layer the train/eval mode of the linear it replaces.
* ``stats()`` values that are floats are averaged over layers and printed by the demo.
* ``METHODS`` lives here; ``mokernels.methods`` imports every method module it finds (slora, effilora,
  dlp_lora, samora, moore), so a method registers itself just by existing — no edit of __init__.py.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MethodConfig", "RoutingState", "SharedParams", "AdapterLayer", "METHODS", "register_method",
           "ROUTING_FIELDS", "unwrap_model"]

METHODS: dict[str, type["AdapterLayer"]] = {}
ROUTING_FIELDS = ("task_ids", "adapter_ids", "segments")
_BLOCK = re.compile(r"\.(\d+)\.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module ``mokernels.inject`` wrapped, seen through the wrappers that hold it as a child: DDP,
    ``nn.DataParallel``, FSDP (``.module``) and ``torch.compile`` (``._orig_mod``), so that routing, save,
    load and merge on ``DistributedDataParallel(model)`` act on ``model`` (checkpoint keys without
    ``module.``). A model with its own ``mokernels_config`` is returned as it is."""
    seen = 0
    while "mokernels_config" not in model.__dict__ and seen < 8:  # own attribute (torch.compile forwards getattr)
        inner = model.__dict__.get("_modules", {}).get("module") or model.__dict__.get("_modules", {}).get("_orig_mod")
        if not isinstance(inner, nn.Module):
            break
        model, seen = inner, seen + 1
    return model


def register_method(name: str):
    """Class decorator: ``METHODS[name] = cls`` and ``cls.method = name``. A second class under the same
    name is a ValueError (two methods must not silently shadow each other)."""
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, AdapterLayer)):
            raise ValueError(f"register_method({name!r}): {cls!r} is not an AdapterLayer subclass")
        old = METHODS.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"register_method: method {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.method = name
        METHODS[name] = cls
        return cls
    return deco


# ------------------------------------------------------------------------------------------------
# Config


@dataclass
class MethodConfig:
    """Base of every method's hyperparameters (a dataclass; subclasses add fields with METHODS.md defaults)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MethodConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; accepted: {sorted(names)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# Routing state


def _int_tensor(name: str, v, device) -> Tensor:
    if isinstance(v, int) and not isinstance(v, bool):
        v = torch.tensor([v])
    elif isinstance(v, (list, tuple)):
        v = torch.tensor(v)
    if not isinstance(v, Tensor) or v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
        raise ValueError(f"mokernels.routing: {name} must be an integer tensor (or list of ints), got "
                         f"{v.dtype if isinstance(v, Tensor) else type(v).__name__}")
    v = v.to(torch.long)
    return v if device is None else v.to(device, non_blocking=True)


def _check_range(name: str, t: Tensor, limit: Optional[int]) -> None:
    if t.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.stack([t.min(), t.max()]).tolist())  # one host sync, once per batch
    if lo < -1 or (limit is not None and hi >= limit):
        rng = f"[-1, {limit})" if limit is not None else ">= -1"
        raise ValueError(f"mokernels.routing: {name} must be in {rng} (-1 = none/unseen), got values in [{lo}, {hi}]")


class RoutingState:
    """Per-batch routing metadata of one wrapped model (``model.mokernels_state``, created by inject).

    Its identity never changes; every wrapped layer holds a reference (``layer.routing_state``).
    Filled by ``mokernels.routing(model, ...)`` (context manager; the previous contents are restored in
    ``finally``, so an exception inside the block leaves nothing behind) or ``mokernels.set_routing`` /
    ``mokernels.set_task`` (sticky until changed or cleared). User metadata is validated once, on entry
    (:meth:`set`): ids in ``[-1, n)`` for the ranges the method declares (``routing_limits``), segment
    offsets sorted from 0, shapes consistent; layers then read it without checks.

    Fields: ``task_ids`` long ``[B]`` (one task per sequence) or ``[T]``, -1 = unseen task;
    ``adapter_ids`` long ``[B]`` or ``[T]``; ``segments`` ``(offsets [S+1], seg_ids [S] or [S, k],
    seg_w None or [S, k])``; ``extra`` method-specific entries (``routing_keys`` of the method).
    """

    def __init__(self, limits: Optional[dict] = None, extra_keys: tuple = (), extra_validator: Optional[Callable] = None,
                 device=None):
        self.task_ids: Optional[Tensor] = None
        self.adapter_ids: Optional[Tensor] = None
        self.segments: Optional[tuple] = None
        self.extra: dict = {}
        self.limits: dict = dict(limits or {})
        self.extra_keys = tuple(extra_keys)
        self.extra_validator = extra_validator
        self.device = device
        self.merged = False

    # -- filling ------------------------------------------------------------------------------------

    def snapshot(self) -> tuple:
        return self.task_ids, self.adapter_ids, self.segments, dict(self.extra)

    def restore(self, snap: tuple) -> None:
        self.task_ids, self.adapter_ids, self.segments, extra = snap
        self.extra.clear()
        self.extra.update(extra)

    def clear(self) -> None:
        self.task_ids = self.adapter_ids = self.segments = None
        self.extra.clear()

    def set(self, **ctx) -> None:
        """Validates and loads ``ctx`` (replacing everything that was set before). Keys: task_ids,
        adapter_ids, segments and the method's ``routing_keys``. Raises ValueError before changing anything."""
        if self.merged and any(v is not None for v in ctx.values()):
            raise RuntimeError("mokernels.routing: the adapters are merged into the base weights; "
                               "call mokernels.unmerge(model) before routing")
        accepted = ROUTING_FIELDS + self.extra_keys
        unknown = sorted(set(ctx) - set(accepted))
        if unknown:
            raise ValueError(f"mokernels.routing: unknown routing key(s) {unknown}; this method accepts {list(accepted)}")
        dev = self.device
        new: dict = {}
        for name in ("task_ids", "adapter_ids"):
            v = ctx.get(name)
            if v is not None:
                t = _int_tensor(name, v, dev)
                if t.dim() != 1:
                    raise ValueError(f"mokernels.routing: {name} must be 1-D ([B] per sequence or [T] per token), "
                                     f"got shape {list(t.shape)}")
                _check_range(name, t, self.limits.get(name))
                new[name] = t
        seg = ctx.get("segments")
        if seg is not None:
            new["segments"] = self._check_segments(seg, dev)
        extra = {}
        for k in self.extra_keys:
            if ctx.get(k) is not None:
                extra[k] = self.extra_validator(k, ctx[k]) if self.extra_validator else ctx[k]
        self.task_ids = new.get("task_ids")
        self.adapter_ids = new.get("adapter_ids")
        self.segments = new.get("segments")
        self.extra.clear()
        self.extra.update(extra)

    def _check_segments(self, seg, dev) -> tuple:
        if not isinstance(seg, (tuple, list)) or len(seg) not in (2, 3):
            raise ValueError("mokernels.routing: segments must be (offsets [S+1], seg_ids [S] or [S, k][, seg_w [S, k]])")
        offsets = _int_tensor("segments offsets", seg[0], dev)
        ids = _int_tensor("segments seg_ids", seg[1], dev)
        w = seg[2] if len(seg) == 3 else None
        if offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError(f"mokernels.routing: segments offsets must be [S+1], got shape {list(offsets.shape)}")
        S = offsets.numel() - 1
        if ids.dim() not in (1, 2) or ids.shape[0] != S:
            raise ValueError(f"mokernels.routing: segments seg_ids must be [S] or [S, k] with S = {S}, got {list(ids.shape)}")
        if w is not None:
            if not isinstance(w, Tensor) or not w.is_floating_point() or w.shape != ids.shape or ids.dim() != 2:
                raise ValueError(f"mokernels.routing: segments seg_w must be a float tensor of seg_ids' shape [S, k] = "
                                 f"{list(ids.shape)}, got {list(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
            w = w.to(dev, non_blocking=True) if dev is not None else w
            if not bool(torch.isfinite(w).all()):
                raise ValueError("mokernels.routing: segments seg_w has a NaN or inf")
        if S and (bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[0]) != 0):
            raise ValueError("mokernels.routing: segments offsets must be sorted and start at 0")
        _check_range("segments seg_ids", ids, self.limits.get("adapter_ids"))
        return offsets, ids, w

    # -- reading (layers) ---------------------------------------------------------------------------

    def get(self, key: str, layer_name: str) -> Any:
        """The routing entry ``key``; RuntimeError naming the layer, the key and the call to use if missing."""
        v = getattr(self, key) if key in ROUTING_FIELDS else self.extra.get(key)
        if v is None:
            raise RuntimeError(
                f"mokernels: layer {layer_name!r} needs routing metadata {key!r}, but none is set; run the forward "
                f"(and backward, with gradient checkpointing) inside `with mokernels.routing(model, {key}=...):` or "
                f"call mokernels.set_routing(model, {key}=...)" + (" / mokernels.set_task(model, ids)" if key == "task_ids" else ""))
        return v

    def token_ids(self, key: str, x: Tensor, layer_name: str) -> Tensor:
        """Long ``[T]`` for ``x [..., d]``: per-sequence ids ``[B]`` (``x.shape[0] == B``, x at least 3-D)
        broadcast over ``x.shape[1:-1]``, or per-token ids ``[T]`` as they are."""
        t = self.get(key, layer_name)
        T = math.prod(x.shape[:-1])
        if x.dim() >= 3 and t.shape[0] == x.shape[0]:
            return t.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1]).reshape(T)
        if t.shape[0] == T:
            return t
        if t.shape[0] == 1:  # one id for the whole batch (set_task(model, 3))
            return t.expand(T)
        raise RuntimeError(f"mokernels: layer {layer_name!r}: {key} has {t.shape[0]} entries but the input "
                           f"{list(x.shape)} has batch {x.shape[0]} and {T} tokens")

    def token_task_ids(self, x: Tensor, layer_name: str) -> Tensor:
        return self.token_ids("task_ids", x, layer_name)


# ------------------------------------------------------------------------------------------------
# Shared parameters


class SharedParams(nn.Module):
    """Model-level parameters shared by several layers (``model.mokernels_shared``, created by inject):
    ``get_or_create(key, factory)`` returns the one Parameter of ``key`` (e.g. EffiLoRA's A per input width,
    key ``"effilora.A.384"``), calling ``factory() -> Tensor`` the first time. Saved once by save_adapters
    (under ``mokernels_shared.<key>``), never inside a layer's own state. Its forward is the identity, so a
    wrapped ``nn.Sequential`` still runs (the holder becomes the model's last child)."""

    def __init__(self):
        super().__init__()
        self.params = nn.ParameterDict()

    @staticmethod
    def _slot(key: str) -> str:
        return key.replace(".", "__")

    def get_or_create(self, key: str, factory: Callable[[], Tensor]) -> nn.Parameter:
        slot = self._slot(key)
        if slot not in self.params:
            t = factory()
            self.params[slot] = t if isinstance(t, nn.Parameter) else nn.Parameter(t)
        return self.params[slot]

    def items(self):
        return [(k.replace("__", "."), p) for k, p in self.params.items()]

    def __contains__(self, key: str) -> bool:
        return self._slot(key) in self.params

    def __getitem__(self, key: str) -> nn.Parameter:
        return self.params[self._slot(key)]

    def __len__(self) -> int:
        return len(self.params)

    def forward(self, x, *args, **kwargs):
        """Identity: containers that call every child in order (``nn.Sequential`` as the wrapped model)
        pass straight through this holder of parameters."""
        return x


# ------------------------------------------------------------------------------------------------
# Adapter layer


def state_dict_problems(own: dict, sd: dict, strict: bool, holder: str) -> list:
    """What keeps ``sd`` (a checkpoint) from loading into ``own`` (the ``holder``'s tensors, "layer" or
    "model"): missing and unexpected keys (only with ``strict``) and mis-shaped keys (always), each with a
    count and the first five names; empty when it loads."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shaped = sorted(f"{k}: checkpoint {list(sd[k].shape)} vs {holder} {list(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s) {missing[:5]}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {unexpected[:5]}")
    if shaped:
        problems.append(f"mis-shaped key(s) {shaped[:5]}")
    return problems


class AdapterLayer(nn.Module):
    """Base of every method layer: a drop-in for the ``nn.Linear`` it wraps (see the module docstring).

    The ORIGINAL linear's ``weight``/``bias`` Parameter objects are registered under the same names
    (frozen by inject); everything else the layer registers is adapter state (saved by save_adapters).
    """

    method: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    can_merge: ClassVar[bool] = False
    merged_keeps_routing: ClassVar[bool] = False
    routing_keys: ClassVar[tuple] = ()

    def __init__(self, linear: nn.Linear, cfg: MethodConfig, *, name: str = "", state: Optional[RoutingState] = None,
                 shared: Optional[SharedParams] = None):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.cfg = cfg
        self.routing_state = state if state is not None else RoutingState()
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule (saved once, by the model)
        self.layer_name = name
        m = _BLOCK.search(f".{name}.")
        self.block_index: Optional[int] = int(m.group(1)) if m else None
        self.merged = False
        self._unmerged_weight: Optional[Tensor] = None

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def check_linear(cls, linear: nn.Linear, cfg: MethodConfig, name: str) -> None:
        """Dry-run check before anything is mutated; ValueError naming the layer and the numbers."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: MethodConfig, *, name: str, state: RoutingState,
                    shared: SharedParams) -> "AdapterLayer":
        return cls(linear, cfg, name=name, state=state, shared=shared)

    @classmethod
    def routing_limits(cls, cfg: MethodConfig) -> dict:
        """Ranges of the user's routing ids, checked when they enter: ``{"task_ids": n, "adapter_ids": n}``."""
        return {}

    @classmethod
    def validate_routing_extra(cls, key: str, value, cfg: MethodConfig):
        """Validates/normalises an extra routing entry (one of ``routing_keys``) once, on entry."""
        return value

    @classmethod
    def demo_config(cls, num_tasks: int) -> dict:
        return {}

    @classmethod
    def demo_targets(cls) -> list:
        return ["query", "value"]

    @classmethod
    def demo_routing(cls, cfg: MethodConfig, task_ids: Tensor) -> dict:
        lim = cls.routing_limits(cfg)
        return {k: task_ids for k in ("task_ids", "adapter_ids") if k in lim}

    # -- forward -----------------------------------------------------------------------------------

    def base_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - every method overrides it
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def extra_losses(self) -> dict[str, Tensor]:
        """Auxiliary losses, already weighted by the config's lambdas; {} by default."""
        return {}

    def stats(self) -> dict:
        """Optional diagnostics (e.g. SLoRA's mean number of active experts)."""
        return {}

    # -- merge -------------------------------------------------------------------------------------

    def delta_weight(self) -> Optional[Tensor]:
        """``[out, in]`` weight delta (fp32) for methods whose update is a fixed matrix; None otherwise."""
        return None

    def merge(self) -> None:
        """Adds :meth:`delta_weight` into ``weight`` in fp32 (rounded once), keeping the original weight
        so :meth:`unmerge` restores it bit-exactly (memory: one weight copy)."""
        if not self.can_merge:
            raise NotImplementedError(f"{self.method or type(self).__name__} cannot merge into the base weight "
                                      f"(its update depends on the input through a router)")
        if self.merged:
            raise RuntimeError(f"mokernels: layer {self.layer_name!r} is already merged")
        delta = self.delta_weight()
        if delta is None:
            raise NotImplementedError(f"{type(self).__name__}: can_merge needs delta_weight() or its own merge()")
        with torch.no_grad():
            self._unmerged_weight = self.weight.detach().clone()
            acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
            self.weight.copy_((self.weight.to(acc) + delta.to(acc)).to(self.weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.can_merge:
            raise NotImplementedError(f"{self.method or type(self).__name__} cannot merge into the base weight")
        if not self.merged:
            return
        with torch.no_grad():
            self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    # -- adapter state -----------------------------------------------------------------------------

    def _adapter_tensors(self) -> dict[str, Tensor]:
        out = {}
        for k, p in self.named_parameters():
            if k not in ("weight", "bias"):
                out[k] = p
        for k, b in self.named_buffers():
            if k.rsplit(".", 1)[-1] not in self._non_persistent(k):
                out[k] = b
        return out

    def _non_persistent(self, qual: str) -> set:
        mod = self.get_submodule(qual.rsplit(".", 1)[0]) if "." in qual else self
        return set(mod._non_persistent_buffers_set)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Own parameters and persistent buffers except ``weight``/``bias``, detached."""
        return {k: v.detach() for k, v in self._adapter_tensors().items()}

    def load_adapter_state_dict(self, sd: dict, strict: bool = True) -> None:
        """Copies ``sd`` into the same-named tensors; ValueError naming missing/unexpected/mis-shaped keys
        (missing/unexpected only with ``strict``; mis-shaped always)."""
        own = self._adapter_tensors()
        problems = state_dict_problems(own, sd, strict, "layer")
        if problems:
            raise ValueError(f"mokernels.load_adapters: layer {self.layer_name!r}: " + "; ".join(problems))
        with torch.no_grad():
            for k in set(own) & set(sd):
                own[k].copy_(sd[k])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"method={self.method!r}"
