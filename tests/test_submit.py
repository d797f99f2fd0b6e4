"""ctx.submit: results, errors, cancellation, deadlines, bounded queues, tier isolation."""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
import traceback
import weakref
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import pytest

from pygpukit import (
    MB,
    DeadlineExceeded,
    QoSPolicy,
    QueueFull,
    context_session,
    current_context,
    current_stream,
)
from pygpukit.runtime import Dispatcher, DispatcherConfig, LauncherConfig, Runtime

pytestmark = pytest.mark.anyio


async def test_submit_runs_on_the_launcher_with_the_context_bound(rt: Runtime) -> None:
    ctx = rt.create_context("m", max_vram=16 * MB)
    loop_thread = threading.get_ident()

    def step(n: int, *, scale: float) -> tuple[int, float, bool, bool]:
        assert current_context() is ctx and current_stream() is ctx.stream
        if rt.backend.name == "cuda":
            import cupy

            assert cupy.cuda.get_current_stream().ptr == ctx.stream.id
        a = rt.xp.ones((n,), dtype="float32")
        return threading.get_ident(), float(a.sum()) * scale, ctx.usage().used > 0, True

    thread, total, charged, _ = await ctx.submit(step, 1000, scale=2.0)
    assert thread != loop_thread
    assert total == 2000.0 and charged
    usage = ctx.usage()
    assert (usage.tasks, usage.failed, usage.in_flight, usage.queued) == (1, 0, 0, 0)
    assert usage.used == 0  # the task's arrays died with it


