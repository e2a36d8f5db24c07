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
    """Unwritten shared memory reads as NaN and fibers run in one order (reverse by default, forward
    in the ASan pass) until the first barrier, so a kernel reading its neighbours' slots without
    __syncthreads gives a visibly wrong answer in either schedule."""
    x = torch.arange(1.0, 65.0)
    out = emu_ops._selftest("missing_barrier", x)
    assert torch.isnan(out).any()
    # the same kernel with every slot written first would give x[t-1] + x[t+1]
    assert not torch.equal(out, x.roll(1) + x.roll(-1))


def test_emulator_survives_a_failed_launch(emu_ops):
    with pytest.raises(RuntimeError):
        emu_ops._selftest("exited_lane_shuffle", torch.zeros(32))
    x = torch.randn(64)
    assert torch.isfinite(emu_ops._selftest("warp_ops", x)).all()


@pytest.mark.skipif(not mokernels._ext.emulation_built(sanitized=True),
                    reason="ASan emulation module not built (MOKERNELS_BUILD_EMU_ASAN=1)")
def test_sanitizer_build_catches_planted_out_of_bounds_read(tmp_path):
    """Runs a kernel with a planted one-past-the-row read under the ASan build in a subprocess and
    expects AddressSanitizer's heap-buffer-overflow report."""
    script = textwrap.dedent(
        """
        import torch, mokernels
        from mokernels import emu
        x = torch.randn(5, 7)
        print(emu.ops()._planted_oob_read(x))
        """
    )
    env = dict(os.environ, LD_PRELOAD=mokernels.emu.sanitizer_preload(), ASAN_OPTIONS="detect_leaks=0", MOKERNELS_EMU_ASAN="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0, proc.stdout
    assert "heap-buffer-overflow" in proc.stderr, proc.stderr[-3000:]
    assert "row_sum_one_past" in proc.stderr  # the report points into the kernel
