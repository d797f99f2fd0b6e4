"""Waiters on one stream sharing a completion signal (``CompletionBridge.coalesce``, opt-in)."""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import anyio
import pytest

from pygpukit import CudaError, InvalidArgument
from pygpukit.benchmarks._common import busy_kernel
from pygpukit.runtime import CompletionBridge, Runtime, make_channel

pytestmark = pytest.mark.anyio


@pytest.fixture
def sharing(rt: Runtime) -> Iterator[CompletionBridge]:
    """``rt``'s bridge with signals shared, up to 32 to one, and no spinning (so every
    await arms): restored afterwards."""
    bridge = rt.bridge
    coalesce, spin = bridge.coalesce, bridge.spin_us
    bridge.coalesce, bridge.spin_us = 32, 0.0
    try:
        yield bridge
    finally:
        bridge.coalesce, bridge.spin_us = coalesce, spin


def _shared(**kwargs: object) -> CompletionBridge:
    return CompletionBridge(make_channel("python"), coalesce=32, **kwargs)  # type: ignore[arg-type]


async def test_awaits_on_one_stream_share_signals_and_each_waits_for_its_own_work(
    rt: Runtime, sharing: CompletionBridge, anyio_backend: tuple[str, dict[str, object]]
) -> None:
    """100 tasks each queue a 1 ms step of their own and await the stream, all in one loop
    iteration while a long step holds the stream: on asyncio the first gets a signal of its
    own and the other 99 share, exactly 32 to a signal; on trio each gets its own. Either
    way no task resumes before its own step has run."""
    stream = rt.create_stream()
    n, ran = 100, [False] * 100
    early: list[int] = []

    def step(i: int) -> None:
        time.sleep(0.001)
        ran[i] = True

    async def task(i: int) -> None:
        stream.launch_host_func(functools.partial(step, i))
        await stream
        if not ran[i]:
            early.append(i)

    before = sharing.stats()
    busy_kernel(rt)(stream, 0.05)  # nothing runs until every task has armed
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(task, i)
    after = sharing.stats()
    assert early == [], f"tasks {early} resumed before their own step had run"
    assert after.armed - before.armed == n
    signals = after.signals - before.signals
    if anyio_backend[0] == "trio":
        assert signals == n
    else:
        assert signals == 1 + math.ceil((n - 1) / 32)
    assert after.pending == 0


