"""Waiters a holder keeps in one batch behind the events of its work
(``CompletionBridge.hold``: what the dispatcher's launcher threads use for tasks launched
back to back). On the host backend: the bridge is the same code on CUDA."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest

from pygpukit import CudaError
from pygpukit.runtime import CompletionBridge, Runtime, make_channel


class Held(NamedTuple):
    rt: Runtime
    bridge: CompletionBridge
    stream: Any  # a pygpukit Stream
    ran: list[int]  # the steps that have run, in order
    got: list[tuple[int, bool, BaseException | None]]  # (member, its step had run, error)


@pytest.fixture
def held() -> Iterator[Held]:
    """A host runtime whose bridge's watchdog looks only when a test calls it by hand."""
    bridge = CompletionBridge(make_channel("python"), watchdog_interval=3600)
    with Runtime(backend="host", bridge=bridge) as rt:
        yield Held(rt, bridge, rt.create_stream(), [], [])


def _hold(
    h: Held, batch: Any, i: int, cap: int = 32, step: Callable[[], None] | None = None
) -> Any:
    """Queue member ``i``'s step and an event behind it; hold ``i`` in ``batch`` for it."""

    def run() -> None:
        if step is not None:
            step()
        h.ran.append(i)

    h.stream.launch_host_func(run)
    event = h.rt.backend.create_event()
    h.stream.raw.record(event)
    return h.bridge.hold(
        batch, event, h.rt.backend, lambda error: h.got.append((i, i in h.ran, error)), cap
    )


def _drain(h: Held) -> None:
    h.stream.synchronize()
    h.bridge._on_readable()


def test_held_members_share_one_signal_and_resolve_in_the_order_they_joined(held: Held) -> None:
    before = held.bridge.stats()
    batch = None
    for i in range(5):
        batch = _hold(held, batch, i)
    assert held.bridge.stats().pending - before.pending == 5  # armed, each in its own slot
    assert held.bridge.stats().signals == before.signals  # none sent yet
    held.bridge.send(batch)
    _drain(held)
    assert held.bridge.stats().signals - before.signals == 1
    assert held.got == [(i, True, None) for i in range(5)]
    assert held.bridge.stats().pending == 0


def test_the_signal_waits_for_the_last_members_work(held: Held) -> None:
    """The batch's signal goes behind the newest member's event, not the first one's."""
    gate = threading.Event()
    batch = _hold(held, None, 0)
    batch = _hold(held, batch, 1, step=lambda: gate.wait(5))
    held.bridge.send(batch)
    time.sleep(0.05)
    held.bridge._on_readable()
    assert held.got == [], "a member resolved while the last member's work was still running"
    gate.set()
    _drain(held)
    assert held.got == [(0, True, None), (1, True, None)]


def test_a_batch_is_sent_when_its_cap_is_reached_and_the_next_member_opens_another(
    held: Held,
) -> None:
    before = held.bridge.stats().signals
    first = _hold(held, None, 0, cap=2)
    assert _hold(held, first, 1, cap=2) is first
    assert held.bridge.stats().signals - before == 1 and not first.open
    second = _hold(held, first, 2, cap=2)  # first is sent: a new batch
    assert second is not first and second.open
    held.bridge.send(second)
    held.bridge.send(second)  # sending twice sends once
    held.bridge.send(None)
    _drain(held)
    assert held.bridge.stats().signals - before == 2
    assert [member for member, _, _ in held.got] == [0, 1, 2]


def test_a_batch_its_holder_never_sends_is_sent_at_the_watchdogs_second_look(held: Held) -> None:
    """A holder stuck in code that waits for a member's caller must not strand it."""
    batch = _hold(held, None, 0)
    _hold(held, batch, 1)
    before = held.bridge.stats().signals
    held.bridge._watchdog.send_stranded()  # first look: seen open
    assert held.bridge.stats().signals == before
    held.bridge._watchdog.send_stranded()  # second look: still open, so sent
    assert held.bridge.stats().signals == before + 1 and not batch.open
    _drain(held)
    assert [member for member, _, _ in held.got] == [0, 1]


def test_the_running_watchdog_sends_a_stranded_batch() -> None:
    bridge = CompletionBridge(make_channel("python"), watchdog_interval=0.02)
    with Runtime(backend="host", bridge=bridge) as rt:
        h = Held(rt, bridge, rt.create_stream(), [], [])
        _hold(h, _hold(h, None, 0), 1)
        deadline = time.monotonic() + 5
        while bridge.stats().pending and time.monotonic() < deadline:
            h.stream.synchronize()
            bridge._on_readable()
            time.sleep(0.01)
        assert [member for member, _, _ in h.got] == [0, 1]


def test_a_fault_fails_held_members_and_their_batch_then_sends_nothing(held: Held) -> None:
    gate = threading.Event()
    batch = _hold(held, None, 0, step=lambda: gate.wait(5))
    batch = _hold(held, batch, 1)
    held.stream.launch_host_func(lambda: 1 / 0)  # the device faults after the members' work
    gate.set()
    with pytest.raises(CudaError):
        held.stream.synchronize()
    assert held.bridge.check_faults() == 2
    assert [(member, type(error)) for member, _, error in held.got] == [
        (0, CudaError),
        (1, CudaError),
    ]
    before = held.bridge.stats().signals
    held.bridge.send(batch)  # nobody left to signal for
    assert held.bridge.stats().signals == before
    assert held.bridge.stats().pending == 0


def test_a_hold_after_the_watchdog_sent_the_batch_opens_another(held: Held) -> None:
    batch = _hold(held, None, 0)
    held.bridge._watchdog.send_stranded()
    held.bridge._watchdog.send_stranded()  # sent by the watchdog
    assert not batch.open
    after = _hold(held, batch, 1)
    assert after is not batch and after.open
    held.bridge.send(after)
    _drain(held)
    assert [member for member, _, _ in held.got] == [0, 1]


class _Refusing:
    """An event whose signal cannot be enqueued (a driver error), its work not done."""

    origin = None

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def signal_when_done(self, slot: int, signal: Any) -> None:
        raise self.error

    def query(self) -> bool:
        return False


def test_a_batch_whose_signal_cannot_be_enqueued_gives_every_member_the_error(
    held: Held,
) -> None:
    error = CudaError("cuLaunchHostFunc failed")
    got: list[BaseException | None] = []
    batch = None
    for _ in range(3):
        batch = held.bridge.hold(batch, _Refusing(error), held.rt.backend, got.append, 32)  # type: ignore[arg-type]
    held.bridge.send(batch)
    assert got == [error, error, error]
    assert held.bridge.stats().pending == 0


def test_one_batch_whose_send_raises_does_not_strand_the_others(held: Held) -> None:
    """The watchdog sends every stranded batch: a ``SystemExit`` from one batch's member
    (its signal refused) is raised again only after the other batches were sent."""

    def exits(error: BaseException | None) -> None:
        raise SystemExit(1)

    held.bridge.hold(None, _Refusing(CudaError("refused")), held.rt.backend, exits, 32)  # type: ignore[arg-type]
    _hold(held, None, 0)
    before = held.bridge.stats().signals
    held.bridge._watchdog.send_stranded()  # first look: both seen
    with pytest.raises(SystemExit):
        held.bridge._watchdog.send_stranded()  # second: both sent, the refused one first
    assert held.bridge.stats().signals - before == 2
    _drain(held)
    assert [member for member, _, _ in held.got] == [0]
    assert held.bridge.stats().pending == 0
