"""Loads the compiled extension `mokernels._C` (op schemas + CUDA kernels) after checking that it
was built for the torch that is running, and reports what the build contains."""
from __future__ import annotations

import importlib.util
import warnings

import torch

try:
    from . import _build_config as config
except ImportError as exc:  # a source checkout that was never built
    raise ImportError(
        "mokernels: the compiled extension is not built (mokernels/_build_config.py is missing). "
        "Build it with: pip install --no-build-isolation --no-deps -e ."
    ) from exc


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def check_torch_abi(built: str, runtime: str, built_cuda: str | None, runtime_cuda: str | None) -> None:
    """Raises ImportError (with the fix) when an extension built against torch `built` (CUDA
    `built_cuda`, None for a CPU build) cannot load into torch `runtime` (CUDA `runtime_cuda`):
    C++ extensions are tied to the torch ABI (major.minor) and CUDA major version they were built with."""
    if _major_minor(built) != _major_minor(runtime):
        raise ImportError(
            f"mokernels was built against torch {built} but torch {runtime} is installed; C++ extensions "
            "are tied to the torch ABI they were built with. Rebuild mokernels "
            "(pip install --no-build-isolation --no-deps -e .) or install a wheel built for this torch."
        )
    if built_cuda is not None and runtime_cuda is None:
        raise ImportError(
            f"mokernels was built with CUDA kernels (torch {built}) but the installed torch {runtime} is a "
            "CPU-only build; rebuild mokernels against this torch."
        )
    if built_cuda is not None and built_cuda.split(".")[0] != runtime_cuda.split(".")[0]:
        raise ImportError(
            f"mokernels was built with CUDA {built_cuda} but torch {runtime} uses CUDA {runtime_cuda}; "
            "rebuild mokernels against this torch."
        )


check_torch_abi(config.TORCH_VERSION, torch.__version__, config.CUDA_VERSION, torch.version.cuda)

from . import _C  # noqa: E402  (registers the `mokernels` op schemas and CUDA kernels)

# What the compiled module says about itself is the truth (the Python record may be newer than it).
_COMPILED = dict(_C.build_info())
if not _COMPILED["with_cuda"]:
    warnings.warn(
        "mokernels was built without CUDA kernels (no nvcc or a CPU-only torch at build time): every op "
        "runs its pure-torch reference implementation.",
        RuntimeWarning,
        stacklevel=2,
    )


def emulation_built(sanitized: bool = False, tsan: bool = False) -> bool:
    """Whether the CPU emulation module (or its ASan/UBSan build, or its TSan build) was built."""
    name = "mokernels._emu_tsan" if tsan else "mokernels._emu_asan" if sanitized else "mokernels._emu"
    return importlib.util.find_spec(name) is not None


def build_info() -> dict:
    """What this installation contains: compiled CUDA arches, CUDA/torch versions it was built with,
    whether the emulation modules exist, and the GPU torch sees now (None without one)."""
    info = dict(_COMPILED)
    info.update(
        version=_version(),
        cuda_archs=[a for a in _COMPILED["cuda_archs"].split(",") if a],
        torch_built=config.TORCH_VERSION,
        torch_runtime=torch.__version__,
        cutlass_version=config.CUTLASS_VERSION,
        emulation=emulation_built(),
        emulation_asan=emulation_built(sanitized=True),
        emulation_tsan=emulation_built(tsan=True),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    )
    return info


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mokernels")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. PYTHONPATH)
        return "unknown"
