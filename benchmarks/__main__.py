"""`python -m benchmarks [--quick] [--out DIR] [--only FAMILY ...]` -- see benchmarks/__init__.py.
`python -m benchmarks --sass [--check ...]`: the SASS resource report (scripts/sass_report.py).

Exit status: 0 when every workload of every selected family ran, 1 when any family's workloads()
or any impl raised (the others still run and are reported), 2 on bad arguments."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few reps (smoke run; < 1 min on CPU)")
    p.add_argument("--out", default="results", type=Path, help="output folder for bench_results.json and PNGs")
    p.add_argument("--only", nargs="+", metavar="FAMILY", default=None,
                   help="run only these families (bench_<FAMILY>.py); comma-separated also accepted")
    p.add_argument("--device", default=None, help="'cuda', 'cuda:1' or 'cpu' (default: cuda if available)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per impl (default 100 CUDA / 21 CPU rounds; quick 30 / 11)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch intra-op threads while timing (default $MOKERNELS_BENCH_THREADS or 1)")
    p.add_argument("--no-l2-flush", action="store_true", help="CUDA: do not flush L2 before each timed call")
    p.add_argument("--list", action="store_true", help="list the benchmark families and exit")
    p.add_argument("--sass", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
                   help="print the SASS resource report of the built _C instead (scripts/sass_report.py; "
                        "the remaining arguments go to it, e.g. --sass --check)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.sass is not None:  # the GPU-free performance check: registers, spills, occupancy, load widths
        import importlib.util

        path = Path(__file__).resolve().parent.parent / "scripts" / "sass_report.py"
        spec = importlib.util.spec_from_file_location("sass_report", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["sass_report"] = mod
        spec.loader.exec_module(mod)
        return mod.main(args.sass)
    import torch
    from rich.console import Console

    from . import _harness as h

    console = Console(width=None if sys.stdout.isatty() else 180)
    only = [f for item in args.only for f in item.split(",") if f] if args.only else None
    try:
        modules = h.discover(None if args.list else only)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    if args.list:
        for fam in modules:
            console.print(fam)
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = h.RunConfig(device=device, quick=args.quick, reps=args.reps, flush_l2=not args.no_l2_flush,
                      threads=args.threads)
    if device.type != "cuda":
        console.print(f"[bold white on red] {h.CPU_WARNING} [/] (no GPU: timings of the CPU reference and "
                      "the emulated kernel show that the paths run, not how fast the kernels are)")

    all_ms: list[h.Measurement] = []
    errors: list[dict] = []
    pngs: list[Path] = []
    t_run = time.perf_counter()
    for family, module in modules.items():
        t_fam = time.perf_counter()
        try:
            workloads = list(module.workloads(device, args.quick))
        except Exception as exc:  # noqa: BLE001 - one broken family must not hide the others
            import traceback

            traceback.print_exc()
            errors.append({"family": family, "error": f"workloads() raised {type(exc).__name__}: {exc}"})
            console.print(f"[red]{family}: workloads() raised {type(exc).__name__}: {exc}[/]")
            continue
        fam_ms: list[h.Measurement] = []
        for i in range(len(workloads)):
            w, workloads[i] = workloads[i], None  # drop each workload's tensors once measured
            with console.status(f"{family}: {w.name}"):
                ms = h.measure_workload(w, cfg)
            del w
            fam_ms.extend(ms)
            errors.extend({"family": family, "workload": m.workload, "impl": m.impl, "error": m.error}
                          for m in ms if m.error)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        all_ms.extend(fam_ms)
        if not fam_ms:
            console.print(f"[yellow]{family}: no workloads for {device}[/]")
            continue
        console.print(h.family_table(family, fam_ms, device, cfg.n_reps()))
        pngs.append(h.family_plot(family, fam_ms, device, args.out / f"bench_{family}.png"))
        console.print(f"[dim]{family}: {len(fam_ms)} measurements in {time.perf_counter() - t_fam:.1f} s[/]")

    config = {"quick": args.quick, "reps": cfg.n_reps(), "l2_flush": device.type == "cuda" and cfg.flush_l2,
              "cpu_threads": None if device.type == "cuda" else cfg.cpu_threads(),
              "families": list(modules), "argv": sys.argv[1:] if argv is None else argv}
    js = h.write_json(args.out / "bench_results.json", h.environment(device), config, all_ms, errors)
    console.print(f"wrote {js}" + "".join(f", {p}" for p in pngs)
                  + f" ({time.perf_counter() - t_run:.1f} s)")
    if errors:
        console.print(f"[red]{len(errors)} error(s); see 'errors' in {js}[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
