"""Wrap any torch model's ``nn.Linear`` layers with a method, PEFT-style; save/load/merge the adapters.

Target patterns (``target_modules`` / ``exclude_modules``): a pattern matches a module's qualified name
``n`` when ``n == p`` (exact), ``n.endswith("." + p)`` (dotted suffix, e.g. ``"query"`` or
``"attention.output.dense"``), or ``re.fullmatch(p, n)`` (regex over the whole name, e.g.
``r"encoder\\.layer\\.[0-2]\\..*query"``). Only modules whose type is exactly ``nn.Linear`` are wrapped
(subclasses such as MultiheadAttention's out_proj are used by their parents without calling forward).

inject is a dry run first (match + every ``check_linear``), then the mutation: a failure never leaves a
half-wrapped model. The checkpoint is one safetensors file whose metadata header holds
``format``/``format_version``, ``method``, ``config`` (JSON), ``targets`` (JSON) and ``mokernels_version``.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import (METHODS, AdapterLayer, MethodConfig, RoutingState, SharedParams, state_dict_problems,
                   unwrap_model)

__all__ = ["inject", "save_adapters", "load_adapters", "merge", "unmerge", "extra_losses", "trainable_parameters",
           "adapter_layers", "match_targets"]

FORMAT = "mokernels.adapters"
FORMAT_VERSION = "1"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mokernels")
    except Exception:  # running from a source checkout that is not installed
        return "0.1.0+src"


VERSION = _version()
SHARED_PREFIX = "mokernels_shared."
log = logging.getLogger("mokernels")


def _as_list(p) -> list:
    if p is None:
        return []
    if isinstance(p, str):
        return [p]
    return list(p)


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def match_targets(model: nn.Module, target_modules, exclude_modules=None) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules that ``target_modules`` matches and ``exclude_modules``
    does not (rules in the module docstring). ValueError naming the patterns when nothing matches, or when a
    pattern matches only modules that are not ``nn.Linear`` (e.g. an ``Embedding``: it would be skipped
    silently). A pattern that matches nothing at all is allowed while another one matches (PEFT's rule)."""
    targets, excludes = _as_list(target_modules), _as_list(exclude_modules)
    if not targets or not all(isinstance(p, str) and p for p in targets + excludes):
        raise ValueError(f"mokernels.inject: target_modules must be a non-empty list of name patterns, got {target_modules!r}")
    names = []
    others: dict[str, list[str]] = {p: [] for p in targets}  # per pattern: matched modules that are not wrapped
    hit: set[str] = set()  # patterns that matched an nn.Linear
    for n, m in model.named_modules():
        if any(_matches(n, p) for p in excludes):
            continue
        ps = [p for p in targets if _matches(n, p)]
        if not ps:
            continue
        if type(m) is nn.Linear:
            names.append(n)
            hit.update(ps)
        else:
            for p in ps:
                others[p].append(f"{n or '<root>'} ({type(m).__name__})")
    only_other = {p: v for p, v in others.items() if v and p not in hit}
    if names and only_other:  # PEFT raises for unsupported target types too: never skip the user's target silently
        p, v = next(iter(only_other.items()))
        raise ValueError(f"mokernels.inject: target pattern {p!r} matches no nn.Linear, only {v[:3]}"
                         + (f" and {len(v) - 3} more" if len(v) > 3 else "") + "; mokernels wraps modules whose type "
                         "is exactly nn.Linear (not Embedding, Conv or Linear subclasses): remove the pattern"
                         + (f" (also {sorted(only_other)[1:]})" if len(only_other) > 1 else ""))
    if not names:
        lin = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        raise ValueError(f"mokernels.inject: no nn.Linear matches target_modules={targets}"
                         + (f" (exclude_modules={excludes})" if excludes else "")
                         + f"; the model's linear layers are e.g. {lin[:6]} ({len(lin)} in all). A pattern matches an "
                           "exact name, a dotted suffix, or a regex over the whole name")
    return names


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def _config(model: nn.Module) -> dict:
    c = getattr(model, "mokernels_config", None)
    if not isinstance(c, dict):
        raise ValueError(f"mokernels: {type(model).__name__} has no mokernels adapters; call mokernels.inject(model, ...) first")
    return c


