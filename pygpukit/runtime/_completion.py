"""Awaiting GPU completion without blocking the event loop.

A waiter takes a *slot* (``_slots.py``). The backend enqueues, at the point in the stream the
waiter waits for, a signal that pushes the slot's token into a channel and writes an eventfd
(``_channel.py``; on CUDA a host function written in C that never takes the GIL:
``_cbridge.c``). Each event loop watches that one fd and, when it is readable, resolves
every finished waiter at once. Waiters may share one signal (``_batches.py``).

Host functions are not called once a CUDA context has faulted, so a watchdog thread
(``_watchdog.py``) queries the streams of pending waiters while there are any and fails them
with :class:`~pygpukit.CudaError` (:meth:`CompletionBridge.fault` tells what it found). A
cancelled await gives up its future at once and its slot when the signal arrives; nothing is
left behind either way.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._exceptions import InvalidArgument
from ._batches import Batch, Batches
from ._channel import CAPACITY, Channel, claim, make_channel
from ._oneshot import Oneshot, running_library
from ._slots import Callback, SlotTable
from ._watchdog import Watchdog

if TYPE_CHECKING:
    from ._backends import Backend, RawEvent, RawStream

__all__ = (
    "CAPACITY",
    "Batch",
    "BridgeStats",
    "CompletionBridge",
    "checkpoint",
    "default_bridge",
    "make_channel",
)

DEFAULT_SPIN_US = 20.0  # docs/adr/0013: a trivial kernel completes in ~15 us
DEFAULT_COALESCE = 1  # waiters per shared signal at most: off unless asked for (see wait())


class BridgeStats:
    """A snapshot of the bridge: live waiters, free slots, which channel it uses, and since
    it was made how many waiters were armed and how many signals were enqueued for them
    (asked for, whether or not the enqueue then succeeded; fewer signals than waiters when
    waiters on one stream share a signal: :attr:`CompletionBridge.coalesce`)."""

    __slots__ = ("armed", "capacity", "free_slots", "native", "pending", "signals")

    def __init__(
        self, pending: int, free_slots: int, capacity: int, native: bool, armed: int, signals: int
    ) -> None:
        self.pending = pending
        self.free_slots = free_slots
        self.capacity = capacity
        self.native = native
        self.armed = armed
        self.signals = signals

    def __repr__(self) -> str:
        return (
            f"BridgeStats(pending={self.pending}, free_slots={self.free_slots}, "
            f"capacity={self.capacity}, native={self.native}, armed={self.armed}, "
            f"signals={self.signals})"
        )


class CompletionBridge:
    """Turns stream positions into awaitables; one per process is enough."""

    def __init__(
        self, channel: Channel, *, watchdog_interval: float = 0.1, coalesce: int | None = None
    ) -> None:
        if coalesce is None:
            raw = os.environ.get("PYGPUKIT_COALESCE", "").strip()
            try:
                coalesce = int(raw) if raw else DEFAULT_COALESCE
            except ValueError:
                coalesce = raw  # type: ignore[assignment]  # refused just below
        if type(coalesce) is not int or coalesce < 1:
            raise InvalidArgument(
                f"coalesce (PYGPUKIT_COALESCE) must be an integer >= 1: the most waiters "
                f"that share one signal; 1 gives every waiter its own. Got {coalesce!r}"
            )
        claim(channel)
        self._ch = channel
        self.native = channel.native  # the Signal protocol the backends use
        self.push = channel.push
        wake = threading.Event()  # the watchdog looks while it is set
        self._slots = slots = SlotTable(channel.drain, wake)
        self._batches = batches = Batches(slots, channel)
        self._watchdog = Watchdog(slots, batches, wake, watchdog_interval)
        self._watching = False  # the watchdog's thread starts for the first waiter
        # What the per-await paths use, bound here once: no lookup through the rooms there.
        self._lock = slots.lock  # guards the slots and the batches
        self._add = slots.add
        self._release = slots.release
        self._probes = slots.probes  # empty exactly when no waiter is pending
        self._on_readable = slots.on_readable
        self._shared = batches.shared
        self._open = batches.open
        self._join = batches.join
        self._close = batches.close
        self._send = batches.send
        #: At most this many waiters on one stream share one signal (see :meth:`wait`).
        self.coalesce = coalesce
        self.spin_us = float(os.environ.get("PYGPUKIT_SPIN_US", DEFAULT_SPIN_US))
        self._loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._trio_var: Any = None

    # -- waiting ------------------------------------------------------------------------
    async def wait(self, target: RawStream | RawEvent, backend: Backend) -> None:
        """Return once the work ``target`` marks has run on the device.

        Short work is caught by querying for up to :attr:`spin_us` microseconds first when no
        other waiter is pending (the loop is held that long at most, never while idle);
        otherwise, and for longer work, it sleeps on the bridge.

        With :attr:`coalesce` above 1 (``PYGPUKIT_COALESCE``; off by default), awaits of a
        stream that already has waiters pending, on an asyncio loop's thread, share one
        signal instead of enqueuing one each: see ``share`` in :meth:`on_done`.

        :raises CudaError: the device faulted while we waited
        """
        # Spin only for a lone waiter: with others pending the loop has work to return to,
        # and spinning would cost every one of thousands of awaits (docs/adr/0013).
        if (
            self.spin_us > 0
            and backend.spin_helps
            and not self._probes
            and _spin(target.query, self.spin_us)
        ):
            await checkpoint()  # an await is a scheduling point, done or not
            return
        self.attach()
        one = Oneshot()
        self.on_done(target, backend, one, share=True)  # this task suspends just below
        await one.wait(again=False)

    def on_done(
        self,
        target: RawStream | RawEvent,
        backend: Backend,
        callback: Callback,
        *,
        spin: bool = False,
        share: bool = False,
    ) -> None:
        """Call ``callback(None)`` once ``target``'s work has run, ``callback(error)`` if the
        device faults first. It runs on whichever loop thread drains the bridge (or on the
        watchdog thread), so it must be quick and thread-safe.

        With ``spin`` (for a caller on the loop thread) ``target`` is first queried for up
        to :attr:`spin_us` when no other waiter is pending, as :meth:`wait` does; if it is
        done by then, ``callback(None)`` runs right here, before this returns.

        With ``share`` (for a caller on an asyncio loop's thread that will not block that
        thread waiting for ``callback``) and :attr:`coalesce` above 1, a stream ``target``
        that already has waiters pending does not get a signal of its own: the waiter joins
        the stream's open batch, which gets one signal when the loop finishes its current
        iteration, or at once when :attr:`coalesce` waiters have joined. It still resolves
        only after its own work has run, but also only after all the work queued on the
        stream before the batch was sent, by any task or thread: work that waits on the
        host for something this waiter's resolution leads to would never run, so sharing is
        off by default. A lone waiter, an event, another thread and trio get a signal of
        their own. If the shared signal cannot be enqueued, every waiter of the batch gets
        the error; when the batch was filled by this call, that runs here.
        """
        if (
            spin
            and self.spin_us > 0
            and backend.spin_helps
            and not self._probes
            and _spin(target.query, self.spin_us)
        ):
            callback(None)
            return
        # what the watchdog queries for faults: an event's stream, or the stream itself
        probe = getattr(target, "origin", target)  # (no ABC isinstance: once per await)
        # A stream awaited on an asyncio loop's thread may share its signal (see above).
        loop = (
            asyncio._get_running_loop() if share and probe is target and self.coalesce > 1 else None
        )
        if not self._watching:
            self._start_watchdog()
        opened = full = None
        with self._lock:
            token, on = self._add(callback, backend, probe)  # type: ignore[arg-type]
            if loop is not None and on.count > 1:  # others pending on the stream: share
                batch = self._shared.get(on)
                if batch is None:  # this waiter opens the stream's batch
                    batch = opened = self._open(Batch(target, self.coalesce, on, loop))
                if batch.loop is loop:
                    full = self._join(batch, token)
                    token = -1
        if token >= 0:  # a signal of its own, now
            try:
                target.signal_when_done(token, self)
            except BaseException:
                self._release(token)
                raise
        elif opened is not None:  # signal it after this iteration
            assert loop is not None
            loop.call_soon(self.send, opened)
        if full is not None:
            self._send(full)

    def hold(
        self,
        batch: Batch | None,
        event: RawEvent,
        backend: Backend,
        callback: Callback,
        cap: int,
    ) -> Batch:
        """Arm ``callback`` for ``event``'s work as the newest member of ``batch`` (of a new
        batch if that is ``None`` or sent), and return the batch. Its one signal goes behind
        the event of its last member, when the holder calls :meth:`send`, when ``cap``
        members have joined (then here), or from the watchdog when it finds the batch still
        open at its second look (0.1-0.2 s): a holder that cannot send — its thread stuck in
        code that waits for a member's caller — strands nobody. Members resolve in the order
        they joined, each with its own callback, after their own work and that of the
        members after them: every member's event must be on the same stream, so that the
        last one's covers all of them."""
        if batch is not None:  # a held batch (not a stream's), on the same stream
            assert batch.probe is None, "hold() takes a batch hold() returned"
            assert getattr(batch.target, "origin", None) is event.origin, "another stream"
        if not self._watching:
            self._start_watchdog()
        with self._lock:
            token, _ = self._add(callback, backend, event.origin)
            if batch is None or not batch.open:
                batch = self._open(Batch(event, cap))
            batch.target = event
            full = self._join(batch, token)
        if full is not None:
            self._send(full)
        return batch

    def send(self, batch: Batch | None) -> None:
        """Enqueue ``batch``'s signal now, unless it was sent already (or is ``None``)."""
        if batch is None:
            return
        with self._lock:
            if not batch.open:
                return  # sent when it filled up, or by the watchdog
            self._close(batch)
        self._send(batch)

    def attach(self) -> None:
        """Watch the bridge's fd from the running asyncio loop or trio run (idempotent)."""
        loop = asyncio._get_running_loop()
        if loop is not None:
            if loop not in self._loops:
                loop.add_reader(self._ch.fd, self._on_readable)
                self._loops.add(loop)
            return
        if running_library() == "trio":
            import trio

            self._attach_trio(trio)

    def _attach_trio(self, trio: Any) -> None:
        if self._trio_var is None:
            self._trio_var = trio.lowlevel.RunVar(f"pygpukit_bridge_pump_{id(self):x}")
        if self._trio_var.get(None) is None:
            self._trio_var.set(True)
            trio.lowlevel.spawn_system_task(self._trio_pump, name="pygpukit-completion-pump")

    async def _trio_pump(self) -> None:
        import trio

        while True:
            await trio.lowlevel.wait_readable(self._ch.fd)
            self._on_readable()

    def stats(self) -> BridgeStats:
        slots, batches = self._slots, self._batches
        with self._lock:
            return BridgeStats(
                slots.live,
                CAPACITY - slots.live,
                CAPACITY,
                self.native is not None,
                slots.armed,
                # a signal for each waiter that joined no batch, and one for each batch
                slots.armed - batches.joined + batches.sent,
            )

    # -- the watchdog ------------------------------------------------------------------
    def _start_watchdog(self) -> None:
        self._watchdog.start()
        self._watching = True

    def check_faults(self) -> int:
        """Fail every pending waiter whose device has faulted; returns how many.

        The device is asked once per stream that waiters wait on, not once per waiter: with
        tens of thousands in flight a look every ``watchdog_interval`` must stay cheap, as
        it holds the GIL. A failed waiter's slot is freed at once under a new generation:
        its signal will never come on a faulted device, and if it does, it is ignored.
        """
        return self._watchdog.check_faults()

    def fault(self, backend: Backend) -> BaseException | None:
        """The first error the watchdog found on ``backend``'s device, if it found one: a
        copy (no traceback) of what failed that device's waiters. Read from what the
        watchdog kept; nothing is asked of the device, so it is cheap from any thread."""
        return self._watchdog.faults.get(backend)


def _spin(query: Callable[[], bool], us: float) -> bool:
    """Whether ``query()`` comes true within ``us`` microseconds (it is asked at least once;
    the caller's thread is held meanwhile)."""
    end = time.perf_counter_ns() + us * 1000
    while True:
        if query():
            return True
        if time.perf_counter_ns() >= end:
            return False


async def checkpoint() -> None:
    """Let the loop run other tasks once (asyncio or trio)."""
    if asyncio._get_running_loop() is not None:
        await asyncio.sleep(0)
    else:
        import trio

        await trio.lowlevel.checkpoint()


_default: CompletionBridge | None = None
_default_lock = threading.Lock()


def default_bridge() -> CompletionBridge:
    """The process-wide bridge (created on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = CompletionBridge(make_channel())
    return _default
