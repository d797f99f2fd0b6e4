"""The benchmark suite runs on the host backend with small sizes, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pygpukit.benchmarks import NAMES, run_suite
from pygpukit.benchmarks._common import GcPauses


def test_every_benchmark_runs_and_reports_against_its_baseline() -> None:
    result = run_suite(backend="host", quick=True)
    assert set(result["results"]) == set(NAMES)
    rows = result["summary"]
    assert {r["benchmark"] for r in rows} == set(NAMES)
    assert all(r["met"] is None for r in rows)  # targets are judged on CUDA only
    completion = result["results"]["completion"]["loops"]["asyncio"]
    assert set(completion) == {
        "pygpukit",
        "bridge-only",
        "pygpukit-py",
        "hostfn+cst",
        "to_thread",
        "poll",
    }
    assert all(0 < m["p50_us"] <= m["p99_us"] for m in completion.values())
    idle = result["results"]["completion"]["idle_cpu"]["asyncio"]
    assert idle["pygpukit"] < 0.5 < idle["poll"]  # the bridge sleeps; polling burns a core
    assert all(c["checksum_ok"] for c in result["results"]["eviction"]["cycles"])
    assert set(result["results"]["isolation"]["latency"]) == {
        "alone",
        "alone/inline",
        "flood/pygpukit",
        "flood/equal",
    }
    assert set(result["results"]["isolation"]["gc"]) == {"alone", "alone/inline", "flood/pygpukit"}


def test_gc_pauses_are_counted_where_they_overlap() -> None:
    import gc
    import time

    with GcPauses() as pauses:
        t0 = time.perf_counter()
        gc.collect()
        t1 = time.perf_counter()
    gc.collect()  # after the with: not counted
    assert len(pauses.spans) == 1
    a, b = pauses.spans[0]
    assert t0 <= a <= b <= t1
    assert pauses.hits([(t0, t1), (t1 + 1, t1 + 2)]) == 1
    assert pauses.summary([(t0, t1)])["samples_hit"] == 1


def test_cli_bench_only_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pygpukit.cli",
            "bench",
            "--backend",
            "host",
            "--quick",
            "--only",
            "submit,stages",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"submit", "stages"}
    assert "| submit |" in proc.stdout and "| stages |" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pygpukit.cli", "bench", "--only", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown benchmark" in bad.stderr
