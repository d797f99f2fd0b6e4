"""After a device fault: the runtime says so (without asking the device), the server answers
503 to requests in flight and to later ones, and ``/health`` tells an orchestrator to restart
the process. On the host backend, whose stream items fault it as a bad kernel faults a CUDA
context."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from conftest import CUDA

from pygpukit import MB, CudaError
from pygpukit.runtime import HealthState, Runtime, RuntimeHealth

RESTART = "the device failed and this server process must be restarted: "


def _bad_kernel() -> None:
    raise IndexError("out of bounds")


# -- the runtime's query --------------------------------------------------------------------


async def _fault_while_awaited(rt: Runtime) -> CudaError:
    """Fault the device while an await of its work is pending; the error the await got."""
    stream = rt.create_stream()
    gate = threading.Event()
    stream.launch_host_func(lambda: gate.wait(10))  # the device is busy...
    stream.launch_host_func(_bad_kernel)  # ...and then a kernel faults
    errors: list[CudaError] = []

    async def wait() -> None:
        try:
            await stream
        except CudaError as exc:
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()  # armed: pending when the fault comes
            gate.set()
    (error,) = errors
    return error


@pytest.mark.anyio
async def test_health_turns_faulted_when_the_device_faults_and_closed_at_close() -> None:
    with Runtime(backend="host") as rt:
        assert rt.health() == RuntimeHealth(HealthState.OK) and rt.health().ok
        error = await _fault_while_awaited(rt)  # the watchdog failed the await
        health = rt.health()
        assert health.state is HealthState.FAULTED and not health.ok
        assert type(health.error) is CudaError and str(health.error) == str(error)
        assert str(error).startswith("host device faulted: a stream item raised IndexError")
        assert health.error.__traceback__ is None  # a copy: it holds no waiter's frames
    assert rt.health() == RuntimeHealth(HealthState.CLOSED)


def test_health_asks_the_device_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    with Runtime(backend="host") as rt:

        def no_query(streams: Any) -> None:
            raise AssertionError("health() queried the device")

        monkeypatch.setattr(rt.backend, "fault", no_query)
        assert rt.health().state is HealthState.OK


@pytest.mark.anyio
async def test_a_faulted_runtime_is_freed_once_dropped() -> None:
    """The process-wide bridge keeps each device's fault, but must not keep the runtime
    alive through it: the error, once raised, holds frames that hold the backend."""
    rt = Runtime(backend="host")
    error = await _fault_while_awaited(rt)
    assert rt.health().state is HealthState.FAULTED
    rt.close()
    backend = weakref.ref(rt.backend)
    del rt, error
    with anyio.fail_after(5):
        gc.collect()
        while backend() is not None:  # the executor's threads end a moment after close()
            await anyio.sleep(0.01)
            gc.collect()


CUDA_FAULT = textwrap.dedent(
    r"""
    import asyncio
    import cupy
    from pygpukit import CudaError
    from pygpukit.runtime import Runtime

    LATE_OOB = cupy.RawKernel(r'''
    extern "C" __global__ void late_oob(float* p, long long cycles) {
        long long start = clock64();
        while (clock64() - start < cycles) { }  // ~0.2 s: the await is armed first
        p[threadIdx.x + (1ull << 40)] = 1.0f;    // then the context faults
    }''', "late_oob")

    async def main():
        rt = Runtime(backend="cuda")
        stream = rt.create_stream()
        buf = cupy.zeros(32, dtype=cupy.float32)
        before = rt.health().state.name
        with stream.raw.cp:
            LATE_OOB((1,), (32,), (buf, cupy.int64(400_000_000)))
        try:
            await asyncio.wait_for(stream, timeout=10)
        except CudaError:
            pass
        after = rt.health()
        print("HEALTH", before, after.state.name, getattr(after.error, "status", None))

    asyncio.run(main())
    """
)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_health_turns_faulted_after_a_cuda_fault() -> None:
    """The fault kills the CUDA context for the whole process: in a subprocess."""
    run = subprocess.run(
        [sys.executable, "-c", CUDA_FAULT],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout
    ((before, after, status),) = re.findall(r"^HEALTH (\w+) (\w+) (\S+)$", run.stdout, re.M)
    assert (before, after) == ("OK", "FAULTED"), run.stdout
    assert int(status) > 0, run.stdout  # the CUDA error code the watchdog found


# -- the server -----------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:  # FastAPI/starlette run on asyncio here
    return "asyncio"


def _app() -> Any:
    from fastapi import Depends, FastAPI

    from pygpukit.integrations.fastapi import Pygpukit

    ran: list[str] = []

    def setup(rt: Runtime) -> dict[str, Any]:
        rt.create_context("llm", max_vram=16 * MB)
        return {"echo": object()}  # not a Pipeline: handed out as it is

    gpu = Pygpukit(setup, backend="host", admission=None)
    app = FastAPI(lifespan=gpu.lifespan)
    gpu.install(app)

    @app.post("/work")
    async def work(ctx: Any = Depends(gpu.context("llm"))) -> dict[str, int]:  # noqa: B008
        ran.append("work")
        return {"value": await ctx.submit(lambda: 42)}

    @app.post("/echo")
    async def echo(pipe: Any = Depends(gpu.pipeline("echo"))) -> dict[str, str]:  # noqa: B008
        ran.append("echo")
        return {"got": type(pipe).__name__}

    @app.post("/launch-fails")
    async def launch_fails() -> None:  # as a launch on a faulted CUDA context nothing awaited
        raise CudaError("CUDA error: cudaErrorIllegalAddress: an illegal memory access", 700)

    return app, gpu, ran


def _client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await anyio.sleep(0.005)


@asynccontextmanager
async def _in_flight(
    client: httpx.AsyncClient, method: str, path: str, until: Callable[[], bool]
) -> AsyncIterator[list[httpx.Response]]:
    """Send a request in the background and enter once ``until()`` holds; the reply is in
    the list yielded once the block is left."""
    replies: list[httpx.Response] = []

    async def send() -> None:
        replies.append(await client.request(method, path))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await _until(until)
            yield replies


def _assert_fault_answer(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"
    assert "retry-after" not in r.headers  # retrying this process cannot help
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == "CudaError"
    assert body["detail"].startswith(RESTART + "host device faulted"), body


@pytest.mark.anyio
async def test_after_a_fault_requests_get_503_and_health_turns_unhealthy() -> None:
    app, gpu, ran = _app()
    async with app.router.lifespan_context(app), _client(app) as client:
        r = await client.get("/health")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        body = r.json()
        assert set(body) == {"status", "backend", "device", "contexts"}
        assert body["status"] == "ok" and body["backend"] == "host" and body["contexts"] == 1
        assert body["device"] == gpu.runtime.device.name
        assert (await client.post("/work")).json() == {"value": 42}

        ctx = gpu.runtime.get_context("llm")
        gate = threading.Event()
        ctx.stream.launch_host_func(gate.wait)  # the device is busy...
        ctx.stream.launch_host_func(_bad_kernel)  # ...and then a kernel faults
        # a request whose task waits behind the fault
        async with _in_flight(client, "POST", "/work", lambda: ctx.usage().in_flight > 0) as rs:
            assert (await client.get("/health")).status_code == 200  # not yet
            gate.set()
        (r,) = rs
        _assert_fault_answer(r)

        r = await client.get("/health")
        assert r.status_code == 503
        body = r.json()
        assert set(body) == {"status", "error", "detail"}
        assert body["status"] == "unhealthy" and body["error"] == "CudaError"
        assert body["detail"].startswith(RESTART + "host device faulted"), body

        tasks, ran[:] = ctx.usage().tasks, []
        for path in ("/work", "/echo"):  # later requests: refused before any work
            _assert_fault_answer(await client.post(path))
        assert ran == [] and ctx.usage().tasks == tasks
        assert (await client.get("/health")).status_code == 503


@pytest.mark.anyio
async def test_a_request_told_to_restart_makes_health_unhealthy_too() -> None:
    """A fault no await saw (CUDA work nothing waited for) surfaces as a CudaError when
    later work launches: the client is told to restart the process, so /health agrees."""
    app, gpu, _ = _app()
    async with app.router.lifespan_context(app), _client(app) as client:
        r = await client.post("/launch-fails")
        assert r.status_code == 503 and "retry-after" not in r.headers
        assert r.json() == {
            "error": "CudaError",
            "detail": RESTART + "CUDA error: cudaErrorIllegalAddress: an illegal memory access",
        }
        assert gpu.runtime.health().ok  # the runtime itself saw nothing
        r = await client.get("/health")
        assert r.status_code == 503 and r.json()["error"] == "CudaError"
        assert (await client.post("/echo")).status_code == 503


@pytest.mark.anyio
async def test_health_is_unhealthy_while_shutdown_drains_and_after() -> None:
    from fastapi import FastAPI

    from pygpukit.integrations.fastapi import Pygpukit

    gpu = Pygpukit(backend="host")
    app = FastAPI(lifespan=gpu.lifespan)
    gpu.install(app)
    release = anyio.Event()

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await release.wait()
        return {"done": True}

    lifespan = app.router.lifespan_context(app)
    async with _client(app) as client:
        await lifespan.__aenter__()
        async with _in_flight(client, "GET", "/slow", lambda: gpu.in_flight > 0) as replies:
            assert (await client.get("/health")).status_code == 200
            async with anyio.create_task_group() as tg:
                tg.start_soon(lifespan.__aexit__, None, None, None)  # shutdown: it drains
                await _until(lambda: gpu.draining)
                r = await client.get("/health")
                assert r.status_code == 503
                assert r.json()["status"] == "unhealthy" and r.json()["error"] == "Draining"
                release.set()
        assert [r.json() for r in replies] == [{"done": True}]  # drained, not cut
        r = await client.get("/health")
    assert r.status_code == 503 and r.json()["error"] == "ContextClosed"


@pytest.mark.anyio
async def test_health_path_can_be_moved_or_left_out() -> None:
    from fastapi import FastAPI

    from pygpukit.integrations.fastapi import Pygpukit

    for path, probes in (("/livez", {"/livez": 200, "/health": 404}), (None, {"/health": 404})):
        gpu = Pygpukit(backend="host")
        app = FastAPI(lifespan=gpu.lifespan)
        gpu.install(app, health_path=path)
        async with app.router.lifespan_context(app), _client(app) as client:
            for probe, code in probes.items():
                assert (await client.get(probe)).status_code == code


def test_a_health_path_must_be_a_path() -> None:
    from fastapi import FastAPI

    from pygpukit import InvalidArgument, InvalidArgumentType
    from pygpukit.integrations.fastapi import Pygpukit

    gpu, app = Pygpukit(backend="host"), FastAPI()
    with pytest.raises(
        InvalidArgument,
        match=r"^health_path must start with '/', not 'health'; e\.g\. '/health', or None to "
        r"mount no health endpoint$",
    ):
        gpu.install(app, health_path="health")
    with pytest.raises(InvalidArgumentType, match=r"^health_path must be a non-empty str"):
        gpu.install(app, health_path=3)  # type: ignore[arg-type]
