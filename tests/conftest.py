"""Shared fixtures: a fresh runtime per test, and async tests over asyncio, uvloop, trio."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from clocks import FakeClock

from pygpukit import scheduler
from pygpukit.runtime import Runtime

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
ROOT = Path(__file__).resolve().parent.parent


def load_example(relative: str, name: str) -> ModuleType:
    """Import the example file ``ROOT/relative`` as module ``name`` (registered in
    ``sys.modules``: dataclasses and pickling look a module up there)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _gpu() -> bool:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


CUDA = _gpu()

BACKENDS = [
    pytest.param("host", id="host"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU")],
    ),
]

ANYIO_BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(
        ("asyncio", {"use_uvloop": True}),
        id="uvloop",
        marks=pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop not installed"),
    ),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=ANYIO_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def rt(backend: str) -> Iterator[Runtime]:
    """A fresh runtime on each backend (host always; CUDA where a GPU is visible)."""
    runtime = Runtime(backend=backend, vram_limit=1 << 30)
    try:
        yield runtime
    finally:
        runtime.close()


@pytest.fixture
def host_rt() -> Iterator[Runtime]:
    runtime = Runtime(backend="host", vram_limit=1 << 30)
    try:
        yield runtime
    finally:
        runtime.close()


@pytest.fixture(autouse=True)
def _fresh_default_runtime() -> Iterator[None]:
    yield
    scheduler.shutdown()


@pytest.fixture(autouse=True)
def _pool_keeps_its_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA runtimes made in a test keep their pool's unused memory until they close, so
    tests that count the pool's or the driver's bytes across a slow step (a first kernel
    compile) do not depend on timing; the idle-trim tests set their own value."""
    monkeypatch.setenv("PYGPUKIT_POOL_IDLE_S", "inf")


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock at 0.0 that only the test moves (``clock.advance(s)``, ``clock.now = t``)."""
    return FakeClock()
