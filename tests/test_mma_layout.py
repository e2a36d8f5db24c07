"""The fragment layouts that the emulated mma.sync / ldmatrix are built on (mma.cuh's coordinate maps)
checked against CuTe's encoding of the same hardware layouts (SM80 MMA traits, SM75 LDSM copy
traits). This is the GPU-independent half of validating the emulator; the `cuda` tile-GEMM test is
the other half."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mokernels._ext import config

ROOT = Path(__file__).resolve().parents[1]


def _includes() -> list[str]:
    incs = [str(ROOT / "csrc")]
    cutlass = getattr(config, "CUTLASS_INCLUDE", None)
    cuda = [d for d in getattr(config, "CUDA_INCLUDE_DIRS", []) if Path(d).is_dir()]
    if not cutlass or not Path(cutlass).is_dir() or not cuda:
        pytest.skip("this build recorded no CUTLASS/CUDA include dirs")
    incs.append(cutlass)
    for d in cuda:
        incs += [d] + ([str(Path(d) / "cccl")] if (Path(d) / "cccl").is_dir() else [])
    return incs


@pytest.mark.emu
def test_fragment_layout_maps_match_cute(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed"
    exe = tmp_path / "mma_layout_check"
    cmd = [cxx, "-std=c++20", "-w", "-DMOKERNELS_EMULATION", *(f"-I{i}" for i in _includes()),
           str(ROOT / "tests" / "cpp" / "mma_layout_check.cpp"), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "OK 1024", run.stdout
