"""Routing context: feed per-batch metadata (task ids, adapter ids, sentence segments, method extras) to
every wrapped layer of a model without touching forward signatures.

    with mokernels.routing(model, task_ids=torch.tensor([0, 2, 1])):
        loss = model(**batch).last_hidden_state.pow(2).mean()
        loss.backward()          # with gradient checkpointing, run backward inside the block too

``routing`` validates once on entry (see :class:`~mokernels.methods.base.RoutingState`), and restores the
previous contents in ``finally`` (an exception inside the block leaves nothing behind; nested blocks
work). ``set_routing`` / ``set_task`` are sticky (until the next call or ``clear_routing``).
"""
from __future__ import annotations

import contextlib

from torch import nn

from .base import RoutingState, unwrap_model

__all__ = ["routing", "set_routing", "set_task", "set_adapter_ids", "clear_routing", "routing_state"]


def routing_state(model: nn.Module) -> RoutingState:
    """The model's RoutingState (also through DDP / DataParallel / torch.compile wrappers); ValueError if the
    model was not wrapped by mokernels.inject."""
    model = unwrap_model(model)
    st = getattr(model, "mokernels_state", None)
    if not isinstance(st, RoutingState):
        raise ValueError(f"mokernels: {type(model).__name__} has no mokernels adapters; call mokernels.inject(model, ...) first")
    p = next(model.parameters(), None)
    if p is not None:
        st.device = p.device  # follows model.to(...): routing metadata is moved there once, on entry
    return st


@contextlib.contextmanager
def routing(model: nn.Module, **ctx):
    """Context manager: ``ctx`` (task_ids=, adapter_ids=, segments=, method keys) is validated and set for
    the block; the previous routing is restored on exit, also on an exception."""
    st = routing_state(model)
    snap = st.snapshot()
    st.set(**ctx)  # raises before changing anything
    try:
        yield st
    finally:
        st.restore(snap)


def set_routing(model: nn.Module, **ctx) -> None:
    """Sticky routing: validated and kept until the next set_routing/set_task/clear_routing."""
    routing_state(model).set(**ctx)


def set_task(model: nn.Module, task_ids) -> None:
    """Sticky task ids: ``[B]`` per sequence, ``[T]`` per token, or one int for every token; -1 = unseen task."""
    routing_state(model).set(task_ids=task_ids)


def set_adapter_ids(model: nn.Module, adapter_ids) -> None:
    """Sticky adapter ids (``[B]`` per sequence or ``[T]`` per token; -1 = none)."""
    routing_state(model).set(adapter_ids=adapter_ids)


def clear_routing(model: nn.Module) -> None:
    routing_state(model).clear()
