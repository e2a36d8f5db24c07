"""The CPU emulator itself: CUDA execution rules it must reproduce and misuse it must report, and the
sanitizer build catching an out-of-bounds read in kernel code (our stand-in for compute-sanitizer)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mokernels
import mokernels.emu

pytestmark = pytest.mark.emu


@pytest.mark.parametrize("n", [32, 64, 96])
def test_warp_collectives_and_dynamic_shared(emu_ops, n):
    x = torch.randn(n)
    out = emu_ops._selftest("warp_ops", x)
    w = x.view(-1, 32)
    lane = torch.arange(32)
    torch.testing.assert_close(out[:, 0], w.sum(1, keepdim=True).expand(-1, 32).reshape(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 1], w.max(1, keepdim=True).values.expand(-1, 32).reshape(-1))
    torch.testing.assert_close(out[:, 2], w[:, 3:4].expand(-1, 32).reshape(-1))
    down = torch.where(lane < 31, (lane + 1).clamp(max=31), lane)
    torch.testing.assert_close(out[:, 3], w[:, down].reshape(-1))
    torch.testing.assert_close(out[:, 4], (w > 0).sum(1, keepdim=True).float().expand(-1, 32).reshape(-1))
    torch.testing.assert_close(out[:, 5], x[torch.arange(n) ^ 1])


@pytest.mark.parametrize("n", [1, 33, 64, 200])
def test_threads_that_exit_early_do_not_block_barriers(emu_ops, n):
    x = torch.randn(n)
    keep = n // 2 + 1
    out = emu_ops._selftest("early_exit", x)
    idx = (torch.arange(keep) + 1) % keep
    torch.testing.assert_close(out[:keep], x[idx])
    assert torch.count_nonzero(out[keep:]) == 0


def test_divergent_barrier_is_reported(emu_ops):
    with pytest.raises(RuntimeError, match="deadlock"):
        emu_ops._selftest("divergent_barrier", torch.zeros(64))


def test_shuffle_with_exited_lane_is_reported(emu_ops):
    with pytest.raises(RuntimeError, match="lane 5 has exited"):
        emu_ops._selftest("exited_lane_shuffle", torch.zeros(64))


@pytest.mark.parametrize("case,msg", [
    ("mismatched_collectives", "different warp collectives"),
    ("misaligned_ldmatrix", "16-byte aligned"),
    ("throws", "thrown inside the kernel"),
    ("too_much_shared_memory", "48 KiB"),
])
def test_misuse_is_reported(emu_ops, case, msg):
    with pytest.raises(RuntimeError, match=msg):
        emu_ops._selftest(case, torch.zeros(64))


@pytest.mark.racy
def test_missing_barrier_is_exposed(emu_ops):
    """Unwritten shared memory reads as NaN and the lanes of a warp run in one order (reverse-first by
    default, forward-first with MOKERNELS_EMU_SCHEDULE=forward) up to the barrier, so a kernel reading its
    neighbours' slots without __syncthreads gives a visibly wrong answer in either schedule."""
    x = torch.arange(1.0, 65.0)
    out = emu_ops._selftest("missing_barrier", x)
    assert torch.isnan(out).any()
    # the same kernel with every slot written first would give x[t-1] + x[t+1]
    assert not torch.equal(out, x.roll(1) + x.roll(-1))


SCHEDULES = [{}, {"MOKERNELS_EMU_SCHEDULE": "forward"}, {"MOKERNELS_EMU_BLOCK_ORDER": "reverse"}]


@pytest.fixture(params=SCHEDULES, ids=["reverse-first", "forward-first", "blocks-reversed"])
def schedule(request, monkeypatch):
    """Runs a test under each scheduling knob (the shim reads them at every launch)."""
    monkeypatch.delenv("MOKERNELS_EMU_SCHEDULE", raising=False)
    monkeypatch.delenv("MOKERNELS_EMU_BLOCK_ORDER", raising=False)
    for k, v in request.param.items():
        monkeypatch.setenv(k, v)
    return request.param


@pytest.mark.racy
@pytest.mark.parametrize("n", [64, 96])
def test_collective_does_not_act_as_block_barrier(emu_ops, schedule, n):
    """Warps run one at a time between block barriers: a warp_reduce between another warp's shared-memory
    write and the read does not order them, so the read sees poison; with the barrier it is right."""
    x = torch.arange(1.0, n + 1.0)
    expect = x.roll(-32)
    torch.testing.assert_close(emu_ops._selftest("cross_warp_read_synced", x), expect)
    out = emu_ops._selftest("cross_warp_read", x)
    assert torch.isnan(out).any(), out


def _gemm_inputs(K=32):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-4, 5, (32, K), generator=g).float()
    b = torch.randint(-4, 5, (16, K), generator=g).float()
    return a, b, torch.cat([a.flatten(), b.flatten()])


def test_two_warp_mma_gemm_is_right(emu_ops, schedule):
    a, b, x = _gemm_inputs()
    torch.testing.assert_close(emu_ops._selftest("two_warp_gemm", x), a @ b.T, rtol=0, atol=0)


