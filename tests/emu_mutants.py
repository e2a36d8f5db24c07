"""The planted-bug catalogue (issue 7) and its runner; tests/test_emu_mutants.py drives it.

Each mutant is a kernel with one bug class (csrc/emu/mutants.h, bug > 0) or a real kernel with one
MK_MUTABLE point switched off (mokernels_emu::_set_mutation). Each has a correct twin (bug = 0 / no
mutation) that every pass must find clean. A pass runs a case in a child process:
  plain-rev / plain-fwd  mokernels._emu, fibers starting in reverse order / in forward order with
                         the grid's blocks reversed (CI's passes 1 and 2)
  asan                   mokernels._emu_asan (ASan + UBSan, forward order)
  tsan                   mokernels._emu_tsan, strict (warp collectives give no ordering)
and a case is *caught* by it when the emulator raises (misuse), the result differs from the
reference, or the sanitizer reports (the child dies with its report). Cases run in one child per pass;
after a sanitizer kills the child, the runner starts another one at the next case.

Run as a script (from the repository root): python tests/emu_mutants.py PASS CASE... prints one JSON
line per case it finishes ("case", "outcome": ok | wrong | error: <message>).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PASSES = ("plain-rev", "plain-fwd", "asan", "tsan")


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # the planted bug, for the README table
    needs: str | None = None  # an issue7-shim feature without which no pass can see it


# name -> (description, issue7-shim feature it needs or None)
MUTANTS = [
    Mutant("part_warp_shuffle", "warp_reduce called by lanes 0-15 only"),
    Mutant("exited_lane_shuffle", "lane 5 returns before a full-warp shuffle"),
    Mutant("shuffle_48_threads", "full-warp shuffle in a 48-thread block"),
    Mutant("oob_global", "reads one past the end of a global buffer"),
    Mutant("oob_dynamic_smem", "reads one past the end of dynamic shared memory"),
    Mutant("oob_static_smem", "reads one past the end of a static __shared__ array"),
    Mutant("missing_barrier", "no __syncthreads between a shared-memory write and a neighbour's read"),
    Mutant("gemm2w_raw", "2-warp ldmatrix+mma GEMM without its read-after-write barrier"),
    Mutant("gemm2w_war", "2-warp ldmatrix+mma GEMM without its overwrite (write-after-read) barrier"),
    Mutant("gemm2w_both", "2-warp ldmatrix+mma GEMM without both barriers"),
    Mutant("cross_warp_after_reduce", "cross-warp shared-memory read with only a warp_reduce in between"),
    Mutant("global_add_race", "non-atomic `out[0] += x` by every thread (global memory)"),
    Mutant("shared_add_race", "non-atomic `acc += x` by every thread (shared memory)"),
    Mutant("conflicting_stores", "two blocks store to the same global words"),
    Mutant("static_smem_uninitialised", "static __shared__ array read before written (first launch)",
           needs="poisoned static shared memory"),
    Mutant("barrier_call_sites", "the warps meet at two different __syncthreads call sites", needs="barrier identity"),
    Mutant("int32_overflow", "signed int32 overflow in index arithmetic (wraps to the right value)",
           needs="-fno-wrapv in the ASan build"),
    Mutant("cp_async_missing_wait", "cp.async pipeline without its wait_group", needs="cp.async"),
    Mutant("cp_async_wrong_wait_count", "cp.async pipeline with wait_group<1> where <0> is needed", needs="cp.async"),
    Mutant("cp_async_missing_commit", "cp.async pipeline without its commit_group", needs="cp.async"),
    Mutant("rank_one.bwd.barrier", "real rank_one backward without its block_sync"),
    Mutant("rank_one.fwd.guard", "real rank_one forward without its column bounds guard"),
    Mutant("router.max_init", "real router backward: row max starts at 0 instead of -inf (wrong neutral value)"),
    Mutant("router.warp_band", "real keep-many router: top-p cut from the fp64 prefix scan without the fp32 rounding band"),
    Mutant("tile_gemm.raw_barrier", "real tile GEMM without its read-after-write block_sync"),
    Mutant("tile_gemm.war_barrier", "real tile GEMM without its overwrite block_sync"),
    Mutant("householder.red_barrier", "real Householder apply: per-warp partial dots summed without a block_sync"),
    Mutant("householder.t_barrier", "real Householder apply: rank-L update reads t = K s without a block_sync"),
    Mutant("householder.stage", "real Householder apply: x tile not staged (later reflection groups read stale smem)"),
    Mutant("householder.dy_stage_barrier", "real Householder dU reduction: staged α/β rows read without a block_sync"),
    Mutant("householder.dy_reuse_barrier", "real Householder dU reduction: α/β rows overwritten without a block_sync"),
]
BY_NAME = {m.name: m for m in MUTANTS}


def shim_features() -> dict[str, bool]:
    """Which issue7-shim features this checkout has (the mutants needing a missing one are skipped)."""
    platform = (ROOT / "csrc/kernels/common/platform.cuh").read_text()
    setup = (ROOT / "setup.py").read_text()
    shim = (ROOT / "csrc/emu/shim.cpp").read_text()
    return {
        "poisoned static shared memory": "MK_SHARED_ARRAY" in platform,
        "barrier identity": "source_location" in platform + shim,
        "-fno-wrapv in the ASan build": "-fno-wrapv" in setup,
        "cp.async": (ROOT / "csrc/kernels/common/async.cuh").exists(),
    }


# ---- the cases (run inside the child process) ----

def _cases() -> dict[str, Callable]:
    """case name -> fn(ops, bug: bool) -> (got, want, tolerance); `want` from an independent reference."""
    import math

    import torch

    from mokernels.ops import rank_one_scale_backward_reference, rank_one_scale_reference
    from mokernels.ops import router as R

    def warp_sums(x):
        return x.view(-1, 32).sum(1, keepdim=True).expand(-1, 32).reshape(-1)

    def planted(name, x, want, tol=1e-5, code=1):
        return lambda ops, bug: (ops._mutant(name, code if bug else 0, x), want, tol)

    g = torch.Generator().manual_seed(7)
    x64 = torch.randn(64, generator=g)
    x32 = torch.randn(32, generator=g)
    lane = torch.arange(64)
    cases = {
        "part_warp_shuffle": planted("part_warp_shuffle", x64, warp_sums(x64)),
        "exited_lane_shuffle": planted("exited_lane_shuffle", x64, warp_sums(x64)),
        "shuffle_48_threads": planted("shuffle_48_threads", x64, warp_sums(x64)),
        "oob_global": planted("oob_global", x32, x32 + x32.roll(-1)),
        "oob_dynamic_smem": planted("oob_dynamic_smem", x32, x32 + x32.roll(-1)),
        "oob_static_smem": planted("oob_static_smem", x32, x32 + x32.roll(-1)),
        "missing_barrier": planted("missing_barrier", x64, x64.roll(1) + x64.roll(-1)),
        "cross_warp_after_reduce": planted("cross_warp_after_reduce", x64, x64[lane ^ 32] + warp_sums(x64)),
        "global_add_race": planted("global_add_race", x64, torch.cat([x64.sum().view(1), torch.zeros(63)])),
        "shared_add_race": planted("shared_add_race", x64, torch.cat([x64.sum().view(1), torch.zeros(63)])),
        "conflicting_stores": planted("conflicting_stores", x32, x32 + 1),
        "static_smem_uninitialised": planted("static_smem_uninitialised", x64, x64),
        "barrier_call_sites": planted("barrier_call_sites", x64, x64[lane ^ 32]),
        "int32_overflow": planted(
            "int32_overflow", x64, x64[((lane + 1) * 1640531527 % 2**32) % 64]),
    }
    # cp.async: selftest.h's 4-stage pipeline (mode 0 correct; 1 no wait, 2 wait_group<1> at the last
    # stage, 3 no commit); out = x with each 256-float stage rotated by 4
    xp = torch.randn(4 * 256, generator=g)
    for name, mode in (("cp_async_missing_wait", 1), ("cp_async_wrong_wait_count", 2), ("cp_async_missing_commit", 3)):
        cases[name] = (lambda mode: lambda ops, bug: (
            ops._selftest(f"cp_async_ca16_{mode if bug else 0}", xp), xp.view(-1, 256).roll(-4, dims=1).flatten(), 0.0
        ))(mode)
    ab = torch.randn(32, 48, generator=g).to(torch.bfloat16)
    gemm_want = ab[:16].double() @ ab[16:].double().T
    for name, code in (("gemm2w_raw", 1), ("gemm2w_war", 2), ("gemm2w_both", 3)):
        cases[name] = planted("gemm2w", ab.float(), gemm_want, tol=1e-4 * 48, code=code)

    def real(mutation, fn):
        def run(ops, bug):
            ops._set_mutation(mutation if bug else "")
            try:
                return fn(ops)
            finally:
                ops._set_mutation("")
        return run

    z, s, gg = torch.randn(130, 64, generator=g), torch.randn(64, generator=g), torch.randn(130, 64, generator=g)
    grad = torch.randn(130, 64, generator=g)
    cases["rank_one.bwd.barrier"] = real("rank_one.bwd.barrier", lambda ops: (
        torch.cat([t.reshape(-1) for t in ops.rank_one_scale_backward(grad, z, s, gg)]),
        torch.cat([t.reshape(-1) for t in rank_one_scale_backward_reference(grad, z, s, gg)]), 1e-4))
    z3, s3, g3 = torch.randn(7, 3, generator=g), torch.randn(3, generator=g), torch.randn(7, 3, generator=g)
    cases["rank_one.fwd.guard"] = real("rank_one.fwd.guard", lambda ops: (
        ops.rank_one_scale(z3, s3, g3), rank_one_scale_reference(z3, s3, g3), 1e-6))
    logits = torch.randn(5, 8, generator=g) - 200.0  # exp(z - 0) underflows: a wrong max start shows
    ids = R.route_fwd_reference(logits, 1.0, 1.0, 3, "sum", False)[0]  # the forward kernel has no such scalar
    bargs = (torch.randn(5, 3, generator=g), None, logits, ids, 1.0, "sum")
    cases["router.max_init"] = real("router.max_init", lambda ops: (
        ops.route_bwd(*bargs), R.route_bwd_reference(*bargs), 1e-5))
    tail = torch.full((1, 40), math.log(5e-8))  # 1 then e = 5e-8: each sequential fp32 add rounds back to 1,
    tail[0, 0] = 0.0                            # the exact prefix crosses fl(top_p·S) > 1 ~20 terms in
    cases["router.warp_band"] = real("router.warp_band", lambda ops: (
        ops.route_fwd(tail, 1.0, 0.9999995, 40, "none", False)[2],
        R.route_fwd_reference(tail, 1.0, 0.9999995, 40, "none", False)[2], 0.0))
    a, b = torch.randn(32, 48, generator=g).bfloat16(), torch.randn(16, 48, generator=g).bfloat16()
    for name in ("tile_gemm.raw_barrier", "tile_gemm.war_barrier"):
        cases[name] = real(name, lambda ops: (ops._tile_gemm(a, b, False), a.double() @ b.double().T, 1e-4 * 48))
    # Householder apply, bf16 D = 64 (16-byte vectors of 8: 4 reflections per dot-product group), L = 5 (two groups:
    # the second reads the staged x tile), N = 8 (one tile; small: the prologue's Gram kernel runs L blocks)
    from mokernels.ops.householder import householder_apply_reference

    xh, Uh = torch.randn(8, 64, generator=g).bfloat16(), torch.randn(5, 64, generator=g).bfloat16()
    want_h = householder_apply_reference(xh, Uh)  # fp32 math, one bf16 rounding, as the kernel
    for name in ("householder.red_barrier", "householder.t_barrier", "householder.stage"):
        cases[name] = real(name, lambda ops: (ops.householder_apply(xh, Uh, False, 1e-12, False)[0], want_h, 2e-2))
    # the dU reduction, fp32, L = 9, N = 70, D = 5: one row split, three 32-row staging steps
    al, be = torch.randn(70, 9, generator=g), torch.randn(70, 9, generator=g)
    gz, xz = torch.randn(70, 5, generator=g), torch.randn(70, 5, generator=g)
    want_z = al.double().T @ gz.double() + be.double().T @ xz.double()
    for name in ("householder.dy_stage_barrier", "householder.dy_reuse_barrier"):
        cases[name] = real(name, lambda ops: (ops.householder_grad_y(al, be, gz, xz), want_z, 1e-4))
    return cases


def _run_case(ops, fn, bug: bool) -> str:
    import torch

    try:
        got, want, tol = fn(ops, bug)
    except RuntimeError as e:  # the emulator reports misuse as RuntimeError
        return "error: " + str(e).splitlines()[0][:200]
    got, want = got.double(), want.double()
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol):
        return "wrong"
    return "ok"


def child_main(argv: list[str]) -> None:
    from mokernels import emu

    ops = emu.ops()
    cases = _cases()
    for case in argv:  # "name" (the mutant) or "name:clean" (its correct twin)
        name, _, variant = case.partition(":")
        print(json.dumps({"case": case, "begin": True}), flush=True)
        outcome = _run_case(ops, cases[name], bug=variant != "clean")
        print(json.dumps({"case": case, "outcome": outcome}), flush=True)


# ---- the runner (parent side) ----

def pass_env(pass_name: str) -> tuple[dict[str, str], list[str]]:
    """Environment and command prefix of a pass."""
    sys.path.insert(0, str(ROOT))
    from mokernels import emu

    env = dict(os.environ, PYTHONPATH=str(ROOT), HYPOTHESIS_PROFILE="ci")
    for k in ("MOKERNELS_EMU_ASAN", "MOKERNELS_EMU_TSAN", "MOKERNELS_EMU_TSAN_STRICT", "LD_PRELOAD",
              "MOKERNELS_EMU_SCHEDULE", "MOKERNELS_EMU_BLOCK_ORDER", "MOKERNELS_EMU_MUTATION"):
        env.pop(k, None)
    prefix: list[str] = []
    if pass_name == "plain-fwd":  # as CI's pass 2
        env.update(MOKERNELS_EMU_SCHEDULE="forward", MOKERNELS_EMU_BLOCK_ORDER="reverse")
    elif pass_name == "asan":
        env.update(LD_PRELOAD=emu.sanitizer_preload(), ASAN_OPTIONS="detect_leaks=0", MOKERNELS_EMU_ASAN="1",
                   MOKERNELS_EMU_SCHEDULE="forward")
    elif pass_name == "tsan":
        env.update(emu.tsan_env(strict=True))
        prefix = ["setarch", "-R"]
    return env, prefix


SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "WARNING: ThreadSanitizer")


def run_pass(pass_name: str, cases: list[str], timeout: float = 600) -> dict[str, str]:
    """case -> outcome under `pass_name`; a case during which the child died with a sanitizer report
    is "sanitizer: <first report line>", one during which it died otherwise is "crash: ..."."""
    env, prefix = pass_env(pass_name)
    results: dict[str, str] = {}
    todo = list(cases)
    while todo:
        proc = subprocess.run([*prefix, sys.executable, str(Path(__file__)), *todo], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        current = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if rec.get("begin"):
                current = rec["case"]
            else:
                results[rec["case"]] = rec["outcome"]
                current = None
        if current is None:
            if proc.returncode != 0:
                raise RuntimeError(f"{pass_name}: the child failed outside a case (rc {proc.returncode}):\n"
                                   + proc.stderr[-3000:])
            break
        report = next((ln.strip() for ln in proc.stderr.splitlines() if any(m in ln for m in SANITIZER_MARKS)), None)
        results[current] = f"sanitizer: {report}" if report else f"crash: rc {proc.returncode}: {proc.stderr[-300:]}"
        todo = todo[todo.index(current) + 1:]
    return results


def caught(outcome: str) -> bool:
    return outcome != "ok"


def markdown_table(results: dict[str, dict[str, str]], features: dict[str, bool]) -> str:
    """Mutant x pass -> caught (how) / silent, as a Markdown table (the README's)."""
    def cell(o: str | None) -> str:
        if o is None:
            return "n/a"
        if o == "ok":
            return "silent"
        kind = o.split(":")[0]
        if kind == "sanitizer":
            return "**" + ("TSan race" if "ThreadSanitizer" in o else "UBSan" if "runtime error" in o else "ASan") + "**"
        return "**wrong result**" if kind == "wrong" else "**error**" if kind == "error" else "**crash**"

    lines = ["| planted bug | " + " | ".join(PASSES) + " |", "|---|" + "---|" * len(PASSES)]
    for m in MUTANTS:
        if m.needs and not features.get(m.needs):
            lines.append(f"| `{m.name}`: {m.bug} | " + " | ".join(["needs " + m.needs] * len(PASSES)) + " |")
            continue
        lines.append(f"| `{m.name}`: {m.bug} | " + " | ".join(cell(results[p].get(m.name)) for p in PASSES) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    child_main(sys.argv[1:])
