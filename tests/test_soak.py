"""The soak (``pygpukit soak --quick``, the CI variant) passes on the host backend, and its
checks catch what they are there to catch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pygpukit
from pygpukit.benchmarks import soak
from pygpukit.benchmarks.soak import QUICK, SoakConfig, run_soak

TINY = SoakConfig(contexts=12, submits=480, live=4, batch=16, samples=3, warmup=1, evictions=3)


def test_the_quick_soak_passes(tmp_path: Path) -> None:
    path = tmp_path / "soak.json"
    command = ["soak", "--quick", "--backend", "host", "--json", str(path)]
    proc = subprocess.run(  # a process of its own: its memory, threads and descriptors
        [sys.executable, "-m", "pygpukit.cli", *command],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(pygpukit.__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(path.read_text())
    assert result["ok"] and all(result["checks"].values())
    tally = result["tally"]
    assert tally["submitted"] == QUICK.submits
    assert tally["contexts"] == QUICK.contexts
    assert tally["cancelled"] > 0 and tally["expired"] > 0 and tally["sessions"] > 0
    assert tally["evictions"] >= QUICK.evictions and tally["restores"] >= QUICK.evictions
    assert len(result["readings"]) == QUICK.samples + 1
    assert "| resident memory |" in proc.stdout and "soak: passed" in proc.stdout


def _tiny() -> dict[str, Any]:
    return run_soak("host", TINY)


def test_a_tiny_soak_passes_and_counts_every_submit() -> None:
    result = _tiny()
    assert result["ok"], result["checks"]
    t = result["tally"]
    assert t["submitted"] == TINY.submits
    assert t["completed"] + t["cancelled"] + t["expired"] == TINY.submits


def test_charges_kept_past_destroy_fail_the_soak(monkeypatch: pytest.MonkeyPatch) -> None:
    kept: list[Any] = []

    def leaky(xp: Any, n: int) -> int:
        kept.append(xp.ones((n,), dtype=xp.float32))  # outlives its context
        return n

    monkeypatch.setattr(soak, "_work", leaky)
    result = _tiny()
    assert not result["checks"]["charges back to zero at destroy"]
    assert not result["ok"]


def test_errors_fail_the_soak(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(xp: Any, n: int) -> int:
        raise RuntimeError("model step failed")

    monkeypatch.setattr(soak, "_work", broken)
    result = _tiny()
    assert not result["checks"]["no errors"] and not result["ok"]
    assert result["tally"]["failed"] > 0
    assert any("model step failed" in e for e in result["errors"])


def test_growth_past_the_limit_fails() -> None:
    readings = [{"rss_bytes": v} for v in (50, 100, 104, 106)]
    assert soak._growth(readings, "rss_bytes", 1)["ok"] is False
    assert soak._growth(readings[:3], "rss_bytes", 1)["ok"] is True
