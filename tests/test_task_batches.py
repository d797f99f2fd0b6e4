"""Tasks of one context launched back to back share a completion signal
(``DispatcherConfig.batch_us``, CUDA: on the host backend tasks run as stream items)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from conftest import CUDA

from pygpukit import MB, QoSPolicy
from pygpukit.benchmarks._common import noop_kernel
from pygpukit.qos import DispatcherConfig, RuntimeScheduler
from pygpukit.qos._scheduler import HELD_MAX
from pygpukit.runtime import Runtime

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA, reason="no CUDA GPU"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _runtime(batch_us: float, context_in_flight: int | None = 4) -> Runtime:
    rt = Runtime(backend="cuda", vram_limit=1 << 30)
    config = DispatcherConfig(batch_us=batch_us, context_in_flight=context_in_flight)
    rt.scheduler = RuntimeScheduler(rt, config)
    return rt


async def _signals_for(rt: Runtime, n: int) -> tuple[int, list[float]]:
    """Signals enqueued for a gate task and ``n`` quick tasks queued behind it on the
    launcher thread, and each quick task's GPU time."""
    ctx = rt.create_context("c", max_vram=16 * MB, qos=QoSPolicy.GUARANTEED)
    launch = noop_kernel(rt)
    timed: list[float] = []
    go = threading.Event()

    def step(i: int) -> int:
        launch(ctx.stream)
        return i

    for i in range(3):  # the launcher thread learns that step is quick
        await ctx.submit(step, i)
    rt.scheduler.listeners.append(lambda task: timed.append(task.gpu_ms))
    before = rt.bridge.stats().signals
    got: list[int] = []

    async def one(i: int) -> None:
        got.append(await ctx.submit(step, i))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ctx.submit, go.wait, 10)
            await anyio.sleep(0.01)
            for i in range(n):
                tg.start_soon(one, i)
            await anyio.sleep(0.01)
            go.set()
    assert sorted(got) == list(range(n))
    return rt.bridge.stats().signals - before, timed[1:]  # not the gate's


async def test_quick_tasks_queued_back_to_back_share_signals_and_are_each_timed() -> None:
    # batch_us of 1 s: every call counts as quick, however the threads were scheduled
    with _runtime(1e6, context_in_flight=None) as rt:
        signals, timed = await _signals_for(rt, 200)
    assert signals == -(-201 // HELD_MAX), f"{signals} signals for 201 tasks"
    assert len(timed) == 200 and all(ms > 0 for ms in timed)


async def test_batch_us_zero_gives_each_task_its_own_signal() -> None:
    with _runtime(0.0, context_in_flight=None) as rt:
        signals, timed = await _signals_for(rt, 200)
    assert signals == 201
    assert len(timed) == 200 and all(ms > 0 for ms in timed)


@pytest.fixture
def rt() -> Iterator[Runtime]:
    """Functions that took under 0.1 s count as quick: what is held does not depend on
    how the loop and launcher threads happened to share the GIL."""
    with _runtime(1e5) as runtime:
        yield runtime


async def test_a_function_that_waits_for_an_earlier_tasks_caller_does_not_hang(
    rt: Runtime,
) -> None:
    """b's function waits on the host until a's caller has resumed, while a's signal is held
    for b: the completion watchdog sends the held signal at its second look."""
    ctx = rt.create_context("c", max_vram=16 * MB)
    launch = noop_kernel(rt)
    go, a_resumed = threading.Event(), threading.Event()

    def step(wait_for: threading.Event | None) -> None:
        launch(ctx.stream)
        if wait_for is not None:
            assert wait_for.wait(10), "a's caller never resumed"

    for _ in range(3):
        await ctx.submit(step, None)  # quick: b will run while a's signal is held
    took: dict[str, float] = {}

    async def a() -> None:
        await ctx.submit(step, None)
        took["a"] = time.perf_counter() - t0
        a_resumed.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            # the launcher is busy with the gate while a and b queue behind it
            tg.start_soon(ctx.submit, go.wait, 10)
            await anyio.sleep(0.01)
            tg.start_soon(a)
            tg.start_soon(ctx.submit, step, a_resumed)
            await anyio.sleep(0.01)
            t0 = time.perf_counter()
            go.set()
    # held, then sent by the watchdog (it looks every 0.1 s and sends on its second look)
    assert 0.05 < took["a"] < 1.0, took


async def test_a_task_does_not_wait_for_a_slow_function_after_it(rt: Runtime) -> None:
    ctx = rt.create_context("c", max_vram=16 * MB)
    launch = noop_kernel(rt)
    go = threading.Event()

    def quick() -> None:
        launch(ctx.stream)

    def slow() -> None:  # slower than batch_us (0.1 s)
        launch(ctx.stream)
        time.sleep(0.3)

    for _ in range(2):
        await ctx.submit(quick)
    await ctx.submit(slow)  # the launcher thread knows it is slow now
    took: dict[str, Any] = {}

    async def first() -> None:
        await ctx.submit(quick)
        took["quick"] = time.perf_counter() - t0

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ctx.submit, go.wait, 10)
            await anyio.sleep(0.01)
            tg.start_soon(first)
            tg.start_soon(ctx.submit, slow)
            await anyio.sleep(0.01)
            t0 = time.perf_counter()
            go.set()
    assert took["quick"] < 0.15, took  # held for slow(), it would be >= 0.3 s
