"""Argument checks shared by the reference (CPU) and fake kernels of every op: the same errors, naming
the argument and the expected shape/dtype, on every device and at trace time."""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def expect(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"mokernels.{op}: {msg}")


def expect_dtype(op: str, name: str, t: torch.Tensor, allowed=FLOAT_DTYPES, like: torch.Tensor | None = None) -> None:
    if like is not None and t.dtype != like.dtype:  # messages are formatted only when a check fails
        expect(False, op, f"{name} must have dtype {like.dtype}, got {t.dtype}")
    if t.dtype not in allowed:
        expect(False, op, f"{name} has unsupported dtype {t.dtype} (expected one of {list(allowed)})")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the references: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_number(v) -> bool:
    """A real Python/NumPy number, not a bool (``top_k=True`` is a bug, not 1)."""
    import numbers

    return isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def expect_same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` lives on ``ref``'s device (a meta tensor mixed with CPU ones is an error,
    as in torch, never uninitialised memory)."""
    for name, t in others.items():
        if t is not None:
            expect(t.device == ref.device, op, f"{name} is on {t.device} but {ref_name} is on {ref.device}: "
                                               "all inputs must be on one device")


def can_sync(t: torch.Tensor) -> bool:
    """Whether a host check may read ``t``'s values: not a meta or fake tensor (tracing, FakeTensorMode)."""
    if t.device.type == "meta":
        return False
    if _c_is_fake is not None and type(t) is torch.Tensor and not torch._is_functional_tensor(t) \
            and not _functorch_wrapped(t):
        return not _c_is_fake(t)  # is_fake for a plain tensor, without its generic walk
    return not is_fake(t)


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
# torch >= 2.14 (GPU machines may run 2.11, which lacks it: is_fake's generic walk there)
_c_is_fake = getattr(torch._C, "_is_fake_tensor", None)


def is_eager(device_type: str = "cuda") -> bool:
    """Not under torch.compile and (for CUDA tensors) not capturing a CUDA graph: host checks and
    Python-side AD wrappers may run."""
    if torch.compiler.is_compiling():
        return False
    return device_type != "cuda" or not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def grad_or_tangent(*ts: torch.Tensor) -> bool:
    """Whether autograd (reverse or forward mode) may see these tensors: the public functions then take a
    path with every AD mode they support (torch.library registers no forward-mode formula). Called on
    every op call: plain loops and pre-bound functions (~0.3 µs, not 3)."""
    if _grad_enabled():
        for t in ts:
            if t.requires_grad:
                return True
    if _forward_ad._current_level >= 0:
        return True
    for t in ts:
        if _functorch_wrapped(t):
            return True
    return False


_grad_enabled = torch.is_grad_enabled
_forward_ad = torch.autograd.forward_ad


def native_call_ok() -> bool:
    """Whether an op may call native code directly (pybind, bypassing the dispatcher) on plain tensors:
    not under torch.compile/export, no TorchDispatchMode (FakeTensorMode, ...) active and no jit tracer
    recording (each would miss the call or hand it fake tensors)."""
    return not _is_compiling() and not _dispatch_modes() and _tracing_state() is None


_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_tracing_state = torch._C._get_tracing_state


def autocast_like(device_type: str, like: torch.Tensor, *ts):
    """The autocast contract of the ops that take parameters (README "Autocast"): under ``torch.autocast``
    for ``device_type``, the parameter-like inputs ``ts`` follow the activation ``like``'s dtype (a
    differentiable cast); outside autocast nothing is cast and mismatched dtypes stay an error."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return tuple(t.to(like.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts)
    return ts


def autocast_off(device_type: str):
    """Context with ``torch.autocast`` disabled for ``device_type``: the references promise fp32 math (fp64 for
    fp64), but inside an autocast region their fp32 GEMMs would silently run in the autocast dtype."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def expect_no_tangent(op: str, ts, what: str) -> None:
    """Ops with reverse-mode autograd only (torch.library registers no forward-mode formula): a forward-mode
    tangent (``torch.autograd.forward_ad``, or ``torch.func.jvp``, which makes dual tensors too) on any of
    ``ts`` (described by ``what``) would be dropped silently — the output came back without a tangent, or with
    a zero one under ``jvp`` — so it is an error. Free outside a ``dual_level``."""
    if _forward_ad._current_level < 0:
        return
    if any(isinstance(t, torch.Tensor) and _forward_ad.unpack_dual(t).tangent is not None for t in ts):
        raise NotImplementedError(f"mokernels.{op}: forward-mode AD is not supported (a tangent on {what} would be "
                                  "dropped): use reverse mode (Tensor.backward / torch.autograd.grad)")
