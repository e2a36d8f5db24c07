"""Build of mokernels: the `mokernels._C` extension (op schemas + CUDA kernels) and the CPU
emulation module `mokernels._emu` (the same kernel source, run on CPU by csrc/emu).

Environment knobs (all optional):
  TORCH_CUDA_ARCH_LIST / MOKERNELS_CUDA_ARCHS  arches, e.g. "8.0;9.0a" ("+PTX" adds PTX for that
                                              arch); default "8.0+PTX;9.0a" (sm_80 cubins also serve
                                              sm_86/sm_89, compute_80 PTX lets newer GPUs JIT)
  MAX_JOBS                                    parallel compile jobs (ninja)
  MOKERNELS_REQUIRE_CUDA=1                    fail instead of building without CUDA kernels
  MOKERNELS_FORCE_CPU=1                       build without CUDA kernels even if nvcc is there
  MOKERNELS_BUILD_EMU=0                       skip the emulation module
  MOKERNELS_BUILD_EMU_ASAN=1                  also build mokernels._emu_asan (ASan + UBSan)
  MOKERNELS_BUILD_EMU_TSAN=1                  also build mokernels._emu_tsan (ThreadSanitizer race pass)
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0+PTX;9.0a"


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def _resolve_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH if set, else the toolkit behind `nvcc` on PATH. The nvcc there may be a
    wrapper script that execs the real compiler; torch would then guess the wrong root."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and Path(os.environ[var], "bin", "nvcc").exists():
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    head = Path(nvcc).read_bytes()[:4096]
    if head.startswith(b"#!"):
        m = re.search(rb"(/[^\s\"']+)/bin/nvcc\b", head)
        if m and Path(m.group(1).decode(), "bin", "nvcc").exists():
            return m.group(1).decode()
    return str(Path(nvcc).resolve().parent.parent)


TOOLKIT = _resolve_cuda_home()  # its headers also serve the emulator, even when CUDA kernels are off
CUDA_HOME = None if _flag("MOKERNELS_FORCE_CPU") else TOOLKIT
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # must precede the import of torch.utils.cpp_extension

import torch  # noqa: E402
from torch.utils import cpp_extension as cx  # noqa: E402


def _parse_archs(spec: str) -> tuple[list[str], list[str]]:
    """'8.0+PTX;9.0a' -> (nvcc -gencode flags, targets ['sm_80', 'compute_80', 'sm_90a'])."""
    flags, targets = [], []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.?(\d)([af]?)(\+PTX)?", item, flags=re.IGNORECASE)
        if not m:
            sys.exit(f"mokernels setup: cannot parse CUDA arch {item!r} (expected e.g. 8.0, 9.0a, 8.0+PTX)")
        num = f"{m.group(1)}{m.group(2)}{m.group(3).lower()}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        targets.append(f"sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
            targets.append(f"compute_{num}")
    if not flags:
        sys.exit("mokernels setup: empty CUDA arch list")
    return flags, targets


def _nvidia_wheel_includes() -> list[str]:
    """site-packages/nvidia/cu*/include (cuBLAS/cuSPARSE headers torch includes; the toolkit here
    lacks them). Added with -isystem so the toolkit's own headers keep precedence."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    found = []
    for base in list(spec.submodule_search_locations or []) if spec else []:
        for inc in sorted(Path(base).glob("cu*/include")):
            if (inc / "cublas_v2.h").exists() or (inc / "cuda_bf16.h").exists():
                found.append(str(inc))
    return found


def _cutlass() -> tuple[str | None, str | None]:
    """CUTLASS/CuTe headers from the nvidia-cutlass wheel (nothing vendored)."""
    try:
        import importlib.metadata as md

        import cutlass_library

        inc = Path(cutlass_library.__file__).parent / "source" / "include"
        return (str(inc) if (inc / "cutlass" / "cutlass.h").exists() else None), md.version("nvidia-cutlass")
    except Exception:  # noqa: BLE001 - the wheel is optional for a CPU-only build
        return None, None


# One family = one csrc/<family>.cu wrapper; CMakeLists.txt globs the same files.
CUDA_SOURCES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("*.cu"))
# Native CPU kernels of the ops' CPU path (g++, in every build of _C); CMakeLists.txt globs the same.
CPU_SOURCES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))

torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
with_cuda = CUDA_HOME is not None and torch.version.cuda is not None
if _flag("MOKERNELS_REQUIRE_CUDA") and not with_cuda:
    sys.exit(
        "mokernels setup: MOKERNELS_REQUIRE_CUDA=1 but no CUDA build is possible "
        f"(nvcc/CUDA_HOME: {CUDA_HOME}, torch.version.cuda: {torch.version.cuda})"
    )

nvidia_incs = _nvidia_wheel_includes()
cutlass_inc, cutlass_version = _cutlass()
if with_cuda and cutlass_inc is None and _flag("MOKERNELS_REQUIRE_CUDA"):
    sys.exit("mokernels setup: the nvidia-cutlass wheel is required for the CUDA build (pip install nvidia-cutlass)")
csrc = str(ROOT / "csrc")
isystem = [f for inc in nvidia_incs for f in ("-isystem", inc)]
cxx_flags = ["-O3"]

if with_cuda:
    arch_spec = os.environ.get("MOKERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    gencode, targets = _parse_archs(arch_spec)
    defs = ["-DMOKERNELS_WITH_CUDA=1"]
    # Only bindings.cpp (g++) reads the arch list; nvcc would split a comma-separated -D value.
    archs_def = f"-DMOKERNELS_CUDA_ARCHS_TOKENS={','.join(targets)}"
    ext_c = cx.CUDAExtension(
        "mokernels._C",
        sources=["csrc/bindings.cpp"] + CPU_SOURCES + CUDA_SOURCES,
        include_dirs=[csrc] + ([cutlass_inc] if cutlass_inc else []),
        extra_compile_args={
            "cxx": cxx_flags + defs + [archs_def] + isystem,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *defs, *gencode, *isystem],
        },
    )
    local = f"torch{torch_mm}.cu{torch.version.cuda.replace('.', '')}"
else:
    targets = []
    ext_c = cx.CppExtension(
        "mokernels._C",
        sources=["csrc/bindings.cpp"] + CPU_SOURCES,
        include_dirs=[csrc],
        extra_compile_args={"cxx": cxx_flags + ["-DMOKERNELS_WITH_CUDA=0"]},
    )
    local = f"torch{torch_mm}.cpu"
    print("mokernels setup: building WITHOUT CUDA kernels (no nvcc or CPU-only torch); ops use the "
          "pure-torch reference", file=sys.stderr)

# The emulator needs the CUDA host headers (cuda_bf16.h, vector types and the crt/ they include) but
# no nvcc; the nvidia-* wheels' include dirs lack crt/, so only a toolkit's include dir qualifies.
emu_incs = [str(Path(TOOLKIT, "include"))] if TOOLKIT else []
emu_incs += nvidia_incs
emu_incs = [inc for inc in emu_incs if all(Path(inc, h).exists() for h in ("cuda_bf16.h", "crt/host_defines.h"))]
build_emu = _flag("MOKERNELS_BUILD_EMU", "1") and bool(emu_incs)
build_emu_asan = build_emu and _flag("MOKERNELS_BUILD_EMU_ASAN")
build_emu_tsan = build_emu and _flag("MOKERNELS_BUILD_EMU_TSAN")
if _flag("MOKERNELS_BUILD_EMU", "1") and not emu_incs:
    print("mokernels setup: no CUDA toolkit headers (crt/host_defines.h) found; the emulation module is not "
          "built", file=sys.stderr)

