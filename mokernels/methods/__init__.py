"""The five methods as nn.Linear drop-ins (METHODS.md), the framework to wrap models with them
(:func:`inject`), their routing context and adapter I/O. Every method module found here registers itself
in :data:`METHODS` on import."""
from __future__ import annotations

import importlib

from .base import METHODS, AdapterLayer, MethodConfig, RoutingState, SharedParams, register_method
from .context import clear_routing, routing, routing_state, set_adapter_ids, set_routing, set_task
from .inject import (adapter_layers, extra_losses, inject, load_adapters, match_targets, merge, read_adapter_metadata,
                     save_adapters, trainable_parameters, unmerge)

METHOD_MODULES = ("slora", "effilora", "dlp_lora", "samora", "moore")
for _m in METHOD_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_m}")
    except ModuleNotFoundError as _e:  # that method's module is not there (yet): skip only that case
        if _e.name != f"{__name__}.{_m}":
            raise
from .reducer import Reducer  # noqa: E402

__all__ = ["Reducer", "METHODS", "AdapterLayer", "MethodConfig", "RoutingState", "SharedParams", "register_method", "routing",
           "set_routing", "set_task", "set_adapter_ids", "clear_routing", "routing_state", "inject", "save_adapters", "load_adapters",
           "read_adapter_metadata", "merge", "unmerge", "extra_losses", "trainable_parameters", "adapter_layers",
           "match_targets"]
