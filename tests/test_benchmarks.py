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
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks._harness import hbm_peak_gbps
    finally:
        sys.path.remove(str(ROOT))
    assert hbm_peak_gbps("NVIDIA H100 80GB HBM3") == 3350.0  # SXM
    assert hbm_peak_gbps("NVIDIA H100 PCIe") == 2000.0
    assert hbm_peak_gbps("NVIDIA H200") == 4800.0
    assert hbm_peak_gbps("NVIDIA A100-SXM4-80GB") == 2000.0
    assert hbm_peak_gbps("NVIDIA A100-SXM4-40GB") == 1555.0
    assert hbm_peak_gbps("NVIDIA GeForce RTX 4090") is None
    assert hbm_peak_gbps("NVIDIA H100 NVL") is None  # not in the table: no % rather than a wrong one
