"""Deadlines on clocks the test moves: nothing here sleeps or reads the wall clock.

The dispatcher reads time only through the clock it is given, so a deadline that passes
while a task waits in the queue is tested with a :class:`~clocks.FakeClock` moved by hand.
``ctx.submit``'s own timeout (it stops waiting at the deadline) runs on the event loop's
clock; under trio that clock can be trio's ``MockClock``, which jumps to the next timeout
as soon as every task is blocked, and the dispatcher is given the same clock.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
import trio
import trio.testing
from clocks import FakeClock

from pygpukit import MB, DeadlineExceeded, QoSPolicy
from pygpukit.runtime import (
    Dispatcher,
    DispatcherConfig,
    ExecutionContext,
    Runtime,
    Task,
    TaskState,
)

G, B, BE = QoSPolicy.GUARANTEED, QoSPolicy.BURSTABLE, QoSPolicy.BEST_EFFORT
ONE_SLOT: dict[QoSPolicy, int | None] = {G: None, B: None, BE: 1}


def _late(ms: str, ctx: str = "m") -> str:
    """The message of a task that missed its deadline by ``ms`` milliseconds."""
    return (
        rf"^task '.*' of context '{ctx}' missed its deadline by {ms} ms before it started "
        r"\(nothing ran\); give it a later deadline, a higher priority or tier, or less work "
        r"queued ahead of it$"
    )


def _assert_late(exc: object, ms: str, ctx: str = "m") -> None:
    assert isinstance(exc, DeadlineExceeded), exc
    assert re.match(_late(ms, ctx), str(exc)), str(exc)


class _Ctx:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_queued_task_launches_up_to_its_deadline_and_expires_after_it(
    fake_clock: FakeClock,
) -> None:
    launched: list[Task] = []
    d = Dispatcher(DispatcherConfig(tier_in_flight=ONE_SLOT), clock=fake_clock)
    d.bind(launched.append, None)
    outcomes: dict[str, list[tuple[Any, BaseException | None]]] = {}

    def task(name: str, deadline: float | None) -> Task:
        seen = outcomes.setdefault(name, [])
        return Task(_Ctx(name), BE, print, (), {}, 0, deadline, lambda v, e: seen.append((v, e)))

    first = task("first", None)
    late = task("late", 9.75)
    on_time = task("on_time", 10.0)
    for t in (first, late, on_time):
        d.enqueue(t)
    assert launched == [first] and d.queued() == [late, on_time]
    fake_clock.now = 10.0  # exactly on_time's deadline: it may still launch; late may not
    d.finished(first, None, None)
    assert launched == [first, on_time]
    assert (late.state, on_time.state) == (TaskState.EXPIRED, TaskState.RUNNING)
    [(value, exc)] = outcomes["late"]
    assert value is None
    _assert_late(exc, "250.0", "late")
    assert on_time.t_launched == 10.0 and outcomes["on_time"] == []
    assert d.queued() == [] and d.queued_ctx[late.context] == 0


# -- through ctx.submit, on a host runtime --------------------------------------------------
def _scheduled(clock: Callable[[], float]) -> Runtime:
    """A host runtime whose dispatcher allows one BestEffort task in flight and reads
    ``clock``."""
    policy = Dispatcher(DispatcherConfig(tier_in_flight=ONE_SLOT), clock=clock)
    return Runtime(backend="host", vram_limit=1 << 30, policy=policy)


@pytest.fixture
def fake_rt(fake_clock: FakeClock) -> Iterator[Runtime]:
    rt = _scheduled(fake_clock)
    try:
        yield rt
    finally:
        rt.close()


async def _outcome(results: dict[str, Any], name: str, ctx: ExecutionContext, **kw: Any) -> None:
    """Submit a task that records ``name`` when it runs; keep what submit returned or
    raised under ``name``."""
    try:
        results[name] = await ctx.submit(lambda: results.setdefault("ran", []).append(name), **kw)
    except DeadlineExceeded as exc:
        results[name] = exc


@pytest.mark.anyio
async def test_submit_fails_a_task_whose_deadline_passes_in_the_queue(
    fake_rt: Runtime, fake_clock: FakeClock
) -> None:
    ctx = fake_rt.create_context("m", max_vram=MB, qos=BE)
    gate = threading.Event()
    results: dict[str, Any] = {}
    with anyio.fail_after(30):  # only if the test is broken: nothing here waits on time
        async with anyio.create_task_group() as tg:
            tg.start_soon(ctx.submit, lambda: gate.wait(30))  # holds BestEffort's one slot
            await anyio.wait_all_tasks_blocked()
            try:
                # submit() also stops waiting at the deadline, on the loop's clock: an hour
                # away, so only the dispatcher's clock decides here
                tg.start_soon(lambda: _outcome(results, "late", ctx, deadline=3600.0))
                tg.start_soon(lambda: _outcome(results, "on_time", ctx, deadline=3600.5))
                await anyio.wait_all_tasks_blocked()
                assert ctx.usage().queued == 2 and results == {}
                fake_clock.now = 3600.5  # late's deadline passes while it waits; on_time's is now
            finally:
                gate.set()  # the slot frees: the dispatcher expires late, launches on_time
    assert results["ran"] == ["on_time"] and results["on_time"] is None
    _assert_late(results["late"], "500.0")
    usage = ctx.usage()
    assert (usage.tasks, usage.queued, usage.in_flight) == (2, 0, 0)


@pytest.mark.anyio
async def test_submit_with_a_deadline_already_past_runs_nothing(
    fake_rt: Runtime, fake_clock: FakeClock
) -> None:
    ctx = fake_rt.create_context("m", max_vram=MB, qos=BE)
    ran: list[int] = []
    fake_clock.now = 100.0
    with pytest.raises(DeadlineExceeded, match=_late("1.0")):
        await ctx.submit(lambda: ran.append(1), deadline=99.999)
    await ctx.submit(lambda: ran.append(2), deadline=100.0)  # due now: not late yet
    assert ran == [2]
    assert (ctx.usage().tasks, ctx.usage().queued) == (1, 0)


class TestOnTriosMockClock:
    """``submit()``'s own timeout, in virtual time: the loop jumps to it at once."""

    @pytest.fixture
    def mock_clock(self) -> trio.testing.MockClock:
        return trio.testing.MockClock(autojump_threshold=0)

    @pytest.fixture
    def anyio_backend(self, mock_clock: trio.testing.MockClock) -> tuple[str, dict[str, Any]]:
        return ("trio", {"clock": mock_clock})

    @pytest.fixture
    def mock_rt(self, mock_clock: trio.testing.MockClock) -> Iterator[Runtime]:
        rt = _scheduled(mock_clock.current_time)
        try:
            yield rt
        finally:
            rt.close()

    @pytest.mark.anyio
    async def test_submit_gives_up_waiting_at_its_deadline(self, mock_rt: Runtime) -> None:
        ctx = mock_rt.create_context("m", max_vram=MB, qos=BE)
        gate = threading.Event()
        ran: list[int] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(ctx.submit, lambda: gate.wait(30))  # holds BestEffort's one slot
            await anyio.wait_all_tasks_blocked()
            try:
                start = trio.current_time()
                # virtual time: were submit() not to give up at its deadline, the clock would
                # jump on to this one and fail the test at once. (Nothing may wait on the clock
                # while a thread works: the clock would jump past it.)
                with anyio.fail_after(60), pytest.raises(DeadlineExceeded, match=_late("0.0")):
                    await ctx.submit(lambda: ran.append(1), deadline=start + 5.0)
                # the dispatcher never got a chance to launch it: submit's timeout fired, on
                # the dot, with the slot still held
                assert trio.current_time() - start == 5.0
                assert ctx.usage().in_flight == 1 and ctx.usage().queued == 0
            finally:
                gate.set()
        assert ran == []
        assert ctx.usage().tasks == 1