async def test_exceptions_propagate_with_their_traceback(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("m", max_vram=MB)

    def broken() -> None:
        raise KeyError("weights.bin")

    with pytest.raises(KeyError, match=r"weights\.bin") as info:
        await ctx.submit(broken)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "broken" in frames
    assert ctx.usage().failed == 1


def _blocker(rt: Runtime, ctx) -> threading.Event:  # type: ignore[no-untyped-def]
    """Occupy ctx's stream (host backend) until the returned event is set."""
    gate = threading.Event()
    ctx.stream.launch_host_func(lambda: gate.wait(10))
    return gate


async def test_cancel_before_launch_removes_the_task(host_rt: Runtime) -> None:
    policy = host_rt.policy
    assert isinstance(policy, Dispatcher)
    ctx = host_rt.create_context("m", max_vram=MB, qos=QoSPolicy.BEST_EFFORT)
    gate = threading.Event()
    ran: list[int] = []

    def hold() -> None:
        ctx.stream.launch_host_func(lambda: gate.wait(10))

    async with anyio.create_task_group() as tg:
        for _ in range(2):  # BestEffort's in-flight cap is 2: these two fill it
            tg.start_soon(ctx.submit, hold)
        await anyio.wait_all_tasks_blocked()
        with anyio.CancelScope() as scope:
            tg.start_soon(lambda: ctx.submit(lambda: ran.append(1)))
            await anyio.wait_all_tasks_blocked()
            assert ctx.usage().queued == 1
            scope.cancel()
        tg.cancel_scope.cancel()
    assert ctx.usage().queued == 0
    gate.set()
    await ctx.synchronize()
    await anyio.sleep(0.05)
    assert ran == []  # it never ran
    assert policy.queued() == []


async def test_cancel_after_launch_waits_for_nothing_and_leaks_nothing(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("m", max_vram=16 * MB)
    gate = threading.Event()
    started = threading.Event()

    def slow() -> None:
        started.set()
        ctx.stream.launch_host_func(lambda: gate.wait(10))

    with anyio.move_on_after(0.1) as scope:
        await ctx.submit(slow)
    assert scope.cancelled_caught and started.is_set()
    assert ctx.usage().in_flight == 1  # its GPU work is still running
    gate.set()
    with anyio.fail_after(5):
        while ctx.usage().in_flight:
            await anyio.sleep(0.01)
    usage = ctx.usage()
    assert (usage.tasks, usage.in_flight, usage.queued, usage.used) == (1, 0, 0, 0)
    assert host_rt.bridge.stats().pending == 0


async def test_deadline_fails_without_running(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("m", max_vram=MB, qos=QoSPolicy.BEST_EFFORT)
    gate = threading.Event()
    ran: list[int] = []

    async with anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(ctx.submit, lambda: ctx.stream.launch_host_func(lambda: gate.wait(10)))
        await anyio.wait_all_tasks_blocked()
        start = time.monotonic()
        with pytest.raises(
            DeadlineExceeded,
            match=r"^task '.*' of context 'm' missed its deadline by \d+\.\d ms before it "
            r"started \(nothing ran\); give it a later deadline, a higher priority or tier, or "
            r"less work queued ahead of it$",
        ):
            await ctx.submit(lambda: ran.append(1), deadline=time.monotonic() + 0.1)
        assert 0.09 < time.monotonic() - start < 1.0
        gate.set()
    assert ran == []
    assert ctx.usage().queued == 0


async def test_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = Runtime(
        backend="host", policy=Dispatcher(DispatcherConfig(context_in_flight=1, max_queued=3))
    )
    try:
        ctx = rt.create_context("m", max_vram=MB)
        gate = threading.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ctx.submit, lambda: ctx.stream.launch_host_func(lambda: gate.wait(10)))
            await anyio.wait_all_tasks_blocked()
            for _ in range(3):
                tg.start_soon(ctx.submit, lambda: None)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(
                QueueFull, match=r"^context 'm' already has 3 tasks waiting to launch; retry later"
            ):
                await ctx.submit(lambda: None)
            gate.set()
        assert ctx.usage().tasks == 4
    finally:
        rt.close()


async def test_guaranteed_wait_stays_bounded_under_a_best_effort_flood(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYGPUKIT_HOST_WORKERS", "2")
    with Runtime(backend="host") as rt:
        g = rt.create_context("g", max_vram=MB, qos=QoSPolicy.GUARANTEED)
        be = rt.create_context("be", max_vram=MB, qos=QoSPolicy.BEST_EFFORT)

        def be_step() -> None:
            be.stream.launch_host_func(lambda: time.sleep(0.02))

        def g_step() -> None:
            g.stream.launch_host_func(lambda: time.sleep(0.002))

        waits: list[float] = []
        async with anyio.create_task_group() as tg:
            for _ in range(60):  # ~1.2 s of BestEffort work queued ahead
                tg.start_soon(be.submit, be_step)
            await anyio.wait_all_tasks_blocked()
            for _ in range(10):
                t0 = time.perf_counter()
                await g.submit(g_step)
                waits.append(time.perf_counter() - t0)
            assert be.usage().queued > 0  # the flood was still there throughout
        # With 2 units and BestEffort capped at 2 in flight, a Guaranteed step waits at most
        # for one BestEffort item (20 ms) plus its own 2 ms, never for the queue.
        assert max(waits) < 0.15, waits
        assert be.usage().tasks == 60


async def test_a_failing_listener_does_not_strand_other_tasks(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("m", max_vram=MB)
    calls: list[int] = []

    def flaky(task: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("listener bug")

    host_rt.on_task_done(flaky)
    with anyio.fail_after(10):
        results = []
        async with anyio.create_task_group() as tg:
            for i in range(4):

                async def one(i: int = i) -> None:
                    results.append(await ctx.submit(lambda i=i: i * 2))

                tg.start_soon(one)
    assert sorted(results) == [0, 2, 4, 6]
    assert len(calls) == 4
    assert ctx.usage().in_flight == 0


async def test_submit_after_a_host_fault_raises_instead_of_hanging(host_rt: Runtime) -> None:
    from pygpukit import CudaError

    ctx = host_rt.create_context("m", max_vram=MB)

    def bad() -> None:
        ctx.stream.launch_host_func(lambda: 1 / 0)  # a kernel that faults the device

    with anyio.fail_after(10):
        with pytest.raises(CudaError):
            await ctx.submit(bad)
        with pytest.raises(CudaError):
            await ctx.submit(lambda: 6)


async def test_a_launcher_thread_that_cannot_bind_its_stream_fails_its_tasks(
    host_rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher thread binds its context's stream (and device) once, as it starts;
    where that fails (another device's stream on a broken set-up), every task of the
    context fails with the error instead of waiting for a thread that is gone."""
    from pygpukit import CudaError

    backend = type(host_rt.backend)
    real = backend.bind_stream

    def bind(self: object, stream: object, *, route: bool = True) -> object:
        if threading.current_thread().name.startswith("pygpukit-launcher"):
            raise CudaError("cannot make the device current")
        return real(self, stream)  # type: ignore[arg-type]

    monkeypatch.setattr(backend, "bind_stream", bind)
    ctx = host_rt.create_context("m", max_vram=MB)
    with anyio.fail_after(10):
        for value in (1, 2):
            with pytest.raises(CudaError, match="cannot make the device current"):
                await ctx.submit(lambda v=value: v)
    assert ctx.usage().failed == 2


async def test_destroying_a_context_lets_running_tasks_deliver(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("m", max_vram=MB)
    results: list[object] = []

    def work(i: int) -> int:
        if i == 0:  # still running when the context is destroyed, the others launched
            time.sleep(0.02)
        ctx.stream.launch_host_func(lambda: time.sleep(0.02))
        return i

    async def one(i: int) -> None:
        results.append(await ctx.submit(work, i))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
            await anyio.sleep(0.005)
            await anyio.to_thread.run_sync(host_rt.destroy_context, ctx)
    assert sorted(results) == [0, 1, 2]  # type: ignore[type-var]


# generous, so the test does not hinge on how long a quick call takes on a loaded machine
# (in the GPU machine's full run a quick call on the launcher thread once took over 100 µs)
INLINE = LauncherConfig(inline_us=2000)


@pytest.fixture
def inline_rt(backend: str) -> Iterator[Runtime]:
    """A fresh runtime with inline execution of quick functions turned on (it is opt-in)."""
    with Runtime(backend=backend, vram_limit=1 << 30, launcher=INLINE) as runtime:
        yield runtime


async def test_quick_functions_run_inline_and_keep_the_order(inline_rt: Runtime) -> None:
    """With inline execution on, a function seen to be quick runs on the loop thread (CUDA)
    once the launcher is idle; a slow one, or one behind queued work, goes to the launcher;
    the order holds."""
    rt = inline_rt
    ctx = rt.create_context("inline", max_vram=16 * MB)
    loop_thread = threading.get_ident()
    seen: list[tuple[str, int]] = []
    xp = rt.xp

    def quick(tag: str) -> int:
        assert current_context() is ctx and current_stream() is ctx.stream
        seen.append((tag, threading.get_ident()))
        return int(xp.ones((256,), dtype="float32").size)  # charged to ctx, freed

    def slow(tag: str) -> None:
        time.sleep(0.02)
        seen.append((tag, threading.get_ident()))

    with context_session(ctx):
        xp.ones((256,), dtype="float32")  # compile the kernel beforehand
    assert await ctx.submit(quick, "first") == 256  # unknown yet: the launcher
    assert await ctx.submit(quick, "warm") == 256  # its first call was slower (new thread)
    assert await ctx.submit(quick, "second") == 256
    await ctx.submit(slow, "slow-1")
    await ctx.submit(slow, "slow-2")  # known slow: the launcher again
    async with anyio.create_task_group() as tg:  # a slow task queued ahead: no overtaking
        tg.start_soon(ctx.submit, slow, "slow-3")
        await anyio.sleep(0.001)
        tg.start_soon(ctx.submit, quick, "after-slow")
    threads = dict(seen)
    assert [tag for tag, _ in seen] == [
        "first",
        "warm",
        "second",
        "slow-1",
        "slow-2",
        "slow-3",
        "after-slow",
    ]
    assert threads["first"] != loop_thread and threads["slow-2"] != loop_thread
    if rt.backend.name == "cuda":
        assert threads["second"] == loop_thread  # inline: no thread hand-off
    else:
        assert threads["second"] != loop_thread  # the host executor's units run tasks
    usage = ctx.usage()
    assert (usage.tasks, usage.failed, usage.in_flight, usage.used) == (7, 0, 0, 0)


async def test_inline_is_opt_in_and_errors_still_reach_the_caller(rt: Runtime) -> None:
    calls: list[int] = []

    def flaky(fail: bool) -> int:
        calls.append(threading.get_ident())
        if fail:
            raise KeyError("inline")
        return 1

    plain = rt.create_context("plain", max_vram=16 * MB)  # the default: never inline
    for _ in range(4):
        await plain.submit(flaky, False)
    assert threading.get_ident() not in calls

    on = Runtime(backend=rt.backend.name, launcher=INLINE)
    try:
        ctx = on.create_context("inline", max_vram=16 * MB)
        for _ in range(3):
            await ctx.submit(flaky, False)
        with pytest.raises(KeyError, match="inline"):
            await ctx.submit(flaky, True)  # inline on CUDA: raised to the caller all the same
        assert ctx.usage().failed == 1 and ctx.usage().in_flight == 0
    finally:
        on.close()


@dataclasses.dataclass
class _Step:  # a dataclass with __call__ is unhashable
    scale: int

    def __call__(self, x: int) -> int:
        return self.scale * x


@pytest.mark.parametrize("inline", [False, True], ids=["default", "inline"])
async def test_unhashable_callables_and_made_per_call_functions(
    request: pytest.FixtureRequest, backend: str, inline: bool
) -> None:
    """Remembering how long functions take neither fails on unhashable callables nor keeps
    what a function made per call captured alive (its arrays stay charged otherwise)."""
    rt: Runtime = request.getfixturevalue("inline_rt" if inline else "rt")
    ctx = rt.create_context("calls", max_vram=64 * MB)
    for i in range(5):
        assert await ctx.submit(_Step(3), i) == 3 * i
    xp = rt.xp
    alive = weakref.WeakSet()  # type: ignore[var-annotated]
    for _ in range(10):
        with context_session(ctx):
            held = xp.ones((1 << 18,), dtype="float32")  # 1 MiB captured by the closure
        box = _Box(held)
        alive.add(box)
        assert await ctx.submit(lambda b=box: int(b.array.size)) == 1 << 18
        del held, box
    # the launcher thread lets go of a task once it is back waiting for the next (it may
    # not be yet when the await returns): after one more task none may be left alive
    assert await ctx.submit(int) == 0
    gc.collect()
    assert len(alive) == 0
    assert ctx.usage().used == 0 and ctx.usage().failed == 0
    assert await ctx.submit(lambda: 1) == 1  # and the runtime is healthy


class _Box:
    def __init__(self, array: object) -> None:
        self.array = array


async def test_a_task_finished_inline_still_yields_with_a_deadline(inline_rt: Runtime) -> None:
    """A submit that finished synchronously (inline, GPU already done) is a scheduling point
    with or without a deadline: a loop of them does not starve other tasks."""
    from pygpukit.benchmarks._common import noop_kernel

    rt = inline_rt
    ctx = rt.create_context("yield", max_vram=16 * MB)
    launch = noop_kernel(rt)
    ticks = 0

    def task() -> None:
        launch(ctx.stream)

    async def ticker() -> None:  # a timer: runs only if the loop gets to run other tasks
        nonlocal ticks
        while True:
            await anyio.sleep(0.0002)
            ticks += 1

    for _ in range(5):
        await ctx.submit(task)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.001)
        start, t0 = ticks, time.perf_counter()
        while time.perf_counter() - t0 < 0.05:  # 50 ms of back-to-back submits
            await ctx.submit(task, deadline=time.monotonic() + 10)
        assert ticks - start >= 5  # starved: 0
        tg.cancel_scope.cancel()


async def test_many_quick_tasks_in_flight_all_finish(inline_rt: Runtime) -> None:
    """Quick tasks launched inline as others finish must not nest their completions (on the
    GPU a nested chain down a queue of hundreds overflowed the stack and stranded tasks)."""
    from pygpukit.benchmarks._common import noop_kernel

    rt = inline_rt
    ctx = rt.create_context("many", max_vram=16 * MB)
    launch = noop_kernel(rt)

    def task(i: int) -> int:
        launch(ctx.stream)
        return i

    for i in range(20):  # learn that it is quick
        await ctx.submit(task, i)
    with anyio.fail_after(60):
        for _ in range(2):
            results = await _gather([ctx.submit(task, i) for i in range(400)])
            assert results == list(range(400))
    usage = ctx.usage()
    assert (usage.tasks, usage.failed, usage.in_flight, usage.queued) == (820, 0, 0, 0)


async def _gather(coros: list) -> list:  # type: ignore[type-arg]
    out: list[object] = [None] * len(coros)

    async def one(i: int, c) -> None:  # type: ignore[no-untyped-def]
        out[i] = await c

    async with anyio.create_task_group() as tg:
        for i, c in enumerate(coros):
            tg.start_soon(one, i, c)
    return out
