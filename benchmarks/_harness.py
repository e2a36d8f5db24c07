"""Measurement and reporting for `python -m benchmarks`.

Timing
  * CUDA (:func:`time_cuda_events`, the default on a GPU): a few warm-up calls, then more until
    ~25 ms have passed; then each timed call individually between two CUDA events, with a 256 MiB
    buffer written *before* the start event (not timed) so every call starts with a cold L2.
    Median over the reps; min / p20 / p80 go to the JSON.
  * CPU (:func:`time_cpu_interleaved`): no L2 flush, at a fixed torch thread count (``--threads``,
    default 1: the dev machines and CI are shared 2-core boxes), timed by the thread's CPU time
    (``time.thread_time``, user + system; wall time with more than one thread); the impls of a
    workload interleaved round by round (load from elsewhere hits them alike), each sample >= 2 ms of
    back-to-back calls; median of the rounds.
    CPU numbers describe the reference / emulated paths only -- never GPU performance -- and every
    report says so.

Derived columns: GB/s = ``bytes_moved`` / median time (the bytes an ideal fused kernel must move,
the same for every impl of a workload, i.e. *effective* bandwidth); TFLOP/s from ``flops``; % of the
GPU's HBM peak (known devices only, see :data:`HBM_PEAK_GBPS`); ``× vs <peer>`` = peer median /
ours median (> 1: ours is faster). ``H100 roof µs`` = ``bytes_moved`` / 3.0 TB/s (the measured H100
HBM bandwidth, :data:`ROOFLINE_GBPS`): the paper lower bound of a workload on an H100, shown on every
device; ``× roof`` = ours / that bound (GPU runs only); ``H100 target`` = the issue's target for the
workload (``params["target"]``), to read the GPU table against.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import pkgutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

# --------------------------------------------------------------------------------------------------
# Plugin interface


@dataclass
class Workload:
    """One benchmarked problem. ``impls`` maps a label to a zero-argument callable that runs the
    whole operation once (inputs captured by the closure); ``ours`` is the label of the mokernels
    implementation, every other label is a peer. ``bytes_moved`` / ``flops`` are per call (ideal,
    the same for all impls) and enable the GB/s / TFLOP/s columns; ``params`` (shape, dtype, ...)
    are copied into the JSON.

    An impl whose label contains ``(logic only)`` (e.g. the emulated kernel on CPU) is timed and
    shown but is not a performance peer: it gets no ``× vs`` ratio."""

    family: str
    name: str
    impls: dict[str, Callable[[], object]]
    ours: str
    bytes_moved: int | None = None
    flops: int | None = None
    params: dict = field(default_factory=dict)


@dataclass
class Measurement:
    family: str
    workload: str
    impl: str
    is_ours: bool
    device: str
    median_us: float | None
    min_us: float | None = None
    p20_us: float | None = None
    p80_us: float | None = None
    reps: int = 0
    method: str = ""
    bytes_moved: int | None = None
    flops: int | None = None
    gbps: float | None = None
    tflops: float | None = None
    pct_hbm_peak: float | None = None
    roofline_us: float | None = None  # bytes_moved at 3.0 TB/s (H100), whatever the device
    speedup_vs: dict[str, float] = field(default_factory=dict)  # ours row only: peer / ours
    params: dict = field(default_factory=dict)
    error: str | None = None


NOT_A_PEER_MARKER = "(logic only)"

ROOFLINE_GBPS = 3000.0  # H100 SXM HBM3, measured (ARCHITECTURE.md "Performance without a GPU")


def roofline_us(bytes_moved: int | None) -> float | None:
    """The bytes-moved lower bound on an H100 in µs."""
    return None if not bytes_moved else bytes_moved / (ROOFLINE_GBPS * 1e3)


def is_peer(label: str) -> bool:
    return NOT_A_PEER_MARKER not in label


# --------------------------------------------------------------------------------------------------
# Devices

# HBM peak bandwidth in GB/s (1e9 B/s), by device name. Matched in order on the upper-cased
# torch.cuda.get_device_name(); an unknown GPU gets no "% of peak".
HBM_PEAK_GBPS: list[tuple[tuple[str, ...], str, float]] = [
    (("H200",), "H200", 4800.0),
    (("H100", "PCIE"), "H100 PCIe", 2000.0),
    (("H100", "HBM3"), "H100 SXM", 3350.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (("H100", "SXM"), "H100 SXM", 3350.0),
    (("A100", "80GB"), "A100 80GB", 2000.0),
    (("A100", "40GB"), "A100 40GB", 1555.0),
]


def hbm_peak_gbps(device_name: str) -> float | None:
    up = device_name.upper()
    for needles, _label, gbps in HBM_PEAK_GBPS:
        if all(n in up for n in needles):
            return gbps
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


CPU_WARNING = "CPU: reference / emulated paths — NOT GPU performance"


def device_title(device: torch.device) -> str:
    name = device_name(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        peak = hbm_peak_gbps(name)
        peak_s = f", HBM peak {peak / 1000:.3g} TB/s" if peak else ", HBM peak unknown"
        return f"{name} (sm_{cap[0]}{cap[1]}, CUDA {torch.version.cuda}{peak_s})"
    return f"{name} — {CPU_WARNING}"


# --------------------------------------------------------------------------------------------------
# Timing

L2_FLUSH_BYTES = 256 << 20
_flush_buffers: dict[tuple[str, int | None], torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    key = (device.type, device.index)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _flush_buffers[key]


def time_cuda_events(
    fn: Callable[[], object],
    *,
    reps: int = 100,
    warmup_calls: int = 3,
    warmup_ms: float = 25.0,
    flush_l2: bool = True,
    device: torch.device | None = None,
) -> list[float]:
    """Per-call GPU times in µs of ``fn()``: CUDA events around each call only, after writing a
    256 MiB buffer (untimed) so the call starts with a cold L2."""
    device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):
        flush = _flush_buffer(device) if flush_l2 else None
        for _ in range(warmup_calls):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while (time.perf_counter() - t0) * 1e3 < warmup_ms:
            fn()
            torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def time_cpu(
    fn: Callable[[], object], *, reps: int = 10, warmup_calls: int = 1, budget_s: float = 2.0
) -> list[float]:
    """Per-call wall times in µs of ``fn()`` on CPU (``time.perf_counter``; no L2 flush). Stops
    early (after at least 3 reps) once ``budget_s`` is spent, so slow paths like the emulator keep
    a quick run quick. One impl alone; :func:`time_cpu_interleaved` compares impls."""
    return time_cpu_interleaved({"fn": fn}, reps=reps, warmup_calls=warmup_calls, budget_s=budget_s)["fn"]


CPU_SAMPLE_S = 2e-3  # a CPU sample runs a call often enough to last >= this (timer and scheduler noise)


def time_cpu_interleaved(
    fns: dict[str, Callable[[], object]], *, reps: int = 10, warmup_calls: int = 2, budget_s: float = 2.0,
    sample_s: float = CPU_SAMPLE_S, clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Per-call wall times in µs of each ``fns[label]()`` on CPU, the impls *interleaved*: each round
    times every impl once (in a rotated order), so a burst of load from elsewhere on the machine hits
    all impls of a workload alike instead of one of them. A sample is the mean over enough back-to-back
    calls to last >= ``sample_s`` (a 3 µs call is timed as ~700 calls, not one). Stops early (after at
    least 3 rounds) once ``budget_s`` is spent per impl on average. ``clock``: ``time.perf_counter``
    (wall time) or ``time.thread_time`` (this thread's CPU time, user + system: with one intra-op
    thread, the call's own work, unaffected by other processes taking the core away)."""
    labels = list(fns)
    inner: dict[str, int] = {}
    for label in labels:  # warm-up, and the calls per sample from the last warm-up call
        fn = fns[label]
        dt = 0.0
        for _ in range(max(1, warmup_calls)):
            t0 = clock()
            fn()
            dt = clock() - t0
        inner[label] = max(1, min(10_000, int(sample_s / max(dt, 1e-7))))
    times: dict[str, list[float]] = {label: [] for label in labels}
    t_start = time.perf_counter()
    for rnd in range(reps):
        k = rnd % len(labels)
        for label in labels[k:] + labels[:k]:
            fn, n = fns[label], inner[label]
            t0 = clock()
            for _ in range(n):
                fn()
            times[label].append((clock() - t0) / n * 1e6)
        if rnd >= 2 and time.perf_counter() - t_start > budget_s * len(labels):
            break
    return times


