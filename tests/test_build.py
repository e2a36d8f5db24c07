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
    if info["with_cuda"]:
        # the C++ module and the Python record agree on the compiled targets
        assert info["cuda_archs"] and ",".join(info["cuda_archs"]) == mokernels._ext._C.build_info()["cuda_archs"]


@pytest.mark.skipif(os.environ.get("MOKERNELS_REQUIRE_CUDA") != "1", reason="only where a CUDA build is required")
def test_required_cuda_build_has_the_claimed_arches():
    info = mokernels.build_info()
    assert info["with_cuda"] and info["cuda_version"]
    claimed = os.environ.get("MOKERNELS_EXPECT_ARCHS", "sm_80,sm_90a").split(",")
    assert set(claimed) <= set(info["cuda_archs"]), info["cuda_archs"]


def test_abi_guard():
    check_torch_abi("2.14.1+cu130", "2.14.0+cpu", False, None)  # same major.minor, CPU build: fine
    with pytest.raises(ImportError, match="built against torch 2.13.0"):
        check_torch_abi("2.13.0", "2.14.1", False, None)
    with pytest.raises(ImportError, match="CPU-only"):
        check_torch_abi("2.14.1+cu130", "2.14.1+cpu", True, None)


def test_cuda_ops_registered():
    # the CUDA kernels are registered with the dispatcher whenever the build has them
    has = torch._C._dispatch_has_kernel_for_dispatch_key("mokernels::rank_one_scale", "CUDA")
    assert has == mokernels.build_info()["with_cuda"]
