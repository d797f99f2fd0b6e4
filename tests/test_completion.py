"""Awaiting GPU completion: streams, events, cancellation, faults, both channels."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable

import anyio
import pytest

from pygpukit import CudaError
from pygpukit.benchmarks._common import busy_kernel
from pygpukit.runtime import COMPLETION_CAPACITY as CAPACITY
from pygpukit.runtime import CompletionBridge, Runtime, make_channel

pytestmark = pytest.mark.anyio


def _gate(stream) -> threading.Event:  # type: ignore[no-untyped-def]
    """Hold a host-backend ``stream`` until the returned event is set.

    (Not for CUDA: the driver runs host functions on one thread, so a blocking one would
    hold every other stream's host functions too. CUDA tests use :func:`_busy`.)
    """
    gate = threading.Event()
    stream.launch_host_func(lambda: gate.wait(10))
    return gate


def _busy(rt: Runtime, stream, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """Keep ``stream`` busy for about ``seconds`` of device time."""
    busy_kernel(rt)(stream, seconds)


async def test_await_stream_returns_after_the_work(rt: Runtime) -> None:
    stream = rt.create_stream()
    ran: list[float] = []
    stream.launch_host_func(lambda: (time.sleep(0.05), ran.append(time.perf_counter())))
    await stream
    assert ran, "the await returned before the stream's work ran"
    assert stream.query()


async def test_await_event_waits_for_its_record_only(rt: Runtime) -> None:
    stream = rt.create_stream()
    first = threading.Event()
    stream.launch_host_func(first.set)
    event = stream.record()
    _busy(rt, stream, 0.5)  # work queued after the event must not delay it
    with anyio.fail_after(5):
        await event
    assert first.is_set()
    assert not stream.query()
    await stream


async def test_loop_is_not_blocked_while_awaiting(rt: Runtime) -> None:
    stream = rt.create_stream()
    stream.launch_host_func(lambda: time.sleep(0.3))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await stream
        tg.cancel_scope.cancel()
    assert ticks >= 10, f"the loop ran only {ticks} ticks during a 300 ms await"


async def test_10000_awaits_resolve_and_cancelled_half_leaves_nothing(host_rt: Runtime) -> None:
    rt = host_rt
    ctx = rt.create_context("many", max_vram=256 << 20)
    from pygpukit import context_session

    stream = ctx.stream
    gate = _gate(stream)
    n = 10_000
    resolved = 0
    scopes: list[anyio.CancelScope] = []

    async def waiter(scope: anyio.CancelScope) -> None:
        nonlocal resolved
        with scope:
            async with context_session(ctx):
                buf = rt.xp.empty(1024, dtype="uint8")  # a charge the cancel must return
                await stream
                del buf
                resolved += 1

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            scope = anyio.CancelScope()
            scopes.append(scope)
            tg.start_soon(waiter, scope)
        await anyio.wait_all_tasks_blocked()
        assert rt.bridge.stats().pending >= n
        assert ctx.usage().used == n * 1024
        for scope in scopes[::2]:
            scope.cancel()
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert resolved == n // 2
    with anyio.fail_after(5):
        while rt.bridge.stats().pending:  # cancelled slots come back when the signal lands
            await anyio.sleep(0.01)
    stats = rt.bridge.stats()
    assert stats.pending == 0
    assert stats.free_slots == CAPACITY
    gc.collect()  # cancelled frames may sit in exception/traceback cycles until collected
    assert ctx.usage().used == 0


async def test_fault_fails_pending_await_within_a_second(host_rt: Runtime) -> None:
    stream = host_rt.create_stream()
    gate = _gate(stream)

    def bad_kernel() -> None:
        raise IndexError("out of bounds")

    stream.launch_host_func(bad_kernel)
    gate.set()
    start = time.perf_counter()
    with anyio.fail_after(5), pytest.raises(CudaError, match=r"^host device faulted"):
        await stream
    assert time.perf_counter() - start < 1.0
    assert host_rt.bridge.stats().pending == 0  # the failed waiter's slot is free again


async def test_await_after_fault_raises_too(host_rt: Runtime) -> None:
    stream = host_rt.create_stream()
    stream.launch_host_func(lambda: 1 / 0)
    with anyio.fail_after(5), pytest.raises(CudaError):
        await stream
    with anyio.fail_after(5), pytest.raises(CudaError):
        await stream
    with pytest.raises(CudaError):
        stream.synchronize()


async def test_python_channel_bridge_works_the_same() -> None:
    bridge = CompletionBridge(make_channel("python"))
    assert bridge.stats().native is False
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()
        done = threading.Event()
        stream.launch_host_func(lambda: (time.sleep(0.02), done.set()))
        await stream
        assert done.is_set()
        assert bridge.stats().pending == 0


async def test_a_resolved_waiter_is_not_kept_alive_by_the_watchdog() -> None:
    """The watchdog looks at the pending waiters every interval; what it saw must not keep a
    resolved waiter's callback (a task, the arrays it captured) alive until its next look."""

    class Held:
        pass

    interval = 0.3
    bridge = CompletionBridge(make_channel("python"), watchdog_interval=interval)
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()
        gate = _gate(stream)
        held = Held()
        alive = weakref.ref(held)
        fired = threading.Event()
        bridge.attach()  # callbacks run where the bridge is drained: this loop
        bridge.on_done(stream.raw, rt.backend, lambda err, h=held: fired.set())
        del held
        await anyio.sleep(interval * 1.5)  # the watchdog has looked at the waiter once
        gate.set()
        with anyio.fail_after(5):
            while not fired.is_set():
                await anyio.sleep(0.005)
        gc.collect()
        assert alive() is None  # held by the watchdog's last look: alive until ~2 intervals


async def test_a_full_waiter_table_refuses_clearly_and_frees_as_waiters_resolve() -> None:
    from pygpukit import PygpukitError

    bridge = CompletionBridge(make_channel("python"))
    with Runtime(backend="host", bridge=bridge) as rt:
        stream = rt.create_stream()
        gate = _gate(stream)
        event = rt.backend.create_event()
        stream.raw.record(event)  # completes once the gate opens
        bridge.attach()
        fired: list[BaseException | None] = []
        for _ in range(CAPACITY):  # the table grows on demand up to the ring's size
            bridge.on_done(event, rt.backend, fired.append)
        assert bridge.stats().pending == CAPACITY
        assert bridge.stats().free_slots == 0
        with pytest.raises(PygpukitError, match="await fewer at a time"):
            bridge.on_done(event, rt.backend, fired.append)
        assert bridge.stats().pending == CAPACITY  # the refused one took nothing
        gate.set()
        with anyio.fail_after(30):
            while len(fired) < CAPACITY:
                await anyio.sleep(0.01)
        assert fired == [None] * CAPACITY
        assert bridge.stats().pending == 0
        await stream  # and the table takes new waiters again
        assert bridge.stats().free_slots == CAPACITY


async def test_an_await_that_fails_to_arm_after_a_fault_frees_only_its_own_slot() -> None:
    """If the watchdog failed a waiter (its device faulted) and another await reused the
    slot before arming the first one raised, the error path must leave the new waiter be:
    taking the slot back by number would drop it, and its await would never end."""
    bridge = CompletionBridge(make_channel("python"), watchdog_interval=3600)
    with (
        Runtime(backend="host", bridge=bridge) as bad,
        Runtime(backend="host", bridge=bridge) as good,
    ):
        broken = bad.create_stream()
        broken.launch_host_func(lambda: 1 / 0)  # the bad device faults
        with pytest.raises(CudaError):
            broken.synchronize()  # (an await here could be armed before the fault lands,
            # and only this bridge's watchdog, asleep for an hour, would fail it)
        stream = good.create_stream()
        gate = _gate(stream)
        bridge.attach()
        got: list[BaseException | None] = []

        class Racy:  # a target on the faulted device whose arming fails late
            origin = None

            def signal_when_done(self, token: int, signal: object) -> None:
                assert bridge.check_faults() == 1  # the watchdog's look fails this waiter
                bridge.on_done(stream.raw, good.backend, got.append)  # the slot is reused
                raise CudaError("arming failed")

        with pytest.raises(CudaError, match="arming failed"):
            bridge.on_done(Racy(), bad.backend, lambda exc: None)  # type: ignore[arg-type]
        assert bridge.stats().pending == 1  # the other await is still there
        gate.set()
        with anyio.fail_after(5):
            while not got:
                await anyio.sleep(0.005)
        assert got == [None]


def test_native_channel_is_built_and_has_one_bridge() -> None:
    from pygpukit import InvalidArgument
    from pygpukit.runtime import default_bridge

    assert default_bridge().stats().native is True, (
        "the C completion bridge was not built/imported; is a C compiler installed?"
    )
    with pytest.raises(InvalidArgument, match="process-wide"):
        CompletionBridge(make_channel("native"))


async def test_awaiting_a_closed_stream_raises_instead_of_hanging(rt: Runtime) -> None:
    from pygpukit import MB, ContextClosed, InvalidArgument

    ctx = rt.create_context("short", max_vram=MB)
    stream = rt.create_stream()
    rt.destroy_context(ctx)
    stream.close()
    with anyio.fail_after(5):
        with pytest.raises(InvalidArgument, match="is closed"):
            await stream
        with pytest.raises(ContextClosed):
            await ctx.synchronize()
        with pytest.raises(InvalidArgument, match="is closed"):
            await ctx.stream


def test_events_do_not_cross_host_runtimes(host_rt: Runtime) -> None:
    from pygpukit import InvalidArgument

    with Runtime(backend="host") as other:
        event = other.create_stream().record()
        with pytest.raises(InvalidArgument, match="runtime that created it"):
            host_rt.create_stream().wait_event(event)


def test_a_callback_that_interrupts_the_drain_does_not_strand_the_others() -> None:
    """A completion callback raising KeyboardInterrupt (or the like) propagates, but only
    after every other finished waiter of the batch was resolved: none may wait forever."""
    bridge = CompletionBridge(make_channel("python"))
    with Runtime(backend="host", bridge=bridge) as rt:
        event = rt.backend.create_event()  # never recorded: complete, so it signals at once
        ran: list[BaseException | None] = []

        def interrupt(exc: BaseException | None) -> None:
            raise KeyboardInterrupt

        bridge.on_done(event, rt.backend, ran.append)
        bridge.on_done(event, rt.backend, interrupt)
        bridge.on_done(event, rt.backend, ran.append)
        with pytest.raises(KeyboardInterrupt):
            bridge._on_readable()  # what the loop runs when the bridge's fd is readable
        assert ran == [None, None]
        assert bridge.stats().pending == 0


def test_a_signal_for_no_waiter_of_ours_is_ignored() -> None:
    """A token that names a slot the table does not have yet (a fresh bridge), or an old
    generation, resolves nothing and raises nothing in the loop's reader."""
    bridge = CompletionBridge(make_channel("python"))
    bridge.push(5 + CAPACITY * 3)  # the table is still empty
    bridge._on_readable()
    with Runtime(backend="host", bridge=bridge) as rt:
        ran: list[BaseException | None] = []
        stream = rt.create_stream()
        gate = _gate(stream)
        bridge.on_done(stream.raw, rt.backend, ran.append)  # slot 0, generation 0
        bridge.push(0 + CAPACITY * 7)  # slot 0 under another generation
        bridge._on_readable()
        assert ran == [] and bridge.stats().pending == 1
        gate.set()
        stream.synchronize()
        bridge._on_readable()
        assert ran == [None] and bridge.stats().pending == 0


def test_a_signal_queued_by_a_failed_arming_resolves_no_later_waiter() -> None:
    """If arming raised after its signal was queued (an interrupt right after the enqueue),
    the slot it gives back must not let that signal resolve the next waiter early."""
    bridge = CompletionBridge(make_channel("python"))
    with Runtime(backend="host", bridge=bridge) as rt:
        first, later = rt.create_stream(), rt.create_stream()
        gate, later_gate = _gate(first), _gate(later)

        class Interrupted:  # the real stream's signal, then an interrupt
            origin = None

            def signal_when_done(self, token: int, signal: object) -> None:
                first.raw.signal_when_done(token, signal)  # type: ignore[arg-type]
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            bridge.on_done(Interrupted(), rt.backend, lambda exc: None)  # type: ignore[arg-type]
        fired: list[BaseException | None] = []
        bridge.on_done(later.raw, rt.backend, fired.append)  # takes the slot given back
        gate.set()
        first.synchronize()  # the abandoned signal has landed
        bridge._on_readable()
        assert fired == []  # the later waiter's work is still held
        later_gate.set()
        later.synchronize()
        bridge._on_readable()
        assert fired == [None]


def test_the_watchdog_outlives_a_callback_that_raises_systemexit() -> None:
    """A callback raising SystemExit (or another BaseException) while the watchdog fails it
    must not end the watchdog: later waiters on a faulted device still need it."""
    bridge = CompletionBridge(make_channel("python"), watchdog_interval=0.02)

    def fault_under(rt: Runtime, callback: Callable[[BaseException | None], None]) -> None:
        stream = rt.create_stream()
        gate = _gate(stream)
        stream.launch_host_func(lambda: 1 / 0)
        bridge.on_done(stream.raw, rt.backend, callback)  # queued behind the fault
        gate.set()  # the device faults; the signal never comes

    def exits(exc: BaseException | None) -> None:
        raise SystemExit("a callback exits")

    with Runtime(backend="host", bridge=bridge) as first:
        fault_under(first, exits)
        deadline = time.monotonic() + 5
        while bridge.stats().pending and time.monotonic() < deadline:
            time.sleep(0.01)  # the watchdog fails it (no loop drains this bridge)
        assert bridge.stats().pending == 0
    with Runtime(backend="host", bridge=bridge) as second:  # a later fault, elsewhere
        failed = threading.Event()
        errors: list[BaseException | None] = []
        fault_under(second, lambda exc: (errors.append(exc), failed.set()))
        assert failed.wait(5), "the watchdog is gone: this await would never end"
        assert isinstance(errors[0], CudaError)
