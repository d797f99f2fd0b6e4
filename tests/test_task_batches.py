"""Tasks of one context launched back to back share a completion signal
(``LauncherConfig.batch_us``). On CUDA, and on the host executor run the way CUDA runs
tasks — functions on the context's launcher thread (by default the host backend runs them
as stream items, which never share signals) — so CI runs these too."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
from conftest import CUDA

from pygpukit import MB, CudaError, QoSPolicy
from pygpukit.benchmarks._common import busy_kernel, noop_kernel
from pygpukit.runtime import Dispatcher, DispatcherConfig, LauncherConfig, Runtime
from pygpukit.runtime._backends._host import HostBackend
from pygpukit.runtime._launcher import HELD_MAX

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(
    params=[
        pytest.param(
            "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU")]
        ),
        "host",
    ]
)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "host":  # functions on launcher threads, their work on the executor
        monkeypatch.setattr(HostBackend, "tasks_on_streams", False)
    return str(request.param)


def _runtime(backend: str, batch_us: float, context_in_flight: int | None = 4) -> Runtime:
    return Runtime(
        backend=backend,
        vram_limit=1 << 30,
        policy=Dispatcher(DispatcherConfig(context_in_flight=context_in_flight)),
        launcher=LauncherConfig(batch_us=batch_us),
    )


@pytest.fixture
def rt(backend: str) -> Iterator[Runtime]:
    """Functions that took under 0.1 s count as quick: what is held does not depend on how
    the loop and launcher threads happened to share the GIL."""
    with _runtime(backend, 1e5) as runtime:
        yield runtime


async def _behind_a_gate(ctx: Any, *callers: Callable[[], Awaitable[Any]]) -> float:
    """Start ``callers`` while a gate task holds ``ctx``'s launcher thread, so that their
    tasks queue behind it and then run back to back; open the gate, wait for them all.
    Returns when the gate opened (``time.perf_counter()``)."""
    go = threading.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ctx.submit, go.wait, 10)
        await anyio.sleep(0.01)
        for caller in callers:
            tg.start_soon(caller)
        await anyio.sleep(0.05)
        opened = time.perf_counter()
        go.set()
    return opened


async def _signals_for(rt: Runtime, n: int) -> tuple[int, list[float]]:
    """Signals enqueued for a gate task and ``n`` quick tasks queued behind it on the
    launcher thread, and each quick task's GPU time."""
    ctx = rt.create_context("c", max_vram=16 * MB, qos=QoSPolicy.GUARANTEED)
    launch = noop_kernel(rt)
    timed: list[float] = []

    def step(i: int) -> int:
        launch(ctx.stream)
        return i

    for i in range(3):  # the launcher thread learns that step is quick
        await ctx.submit(step, i)
    rt.on_task_done(lambda task: timed.append(task.gpu_ms))
    before = rt.bridge.stats().signals
    got: list[int] = []

    def caller(i: int) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            got.append(await ctx.submit(step, i))

        return one

    with anyio.fail_after(10):
        await _behind_a_gate(ctx, *(caller(i) for i in range(n)))
    assert sorted(got) == list(range(n))
    return rt.bridge.stats().signals - before, timed[1:]  # not the gate's


