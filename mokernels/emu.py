"""The CPU emulation of mokernels' kernels (csrc/emu): `torch.ops.mokernels_emu.<op>` runs the real
kernel source on CPU tensors, one fiber per CUDA thread. It proves kernel *logic* in CI machines
without a GPU; it says nothing about speed or the GPU memory model.

Three builds of the same kernel source, selected by the environment:
- default: mokernels._emu;
- `MOKERNELS_EMU_ASAN=1`: the AddressSanitizer/UBSan build (mokernels._emu_asan), which must be loaded
  with the ASan runtime (and libstdc++, so ASan's __cxa_throw interceptor finds the real one)
  preloaded into a Python that was not built with ASan:
    LD_PRELOAD="$(python -m mokernels.emu --preload)" ASAN_OPTIONS=detect_leaks=0 MOKERNELS_EMU_ASAN=1 pytest -m emu
- `MOKERNELS_EMU_TSAN=1`: the ThreadSanitizer race pass (mokernels._emu_tsan; one TSan fiber per CUDA
  thread, happens-before only from block barriers and launch start/end, see csrc/emu/tsan_hooks.h);
  `MOKERNELS_EMU_TSAN_STRICT=1` also drops the ordering of warp collectives. TSan needs its runtime
  preloaded and address-space randomisation off (else "unexpected memory mapping"):
    LD_PRELOAD="$(python -m mokernels.emu --preload-tsan)" TSAN_OPTIONS="$(python -m mokernels.emu --tsan-options)" \\
      MOKERNELS_EMU_TSAN=1 setarch -R python -m pytest -m emu
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

# halt_on_error + exitcode: the first race fails the process (CI); the rest keeps TSan quiet about the
# uninstrumented Python and torch around the kernels.
TSAN_OPTIONS = "halt_on_error=1 exitcode=66 ignore_noninstrumented_modules=1 report_signal_unsafe=0 history_size=4"


def sanitized_requested() -> bool:
    return os.environ.get("MOKERNELS_EMU_ASAN", "0") == "1"


def tsan_requested() -> bool:
    return os.environ.get("MOKERNELS_EMU_TSAN", "0") == "1"


def module_name() -> str:
    """The emulation module the environment selects."""
    if tsan_requested():
        return "mokernels._emu_tsan"
    return "mokernels._emu_asan" if sanitized_requested() else "mokernels._emu"


def available() -> bool:
    """Whether the emulation module selected by MOKERNELS_EMU_ASAN / MOKERNELS_EMU_TSAN was built."""
    return emulation_built(sanitized=sanitized_requested(), tsan=tsan_requested())


def load() -> str:
    """Loads the emulation module (once per process) and returns its name."""
    global _loaded
    if _loaded is None:
        name = module_name()
        if not available():
            knob = {"mokernels._emu_tsan": " MOKERNELS_BUILD_EMU_TSAN=1", "mokernels._emu_asan": " MOKERNELS_BUILD_EMU_ASAN=1"}
            raise RuntimeError(
                f"{name} is not built: rebuild with MOKERNELS_BUILD_EMU=1" + knob.get(name, "")
                + " pip install --no-build-isolation --no-deps -e ."
            )
        if sanitized_requested() and not tsan_requested() and "libasan" not in os.environ.get("LD_PRELOAD", ""):
            raise RuntimeError(
                "MOKERNELS_EMU_ASAN=1 needs the ASan runtime preloaded: "
                f'LD_PRELOAD="{sanitizer_preload()}" ASAN_OPTIONS=detect_leaks=0'
            )
        if tsan_requested() and "libtsan" not in os.environ.get("LD_PRELOAD", ""):
            raise RuntimeError(
                "MOKERNELS_EMU_TSAN=1 needs the TSan runtime preloaded and ASLR off: "
                f'LD_PRELOAD="{tsan_preload()}" TSAN_OPTIONS="{TSAN_OPTIONS}" setarch -R python ...'
            )
        importlib.import_module(name)
        _loaded = name
    return _loaded


def ops():
    """`torch.ops.mokernels_emu`, the emulated kernels (loads the module on first use)."""
    load()
    return torch.ops.mokernels_emu


def _gcc_lib(name: str) -> str:
    return subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()


@functools.cache
def sanitizer_preload() -> str:
    """The LD_PRELOAD value for the ASan build: gcc's libasan and libstdc++ (space separated)."""
    return f"{_gcc_lib('libasan.so')} {_gcc_lib('libstdc++.so')}"


@functools.cache
def tsan_preload() -> str:
    """The LD_PRELOAD value for the TSan build: gcc's libtsan and libstdc++ (space separated)."""
    return f"{_gcc_lib('libtsan.so')} {_gcc_lib('libstdc++.so')}"


def tsan_env(strict: bool = True) -> dict[str, str]:
    """Environment entries that run the TSan pass in a child process (prefix the command with
    `setarch -R`)."""
    return {"LD_PRELOAD": tsan_preload(), "TSAN_OPTIONS": TSAN_OPTIONS, "MOKERNELS_EMU_TSAN": "1",
            "MOKERNELS_EMU_TSAN_STRICT": "1" if strict else "0"}


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["--preload"]:
        print(sanitizer_preload())
    elif args == ["--preload-tsan"]:
        print(tsan_preload())
    elif args == ["--tsan-options"]:
        print(TSAN_OPTIONS)
    else:
        sys.exit("usage: python -m mokernels.emu --preload | --preload-tsan | --tsan-options")
