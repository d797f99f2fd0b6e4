"""The benchmarks run on the host backend with small sizes, so they cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

from bench import bench_completion


def test_completion_benchmark_runs_on_host(tmp_path: Path) -> None:
    out = tmp_path / "completion.json"
    result = bench_completion.main(
        ["--backend", "host", "--n", "40", "--warmup", "4", "--loops", "asyncio", "--json", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["loops"].keys() == result["loops"].keys() == {"asyncio"}
    methods = saved["loops"]["asyncio"]
    assert set(methods) == {"pygpukit", "pygpukit-py", "hostfn+cst", "to_thread", "poll"}
    for stats in methods.values():
        assert stats["n"] == 40
        assert 0 < stats["p50_us"] <= stats["p99_us"]