ext_modules = [ext_c]
sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
# Compile-only flags of the sanitizer build, after Python's CFLAGS (extra_compile_args come last):
#  -fno-wrapv: Python's CFLAGS carry -fwrapv, which defines signed overflow and so switches UBSan's
#    signed-integer-overflow check off; the last of -fwrapv/-fno-wrapv wins.
#  -ftrivial-auto-var-init=pattern: an uninitialised local (a register on the GPU) holds a 0xFE..
#    pattern instead of whatever the fresh, zeroed fiber stack had (a forgotten `acc = 0` looked right).
sanitize_cc = ["-ftrivial-auto-var-init=pattern", "-fno-wrapv"]
emu_defs = ["-DMOKERNELS_EMULATION", "-Wno-unknown-pragmas"] + [f"-I{i}" for i in emu_incs]
# The TSan module: only the kernel TU is instrumented; its shim (shim_tsan.cpp, -DMK_EMU_TSAN) is compiled
# separately without -fsanitize (see EmuBuild) and linked in as an object.
TSAN_SHIM = ("csrc/emu/shim_tsan.cpp", ["-O2", "-fPIC", "-std=c++20", "-DMK_EMU_TSAN", f"-I{csrc}"] + emu_defs)
# The kernel families: one emulation TU each (csrc/emu/kernels_<family>.cpp), so MAX_JOBS compiles them in
# parallel; every emulator flavour builds all of them (each flavour in its own build directory, see
# EmuBuild.build_extension, so the same source's objects never collide).
EMU_KERNEL_TUS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "emu").glob("kernels_*.cpp"))
for name, module_src, shim_src, flags, link, wanted in (
    ("mokernels._emu", "csrc/emu/module.cpp", "csrc/emu/shim.cpp", ["-O2"], [], build_emu),
    ("mokernels._emu_asan", "csrc/emu/module_asan.cpp", "csrc/emu/shim_asan.cpp", ["-O1", "-g"] + sanitize, sanitize,
     build_emu_asan),
    ("mokernels._emu_tsan", "csrc/emu/module_tsan.cpp", None, ["-O1", "-g", "-fsanitize=thread"], ["-fsanitize=thread"],
     build_emu_tsan),
):
    if wanted:
        ext_modules.append(
            cx.CppExtension(
                name,
                sources=[module_src] + ([shim_src] if shim_src else []) + EMU_KERNEL_TUS,
                include_dirs=[csrc],
                extra_compile_args={"cxx": flags + emu_defs + (sanitize_cc if name.endswith("asan") else [])},
                extra_link_args=link,
            )
        )


class EmuBuild(cx.BuildExtension):
    """BuildExtension that gives each emulator flavour its own build directory (they compile the same
    kernels_*.cpp sources with different flags) and first compiles the TSan module's shim without
    instrumentation (one set of compile flags per extension would instrument the scheduler's own
    bookkeeping)."""

    def build_extension(self, ext):
        if not ext.name.startswith("mokernels._emu"):
            return super().build_extension(ext)
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
        try:
            self._build_emu(ext)
        finally:
            self.build_temp = base

    def _build_emu(self, ext):
        if ext.name == "mokernels._emu_tsan":
            import subprocess

            src, flags = TSAN_SHIM
            obj = Path(self.build_temp, "shim_tsan_uninstrumented.o")
            obj.parent.mkdir(parents=True, exist_ok=True)
            cmd = [os.environ.get("CXX", "g++"), *flags, "-c", str(ROOT / src), "-o", str(obj)]
            print(" ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True)
            ext.extra_objects = [str(obj)]
        super().build_extension(ext)

# Facts of this build, read by mokernels at import (torch ABI check, build_info()).
(ROOT / "mokernels" / "_build_config.py").write_text(
    "# Generated by setup.py; do not edit.\n"
    f"TORCH_VERSION = {torch.__version__!r}\n"
    f"WITH_CUDA = {with_cuda!r}\n"
    f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
    f"CUDA_ARCHS = {targets!r}\n"
    f"EMU = {build_emu!r}\n"
    f"EMU_ASAN = {build_emu_asan!r}\n"
    f"EMU_TSAN = {build_emu_tsan!r}\n"
    f"CUTLASS_VERSION = {cutlass_version!r}\n"
    f"CUTLASS_INCLUDE = {cutlass_inc!r}\n"
    f"CUDA_INCLUDE_DIRS = {emu_incs!r}\n"
)

major, minor = (int(x) for x in torch_mm.split("."))
setup(
    name="mokernels",
    version=f"{VERSION}+{local}",
    description="Fused CUDA kernels for mixture-of-adapters fine-tuning and serving",
    packages=find_packages(include=["mokernels", "mokernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": EmuBuild.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=[f"torch>={major}.{minor},<{major}.{minor + 1}", "numpy"],
    zip_safe=False,
)