def inject(model: nn.Module, method: str, target_modules: Sequence[str] = (), exclude_modules=None, **cfg) -> nn.Module:
    """Replaces the matching ``nn.Linear`` layers of ``model`` in place by ``method``'s layer (built with
    ``from_linear``), freezes every base parameter and returns the model.

    Args:
        model: any torch model. method: a registered name (``mokernels.methods.METHODS``).
        target_modules / exclude_modules: name patterns (exact, dotted suffix or full regex).
        cfg: the method's hyperparameters (its Config dataclass; unknown keys are a ValueError).
    Attaches ``model.mokernels_state`` (RoutingState), ``model.mokernels_shared`` (SharedParams submodule,
    so shared parameters move/copy/DDP with the model) and ``model.mokernels_config``. Logs (logger
    "mokernels") and stores the trainable/total parameter counts. A second inject is a ValueError.
    """
    if method not in METHODS:
        raise ValueError(f"mokernels.inject: unknown method {method!r}; registered: {sorted(METHODS)}")
    if hasattr(model, "mokernels_config") or adapter_layers(model):
        raise ValueError("mokernels.inject: the model is already wrapped by mokernels "
                         f"({getattr(model, 'mokernels_config', {}).get('method', '?')}); wrap a fresh copy of the base "
                         "model instead (one method per model)")
    cls = METHODS[method]
    conf = cls.Config.from_dict(cfg)
    names = match_targets(model, target_modules, exclude_modules)
    # -- dry run: every check before any mutation
    for n in names:
        cls.check_linear(model.get_submodule(n), conf, n)
    # -- mutate (rolled back if a constructor still fails)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    dev = params[0].device if params else None
    state = RoutingState(limits=cls.routing_limits(conf), extra_keys=tuple(cls.routing_keys),
                         extra_validator=lambda k, v: cls.validate_routing_extra(k, v, conf), device=dev)
    shared = SharedParams()
    done: list[tuple[nn.Module, str, nn.Linear]] = []
    try:
        for p in params:
            p.requires_grad_(False)
        for n in names:
            parent_name, _, child = n.rpartition(".")
            parent = model.get_submodule(parent_name)
            lin = getattr(parent, child)
            layer = cls.from_linear(lin, conf, name=n, state=state, shared=shared)
            layer.train(lin.training)  # new submodules (dropout) follow the model's train/eval mode
            setattr(parent, child, layer)
            done.append((parent, child, lin))
    except BaseException:
        for parent, child, lin in reversed(done):
            setattr(parent, child, lin)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        raise
    model.mokernels_shared = shared.train(model.training)
    model.mokernels_state = state
    model.mokernels_config = {"method": method, "config": conf.to_dict(), "targets": names,
                              "target_modules": _as_list(target_modules), "exclude_modules": _as_list(exclude_modules)}
    tr, tot = trainable_parameters(model)
    model.mokernels_config["trainable"] = (tr, tot)
    log.info("mokernels.inject(%s): %d layers wrapped; trainable params: %d || all params: %d || trainable%%: %.4f",
             method, len(names), tr, tot, 100.0 * tr / max(tot, 1))
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (each Parameter counted once, shared ones included once)."""
    tr = tot = 0
    for p in model.parameters():  # deduplicated by identity
        tot += p.numel()
        if p.requires_grad:
            tr += p.numel()
    return tr, tot


def extra_losses(model: nn.Module) -> Tensor:
    """Sum of every wrapped layer's ``extra_losses()`` (already weighted); a zero scalar if there are none."""
    total = None
    for _, layer in adapter_layers(model):
        for v in layer.extra_losses().values():
            total = v if total is None else total + v
    if total is None:
        p = next(iter(model.parameters()), None)
        total = torch.zeros((), device=p.device if p is not None else None)
    return total


# ------------------------------------------------------------------------------------------------
# Save / load


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for n, layer in adapter_layers(model):
        for k, v in layer.adapter_state_dict().items():
            out[f"{n}.{k}"] = v
    shared = getattr(model, "mokernels_shared", None)
    if shared is not None:
        for k, p in shared.items():
            out[SHARED_PREFIX + k] = p.detach()
    return out


def save_adapters(model: nn.Module, path: str) -> None:
    """Writes every adapter tensor (layer state, shared parameters once) to ``path`` (safetensors), with
    the JSON config in the file's metadata header."""
    model = unwrap_model(model)
    from safetensors.torch import save_file

    c = _config(model)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": c["method"],
            "config": json.dumps(c["config"], sort_keys=True), "targets": json.dumps(c["targets"]),
            "mokernels_version": VERSION}
    tensors, seen = {}, set()
    for k, v in _tensors(model).items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses aliased tensors (e.g. a buffer that views another): store a copy
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    save_file(tensors, str(path), metadata=meta)


