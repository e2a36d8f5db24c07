"""scripts/sass_report.py: parsers, budgets and occupancy on captured cuobjdump output (no GPU, no
cuobjdump needed). The snippets below are cut from `cuobjdump --dump-resource-usage` / `-sass` of
this project's _C (nvcc 13.0)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sass_report", ROOT / "scripts" / "sass_report.py")
sr = importlib.util.module_from_spec(_spec)
sys.modules["sass_report"] = sr  # dataclasses look their module up
_spec.loader.exec_module(sr)

RESOURCE = """
Fatbin ptx code:
================
arch = sm_80
code version = [9,0]
identifier = /work/main/csrc/rank_one.cu
ptxasOptions =  --generate-line-info

Fatbin elf code:
================
arch = sm_80
code version = [1,8]
identifier = /work/main/csrc/rank_one.cu

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN2mk8rank_one17column_sum_kernelI13__nv_bfloat16EEvPKNS_5AccOfIT_E4typeEPS4_ll:
  REG:24 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:384 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN2mk6router16route_fwd_kernelI13__nv_bfloat16Li32ELi32ENS0_12MemoryLogitsIS2_EEEEvT2_PiPT_S6_S8_liiNS_5AccOfIS7_E4typeESB_ii:
  REG:255 STACK:40 SHARED:0 LOCAL:0 CONSTANT[0]:416 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90a
code version = [1,8]
identifier = /work/main/csrc/rank_one.cu

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN2mk8rank_one17column_sum_kernelI13__nv_bfloat16EEvPKNS_5AccOfIT_E4typeEPS4_ll:
  REG:28 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
	code for sm_80
	.target	sm_80

		Function : _ZN2mk8rank_one17column_sum_kernelI13__nv_bfloat16EEvPKNS_5AccOfIT_E4typeEPS4_ll
	.headerflags	@"EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;               /* 0x00000a00ff017624 */
                                                                                         /* 0x000fe400078e00ff */
        /*0100*/                   LDG.E.128.CONSTANT R4, [R2.64] ;                      /* 0x0000000402047981 */
        /*0110*/                   LDG.E.128 R8, [R2.64+0x10] ;                          /* 0x0000000402087981 */
        /*0120*/                   LDG.E.64 R12, [R6.64] ;                               /* 0x00000004060c7981 */
        /*0130*/                   LDG.E R14, [R6.64+0x8] ;                              /* 0x00000004060e7981 */
        /*0140*/                   LDG.E.U16.CONSTANT R15, [R6.64+0xc] ;                 /* 0x00000004060f7981 */
        /*0150*/                   LDS R16, [R0] ;                                       /* 0x0000000000107984 */
        /*0160*/                   EXIT ;                                                /* 0x000000000000794d */
	code for sm_90a
	.target	sm_90a

		Function : _ZN2mk8rank_one17column_sum_kernelI13__nv_bfloat16EEvPKNS_5AccOfIT_E4typeEPS4_ll
        /*0100*/              @!P0 LDG.E.U8 R4, desc[UR4][R2.64] ;                       /* 0x0000000402047981 */