@pytest.mark.racy
@pytest.mark.parametrize("case", ["two_warp_gemm_no_raw_barrier", "two_warp_gemm_no_war_barrier"])
def test_two_warp_mma_gemm_missing_barrier_is_wrong(emu_ops, schedule, case):
    """The 2-warp ldmatrix + mma.sync GEMM without its read-after-write barrier (reads the other warp's
    unwritten, poisoned half of the tile) or without its overwrite barrier (the first warp of the next
    phase overwrites the tile the other warp has not read yet) gives a wrong result in every schedule."""
    a, b, x = _gemm_inputs()
    out = emu_ops._selftest(case, x)
    assert not torch.allclose(out, a @ b.T, equal_nan=False)


def test_static_shared_memory_is_poisoned_in_every_block(emu_ops, schedule):
    """MK_SHARED_ARRAY is a fresh 0xFF-filled allocation per block: reading it before writing gives NaN on
    the first launch and in the second block (a function-local static would hold the first block's data)."""
    x = torch.randn(64)
    out = emu_ops._selftest("static_shared_uninit", x)
    assert out.shape == (2, 64) and torch.isnan(out).all(), out
    assert torch.isnan(emu_ops._selftest("static_shared_uninit", x)).all()  # and again, on a second launch


def test_barriers_at_different_call_sites_are_reported(emu_ops, schedule):
    with pytest.raises(RuntimeError, match=r"different __syncthreads \(.*selftest\.h:\d+ vs .*selftest\.h:\d+\)"):
        emu_ops._selftest("barrier_sites", torch.zeros(64))


def test_barrier_in_a_helper_has_one_call_site(emu_ops):
    """A __syncthreads inside a helper that every thread calls (from two branches) is one barrier."""
    x = torch.randn(64)
    torch.testing.assert_close(emu_ops._selftest("barrier_in_helper", x), x[torch.arange(64) ^ 1])


