"""What the build reports about itself, and the torch-ABI guard at import."""
from __future__ import annotations

import os

import pytest
import torch

import mokernels
from mokernels._ext import check_torch_abi


def test_build_info_reports_build():
    info = mokernels.build_info()
    for key in ("with_cuda", "cuda_archs", "cuda_version", "torch_built", "torch_runtime", "emulation", "gpu"):
        assert key in info
    assert info["torch_built"].split("+")[0].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    # the compiled module and the build record written next to it agree
    cfg = mokernels._ext.config
    assert info["with_cuda"] == cfg.WITH_CUDA and info["cuda_archs"] == cfg.CUDA_ARCHS
    assert bool(info["cuda_archs"]) == info["with_cuda"]


@pytest.mark.skipif(os.environ.get("MOKERNELS_REQUIRE_CUDA") != "1", reason="only where a CUDA build is required")
def test_required_cuda_build_has_the_claimed_arches():
    info = mokernels.build_info()
    assert info["with_cuda"] and info["cuda_version"]
    claimed = os.environ.get("MOKERNELS_EXPECT_ARCHS", "sm_80,sm_90a").split(",")
    assert set(claimed) <= set(info["cuda_archs"]), info["cuda_archs"]


def test_abi_guard():
    check_torch_abi("2.14.1+cpu", "2.14.0+cu130", None, "13.0")  # same major.minor, CPU build: fine
    check_torch_abi("2.14.1+cu130", "2.14.1+cu130", "13.0", "13.2")  # same CUDA major: fine
    with pytest.raises(ImportError, match="built against torch 2.13.0"):
        check_torch_abi("2.13.0", "2.14.1", None, None)
    with pytest.raises(ImportError, match="CPU-only"):
        check_torch_abi("2.14.1+cu130", "2.14.1+cpu", "13.0", None)
    with pytest.raises(ImportError, match="CUDA 12.8"):
        check_torch_abi("2.14.1+cu128", "2.14.1+cu130", "12.8", "13.0")


def test_cuda_ops_registered():
    # the CUDA kernels are registered with the dispatcher whenever the build has them
    has = torch._C._dispatch_has_kernel_for_dispatch_key("mokernels::rank_one_scale", "CUDA")
    assert has == mokernels.build_info()["with_cuda"]


def test_every_kernel_family_has_an_emulation_tu():
    """Each csrc/<family>.cu is compiled into the emulator modules through csrc/emu/kernels_<family>.cpp (one
    TU per family, picked up by setup.py and CMakeLists.txt); a family without one would have no emulated
    kernels and its emu tests would fail only at run time with a missing-op error."""
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    families = sorted(p.stem for p in csrc.glob("*.cu"))
    assert families, "no csrc/*.cu found"
    for fam in families:
        tu = csrc / "emu" / f"kernels_{fam}.cpp"
        assert tu.exists(), f"{fam}.cu has no emulation TU {tu.relative_to(csrc.parent)}"
        assert f'#include "../{fam}.cu"' in tu.read_text(), f"{tu.name} does not include ../{fam}.cu"
    stray = sorted(p.name for p in (csrc / "emu").glob("kernels_*.cpp") if p.stem[len("kernels_"):] not in families)
    assert not stray, f"emulation TUs without a csrc/<family>.cu: {stray}"