"""

COL = "_ZN2mk8rank_one17column_sum_kernelI13__nv_bfloat16EEvPKNS_5AccOfIT_E4typeEPS4_ll"


def test_parse_resource_usage_skips_ptx_and_reads_every_arch():
    ks = sr.parse_resource_usage(RESOURCE)
    assert set(ks) == {("sm_80", COL), ("sm_80", next(m for a, m in ks if "route" in m)), ("sm_90a", COL)}
    k = ks[("sm_80", COL)]
    assert (k.regs, k.spill, k.shared) == (24, 0, 0)
    r = next(v for (a, m), v in ks.items() if "route" in m)
    assert (r.regs, r.stack, r.spill) == (255, 40, 40)
    assert ks[("sm_90a", COL)].shared == 1024


def test_parse_sass_loads_by_width():
    ld = sr.parse_sass_loads(SASS.splitlines())
    assert ld[("sm_80", COL)] == {128: 2, 64: 1, 32: 1, 16: 1}  # LDS is shared memory: not counted
    assert ld[("sm_90a", COL)] == {8: 1}


def test_strip_params_keeps_template_arguments():
    assert sr.strip_params("void mk::a::k<float, 4, mk::a::M<float> >(mk::a::M<float>, int*, (anonymous)::x)") \
        == "void mk::a::k<float, 4, mk::a::M<float> >"


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt (binutils) not installed")
def test_demangle_drops_return_type_and_parameters():
    assert sr.demangle([COL]) == {COL: "mk::rank_one::column_sum_kernel<__nv_bfloat16>"}


def test_budget_line_format():
    b = sr.parse_budget_line("  // sass-budget: mk::router::route_fwd_topk<*> block=128 regs<=64 spill=0 hot", "f:1")
    assert (b.pattern, b.block, b.regs, b.spill, b.hot, b.smem) == ("mk::router::route_fwd_topk<*>", 128, 64, 0, True, 0)
    assert b.matches("mk::router::route_fwd_topk<float, 8>")
    assert not b.matches("mk::router::route_fwd_keep<float>")
    half = sr.parse_budget_line("// sass-budget: mk::r::k<__half,*> block=128 regs<=64 hot", "f:4")
    assert half.matches("mk::r::k<__half, 8, 2>") and not half.matches("mk::r::k<float, __half, 8, 2>")
    plain = sr.parse_budget_line("// sass-budget: mk::x::k block=256 smem=4096", "f:2")
    assert plain.matches("mk::x::k<float>") and plain.matches("mk::x::k") and not plain.matches("mk::x::k2<float>")
    assert plain.smem == 4096 and plain.regs is None and not plain.hot
    assert sr.parse_budget_line("int x;  // no budget here") is None
    with pytest.raises(ValueError, match="regs<64"):
        sr.parse_budget_line("// sass-budget: k regs<64", "f:3")


def test_occupancy_a100_h100():
    a100, h100 = sr.limits_for("sm_80"), sr.limits_for("sm_90a")
    assert (a100.gpu, h100.gpu) == ("A100", "H100")
    # registers: 32/thread -> 64 warps (full); 64 -> 32 warps; 255 -> 8 warps (12.5 %, the figure)
    assert sr.occupancy(32, 0, 128, a100) == (16, 1.0)
    assert sr.occupancy(64, 0, 128, a100) == (8, 0.5)
    assert sr.occupancy(255, 0, 128, h100) == (2, 0.125)
    # 32-thread blocks: the 32-blocks/SM limit caps occupancy at 50 %
    assert sr.occupancy(16, 0, 32, a100) == (32, 0.5)
    # shared memory: 48 KB + 1 KB reserved per block -> 3 blocks on A100's 164 KB, 4 on H100's 228 KB
    assert sr.occupancy(32, 48 * 1024, 256, a100)[0] == 3
    assert sr.occupancy(32, 49 * 1024, 256, h100)[0] == 4


def _kernel(name, regs, stack=0, arch="sm_80"):
    return sr.Kernel(arch, name, name=name, regs=regs, stack=stack)


def test_evaluate_hot_violations_fail_cold_ones_warn_and_unused_budgets_fail():
    budgets = [sr.parse_budget_line("// sass-budget: mk::hot<*> block=128 regs<=64 spill=0 hot", "a:1"),
               sr.parse_budget_line("// sass-budget: mk::cold block=256 regs<=32", "a:2"),
               sr.parse_budget_line("// sass-budget: mk::gone block=256", "a:3")]
    ks = [_kernel("mk::hot<float>", 64), _kernel("mk::hot<double>", 72), _kernel("mk::hot<__half>", 40, stack=16),
          _kernel("mk::cold<float>", 40), _kernel("mk::unbudgeted<float>", 10)]
    rows, unused = sr.evaluate(ks, budgets)
    by = {r.k.name: r for r in rows}
    assert not by["mk::hot<float>"].errors and by["mk::hot<float>"].occ == 0.5
    assert "72 registers > budget 64" in by["mk::hot<double>"].errors[0]
    assert "16 spill bytes > budget 0" in by["mk::hot<__half>"].errors[0]
    assert not by["mk::cold<float>"].errors and "40 registers > budget 32" in by["mk::cold<float>"].warnings[0]
    assert by["mk::unbudgeted<float>"].occ is None and not by["mk::unbudgeted<float>"].errors
    assert len(unused) == 1 and "mk::gone" in unused[0]


def test_repository_budgets_parse():
    """Every sass-budget line in csrc/ is well formed and names a block size (occupancy needs it)."""
    budgets = sr.load_budgets()
    assert budgets, "no sass-budget lines in csrc/"
    assert all(b.block for b in budgets), [b.where for b in budgets if not b.block]
    assert any(b.hot for b in budgets)


def _have_cuda_build():
    try:
        from mokernels import _build_config as c
    except ImportError:
        return False
    return bool(c.WITH_CUDA) and any(ROOT.joinpath("mokernels").glob("_C*.so"))


@pytest.mark.skipif(not _have_cuda_build(), reason="extension built without CUDA kernels: no cubins to read")
def test_report_on_the_built_extension():
    """The real binary: every hot budget holds (what CI's `sass_report.py --check` enforces)."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_report.py"), "--check", "--no-loads"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "hot" in res.stdout