def test_sharing_is_off_by_default_so_later_work_cannot_hold_an_earlier_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a signal each (the default), a waiter resumes after its own step even when a
    step queued after it waits on the host for that resumption. A shared signal would be
    queued after that step, and neither would ever finish: why sharing is opt-in."""
    monkeypatch.delenv("PYGPUKIT_COALESCE", raising=False)
    bridge = CompletionBridge(make_channel("python"))
    assert bridge.coalesce == 1
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()
        released = threading.Event()
        timed_out: list[bool] = []

        async def first() -> None:  # the idle stream's waiter
            stream.launch_host_func(lambda: None)
            await stream

        async def producer() -> None:  # releases the consumer's input once its step ran
            stream.launch_host_func(lambda: None)
            await stream
            released.set()

        async def consumer() -> None:  # its step waits on the host for the producer
            stream.launch_host_func(lambda: timed_out.append(not released.wait(5)))
            await stream

        async def main() -> None:
            await asyncio.gather(first(), producer(), consumer())

        asyncio.run(main())
        assert timed_out == [False]


def test_a_first_waiter_is_not_held_by_work_queued_after_it() -> None:
    """The waiter that finds its stream idle is signalled at once: later tasks' slow steps
    on the same stream, and their shared signal, do not delay it. (asyncio runs tasks in
    the order they were made; trio shares no signals.)"""
    with Runtime(backend="host", bridge=_shared()) as rt:
        stream = rt.create_stream()
        gate = threading.Event()
        order: list[str] = []

        async def first() -> None:
            await stream
            order.append("first")
            gate.set()  # only now may the later tasks' steps finish

        async def later() -> None:
            stream.launch_host_func(lambda: gate.wait(10))
            await stream  # shares a signal: after its own (gated) step
            order.append("later")

        async def main() -> None:
            await asyncio.wait_for(asyncio.gather(first(), *(later() for _ in range(3))), 20)

        asyncio.run(main())
        assert order == ["first", "later", "later", "later"]
        assert rt.bridge.stats().signals == 2  # first's own; one for the three later


def test_on_done_shares_only_when_asked() -> None:
    """A callback armed without ``share`` may be waited for by blocking the loop's thread:
    it gets a signal of its own even with ``coalesce`` above 1."""
    bridge = _shared()
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()
        got: list[BaseException | None] = []

        async def main() -> None:
            for _ in range(10):
                bridge.on_done(stream.raw, rt.backend, got.append)
            stream.synchronize()

        asyncio.run(main())
        bridge._on_readable()
        assert got == [None] * 10
        assert bridge.stats().signals == 10


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"])
def test_a_bad_coalesce_is_refused_naming_the_rule(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="must be an integer >= 1"):
        CompletionBridge(make_channel("python"), coalesce=bad)  # type: ignore[arg-type]


def test_a_bad_coalesce_from_the_environment_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGPUKIT_COALESCE", "lots")
    with pytest.raises(InvalidArgument, match=r"PYGPUKIT_COALESCE.*'lots'"):
        CompletionBridge(make_channel("python"))


def _arm(bridge: CompletionBridge, rt: Runtime, stream: object, into: dict[str, object]) -> None:
    """a: a signal of its own (the stream is idle); b, c: one shared, sent after this step."""
    for name in "abc":
        bridge.on_done(
            stream.raw,  # type: ignore[attr-defined]
            rt.backend,
            functools.partial(into.__setitem__, name),
            share=True,
        )


def test_a_shared_signal_that_cannot_be_enqueued_fails_every_waiter_of_it() -> None:
    """The device faults after waiters joined a batch and before its signal is sent: each
    of them gets the error from the send (the watchdog here would take an hour)."""
    bridge = _shared(watchdog_interval=3600)
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()
        got: dict[str, object] = {}

        async def main() -> None:
            gate = threading.Event()
            stream.launch_host_func(lambda: gate.wait(10))
            _arm(bridge, rt, stream, got)
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
    bridge = _shared(watchdog_interval=3600)
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()
        ran: list[int] = []
        got: dict[str, object] = {}

        async def main() -> None:
            for i in range(3):
                stream.launch_host_func(functools.partial(ran.append, i))
            _arm(bridge, rt, stream, got)
            stream.close()
            await asyncio.sleep(0)  # the loop tries to send b and c's signal: closed

        asyncio.run(main())
        bridge._on_readable()
        assert ran == [0, 1, 2]
        assert got == {"a": None, "b": None, "c": None}
        assert bridge.stats().pending == 0


class Stranded(NamedTuple):
    bridge: CompletionBridge
    stream: Any
    got: dict[str, object]


@pytest.fixture
def stranded() -> Iterator[Stranded]:
    """:func:`_arm` on a loop that stops before the iteration that would send b and c's
    shared signal; the bridge's watchdog looks only when a test calls it by hand."""
    bridge = _shared(watchdog_interval=3600)
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()
        got: dict[str, object] = {}
        loop = asyncio.new_event_loop()

        async def arm() -> None:
            _arm(bridge, rt, stream, got)
            loop.stop()

        try:
            loop.run_until_complete(arm())
            yield Stranded(bridge, stream, got)
        finally:
            loop.close()


def test_a_batch_left_by_a_stopped_loop_is_sent_by_the_watchdog(stranded: Stranded) -> None:
    """A loop that stops before it runs the call that sends its open batch would strand
    those waiters; the watchdog sends a stopped loop's batches."""
    bridge = stranded.bridge
    assert bridge.stats().signals == 1
    bridge._watchdog.send_stranded()  # one look: the loop is not running
    assert bridge.stats().signals == 2
    stranded.stream.synchronize()
    bridge._on_readable()
    assert stranded.got == {"a": None, "b": None, "c": None}
    assert bridge.stats().pending == 0


def test_a_batch_of_a_loop_blocked_in_one_iteration_is_sent_by_the_watchdog() -> None:
    """A loop's thread that blocks after its tasks joined a batch (a blocking call in a
    coroutine) does not hold their signal for longer than the watchdog's next look."""
    bridge = _shared(watchdog_interval=0.02)
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()
        got: dict[str, object] = {}
        sent: list[bool] = []

        async def main() -> None:
            _arm(bridge, rt, stream, got)
            deadline = time.monotonic() + 5  # block this loop's thread meanwhile
            while bridge.stats().signals < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # noqa: ASYNC251 (blocking is the point)
            sent.append(bridge.stats().signals == 2)
            stream.synchronize()
            await asyncio.sleep(0)

        asyncio.run(main())
        bridge._on_readable()
        assert sent == [True]
        assert got == {"a": None, "b": None, "c": None}


def test_the_watchdog_sends_no_batch_into_a_stream_being_captured(stranded: Stranded) -> None:
    """A shared signal sent while its stream is captured would become a node of the graph
    (resolving nobody until a replay, and then a stale token at every replay): the
    watchdog leaves such a batch open until the capture is over."""
    bridge, raw = stranded.bridge, stranded.stream.raw
    raw.capturing = True  # as CUDA's capture sets it
    for _ in range(3):
        bridge._watchdog.send_stranded()
    assert bridge.stats().signals == 1, "a signal was sent into the capture"
    raw.capturing = False
    bridge._watchdog.send_stranded()
    assert bridge.stats().signals == 2
    stranded.stream.synchronize()
    bridge._on_readable()
    assert stranded.got == {"a": None, "b": None, "c": None}