def cpu_clock(threads: int) -> Callable[[], float]:
    """The clock of the CPU rows: with one intra-op thread the calling thread's CPU time (a shared box's
    load from other processes does not inflate it; the work is all on this thread), else wall time."""
    return time.thread_time if threads == 1 else time.perf_counter


class cpu_threads:
    """``with cpu_threads(n):`` torch's intra-op thread count fixed at ``n`` for the block (restored
    after): CPU rows compare impls at one known thread count, not whatever the machine's load left."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)
        return False


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of an ascending list."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------------------
# Running


@dataclass
class RunConfig:
    device: torch.device
    quick: bool = False
    reps: int | None = None  # None: 100 on CUDA (30 quick), 10 on CPU (5 quick)
    flush_l2: bool = True
    threads: int | None = None  # CPU: torch intra-op threads while timing (None: $MOKERNELS_BENCH_THREADS or 1)

    def cpu_threads(self) -> int:
        if self.threads is not None:
            return max(1, self.threads)
        return max(1, int(os.environ.get("MOKERNELS_BENCH_THREADS", "1")))

    def n_reps(self) -> int:
        if self.reps is not None:
            return self.reps
        if self.device.type == "cuda":
            return 30 if self.quick else 100
        return 11 if self.quick else 21  # CPU: interleaved rounds, median (cheap: each sample >= 2 ms)


def measure_workload(w: Workload, cfg: RunConfig) -> list[Measurement]:
    """Times every impl of ``w``; an impl that raises gives a Measurement with ``error`` set."""
    dev = device_name(cfg.device)
    peak = hbm_peak_gbps(dev) if cfg.device.type == "cuda" else None
    out: list[Measurement] = []
    if w.ours not in w.impls:
        return [Measurement(w.family, w.name, w.ours, True, dev, None, params=dict(w.params),
                            error=f"workload's ours={w.ours!r} is not one of its impls {list(w.impls)}")]
    cpu_times: dict[str, list[float]] = {}
    cpu_error: Exception | None = None
    if cfg.device.type != "cuda":  # every impl of the workload interleaved, at a fixed thread count
        try:
            with cpu_threads(cfg.cpu_threads()):
                cpu_times = time_cpu_interleaved(w.impls, reps=cfg.n_reps(), clock=cpu_clock(cfg.cpu_threads()))
        except Exception as exc:  # noqa: BLE001 - then each impl alone, to tell which one raises
            cpu_error = exc
    for label, fn in w.impls.items():
        m = Measurement(w.family, w.name, label, label == w.ours, dev, None,
                        bytes_moved=w.bytes_moved, flops=w.flops, params=dict(w.params),
                        roofline_us=roofline_us(w.bytes_moved))
        try:
            if cfg.device.type == "cuda":
                times = time_cuda_events(fn, reps=cfg.n_reps(), flush_l2=cfg.flush_l2, device=cfg.device)
                m.method = "cuda-events" + (", L2 flushed" if cfg.flush_l2 else "")
            else:
                if cpu_error is None:
                    times = cpu_times[label]
                else:
                    with cpu_threads(cfg.cpu_threads()):
                        times = time_cpu(fn, reps=cfg.n_reps())
                m.method = f"{cpu_clock(cfg.cpu_threads()).__name__} (CPU, {cfg.cpu_threads()} thread(s), impls interleaved)"
        except Exception as exc:  # noqa: BLE001 - reported per impl, the run goes on
            m.error = f"{type(exc).__name__}: {exc}".strip()
            traceback.print_exc()
            out.append(m)
            continue
        ts = sorted(times)
        m.reps = len(ts)
        m.median_us = _percentile(ts, 50)
        m.min_us, m.p20_us, m.p80_us = ts[0], _percentile(ts, 20), _percentile(ts, 80)
        if m.median_us > 0:
            secs = m.median_us * 1e-6
            if w.bytes_moved:
                m.gbps = w.bytes_moved / secs / 1e9
                if peak:
                    m.pct_hbm_peak = 100.0 * m.gbps / peak
            if w.flops:
                m.tflops = w.flops / secs / 1e12
        out.append(m)
    ours = next(m for m in out if m.is_ours)
    if ours.median_us:
        for m in out:
            if not m.is_ours and m.median_us and is_peer(m.impl):
                ours.speedup_vs[m.impl] = m.median_us / ours.median_us
    return out


def discover(only: list[str] | None = None) -> dict[str, object]:
    """``{family: module}`` for every ``benchmarks/bench_<family>.py`` (only the ``only`` families
    if given; an unknown name raises ValueError listing the known ones)."""
    pkg_dir = Path(__file__).resolve().parent
    names = sorted(i.name for i in pkgutil.iter_modules([str(pkg_dir)]) if i.name.startswith("bench_"))
    families = [n[len("bench_"):] for n in names]
    if only:
        unknown = [f for f in only if f not in families]
        if unknown:
            raise ValueError(f"unknown benchmark family {unknown}; known: {families}")
        families = [f for f in families if f in only]
    pkg = __name__.rsplit(".", 1)[0]
    return {f: importlib.import_module(f"{pkg}.bench_{f}") for f in families}


# --------------------------------------------------------------------------------------------------
# Reporting


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _fmt_us(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.1f}" if v < 1e5 else f"{v:,.0f}"


def family_table(family: str, ms: list[Measurement], device: torch.device, n_reps: int):
    """A rich Table: one row per workload × impl."""
    from rich.table import Table

    on_gpu = device.type == "cuda"
    show_gbps = any(m.bytes_moved for m in ms)
    show_tflops = any(m.flops for m in ms)
    show_pct = on_gpu and any(m.pct_hbm_peak is not None for m in ms)
    show_roof = any(m.roofline_us for m in ms)
    show_target = any(m.params.get("target") for m in ms)
    peers: list[str] = []
    for m in ms:
        if not m.is_ours and is_peer(m.impl) and m.impl not in peers:
            peers.append(m.impl)
    title = f"[bold]{family}[/] on {device_title(device)}"
    if not on_gpu:
        title = f"[bold]{family}[/] on {device_name(device)}\n[bold white on red] {CPU_WARNING} [/]"
    how = ("CUDA events, L2 flushed before each call" if on_gpu else
           "CPU time of the thread at 1 thread (else wall time), no L2 flush, impls interleaved per round")
    unit = "calls" if on_gpu else "rounds"
    caption = (f"µs: median of ≤{n_reps} {unit} ({how}). GB/s: ideal bytes / time. "
               "× vs X = X's time / ours' time (> 1: ours faster).")
    t = Table(title=title, caption=caption, show_lines=False)
    t.add_column("workload", style="cyan", no_wrap=True)
    t.add_column("impl", no_wrap=True)
    t.add_column("µs", justify="right")
    if show_gbps:
        t.add_column("GB/s", justify="right")
    if show_tflops:
        t.add_column("TFLOP/s", justify="right")
    if show_pct:
        t.add_column("% HBM peak", justify="right")
    if show_roof:
        t.add_column("H100 roof µs", justify="right")
        if on_gpu:
            t.add_column("× roof", justify="right")
    if show_target:
        t.add_column("H100 target")
    for p in peers:
        t.add_column(f"× vs {p}", justify="right")
    last = None
    for m in ms:
        if last is not None and m.workload != last:
            t.add_section()
        first = m.workload != last
        last = m.workload
        impl = f"[bold green]{m.impl} (ours)[/]" if m.is_ours else m.impl
        if m.error:
            row = [m.workload if first else "", impl, f"[red]error: {m.error[:60]}[/]"]
        else:
            row = [m.workload if first else "", impl, _fmt_us(m.median_us)]
        if show_gbps:
            row.append(_fmt(m.gbps, ",.1f"))
        if show_tflops:
            row.append(_fmt(m.tflops, ".3f"))
        if show_pct:
            row.append(_fmt(m.pct_hbm_peak, ".1f"))
        if show_roof:
            row.append(_fmt(m.roofline_us, ",.1f") if first else "")
            if on_gpu:
                ratio = m.median_us / m.roofline_us if (m.is_ours and m.median_us and m.roofline_us) else None
                row.append(_fmt(ratio, ".2f") if ratio is not None else "")
        if show_target:
            row.append(str(m.params.get("target", "")) if first else "")
        for p in peers:
            r = m.speedup_vs.get(p) if m.is_ours else None
            if r is None:
                row.append("")
            else:
                color = "green" if r >= 1.0 else "red"
                row.append(f"[{color}]{r:.2f}×[/]")
        t.add_row(*row)
    return t


def family_plot(family: str, ms: list[Measurement], device: torch.device, path: Path) -> Path:
    """Grouped bars (µs, log y) per workload per impl, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads: list[str] = []
    impls: list[str] = []
    ours_labels: set[str] = set()
    for m in ms:
        if m.workload not in workloads:
            workloads.append(m.workload)
        if m.impl not in impls:
            impls.append(m.impl)
        if m.is_ours:
            ours_labels.add(m.impl)
    by_key = {(m.workload, m.impl): m for m in ms}
    n_w, n_i = len(workloads), max(1, len(impls))
    width = 0.8 / n_i
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * n_w * max(1, n_i / 2) + 2.5), 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, wname in enumerate(workloads):
            m = by_key.get((wname, impl))
            if m is not None and m.median_us:
                xs.append(i + (j - (n_i - 1) / 2) * width)
                ys.append(m.median_us)
        label = f"{impl} (ours)" if impl in ours_labels else impl
        bars = ax.bar(xs, ys, width=width * 0.95, label=label, color=colors[j % len(colors)],
                      edgecolor="black" if impl in ours_labels else None, linewidth=0.8)
        for b, y in zip(bars, ys):
            txt = f"{y:.0f}" if y >= 100 else f"{y:.3g}"
            ax.annotate(txt, (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom",
                        fontsize=7, rotation=90 if n_i > 3 else 0, xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_ylabel("µs per call (median, log scale) — lower is better")
    ax.set_xticks(range(n_w))
    ax.set_xticklabels(workloads, rotation=25 if n_w > 2 else 0, ha="right" if n_w > 2 else "center", fontsize=8)
    ax.margins(y=0.15)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    title = f"{family} — {device_name(device)}"
    if device.type != "cuda":
        title += f"\n{CPU_WARNING}"
    ax.set_title(title, fontsize=10, color="black" if device.type == "cuda" else "darkred")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def environment(device: torch.device) -> dict:
    """Facts recorded at the top of bench_results.json."""
    info: dict = {
        "device": device_name(device),
        "device_type": device.type,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["capability"] = list(torch.cuda.get_device_capability(device))
        info["hbm_peak_gbps"] = hbm_peak_gbps(info["device"])
    else:
        info["note"] = CPU_WARNING
    try:
        import mokernels

        info["mokernels_build_info"] = mokernels.build_info()
    except Exception as exc:  # noqa: BLE001 - a results file is still useful without it
        info["mokernels_build_info"] = {"error": f"{type(exc).__name__}: {exc}"}
    return info


def write_json(path: Path, env: dict, config: dict, ms: list[Measurement], errors: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**env, "config": config, "measurements": [asdict(m) for m in ms], "errors": errors}
    path.write_text(json.dumps(doc, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