async def test_quick_tasks_queued_back_to_back_share_signals_and_are_each_timed(
    backend: str,
) -> None:
    # batch_us of 1 s: every call counts as quick, however the threads were scheduled
    with _runtime(backend, 1e6, context_in_flight=None) as rt:
        signals, timed = await _signals_for(rt, 200)
    assert signals == -(-201 // HELD_MAX), f"{signals} signals for 201 tasks"
    assert len(timed) == 200 and all(ms > 0 for ms in timed)


async def test_batch_us_zero_gives_each_task_its_own_signal(backend: str) -> None:
    with _runtime(backend, 0.0, context_in_flight=None) as rt:
        signals, timed = await _signals_for(rt, 200)
    assert signals == 201
    assert len(timed) == 200 and all(ms > 0 for ms in timed)


async def test_the_default_context_cap_bounds_a_shared_signal(backend: str) -> None:
    """Held tasks are in flight: with the default per-context cap (16) no signal is shared
    by more than 16 tasks, and the gate plus the 15 tasks launched behind it share one."""
    cap = DispatcherConfig().context_in_flight
    assert cap == 16
    with _runtime(backend, 1e6, context_in_flight=cap) as rt:
        signals, timed = await _signals_for(rt, 200)
    assert -(-201 // cap) <= signals <= 201 - (cap - 1), f"{signals} signals for 201 tasks"
    assert len(timed) == 200


async def test_a_batch_is_sent_before_the_launcher_waits_for_more(
    rt: Runtime, no_watchdog: None
) -> None:
    """Quick tasks queued behind a gate are held, and sent when the launcher thread finds
    its queue empty — not left for the watchdog (which sends nothing here)."""
    ctx = rt.create_context("c", max_vram=16 * MB)
    launch = noop_kernel(rt)

    def step() -> None:
        launch(ctx.stream)

    for _ in range(3):
        await ctx.submit(step)
    before = rt.bridge.stats().signals

    async def caller() -> None:
        await ctx.submit(step)

    with anyio.fail_after(3):
        await _behind_a_gate(ctx, caller, caller, caller)
    assert rt.bridge.stats().signals - before == 1  # the gate and the three, held together


async def test_each_task_of_a_shared_signal_resumes_after_its_own_work(rt: Runtime) -> None:
    """Three tasks of 20 ms of GPU work each share a signal: each caller resumes only once
    its own work has run, and the signal waits for the last one's."""
    ctx = rt.create_context("c", max_vram=16 * MB)
    spin = busy_kernel(rt)
    ended: list[bool] = []

    def step() -> Any:
        spin(ctx.stream, 0.02)
        done = rt.backend.create_event()
        ctx.stream.raw.record(done)
        return done

    for _ in range(2):
        await ctx.submit(step)  # learned: quick on the host, 20 ms on the GPU (< 0.1 s)
    before = rt.bridge.stats().signals

    async def caller() -> None:
        done = await ctx.submit(step)
        ended.append(done.query())

    with anyio.fail_after(5):
        await _behind_a_gate(ctx, caller, caller, caller)
    assert ended == [True, True, True]
    assert rt.bridge.stats().signals - before == 1  # the gate and all three, one signal


async def test_a_function_that_waits_for_an_earlier_tasks_caller_does_not_hang(
    rt: Runtime,
) -> None:
    """b's function waits on the host until a's caller has resumed, while a's signal is held
    for b: the completion watchdog sends the held signal at its second look."""
    ctx = rt.create_context("c", max_vram=16 * MB)
    launch = noop_kernel(rt)
    a_resumed = threading.Event()
    resumed: dict[str, float] = {}

    def step(wait_for: threading.Event | None) -> None:
        launch(ctx.stream)
        if wait_for is not None:
            assert wait_for.wait(10), "a's caller never resumed"

    for _ in range(3):
        await ctx.submit(step, None)  # quick: b will run while a's signal is held

    async def a() -> None:
        await ctx.submit(step, None)
        resumed["a"] = time.perf_counter()
        a_resumed.set()

    async def b() -> None:
        await ctx.submit(step, a_resumed)

    with anyio.fail_after(5):
        opened = await _behind_a_gate(ctx, a, b)
    # held, then sent by the watchdog (it looks every 0.1 s and sends on its second look)
    assert 0.05 < resumed["a"] - opened < 1.0, resumed["a"] - opened


@pytest.fixture
def no_watchdog(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The completion watchdog sends no held batch during the test (it still checks for
    faults): what is sent, the launcher thread sent."""
    monkeypatch.setattr(rt.bridge._watchdog, "send_stranded", lambda: None)


@pytest.mark.parametrize("slow_on", ["host", "gpu"])
async def test_a_task_does_not_wait_for_a_slow_task_after_it(
    rt: Runtime, no_watchdog: None, slow_on: str
) -> None:
    """quick's signal is not held for a task whose function took longer than batch_us
    (0.1 s), on the host or on the GPU, on its last call."""
    ctx = rt.create_context("c", max_vram=16 * MB)
    launch, spin = noop_kernel(rt), busy_kernel(rt)
    resumed: dict[str, float] = {}

    def quick() -> None:
        launch(ctx.stream)

    def slow() -> None:
        if slow_on == "host":
            launch(ctx.stream)
            time.sleep(0.3)
        else:
            spin(ctx.stream, 0.3)

    for _ in range(2):
        await ctx.submit(quick)
    await ctx.submit(slow)  # the launcher thread knows it is slow now

    async def first() -> None:
        await ctx.submit(quick)
        resumed["quick"] = time.perf_counter()

    async def second() -> None:
        await ctx.submit(slow)

    with anyio.fail_after(5):
        opened = await _behind_a_gate(ctx, first, second)
    assert resumed["quick"] - opened < 0.15  # held for slow, >= 0.3 s


async def test_tasks_held_when_their_context_is_destroyed_still_deliver(
    rt: Runtime, no_watchdog: None
) -> None:
    """a and b are held while c's function blocks; the context is destroyed meanwhile: the
    launcher thread, stopping, sends what it holds (the watchdog sends nothing here). c's
    function returns after its stream was closed: on CUDA its end is still recorded and it
    delivers 2; the host backend refuses work on a closed stream, so c fails with that."""
    ctx = rt.create_context("c", max_vram=16 * MB)
    launch = noop_kernel(rt)
    release = threading.Event()
    got: list[int] = []
    failed: list[tuple[int, BaseException]] = []

    def step(i: int, wait_for: threading.Event | None = None) -> int:
        launch(ctx.stream)
        if wait_for is not None:
            wait_for.wait(10)
        return i

    for i in range(2):
        await ctx.submit(step, i)

    def caller(i: int, wait_for: threading.Event | None = None) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            try:
                got.append(await ctx.submit(step, i, wait_for))
            except CudaError as exc:
                failed.append((i, exc))

        return one

    async def destroy_then_release() -> None:
        await anyio.sleep(0.15)  # the gate opened at 0.06 s: a and b held, c blocked
        await anyio.to_thread.run_sync(rt.destroy_context, ctx)
        release.set()

    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(destroy_then_release)
            await _behind_a_gate(ctx, caller(0), caller(1), caller(2, release))
    if rt.backend.name == "cuda":
        assert sorted(got) == [0, 1, 2]
    else:
        assert sorted(got) == [0, 1]
        assert [(i, "closed" in str(exc)) for i, exc in failed] == [(2, True)]
