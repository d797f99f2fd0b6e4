"""The load and chaos script against the example server, small: two rounds of 40 requests
at once (streams dropped mid-way, malformed bodies), on 127.0.0.1 only."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import load_example


def _load_module() -> Any:
    return load_example("examples/pipelines/load.py", "example_load")


@pytest.mark.slow
def test_load_and_chaos_leave_the_server_healthy(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    argv = ["--rounds", "2", "--requests", "40", "--max-seconds", "90", "--check"]
    rc = _load_module().main([*argv, "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["broken"] == [] and rc == 0
    assert data["alive"] is True
    rounds = data["rounds"]
    assert len(rounds) == 2
    for r in rounds:
        answers = r["answers"]
        assert len(answers) == 40
        kinds = Counter(a["kind"] for a in answers)
        assert set(kinds) == {"assistant", "stream", "dropped", "describe", "malformed", "read"}
        for a in answers:
            assert a["status"] != 500 and a["error_shape"], a
            if a["kind"] == "malformed":
                assert a["status"] == (404 if a["tier"] == "unknown-service" else 422), a
        served = [a for a in answers if a["kind"] != "malformed" and a["status"] == 200]
        assert len(served) >= 20  # a 30 s timeout: the load waits, it is not refused
        assert r["busy_admissions"] == {}
        assert r["threads"] is None or r["threads"] <= rounds[0]["threads"]


def test_the_checks_catch_what_they_name() -> None:
    load = _load_module()
    good = load.Answer("assistant", "batch", 200, 0.1)
    rounds = [
        load.Round(0, 1.0, [good], rss_mb=50.0, threads=50, open_files=10),
        load.Round(1, 1.0, [good], rss_mb=100.0, threads=50, open_files=10),
        load.Round(
            2,
            1.0,
            [
                load.Answer("assistant", "batch", 500, 0.1),
                load.Answer("malformed", "bad-json", 200, 0.1),
                load.Answer("describe", "describe", 429, 0.1, error_shape=False),
            ],
            rss_mb=200.0,
            threads=51,
            open_files=20,
            busy_admissions={"batch": {"running": 1}},
        ),
    ]
    assert load.violations(rounds, alive=False) == [
        "the server died",
        "round 2: assistant batch answered 500",
        "round 2: malformed bad-json answered 200",
        "round 2: describe describe 429: not an error body",
        "round 2: admissions still busy: {'batch': {'running': 1}}",
        "round 2: threads grew 50 -> 51",
        "round 2: open files 10 -> 20",
        "round 2: RSS 100 -> 200 MiB",
    ]
    assert load.violations(rounds[:2], alive=True) == []  # the first round warms up
