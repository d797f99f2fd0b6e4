"""``pygpukit demo`` — the README's main job — finishes quickly on the host backend."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


def test_demo_runs_under_a_minute_and_writes_its_timeline(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pygpukit.cli", "demo", "--backend", "host"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 60, f"the demo took {elapsed:.1f} s"
    out = proc.stdout
    for service, tier in (
        ("interactive", "GUARANTEED"),
        ("standard", "BURSTABLE"),
        ("batch", "BEST_EFFORT"),
    ):
        for role in ("llm", "tts"):
            row = next(line for line in out.splitlines() if line.startswith(f"{service}-{role} "))
            assert tier in row
        assert f"{service:<12} requests" in out
    assert "16/16 requests" in proc.stderr  # the progress bar reached the end
    trace = json.loads((tmp_path / "pygpukit-demo-trace.json").read_text())
    events = trace["traceEvents"]
    rows = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert set(rows.values()) == {
        f"{s}-{r} ({tier})"
        for s, tier in (
            ("interactive", "GUARANTEED"),
            ("standard", "BURSTABLE"),
            ("batch", "BEST_EFFORT"),
        )
        for r in ("llm", "tts")
    }
    slices = [e for e in events if e["ph"] == "X"]
    assert {e["tid"] for e in slices} == set(rows)
    assert all(e["dur"] >= 0 and e["args"]["context"] == rows[e["tid"]].split()[0] for e in slices)
    assert trace["otherData"]["pygpukit"]["tasks"] == len(slices)


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="torch and transformers are not installed",
)
def test_the_torch_demo_serves_every_tier_on_transformers_models(tmp_path: Path) -> None:
    from pygpukit.demo import run_demo

    trace = tmp_path / "trace.json"
    report = run_demo(
        "host",
        requests={"interactive": 1, "standard": 1, "batch": 1},
        tokens=12,
        trace=trace,
        png=None,
        torch=True,
    )
    assert {r["context"] for r in report.table} >= {
        f"{s}-{role}" for s in ("interactive", "standard", "batch") for role in ("llm", "tts")
    }
    assert all(len(report.latency[s]) == 1 for s in ("interactive", "standard", "batch"))
    assert all(report.audio_s[s] > 0 for s in ("interactive", "standard", "batch"))
    slices = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["args"]["context"] for e in slices} >= {"interactive-llm", "batch-tts"}
