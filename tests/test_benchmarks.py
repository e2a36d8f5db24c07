"""The benchmark runner end to end: `python -m benchmarks --quick --only rank_one` must print its
table and write a JSON with one positive median per (workload, impl) plus the family's PNG."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_rank_one_run_writes_json_and_png(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "rank_one", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "rank_one" in proc.stdout

    doc = json.loads((tmp_path / "bench_results.json").read_text())
    assert doc["torch_version"] and doc["device"] and doc["date"]
    assert doc["errors"] == []
    ms = [m for m in doc["measurements"] if m["family"] == "rank_one"]
    assert ms, "no rank_one measurements"

    import torch

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import bench_rank_one
    finally:
        sys.path.remove(str(ROOT))
    device = torch.device(doc["device_type"])
    expected = {(w.name, impl) for w in bench_rank_one.workloads(device, quick=True) for impl in w.impls}
    got = [(m["workload"], m["impl"]) for m in ms]
    assert len(got) == len(set(got)), f"duplicate (workload, impl) rows: {got}"
    assert set(got) == expected
    for m in ms:
        assert m["error"] is None, m
        assert m["median_us"] > 0 and m["min_us"] <= m["p20_us"] <= m["median_us"] <= m["p80_us"], m
        assert m["reps"] >= 3, m
        if m["bytes_moved"]:
            assert m["gbps"] > 0, m
    ours = [m for m in ms if m["is_ours"]]
    assert ours and all(m["speedup_vs"] for m in ours), "every ours row needs a ratio to a peer"
    if doc["device_type"] == "cpu":
        assert "NOT GPU performance" in proc.stdout

    png = tmp_path / "bench_rank_one.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hbm_peak_table_matches_device_names():
    hbm_peak_gbps = _harness().hbm_peak_gbps
    assert hbm_peak_gbps("NVIDIA H100 80GB HBM3") == 3350.0  # SXM
    assert hbm_peak_gbps("NVIDIA H100 PCIe") == 2000.0
    assert hbm_peak_gbps("NVIDIA H200") == 4800.0
    assert hbm_peak_gbps("NVIDIA A100-SXM4-80GB") == 2000.0
    assert hbm_peak_gbps("NVIDIA A100-SXM4-40GB") == 1555.0
    assert hbm_peak_gbps("NVIDIA GeForce RTX 4090") is None
    assert hbm_peak_gbps("NVIDIA H100 NVL") is None  # not in the table: no % rather than a wrong one


def _harness():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import _harness
    finally:
        sys.path.remove(str(ROOT))
    return _harness


def test_cuda_event_timer_flushes_l2_before_each_call_and_times_only_the_call(monkeypatch):
    """The GPU timing path, checked without a GPU: fake events/flush buffer record the call order."""
    import contextlib

    import torch

    h = _harness()
    log: list = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            log.append("record")
            self.at = len(log)

        def elapsed_time(self, end):  # ms
            return float(end.at - self.at)

    class FakeFlush:
        def zero_(self):
            log.append("flush")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(h, "_flush_buffer", lambda d: FakeFlush())
    times = h.time_cuda_events(lambda: log.append("fn"), reps=4, warmup_calls=2, warmup_ms=0.0,
                               device=torch.device("cuda", 0))
    assert log[:2] == ["fn", "fn"]  # warm-up, untimed
    assert log[2:] == ["flush", "record", "fn", "record"] * 4  # flush outside the events
    assert times == [2000.0] * 4  # µs


def test_gpu_report_columns(monkeypatch, tmp_path):
    """GB/s, % of HBM peak and × vs peer on a (pretend) H100 SXM; the table renders them."""
    import torch
    from rich.console import Console

    h = _harness()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(h, "time_cuda_events", lambda fn, **k: [float(fn())] * 5)
    w = h.Workload(family="fake", name="w0", impls={"ours": lambda: 10.0, "peer": lambda: 25.0}, ours="ours",
                   bytes_moved=33_500_000, flops=2_000_000, params={"T": 1})
    dev = torch.device("cuda", 0)
    ms = h.measure_workload(w, h.RunConfig(device=dev))
    ours, peer = ms
    assert ours.is_ours and not peer.is_ours
    assert abs(ours.gbps - 3350.0) < 1e-6 and abs(ours.pct_hbm_peak - 100.0) < 1e-6  # 33.5 MB in 10 µs
    assert abs(ours.tflops - 0.2) < 1e-9
    assert ours.speedup_vs == {"peer": 2.5} and peer.speedup_vs == {}
    console = Console(record=True, width=200)
    console.print(h.family_table("fake", ms, dev, 100))
    text = console.export_text()
    assert "H100" in text and "% HBM peak" in text and "× vs peer" in text and "2.50×" in text
    assert "NOT GPU performance" not in text
    assert h.family_plot("fake", ms, dev, tmp_path / "fake.png").stat().st_size > 0


def test_lora_quick_workloads_run_and_agree():
    """Every impl of the quick lora workloads runs on CPU; ours and the per-token gather+bmm peer
    compute the same layer output on the decode workloads, the emulated kernel matches ours, and the
    qkv-slices row's one sliced call matches its three per-slice calls."""
    import torch

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import bench_lora
    finally:
        sys.path.remove(str(ROOT))
    for w in bench_lora.workloads(torch.device("cpu"), quick=True):
        outs = {label: fn() for label, fn in w.impls.items()}
        assert set(outs) >= {bench_lora.OURS, bench_lora.BASE}
        ours = outs[bench_lora.OURS]
        tol = 2e-2 if isinstance(ours, torch.Tensor) and ours.dtype == torch.bfloat16 else 1e-4  # emulated prefill row
        for peer in (bench_lora.GATHER, bench_lora.EMU, bench_lora.PER_SLICE):
            if peer in outs:
                torch.testing.assert_close(outs[peer], outs[bench_lora.OURS], rtol=tol, atol=tol)


def test_methods_quick_workloads_run_and_agree(one_thread):
    """Every impl of the quick methods workloads runs on CPU; ours and the plain-torch composition of
    each method give the same output (fwd) and the same gradients (fwd+bwd)."""
    import torch

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import bench_methods
    finally:
        sys.path.remove(str(ROOT))
    ws = bench_methods.workloads(torch.device("cpu"), quick=True)
    assert {w.params["method"] for w in ws} == set(bench_methods.METHODS)
    for w in ws:
        outs = {label: fn() for label, fn in w.impls.items()}
        assert set(outs) == {bench_methods.OURS, bench_methods.BASE, bench_methods.TORCH}
        ours, peer = outs[bench_methods.OURS], outs[bench_methods.TORCH]
        if isinstance(ours, torch.Tensor):
            ours, peer = (ours,), (peer,)
        assert len(ours) == len(peer) >= 1
        for a, b in zip(ours, peer):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
