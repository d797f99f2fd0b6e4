"""A runtime on a device other than the thread's current one (``Runtime(device_id=1)`` on a
machine of two or more GPUs): its memory, kernels, awaits, tasks, timings and evictions all
stay on its own device, whichever device the calling thread has current."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import CUDA

from pygpukit import QoSPolicy, capture_graph, context_session
from pygpukit.benchmarks._common import busy_kernel
from pygpukit.runtime import Runtime

MiB = 1 << 20


def _devices() -> int:
    if not CUDA:
        return 0
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(_devices() < 2, reason="needs two CUDA GPUs"),
]


@pytest.fixture
def other() -> Iterator[Runtime]:
    """A runtime on the last device, made and used from a thread whose current device is
    device 0."""
    import cupy

    cupy.cuda.Device(0).use()
    with Runtime(backend="cuda", device_id=_devices() - 1, vram_limit=2 << 30) as rt:
        yield rt
    assert cupy.cuda.runtime.getDevice() == 0, "the runtime left another device current"


def _device_of(array: Any) -> int:
    import cupy

    return int(cupy.cuda.runtime.pointerGetAttributes(array.data.ptr).device)


def test_a_sessions_arrays_live_on_the_runtimes_device(other: Runtime) -> None:
    import cupy

    ctx = other.create_context("c", max_vram=64 * MiB)
    with context_session(ctx):
        x = other.xp.arange(1 << 20, dtype=other.xp.float32)
        total = float((x * 2).sum())
    assert _device_of(x) == other.backend.device_id
    assert total == float(np.arange(1 << 20, dtype=np.float32).sum() * 2)
    assert ctx.usage().held >= 4 * MiB
    assert cupy.cuda.runtime.getDevice() == 0  # the session put the thread's device back


def test_awaiting_its_stream_waits_for_its_kernel(other: Runtime) -> None:
    ctx = other.create_context("c", max_vram=64 * MiB)
    spin = busy_kernel(other)

    async def main() -> bool:
        async with context_session(ctx):  # the session makes the runtime's device current
            spin(ctx.stream, 0.05)
            await ctx.stream
            return ctx.stream.query()

    assert asyncio.run(main())


def test_a_submitted_task_runs_on_the_runtimes_device_and_is_timed(other: Runtime) -> None:
    ctx = other.create_context("c", max_vram=64 * MiB, qos=QoSPolicy.GUARANTEED)
    spin = busy_kernel(other)

    def work() -> Any:
        spin(ctx.stream, 0.01)
        a = other.xp.full((32, 32), 3.0, dtype=other.xp.float32)
        return a @ a  # cuBLAS: a handle of the runtime's device

    async def main() -> Any:
        return await ctx.submit(work)

    y = asyncio.run(main())
    assert _device_of(y) == other.backend.device_id
    assert float(y.get().sum()) == 9.0 * 32 * 32 * 32
    assert ctx.usage().gpu_time_s >= 0.009  # the task's GPU time came from its events


def test_a_completion_armed_from_a_thread_on_device_0_lands(other: Runtime) -> None:
    """A completion armed from a user thread whose current device is 0 still lands (the
    watchdog's sends of held or stranded signals come from such a thread too)."""
    ctx = other.create_context("c", max_vram=64 * MiB)
    spin = busy_kernel(other)
    errors: list[BaseException] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def arm() -> None:
            import cupy

            cupy.cuda.Device(0).use()
            try:
                event = other.backend.create_event(timing=True)
                ctx.stream.raw.record(event)
                other.bridge.on_done(
                    event,
                    other.backend,
                    lambda exc: loop.call_soon_threadsafe(done.set_result, exc),
                )
            except BaseException as exc:
                errors.append(exc)
                loop.call_soon_threadsafe(done.set_result, exc)

        other.bridge.attach()
        with context_session(ctx):
            spin(ctx.stream, 0.02)
        thread = threading.Thread(target=arm)
        thread.start()
        thread.join()
        assert await asyncio.wait_for(done, 10) is None

    asyncio.run(main())
    assert errors == []


def test_a_graph_captured_on_the_runtimes_device_replays_there(other: Runtime) -> None:
    ctx = other.create_context("g", max_vram=64 * MiB)
    xp = other.xp
    with context_session(ctx):
        x = xp.ones(1024, dtype=xp.float32)
        y = xp.zeros_like(x)

        def step() -> None:
            y[...] = y + x * 2.0

        step()  # compile before capturing
        graph = capture_graph(step)
        for _ in range(3):
            graph.launch()
        ctx.stream.synchronize()
        graph.close()
    assert _device_of(y) == other.backend.device_id
    assert float(y.get()[0]) == 8.0


def test_best_effort_buffers_spill_and_restore_on_the_runtimes_device(other: Runtime) -> None:
    rt = other
    be = rt.create_context("be", max_vram=512 * MiB, qos=QoSPolicy.BEST_EFFORT)
    with context_session(be):
        w = rt.xp.arange(64 * MiB // 4, dtype=rt.xp.float32)
    handle = be.evictable(w)
    del w
    expected = np.arange(64 * MiB // 4, dtype=np.float32)
    freed = be._reclaim(64 * MiB)  # what memory pressure does
    assert freed >= 64 * MiB and not handle.on_device
    with context_session(be):
        back = handle.array
        assert _device_of(back) == rt.backend.device_id
        np.testing.assert_array_equal(back.get(), expected)


def test_two_runtimes_on_two_devices_run_side_by_side() -> None:
    import cupy

    cupy.cuda.Device(0).use()
    last = _devices() - 1
    with (
        Runtime(backend="cuda", device_id=0, vram_limit=1 << 30) as a,
        Runtime(backend="cuda", device_id=last, vram_limit=1 << 30) as b,
    ):
        ca = a.create_context("a", max_vram=64 * MiB)
        cb = b.create_context("b", max_vram=64 * MiB)

        def make(rt: Runtime, value: float) -> Any:
            return rt.xp.full(256, value, dtype=rt.xp.float32)

        async def main() -> tuple[Any, Any]:
            return await asyncio.gather(ca.submit(make, a, 1.0), cb.submit(make, b, 2.0))

        x, y = asyncio.run(main())
        assert (_device_of(x), _device_of(y)) == (0, last)
        assert float(x.get().sum()) == 256.0 and float(y.get().sum()) == 512.0


def test_task_steps_outside_a_session_leave_the_threads_device_alone(other: Runtime) -> None:
    """With PyTorch's CUDA state live, restoring its current stream at the end of a task
    step makes that stream's device current; the step's end puts the thread's back."""
    import cupy

    torch = pytest.importorskip("torch")
    torch.cuda.init()
    ctx = other.create_context("c", max_vram=64 * MiB)
    seen: list[tuple[int, int]] = []

    async def outside() -> None:  # a task of a hooked loop, in no session
        for _ in range(3):
            await asyncio.sleep(0)
            seen.append((int(cupy.cuda.runtime.getDevice()), int(torch.cuda.current_device())))

    async def main() -> None:
        await ctx.submit(lambda: None)  # hooks the loop: every task step binds
        await asyncio.create_task(outside())

    asyncio.run(main())
    assert seen == [(0, 0)] * 3
