"""Every snippet of the seed document runs as written and does what its comments say.

The snippets run in order in one namespace, like a notebook (later ones use names earlier
ones imported), with ``import _pygpukit_rust as rust`` read as
``import pygpukit.lowlevel as rust``. Snippets that start a new scenario get a fresh default
runtime, since they reuse context names.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest
import seed_models

from pygpukit import GB, MB, VRAMBudgetExceeded, scheduler

DOC = Path(__file__).resolve().parents[1] / "docs" / "seed" / "scheduler.md"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "scheduler.md"

# Which snippets begin a new scenario (fresh default runtime).
FRESH = {3, 4, 5, 6, 7, 10}
LATER: set[int] = set()  # snippets not delivered yet (0-based); none now


def snippets() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return [
        b.replace("import _pygpukit_rust as rust", "import pygpukit.lowlevel as rust")
        for b in blocks
    ]


def test_vendored_seed_matches_the_shared_one() -> None:
    if not SHARED.exists():
        pytest.skip("no ../shared checkout beside this one")
    assert DOC.read_text() == SHARED.read_text()


def _check(index: int, ns: dict[str, Any], buf: io.StringIO) -> None:
    out = buf.getvalue()
    calls = seed_models.CALLS
    rt = scheduler.get_runtime()
    if index == 0:
        assert {c.name for c in rt.contexts} == {"llm", "tts", "vision"}
        assert ns["llm_ctx"].max_vram == 4 * GB
    elif index == 1:
        assert ("run_llm_inference", "llm") in calls
        assert ("run_tts", "tts") in calls
    elif index == 2:
        assert ("llm_inference_async", "llm") in calls
        assert ("tts_synthesis_async", "tts") in calls
        assert len(ns["result"]) == 2
    elif index == 3:
        llm, tts, bg = ns["llm_ctx"], ns["tts_ctx"], ns["bg_ctx"]
        assert scheduler.get_context_usage(llm).reserved == 4 * GB  # "Always has 4GB reserved"
        assert scheduler.get_context_usage(tts).reserved == 1 * GB  # "Base 1GB"
        assert scheduler.get_context_usage(bg).reserved == 0  # "whatever is available"
        least, greatest = rt.device.priority_range
        assert llm.stream.priority == greatest and bg.stream.priority == least
        with scheduler.context_session(tts):  # "can burst to 2GB" past its base...
            burst = rt.xp.empty(1536 * MB, dtype="uint8")
            with pytest.raises(VRAMBudgetExceeded):  # ...and no further
                rt.xp.empty(1024 * MB, dtype="uint8")
            del burst
    elif index == 4:
        assert "Available VRAM:" in out and "Used: 0.0 GB" in out and "Max: 4.0 GB" in out
    elif index == 5:
        ctx = scheduler.create_context("pressured", max_vram=8 * MB)
        with scheduler.context_session(ctx), pytest.raises(VRAMBudgetExceeded):
            rt.xp.empty(12 * MB, dtype="uint8")
        assert "Context pressured: requested 12582912, available 8388608" in buf.getvalue()
    elif index == 6:
        assert f"Stream ID: {ns['stream'].id}" in out
    elif index == 7:
        assert ("consumed", "consumer") in calls
    elif index == 8:
        stats = ns["stats"]
        assert stats.allocated_bytes == 0 and stats.free_blocks == 1
        assert "Allocated: 0" in out
    elif index == 9:
        assert "Task admitted with priority 0" in out
        assert ns["result"].reserved_memory == 256 * MB  # what admit() would reserve
        assert ns["evaluator"].reserved_memory == 0  # evaluate() only decides
    elif index == 10:
        assert "Memory limit: 4294967296" in out and "Compute limit: 0.5" in out
        assert ns["manager"].get_partition("training").memory_limit == 4 * GB
    elif index == 11:
        assert ns["result"]["audio"].startswith("synthesize_speech(")
        assert {("generate_response", "llm"), ("analyze_images", "vision")} <= set(calls)
        assert ("synthesize_speech", "tts") in calls


def test_every_seed_snippet_runs_and_does_what_it_says(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYGPUKIT_BACKEND", backend)
    monkeypatch.setenv("PYGPUKIT_HOST_VRAM", "16GiB")
    blocks = snippets()
    assert len(blocks) == 12
    ns: dict[str, Any] = {k: getattr(seed_models, k) for k in dir(seed_models) if k[0] != "_"}
    ns.update(__name__="seed", prompt="Hello", text="Welcome")  # the user's own variables
    seed_models.CALLS.clear()
    for index, code in enumerate(blocks):
        if index in LATER:
            continue
        if index in FRESH:
            scheduler.shutdown()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"<seed snippet {index + 1}>", "exec"), ns)
            _check(index, ns, out)
