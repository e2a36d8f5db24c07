#!/usr/bin/env python3
"""SASS resource report: the GPU-free performance check (issue 8, ARCHITECTURE.md "Performance
without a GPU").

For every kernel in the built extension (mokernels/_C*.so) and every cubin arch (sm_80, sm_90a) it
prints registers, spill bytes (STACK + LOCAL), static shared memory, the theoretical occupancy on an
A100 (sm_80 cubins) or H100 (sm_90 cubins) at the kernel's launch block size, and the number of
global loads by width (128-bit LDG.E.128 vs narrower LDG.E.64 / LDG.E / .U16 / .U8), read from
`cuobjdump --dump-resource-usage` and `cuobjdump -sass` (cuobjdump: scripts/find_cuobjdump.sh).

Budgets live next to each kernel, in its .cuh/.cu under csrc/, one comment line per kernel family:

    // sass-budget: <pattern> block=<threads> [smem=<dynamic bytes>] [regs<=<n>] [spill=<bytes>] [hot]

* <pattern>: an fnmatch glob matched against the demangled kernel name without its parameter list
  and without spaces, e.g. ``mk::router::route_fwd_topk<__half,*>``; a pattern without ``<`` matches
  every template instance of that name (``mk::rank_one::column_sum_kernel``). Every budget that
  matches a kernel applies.
* block: threads per block the launcher uses (for occupancy); smem: dynamic shared memory per
  block at launch (default 0), added to the static shared memory.
* regs<=n / spill=b: register budget and the most spill bytes (STACK + LOCAL) allowed.
* hot: a violated regs/spill budget is an error (else a warning).

``--check`` exits 1 when a hot kernel exceeds its register budget or spills more than allowed, or
when a budget matches no kernel in the binary (a renamed kernel must not silently lose its budget).
Kernels without any budget are listed (occupancy unknown) and warned about, not failed.

Usage: python scripts/sass_report.py [--so PATH] [--check] [--arch sm_80 sm_90a] [--filter GLOB]
       [--json OUT] [--no-loads]    (also: python -m benchmarks --sass)
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Per-SM limits for the theoretical occupancy (CUDA occupancy calculator data).
@dataclasses.dataclass(frozen=True)
class SmLimits:
    gpu: str
    regs: int = 65536           # 32-bit registers per SM
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256   # registers are allocated per warp in units of 256
    smem: int = 0               # shared memory per SM usable by blocks (bytes)
    smem_per_block_reserved: int = 1024  # sm_80+: 1 KB per block reserved by the system
    smem_alloc_unit: int = 128
    threads: int = 2048
    blocks: int = 32


SM_LIMITS = {
    "sm_80": SmLimits(gpu="A100", smem=164 * 1024),
    # sm_90 cubins already count the 1 KB per-block system reservation in their SHARED figure
    "sm_90": SmLimits(gpu="H100", smem=228 * 1024, smem_per_block_reserved=0),
}


def limits_for(arch: str) -> SmLimits:
    m = re.match(r"sm_(\d+)", arch)
    return SM_LIMITS["sm_90"] if m and int(m.group(1)) >= 90 else SM_LIMITS["sm_80"]


def occupancy(regs: int, smem_bytes: int, block: int, lim: SmLimits) -> tuple[int, float]:
    """(resident blocks per SM, occupancy = resident warps / max warps) for one kernel."""
    if block <= 0:
        return 0, 0.0
    warps = -(-block // 32)
    max_warps = lim.threads // 32
    by_threads = max_warps // warps
    per_warp = -(-max(regs, 1) * 32 // lim.reg_alloc_unit) * lim.reg_alloc_unit
    by_regs = (lim.regs // per_warp) // warps
    if smem_bytes > 0:
        per_block = -(-(smem_bytes + lim.smem_per_block_reserved) // lim.smem_alloc_unit) * lim.smem_alloc_unit
        by_smem = lim.smem // per_block
    else:
        by_smem = lim.blocks
    blocks = max(0, min(by_threads, by_regs, by_smem, lim.blocks))
    return blocks, blocks * warps / max_warps


# ------------------------------------------------------------------------------------------------
# cuobjdump output parsers


@dataclasses.dataclass
class Kernel:
    arch: str
    mangled: str
    name: str = ""        # demangled, without the parameter list
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0       # static shared memory (bytes)
    loads: dict = dataclasses.field(default_factory=dict)  # width bits -> count of LDG

    @property
    def spill(self) -> int:
        return self.stack + self.local


_ARCH = re.compile(r"^\s*arch = (sm_\w+)")
_FUNC = re.compile(r"^\s*Function (\S+):\s*$")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_resource_usage(text: str) -> dict[tuple[str, str], Kernel]:
    """`cuobjdump --dump-resource-usage` -> {(arch, mangled name): Kernel}; PTX entries are skipped
    (they have no resource usage)."""
    out: dict[tuple[str, str], Kernel] = {}
    arch, func = None, None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _FUNC.match(line):
            func = m.group(1)
        elif func and (m := _RES.search(line)):
            regs, stack, shared, local = map(int, m.groups())
            out[(arch, func)] = Kernel(arch, func, regs=regs, stack=stack, shared=shared, local=local)
            func = None
    return out


_SASS_CODE = re.compile(r"^\s*code for (sm_\w+)")
_SASS_FUNC = re.compile(r"^\s*Function : (\S+)")
_LDG = re.compile(r"\bLDG\.([A-Z0-9_.]+)")


def ldg_width(mods: str) -> int:
    """Bits moved by one LDG from its modifiers (E.128 -> 128, E.64 -> 64, E.U16 -> 16, E -> 32)."""
    parts = mods.split(".")
    for p, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if p in parts:
            return bits
    return 32


def parse_sass_loads(lines) -> dict[tuple[str, str], dict[int, int]]:
    """`cuobjdump -sass` (an iterable of lines) -> {(arch, mangled name): {bits: number of LDG}}."""
    out: dict[tuple[str, str], dict[int, int]] = {}
    arch, cur = None, None
    for line in lines:
        if "LDG" in line:
            if cur is not None and (m := _LDG.search(line)):
                bits = ldg_width(m.group(1))
                cur[bits] = cur.get(bits, 0) + 1
        elif "code for" in line and (m := _SASS_CODE.match(line)):
            arch = m.group(1)
        elif "Function :" in line and (m := _SASS_FUNC.match(line)):
            cur = out.setdefault((arch, m.group(1)), {})
    return out


def strip_params(demangled: str) -> str:
    """'ns::k<int, 4>(float const*, int)' -> 'ns::k<int, 4>' (the parameter list is the last
    top-level parenthesised group)."""
    depth = 0
    for i in range(len(demangled) - 1, -1, -1):
        c = demangled[i]
        if c == ")":
            depth += 1
        elif c == "(":
            depth -= 1
            if depth == 0:
                return demangled[:i].strip()
    return demangled.strip()


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    res = subprocess.run([filt], input="\n".join(names) + "\n", capture_output=True, text=True, check=True)
    return {n: strip_params(d).removeprefix("void ") for n, d in zip(names, res.stdout.splitlines())}


# ------------------------------------------------------------------------------------------------
# budgets


@dataclasses.dataclass
class Budget:
    pattern: str
    where: str            # file:line
    block: int | None = None
    smem: int = 0
    regs: int | None = None
    spill: int | None = None
    hot: bool = False

    def matches(self, name: str) -> bool:
        name = name.replace(" ", "")  # patterns have no spaces: 'k<__half,*>' matches 'k<__half, 4>'
        if "<" not in self.pattern and "*" not in self.pattern and "?" not in self.pattern:
            return name == self.pattern or name.startswith(self.pattern + "<")
        return fnmatch.fnmatchcase(name, self.pattern)


_BUDGET = re.compile(r"//\s*sass-budget:\s*(\S+)(.*)$")


def parse_budget_line(line: str, where: str = "?") -> Budget | None:
    m = _BUDGET.search(line)
    if not m:
        return None
    b = Budget(pattern=m.group(1), where=where)
    for tok in m.group(2).split():
        if tok == "hot":
            b.hot = True
        elif mm := re.fullmatch(r"block=(\d+)", tok):
            b.block = int(mm.group(1))
        elif mm := re.fullmatch(r"smem=(\d+)", tok):
            b.smem = int(mm.group(1))
        elif mm := re.fullmatch(r"regs<=(\d+)", tok):
            b.regs = int(mm.group(1))
        elif mm := re.fullmatch(r"spill(?:<)?=(\d+)", tok):
            b.spill = int(mm.group(1))
        else:
            raise ValueError(f"{where}: bad sass-budget token {tok!r} (see scripts/sass_report.py)")
    return b


def load_budgets(src: Path = ROOT / "csrc") -> list[Budget]:
    out = []
    for path in sorted(list(src.rglob("*.cuh")) + list(src.rglob("*.cu")) + list(src.rglob("*.h"))):
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if "sass-budget:" in line:
                b = parse_budget_line(line, f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{i}")
                if b:
                    out.append(b)
    return out


@dataclasses.dataclass
class Row:
    k: Kernel
    budgets: list
    block: int | None
    blocks_per_sm: int
    occ: float | None
    errors: list
    warnings: list


def evaluate(kernels: list[Kernel], budgets: list[Budget]) -> tuple[list[Row], list[str]]:
    """Applies the budgets; returns the rows and the global errors (budgets that match nothing)."""
    rows = []
    used = set()
    for k in kernels:
        bs = [b for b in budgets if b.matches(k.name)]
        used.update(id(b) for b in bs)
        block = next((b.block for b in bs if b.block), None)
        smem = next((b.smem for b in bs if b.smem), 0)
        errs, warns = [], []
        for b in bs:
            bad = []
            if b.regs is not None and k.regs > b.regs:
                bad.append(f"{k.regs} registers > budget {b.regs}")
            if b.spill is not None and k.spill > b.spill:
                bad.append(f"{k.spill} spill bytes > budget {b.spill}")
            (errs if b.hot else warns).extend(f"{x} ({b.where})" for x in bad)
        if not bs:
            warns.append("no sass-budget line")
        if block:
            nb, occ = occupancy(k.regs, k.shared + smem, block, limits_for(k.arch))
        else:
            nb, occ = 0, None
        rows.append(Row(k, bs, block, nb, occ, errs, warns))
    unused = [f"{b.where}: sass-budget '{b.pattern}' names no kernel in the binary" for b in budgets if id(b) not in used]
    return rows, unused


# ------------------------------------------------------------------------------------------------
# driver

_SHORT = [("mk::", ""), ("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("float", "fp32"), ("double", "fp64"),
          ("(anonymous namespace)::", "")]


def short(name: str) -> str:
    for a, b in _SHORT:
        name = name.replace(a, b)
    return name


def find_cuobjdump() -> str:
    res = subprocess.run(["bash", str(ROOT / "scripts" / "find_cuobjdump.sh")], capture_output=True, text=True)
    path = res.stdout.strip()
    if res.returncode != 0 or not path or not Path(path).exists():
        raise SystemExit(f"sass_report: no cuobjdump found ({res.stderr.strip()})")
    return path


def find_so() -> Path:
    sos = sorted((ROOT / "mokernels").glob("_C*.so"))
    if not sos:
        raise SystemExit("sass_report: no mokernels/_C*.so (build the extension first)")
    return sos[0]


def collect(so: Path, archs: list[str], loads: bool = True) -> list[Kernel]:
    co = find_cuobjdump()
    res = subprocess.run([co, "--dump-resource-usage", str(so)], capture_output=True, text=True, check=True)
    kernels = parse_resource_usage(res.stdout)
    if not kernels:
        raise SystemExit(f"sass_report: {so} holds no cubins (a build without CUDA kernels?)")
    if loads:
        proc = subprocess.Popen([co, "-sass", str(so)], stdout=subprocess.PIPE, text=True, bufsize=1 << 20)
        ld = parse_sass_loads(proc.stdout)
        proc.wait()
        for key, cnt in ld.items():
            if key in kernels:
                kernels[key].loads = cnt
    names = demangle(sorted({m for _, m in kernels}))
    out = []
    for (arch, m), k in sorted(kernels.items()):
        if archs and not any(arch == a or arch.startswith(a) for a in archs):
            continue
        k.name = names.get(m, m)
        out.append(k)
    return out


def table(rows: list[Row], loads: bool = True) -> str:
    hdr = ["arch", "kernel", "regs", "spill", "smem", "block", "occ", "ldg128", "ldg64", "ldg32", "ldg<32", "budget"]
    body = []
    for r in rows:
        k = r.k
        ld = k.loads
        status = "FAIL" if r.errors else ("warn" if r.warnings and r.budgets else ("-" if not r.budgets else "ok"))
        if r.budgets and any(b.hot for b in r.budgets) and not r.errors:
            status = "ok hot"
        body.append([
            k.arch, short(k.name), str(k.regs), str(k.spill), str(k.shared), str(r.block or "?"),
            f"{r.occ * 100:.0f}%" if r.occ is not None else "?",
            *([str(ld.get(128, 0)), str(ld.get(64, 0)), str(ld.get(32, 0)), str(ld.get(16, 0) + ld.get(8, 0))]
              if loads else ["-"] * 4), status,
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(hdr)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(hdr), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", type=Path, default=None, help="extension to read (default: mokernels/_C*.so)")
    ap.add_argument("--check", action="store_true", help="exit 1 on a violated hot budget or an unused budget")
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90a"], help="cubin arches to report")
    ap.add_argument("--filter", default=None, help="only kernels whose demangled name matches this glob")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--no-loads", action="store_true", help="skip the SASS load count (cuobjdump -sass: ~20 s)")
    args = ap.parse_args(argv)
    so = args.so or find_so()
    kernels = collect(so, args.arch, loads=not args.no_loads)
    budgets = load_budgets()
    rows, unused = evaluate(kernels, budgets)
    shown = [r for r in rows if not args.filter or fnmatch.fnmatchcase(r.k.name, args.filter)]
    print(f"SASS resource report for {so.name} ({', '.join(args.arch)}; occupancy: sm_80 on A100, sm_90 on H100; "
          "spill = STACK + LOCAL bytes; smem = static bytes; ldg<32 = 16/8-bit loads)")
    print(table(shown, loads=not args.no_loads))
    errors = [f"{r.k.arch} {short(r.k.name)}: {e}" for r in rows for e in r.errors] + unused
    nobudget = sorted({short(r.k.name) for r in rows if not r.budgets})
    for r in rows:
        for w in r.warnings:
            if w != "no sass-budget line":
                print(f"warning: {r.k.arch} {short(r.k.name)}: {w}")
    if nobudget:
        print(f"warning: {len(nobudget)} kernel instance(s) without a sass-budget line (occupancy unknown), e.g. "
              f"{nobudget[0]}")
    if args.json:
        args.json.write_text(json.dumps([
            {"arch": r.k.arch, "kernel": r.k.name, "regs": r.k.regs, "spill": r.k.spill, "smem": r.k.shared,
             "block": r.block, "occupancy": r.occ, "blocks_per_sm": r.blocks_per_sm,
             "ldg": {str(b): c for b, c in sorted(r.k.loads.items())}, "errors": r.errors,
             "hot": any(b.hot for b in r.budgets)} for r in rows], indent=1))
    hot = [r for r in rows if any(b.hot for b in r.budgets)]
    print(f"{len(rows)} kernels, {len(hot)} hot, {len(budgets)} budgets, {len(errors)} error(s)")
    for e in errors:
        print(f"error: {e}")
    return 1 if (args.check and errors) else 0


if __name__ == "__main__":
    sys.exit(main())
