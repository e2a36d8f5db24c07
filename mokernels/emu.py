"""The CPU emulation of mokernels' kernels (csrc/emu): `torch.ops.mokernels_emu.<op>` runs the real
kernel source on CPU tensors, one fiber per CUDA thread. It proves kernel *logic* in CI machines
without a GPU; it says nothing about speed or the GPU memory model.

`MOKERNELS_EMU_ASAN=1` selects the AddressSanitizer/UBSan build (mokernels._emu_asan), which must be
loaded with the ASan runtime (and libstdc++, so ASan's __cxa_throw interceptor finds the real one)
preloaded into a Python that was not built with ASan:
    LD_PRELOAD="$(python -m mokernels.emu --preload)" ASAN_OPTIONS=detect_leaks=0 MOKERNELS_EMU_ASAN=1 pytest -m emu
"""
from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys

import torch

from ._ext import emulation_built

_loaded: str | None = None


def sanitized_requested() -> bool:
    return os.environ.get("MOKERNELS_EMU_ASAN", "0") == "1"


def available() -> bool:
    """Whether the emulation module selected by MOKERNELS_EMU_ASAN was built."""
    return emulation_built(sanitized=sanitized_requested())


def load() -> str:
    """Loads the emulation module (once per process) and returns its name."""
    global _loaded
    if _loaded is None:
        name = "mokernels._emu_asan" if sanitized_requested() else "mokernels._emu"
        if not emulation_built(sanitized=sanitized_requested()):
            raise RuntimeError(
                f"{name} is not built: rebuild with MOKERNELS_BUILD_EMU=1"
                + (" MOKERNELS_BUILD_EMU_ASAN=1" if sanitized_requested() else "")
                + " pip install --no-build-isolation --no-deps -e ."
            )
        if sanitized_requested() and "libasan" not in os.environ.get("LD_PRELOAD", ""):
            raise RuntimeError(
                "MOKERNELS_EMU_ASAN=1 needs the ASan runtime preloaded: "
                f'LD_PRELOAD="{sanitizer_preload()}" ASAN_OPTIONS=detect_leaks=0'
            )
        importlib.import_module(name)
        _loaded = name
    return _loaded


def ops():
    """`torch.ops.mokernels_emu`, the emulated kernels (loads the module on first use)."""
    load()
    return torch.ops.mokernels_emu


@functools.cache
def sanitizer_preload() -> str:
    """The LD_PRELOAD value for the ASan build: gcc's libasan and libstdc++ (space separated)."""

    def lib(name: str) -> str:
        return subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()

    return f"{lib('libasan.so')} {lib('libstdc++.so')}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--preload"]:
        print(sanitizer_preload())
    else:
        sys.exit("usage: python -m mokernels.emu --preload")
