"""Waiters on one stream sharing a completion signal (``CompletionBridge.coalesce``)."""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time

import anyio
import pytest

from pygpukit import CudaError, InvalidArgument
from pygpukit.runtime import Runtime
from pygpukit.runtime._completion import CompletionBridge, make_channel

pytestmark = pytest.mark.anyio


async def test_awaits_on_one_stream_share_signals_and_each_waits_for_its_own_work(
    rt: Runtime, anyio_backend: tuple[str, dict[str, object]]
) -> None:
    """100 tasks each queue a step of their own and await the stream, all in one loop
    iteration: on asyncio they share signals, at most ``coalesce`` waiters to one; on trio
    each gets its own. Either way no task resumes before its own step has run."""
    stream = rt.create_stream()
    n, ran = 100, [False] * 100
    early: list[int] = []

    async def step(i: int) -> None:
        stream.launch_host_func(functools.partial(ran.__setitem__, i, True))
        await stream
        if not ran[i]:
            early.append(i)

    before = rt.bridge.stats()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(step, i)
    after = rt.bridge.stats()
    assert early == [], f"tasks {early} resumed before their own work had run"
    armed, signals = after.armed - before.armed, after.signals - before.signals
    assert armed == n or (armed == n - 1 and rt.backend.spin_helps)  # one may spin it out
    if anyio_backend[0] == "trio":
        assert signals == armed
    else:  # the first waiter alone gets its own; the rest share, `coalesce` to a signal
        assert 2 <= signals <= 1 + math.ceil((armed - 1) / rt.bridge.coalesce), signals
    assert after.pending == 0


def test_a_first_waiter_is_not_held_by_work_queued_after_it(host_rt: Runtime) -> None:
    """The waiter that finds its stream idle is signalled at once: a later task's slow step
    on the same stream, and the later waiters sharing a signal, do not delay it. (asyncio
    runs tasks in the order they were made; trio shares no signals.)"""
    stream = host_rt.create_stream()
    gate = threading.Event()
    order: list[str] = []

    async def first() -> None:
        await stream
        order.append("first")
        gate.set()  # only now may the later tasks' steps finish

    async def later(i: int) -> None:
        stream.launch_host_func(lambda: gate.wait(10))
        await stream  # shares a signal: after its own (gated) step
        order.append("later")

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(first(), *(later(i) for i in range(3))), 20)

    asyncio.run(main())
    assert order == ["first", "later", "later", "later"]


def test_coalesce_1_gives_every_waiter_its_own_signal() -> None:
    bridge = CompletionBridge(make_channel("python"), coalesce=1)
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()

        async def main() -> None:
            await asyncio.gather(*(_await(stream) for _ in range(50)))

        asyncio.run(main())
        stats = bridge.stats()
        assert stats.armed == stats.signals == 50


async def _await(stream: object) -> None:
    await stream  # type: ignore[misc]


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"])
def test_a_bad_coalesce_is_refused_naming_the_rule(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="coalesce must be an integer >= 1"):
        CompletionBridge(make_channel("python"), coalesce=bad)  # type: ignore[arg-type]


def test_a_shared_signal_that_cannot_be_enqueued_fails_every_waiter_of_it() -> None:
    """The device faults after waiters joined a batch and before its signal is sent: each
    of them gets the error from the send (the watchdog here would take an hour)."""
    bridge = CompletionBridge(make_channel("python"), watchdog_interval=3600)
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()
        got: dict[str, BaseException | None] = {}

        async def main() -> None:
            gate = threading.Event()
            stream.launch_host_func(lambda: gate.wait(10))
            for name in "abc":  # a: its own signal; b, c: one shared, sent after this step
                bridge.on_done(stream.raw, rt.backend, functools.partial(got.__setitem__, name))
            stream.launch_host_func(lambda: 1 / 0)
            gate.set()
            with pytest.raises(CudaError):
                stream.synchronize()  # the fault has landed
            await asyncio.sleep(0)  # the loop sends b and c's signal: refused

        asyncio.run(main())
        bridge._on_readable()  # a's signal (what the loop runs when the fd is readable)
        assert got["a"] is None
        assert isinstance(got["b"], CudaError) and isinstance(got["c"], CudaError)
        assert bridge.stats().pending == 0


def test_waiters_of_a_stream_closed_before_their_shared_signal_resolve() -> None:
    """``close()`` waits for the stream's work, so waiters still in an open batch when the
    stream closes have had their work run: they resolve, without an error."""
    bridge = CompletionBridge(make_channel("python"), watchdog_interval=3600)
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()
        ran: list[int] = []
        got: dict[str, BaseException | None] = {}

        async def main() -> None:
            for i, name in enumerate("abc"):  # a: its own signal; b, c: one shared
                stream.launch_host_func(functools.partial(ran.append, i))
                bridge.on_done(stream.raw, rt.backend, functools.partial(got.__setitem__, name))
            stream.close()
            await asyncio.sleep(0)  # the loop tries to send b and c's signal: closed

        asyncio.run(main())
        bridge._on_readable()
        assert ran == [0, 1, 2]
        assert got == {"a": None, "b": None, "c": None}
        assert bridge.stats().pending == 0


def test_a_batch_left_by_a_stopped_loop_is_sent_by_the_watchdog() -> None:
    """A loop that stops before it runs the call that sends its open batch would strand
    those waiters; the watchdog sends a stopped loop's batches."""
    bridge = CompletionBridge(make_channel("python"), watchdog_interval=0.02)
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()
        got: list[BaseException | None] = []
        loop = asyncio.new_event_loop()

        async def arm() -> None:
            bridge.on_done(stream.raw, rt.backend, got.append)  # its own signal
            bridge.on_done(stream.raw, rt.backend, got.append)  # opens a batch
            loop.stop()  # before the loop's next iteration, which would send it

        try:
            loop.run_until_complete(arm())
            deadline = time.monotonic() + 5
            while bridge.stats().signals < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            stream.synchronize()
            bridge._on_readable()
            assert got == [None, None]
            assert bridge.stats().pending == 0
        finally:
            loop.close()