def read_adapter_metadata(path: str) -> dict:
    """The metadata header of an adapter checkpoint (config and targets decoded); ValueError if it is not one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"mokernels.load_adapters: {path} is not a mokernels adapter checkpoint (metadata format "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"mokernels.load_adapters: {path} has format version {meta.get('format_version')!r}; "
                         f"this mokernels reads {FORMAT_VERSION!r}")
    out = dict(meta)
    out["config"] = json.loads(meta["config"])
    out["targets"] = json.loads(meta["targets"])
    return out


def load_adapters(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Loads a checkpoint written by :func:`save_adapters` into a model wrapped with the same method.

    Always an error: another method's checkpoint, a mis-shaped tensor. With ``strict`` (default) also:
    a different config or target list, missing or unexpected keys (nothing is loaded then). With
    ``strict=False`` the keys present in both are loaded and the others left alone; the model keeps its own
    hyperparameters (a config that differs, e.g. another alpha, is logged as a WARNING on "mokernels")."""
    outer, model = model, unwrap_model(model)
    from safetensors.torch import load_file

    c = _config(model)
    meta = read_adapter_metadata(path)
    if meta["method"] != c["method"]:
        raise ValueError(f"mokernels.load_adapters: {path} holds {meta['method']!r} adapters but the model is wrapped "
                         f"with {c['method']!r}")
    diff = sorted(k for k in set(meta["config"]) | set(c["config"]) if meta["config"].get(k) != c["config"].get(k))
    if diff and not strict:  # the model keeps its own hyperparameters (e.g. alpha): outputs differ from the source's
        log.warning("mokernels.load_adapters(strict=False): %s: config differs from the model's in %s (checkpoint %s "
                    "vs model %s); the model keeps its own values", path, diff,
                    {k: meta["config"].get(k) for k in diff}, {k: c["config"].get(k) for k in diff})
    if strict:
        if diff:
            raise ValueError(f"mokernels.load_adapters: config differs from the model's in {diff}: checkpoint "
                             f"{ {k: meta['config'].get(k) for k in diff} } vs model { {k: c['config'].get(k) for k in diff} }")
        if meta["targets"] != c["targets"]:
            miss = sorted(set(c["targets"]) - set(meta["targets"]))
            extra = sorted(set(meta["targets"]) - set(c["targets"]))
            raise ValueError(f"mokernels.load_adapters: target layers differ: wrapped but not in the checkpoint "
                             f"{miss[:5]}, in the checkpoint but not wrapped {extra[:5]}")
    sd = load_file(str(path))
    own = _tensors(model)
    problems = state_dict_problems(own, sd, strict, "model")
    if problems:
        raise ValueError(f"mokernels.load_adapters: {path}: " + "; ".join(problems))
    for n, layer in adapter_layers(model):
        pre = n + "."
        sub = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre) and k[len(pre):] in layer.adapter_state_dict()}
        layer.load_adapter_state_dict(sub, strict=strict)
    shared = getattr(model, "mokernels_shared", None)
    if shared is not None:
        with torch.no_grad():
            for k, p in shared.items():
                if SHARED_PREFIX + k in sd:
                    p.copy_(sd[SHARED_PREFIX + k])
    return outer


# ------------------------------------------------------------------------------------------------
# Merge


def merge(model: nn.Module) -> nn.Module:
    """Merges every wrapped layer into its base weight (methods with ``can_merge``). Unless the method's
    merged layers still route (``merged_keeps_routing``, MoORE), the routing is cleared and refused until
    :func:`unmerge`. NotImplementedError for methods that cannot merge (nothing is changed)."""
    outer, model = model, unwrap_model(model)
    c = _config(model)
    layers = adapter_layers(model)
    cls = type(layers[0][1]) if layers else None
    if cls is not None and not cls.can_merge:
        raise NotImplementedError(f"mokernels.merge: method {c['method']!r} cannot merge into the base weights "
                                  "(its update depends on the input through a router)")
    if c.get("merged"):
        raise RuntimeError("mokernels.merge: the model is already merged")
    done = []
    try:
        for _, layer in layers:
            layer.merge()
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise
    c["merged"] = True
    if cls is not None and not cls.merged_keeps_routing:
        st = model.mokernels_state
        st.clear()
        st.merged = True
    return outer


def unmerge(model: nn.Module) -> nn.Module:
    """Restores every base weight bit-exactly (LIFO); no-op when not merged."""
    outer, model = model, unwrap_model(model)
    c = _config(model)
    if not c.get("merged"):
        return outer
    for _, layer in reversed(adapter_layers(model)):
        layer.unmerge()
    c["merged"] = False
    model.mokernels_state.merged = False
    return outer