def test_plain_shared_does_not_compile_under_emulation(tmp_path):
    """Kernel code must use MK_SHARED_ARRAY: a plain __shared__ (a function-local static under g++, one
    unpoisoned copy for every block) is a compile error in the emulator build."""
    import shutil
    from pathlib import Path

    from mokernels import _build_config as cfg
    gxx = shutil.which("g++")
    if gxx is None or not cfg.CUDA_INCLUDE_DIRS:
        pytest.skip("needs g++ and the CUDA host headers")
    src = tmp_path / "t.cpp"
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    src.write_text('#include "kernels/common/platform.cuh"\nvoid k() { __shared__ float s[4]; s[0] = 1.f; }\n')
    cmd = [gxx, "-std=c++20", "-fsyntax-only", "-DMOKERNELS_EMULATION", f"-I{csrc}",
           *[f"-I{i}" for i in cfg.CUDA_INCLUDE_DIRS], str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "use_MK_SHARED_ARRAY" in proc.stderr, proc.stderr[-2000:]


def _pipeline_expect(x):
    return x.view(-1, 256).roll(-4, dims=1).flatten()


@pytest.mark.parametrize("kind", ["ca4", "ca8", "ca16", "cg16"])
@pytest.mark.parametrize("mode", [0, 4], ids=["wait_group1", "wait_all"])
def test_cp_async_pipeline_is_right(emu_ops, schedule, kind, mode):
    x = torch.randn(4 * 256)
    torch.testing.assert_close(emu_ops._selftest(f"cp_async_{kind}_{mode}", x), _pipeline_expect(x), rtol=0, atol=0)


@pytest.mark.parametrize("mode,bad_stages", [(1, [0, 1, 2, 3]), (2, [3]), (3, [0])],
                         ids=["missing_wait", "wait_group1_where_0_needed", "missing_commit"])
def test_cp_async_misuse_reads_poison(emu_ops, schedule, mode, bad_stages):
    """cp.async lands only at its wait_group (not at __syncthreads): until then the destination holds
    0xFF bytes, so each of these pipelines reads NaN exactly in the stages its bug leaves pending."""
    x = torch.randn(4 * 256)
    out = emu_ops._selftest(f"cp_async_ca16_{mode}", x).view(4, 256)
    expect = _pipeline_expect(x).view(4, 256)
    for s in range(4):
        if s in bad_stages:
            assert torch.isnan(out[s]).all(), s
        else:
            torch.testing.assert_close(out[s], expect[s], rtol=0, atol=0)


def test_cp_async_zero_fill(emu_ops):
    x = torch.randn(256)
    out = emu_ops._selftest("cp_async_zfill", x).view(64, 4)
    keep = (torch.arange(64) % 5).unsqueeze(1) > torch.arange(4)
    torch.testing.assert_close(out, torch.where(keep, x.view(64, 4), torch.zeros(())), rtol=0, atol=0)


def test_cp_async_misaligned_is_reported(emu_ops):
    with pytest.raises(RuntimeError, match="cp.async shared-memory destination is not aligned"):
        emu_ops._selftest("cp_async_zfill_misaligned", torch.zeros(256))


@pytest.mark.cuda
def test_selftest_kernels_match_the_gpu(tmp_path):
    """The emulator self-test kernels that are correct CUDA (cp.async pipelines in every size/form, the
    zero-fill copy, the 2-warp ldmatrix + mma.sync GEMM; csrc/emu/selftest_kernels.cuh) give the host
    reference's exact results on the GPU: the wrappers' PTX agrees with what the emulator models."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        pytest.skip("cp.async needs sm_80")
    exe = tmp_path / "selftest_gpu_check"
    build = subprocess.run([nvcc, "-std=c++20", f"-arch=sm_{major}{minor}", "-O3", "--expt-relaxed-constexpr",
                            f"-I{root / 'csrc'}", str(root / "tests" / "cpp" / "selftest_gpu_check.cu"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "OK 10", run.stdout + run.stderr


def test_emulator_survives_a_failed_launch(emu_ops):
    with pytest.raises(RuntimeError):
        emu_ops._selftest("exited_lane_shuffle", torch.zeros(32))
    x = torch.randn(64)
    assert torch.isfinite(emu_ops._selftest("warp_ops", x)).all()


needs_asan = pytest.mark.skipif(not mokernels._ext.emulation_built(sanitized=True),
                                reason="ASan emulation module not built (MOKERNELS_BUILD_EMU_ASAN=1)")


def _run_sanitized(body: str) -> subprocess.CompletedProcess:
    """Runs `body` (with torch, mokernels and `ops` = the ASan/UBSan emulation ops) in a subprocess."""
    script = "import torch, mokernels\nfrom mokernels import emu\nops = emu.ops()\n" + textwrap.dedent(body)
    env = dict(os.environ, LD_PRELOAD=mokernels.emu.sanitizer_preload(), ASAN_OPTIONS="detect_leaks=0", MOKERNELS_EMU_ASAN="1",
               MOKERNELS_EMU_TSAN="0")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


@needs_asan
def test_sanitizer_build_catches_planted_out_of_bounds_read():
    """Runs a kernel with a planted one-past-the-row read under the ASan build in a subprocess and
    expects AddressSanitizer's heap-buffer-overflow report."""
    proc = _run_sanitized("print(ops._planted_oob_read(torch.randn(5, 7)))")
    assert proc.returncode != 0, proc.stdout
    assert "heap-buffer-overflow" in proc.stderr, proc.stderr[-3000:]
    assert "row_sum_one_past" in proc.stderr  # the report points into the kernel


@needs_asan
def test_sanitizer_build_catches_planted_int32_overflow():
    """A signed int32 index product that overflows in kernel code is a UBSan error: the ASan/UBSan
    build appends -fno-wrapv after Python's -fwrapv (which would define the overflow and silence it)."""
    proc = _run_sanitized("print(ops._planted_int_overflow(torch.zeros(1)))")
    assert proc.returncode != 0, proc.stdout
    assert "signed integer overflow" in proc.stderr, proc.stderr[-3000:]
    assert "planted.h" in proc.stderr  # reported at the kernel's line


@needs_asan
def test_sanitizer_build_makes_uninitialised_accumulator_garbage():
    """-ftrivial-auto-var-init=pattern: a row sum without its `= 0` starts from the 0xFE.. pattern, so its
    result is wrong instead of happening to be right on the fresh (zeroed) fiber stack."""
    proc = _run_sanitized(
        """
        x = torch.randn(40, 6)
        out = ops._planted_uninit_acc(x)
        print("WRONG" if not torch.allclose(out, x.sum(1), atol=1e-4) else "RIGHT")
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("WRONG"), proc.stdout


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_shared_memory_limits_static_plus_dynamic_and_opt_in(emu_ops, monkeypatch, arch):
    """The emulator applies the GPU's shared-memory limits (csrc/emu/shim.h SmemLimits): static + dynamic
    <= 48 KiB without an opt-in, dynamic <= the kernel's MaxDynamicSharedMemorySize with one, static +
    that <= the arch's opt-in limit (sm_80 163 KiB, sm_90 227 KiB), static alone <= 48 KiB."""
    monkeypatch.setenv("MOKERNELS_EMU_ARCH", arch)
    x = torch.randn(64)
    with pytest.raises(RuntimeError, match=r"static \(40960\) \+ dynamic \(16384\).*48 KiB default limit"):
        emu_ops._selftest("smem_static_plus_dynamic", x)
    torch.testing.assert_close(emu_ops._selftest("smem_opt_in", x), 2 * x, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="exceed the kernel's MaxDynamicSharedMemorySize of 16384"):
        emu_ops._selftest("smem_dynamic_above_opt_in", x)
    if arch == "sm_90":  # 40 + 180 KiB <= 227 KiB
        torch.testing.assert_close(emu_ops._selftest("smem_opt_in_large", x), 2 * x, rtol=0, atol=0)
    else:
        with pytest.raises(RuntimeError, match="sm_80 opt-in limit of 166912"):
            emu_ops._selftest("smem_opt_in_large", x)
    with pytest.raises(RuntimeError, match=f"exceeds the {arch} opt-in limit"):
        emu_ops._selftest("smem_attribute_above_arch", x)
    with pytest.raises(RuntimeError, match="48 KiB static limit"):
        emu_ops._selftest("smem_static_above_48k", x)
