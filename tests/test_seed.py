"""Every snippet of the seed document runs as written and does what its comments say.

The snippets run in order in one namespace, like a notebook (later ones use names earlier
ones imported), exactly as the document writes them: ``import _pygpukit_rust as rust``
imports the alias module that the distribution installs next to ``pygpukit``. Snippets that
start a new scenario get a fresh default runtime, since they reuse context names. The
functions the seed leaves to the user are stand-ins in ``seed_models.py``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import re
from pathlib import Path
from typing import Any

import pytest
import seed_models

import pygpukit.lowlevel
from pygpukit import GB, MB, AdmissionRejected, QoSPolicy, VRAMBudgetExceeded, scheduler

ROOT = Path(__file__).resolve().parents[1]

DOC = ROOT / "docs" / "seed" / "scheduler.md"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "scheduler.md"

# Which snippets begin a new scenario (fresh default runtime).
FRESH = {3, 4, 5, 6, 7, 10}


# The snippets that reach the low-level objects through the seed's Rust module name.
RUST = {8, 9, 10}
# Snippet 5 gets a default runtime of this size, so its checks can fill it.
PRESSURE_VRAM = 256 * MB


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def _garbage_cycle(xp: Any, nbytes: int) -> None:
    """An array kept alive only by a reference cycle: freed by a collection, not before."""
    holder: dict[str, Any] = {"array": xp.empty(nbytes, dtype="uint8")}
    holder["self"] = holder


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
        available = ns["available"]
        assert available == scheduler.get_available_vram()  # "model" reserves nothing
        assert f"Available VRAM: {available / GB:.1f} GB" in out
        assert "Used: 0.0 GB" in out and "Max: 4.0 GB" in out
        assert ns["usage"].max == 4 * GB
    elif index == 5:
        assert rt.ledger.handlers == [ns["handle_pressure"]]  # "Register handler"
        ctx = scheduler.create_context("pressured", max_vram=8 * MB)
        with scheduler.context_session(ctx), pytest.raises(VRAMBudgetExceeded):
            rt.xp.empty(12 * MB, dtype="uint8")  # past max_vram: no handler lifts that
        assert "Context pressured: requested 12582912, available 8388608" in buf.getvalue()
        # "Return True to allow allocation, False to reject": the handler's answer decides
        # whether the runtime makes room (here, by collecting a garbage cycle) or refuses.
        spare = rt.available_vram()
        assert spare == PRESSURE_VRAM
        bg = scheduler.create_context("bg", max_vram=spare, qos=QoSPolicy.BEST_EFFORT)
        litter = scheduler.create_context("litter", max_vram=spare, qos=QoSPolicy.BEST_EFFORT)
        gc.disable()
        try:
            with scheduler.context_session(litter):
                _garbage_cycle(rt.xp, 128 * MB)
            with scheduler.context_session(bg):  # 128 MiB left: 128 > 192 * 0.5 -> True
                allowed = rt.xp.empty(192 * MB, dtype="uint8")
                del allowed
            with scheduler.context_session(litter):
                _garbage_cycle(rt.xp, 208 * MB)
            with scheduler.context_session(bg):  # 48 MiB left: 48 > 128 * 0.5 is False
                with pytest.raises(VRAMBudgetExceeded, match="handler"):
                    rt.xp.empty(128 * MB, dtype="uint8")
                assert litter.usage().used == 208 * MB  # no room was made
        finally:
            gc.enable()
            gc.collect()
        assert bg.usage().used == 0 and litter.usage().used == 0
        out = buf.getvalue()
        assert f"Context bg: requested {192 * MB}, available {128 * MB}" in out
        assert f"Context bg: requested {128 * MB}, available {48 * MB}" in out
    elif index == 6:
        assert f"Stream ID: {ns['stream'].id}" in out
    elif index == 7:
        assert ("consumed", "consumer") in calls
    elif index == 8:
        pool, stats = ns["pool"], ns["stats"]
        assert isinstance(pool, pygpukit.lowlevel.MemoryPool)
        assert stats.allocated_bytes == 0 and stats.free_blocks == 1  # "Allocate and free"
        assert "Allocated: 0" in out and "Free blocks: 1" in out
        assert rt.ledger.unscoped.held >= 4096  # its cached block is the default runtime's
        # "with LRU eviction": past the 100 MB quota the least recently used block spills
        blocks = [pool.allocate(40 * MB) for _ in range(3)]
        assert [b.on_device for b in blocks] == [False, True, True]
        assert pool.stats().evictions == 1
        for b in blocks:
            pool.free(b)
    elif index == 9:
        evaluator, result = ns["evaluator"], ns["result"]
        assert "Task admitted with priority 0" in out
        assert result.reserved_memory == 256 * MB  # what committing it reserves
        assert evaluator.reserved_memory == 0  # evaluate() only decides
        assert evaluator.reserve(result).admitted  # the public project's commit step
        assert evaluator.reserved_memory == 256 * MB
        with pytest.raises(AdmissionRejected):  # committing twice cannot over-commit
            evaluator.reserve(result)
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
    assert {i for i, b in enumerate(blocks) if "import _pygpukit_rust as rust" in b} == RUST
    ns: dict[str, Any] = {k: getattr(seed_models, k) for k in dir(seed_models) if k[0] != "_"}
    ns.update(__name__="seed", prompt="Hello", text="Welcome")  # the user's own variables
    seed_models.CALLS.clear()
    for index, code in enumerate(blocks):
        if index in FRESH:
            scheduler.shutdown()
        if index == 5:
            scheduler.initialize(vram_limit=PRESSURE_VRAM)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"<seed snippet {index + 1}>", "exec"), ns)
            _check(index, ns, out)
        if index in RUST:  # the seed's module name is the alias, not a look-alike
            assert ns["rust"].__name__ == "_pygpukit_rust"
            assert all(
                getattr(ns["rust"], name) is getattr(pygpukit.lowlevel, name)
                for name in pygpukit.lowlevel.__all__
            )


def test_the_alias_is_installed_next_to_the_package() -> None:
    """``pip install .`` must ship ``_pygpukit_rust.py`` beside ``pygpukit``, or the seed's
    import fails. The tests import the installed distribution (the repository root is not
    on ``sys.path``), so a missing ``py-modules`` entry fails the import here."""
    import _pygpukit_rust

    assert Path(_pygpukit_rust.__file__).parent == Path(pygpukit.__file__).parent.parent
