"""The benchmarks run on the host backend with small sizes, so they cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):  # type: ignore[no-untyped-def]
    """Import bench/NAME.py by path (the repo root is not on sys.path, so that the
    installed pygpukit, with its compiled bridge, is the one under test)."""
    spec = importlib.util.spec_from_file_location(f"bench.{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench_completion = _load("bench_completion")


def test_completion_benchmark_runs_on_host(tmp_path: Path) -> None:
    out = tmp_path / "completion.json"
    result = bench_completion.main(
        [
            "--backend",
            "host",
            "--n",
            "40",
            "--warmup",
            "4",
            "--loops",
            "asyncio",
            "--json",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["loops"].keys() == result["loops"].keys() == {"asyncio"}
    methods = saved["loops"]["asyncio"]
    assert set(methods) == {
        "pygpukit",
        "bridge-only",
        "pygpukit-py",
        "hostfn+cst",
        "to_thread",
        "poll",
    }
    idle = saved["idle_cpu"]["asyncio"]
    assert idle["pygpukit"] < 0.5 < idle["poll"]  # the bridge sleeps; polling burns a core
    for stats in methods.values():
        assert stats["n"] == 40
        assert 0 < stats["p50_us"] <= stats["p99_us"]


def test_isolation_benchmark_runs_on_host(tmp_path: Path) -> None:
    iso = _load("bench_isolation")
    r = iso.main(
        [
            "--backend",
            "host",
            "--samples",
            "8",
            "--block-us",
            "100",
            "--waves",
            "5",
            "--gap-ms",
            "1",
            "--json",
            str(tmp_path / "iso.json"),
        ]
    )
    assert set(r["latency"]) == {"alone", "alone/inline", "flood/pygpukit", "flood/equal"}
    assert all(v["n"] == 8 and v["p50_us"] > 0 for v in r["latency"].values())
    assert r["flood_kernels_per_s"]["solo"] > 0


def test_eviction_benchmark_runs_on_host(tmp_path: Path) -> None:
    ev = _load("bench_eviction")
    r = ev.main(["--backend", "host", "--gib", "0.03125", "--cycles", "2"])
    assert len(r["cycles"]) == 2 and all(c["checksum_ok"] for c in r["cycles"])
    assert r["evict_gbps"] > 0 and r["raw_h2d_gbps"] > 0
