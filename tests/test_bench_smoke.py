"""The benchmark suite runs on the host backend with small sizes, so it cannot rot; its JSON
describes the run, and ``pygpukit bench --report`` renders the results page from it."""

from __future__ import annotations

import datetime
import importlib
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy
import pytest

import pygpukit
from pygpukit.benchmarks import NAMES
from pygpukit.benchmarks._common import GcPauses
from pygpukit.benchmarks.report import git_commit, render


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # from the directory holding the package this process imported, so that ``-m`` runs the
    # same pygpukit (the installed one in CI, not the source tree CI runs in)
    return subprocess.run(
        [sys.executable, "-m", "pygpukit.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(pygpukit.__file__).resolve().parent.parent,
    )


def _utc_today() -> str:
    return datetime.datetime.now(datetime.UTC).date().isoformat()


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], set[str]]:
    """``pygpukit bench --backend host --quick --json FILE``, run once for this module:
    the JSON's path, its contents, and the UTC days the run spanned."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    days = {_utc_today()}
    proc = _cli("bench", "--backend", "host", "--quick", "--json", str(path), timeout=300)
    days.add(_utc_today())
    assert proc.returncode == 0, proc.stderr
    return path, json.loads(path.read_text()), days


def test_every_benchmark_runs_and_reports_against_its_baseline(
    suite: tuple[Path, dict[str, Any], set[str]],
) -> None:
    _, result, _ = suite
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


def test_the_json_describes_its_run(suite: tuple[Path, dict[str, Any], set[str]]) -> None:
    _, result, days = suite
    env = result["environment"]
    assert env["backend"] == "host" and env["device"].startswith("host executor")
    assert env["versions"]["python"] == platform.python_version()
    assert env["versions"]["numpy"] == numpy.__version__
    assert env["versions"]["pygpukit"] == pygpukit.__version__
    assert env["versions"]["cupy"] is None  # CuPy is asked only on the CUDA backend
    assert env["date"] in days
    assert env["git"] == git_commit()
    assert result["command"] == "pygpukit bench --backend host --quick"
    for row in result["summary"]:
        assert set(row) == {"benchmark", "figure", "value", "baseline", "target", "met", "ratio"}
        assert row["ratio"] is None or isinstance(row["ratio"], float)
    # each benchmark says what bounds a miss, in its own module, and the JSON carries it
    for name in NAMES:
        bound = importlib.import_module(f"pygpukit.benchmarks.{name}").BOUNDS
        assert isinstance(bound, str) and len(bound) > 80
        assert result["bounds"][name] == bound


def test_report_renders_the_runs_header_and_table(
    suite: tuple[Path, dict[str, Any], set[str]], tmp_path: Path
) -> None:
    path, result, _ = suite
    out = tmp_path / "RESULTS.md"
    proc = _cli("bench", "--report", str(path), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    env = result["environment"]
    header, _, rest = page.partition("## Figures")
    assert f"| device | {env['device']} (host backend) |" in header
    assert f"Python {platform.python_version()}" in header
    assert f"NumPy {numpy.__version__}" in header
    assert f"| date | {env['date']} (UTC) |" in header
    assert "| command | `pygpukit bench --backend host --quick` |" in header
    # the commit, found here independently of the code under test
    top = subprocess.run(
        ["git", "rev-parse", "--show-toplevel", "HEAD"],
        cwd=Path(pygpukit.__file__).parent,
        capture_output=True,
        text=True,
    )
    lines = top.stdout.split()
    here = Path(pygpukit.__file__).resolve().parent
    if top.returncode == 0 and Path(lines[0]).resolve() / "pygpukit" == here:
        assert f"| commit | {lines[1][:12]}" in header
    else:
        assert "| commit | - (not run from a git checkout) |" in header
    table, _, bounds = rest.partition("## What bounds each miss")
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert body[0].startswith("| benchmark | figure | value |")
    assert len(body) - 1 == len(result["summary"])
    for line, row in zip(body[1:], result["summary"], strict=True):
        cells = [row["benchmark"], row["figure"], row["value"], row["baseline"]]
        assert line.startswith("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        assert line.endswith(f"| {ratio} | {row['target']} | - |")
    assert "No target is judged on the host backend." in bounds
    # printed to standard output without -o
    again = _cli("bench", "--report", str(path))
    assert again.returncode == 0 and again.stdout == page


def test_report_says_what_bounds_each_miss(suite: tuple[Path, dict[str, Any], set[str]]) -> None:
    _, result, _ = suite
    data = json.loads(json.dumps(result))
    judged = [r for r in data["summary"] if r["target"] == "<=15 us over raw"]
    assert judged  # the submit rows held to a target
    judged[0]["met"] = False
    for r in data["summary"]:
        if r["benchmark"] == "stages":
            r["met"] = True
    page = render(data)
    _, _, bounds = page.partition("## What bounds each miss")
    submit = importlib.import_module("pygpukit.benchmarks.submit")
    assert f"- **submit** ({judged[0]['figure']}): {submit.BOUNDS}" in bounds
    assert "**stages**" not in bounds  # met: nothing to explain
    assert "| **no** |" in page and "| yes |" in page
    judged[0]["met"] = True
    assert "Every figure held to a target met it in this run." in render(data)


def test_git_commit_is_none_outside_a_checkout(tmp_path: Path) -> None:
    package = tmp_path / "pygpukit"
    package.mkdir()
    assert git_commit(package) is None


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
    proc = _cli(
        "bench", "--backend", "host", "--quick", "--only", "submit,stages", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"submit", "stages"}
    assert data["command"] == "pygpukit bench --backend host --only submit,stages --quick"
    assert "| submit |" in proc.stdout and "| stages |" in proc.stdout
    bad = _cli("bench", "--only", "nope", timeout=60)
    assert bad.returncode == 2 and "unknown benchmark" in bad.stderr


def test_cli_bench_runs_and_renders_in_one_command(tmp_path: Path) -> None:
    out, page = tmp_path / "bench.json", tmp_path / "RESULTS.md"
    proc = _cli(
        "bench",
        "--backend",
        "host",
        "--quick",
        "--only",
        "stages",
        "--json",
        str(out),
        "--report",
        "-o",
        str(page),
    )
    assert proc.returncode == 0, proc.stderr
    assert page.read_text() == render(json.loads(out.read_text()))


def test_torch_allocation_is_not_met_when_the_context_charged_nothing() -> None:
    from pygpukit.benchmarks import torch_memory

    run = {
        "measured": True,
        "size": 1 << 20,
        "ours_us": 1.0,
        "torch_us": 1.0,
        "bind_us": 2.0,
        "bind_streams_us": 1.0,
        "charged_bytes": 0,  # PyTorch's allocator was not ours: both loops timed torch's
    }
    assert torch_memory.summary(run)[0].met is False
    assert torch_memory.summary({**run, "charged_bytes": 2 << 20})[0].met is True
