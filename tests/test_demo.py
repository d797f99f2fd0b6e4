"""``pygpukit demo`` — the README's main job — finishes quickly on the host backend."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


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
