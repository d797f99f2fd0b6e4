"""Awaiting GPU completion without blocking the event loop.

A waiter takes a *slot*. The backend enqueues, at the point in the stream the waiter waits
for, a signal that pushes the slot into a ring and writes an eventfd (on CUDA a host
function written in C that never takes the GIL: ``_cbridge.c``). Each event loop watches
that one fd and, when it is readable, resolves every finished waiter in one batch.

Host functions are not called once a CUDA context has faulted, so a watchdog thread
queries the streams of pending waiters while there are any and fails them with
:class:`~pygpukit.CudaError`. A cancelled await gives up its future at once and its slot
when the signal arrives; nothing is left behind either way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .._exceptions import InvalidArgument, PygpukitError
from ._oneshot import Oneshot, running_library

if TYPE_CHECKING:
    from ._backends import Backend, RawEvent, RawStream

__all__ = ("BridgeStats", "CompletionBridge", "default_bridge")

CAPACITY = 1 << 18  # live waiters at most; the ring holds exactly this many
_GEN_SHIFT = CAPACITY.bit_length() - 1  # a token: generation << _GEN_SHIFT | slot
_SLOT = CAPACITY - 1
DEFAULT_SPIN_US = 20.0  # docs/adr/0013: a trivial kernel completes in ~15 us
DEFAULT_COALESCE = 1  # waiters per shared signal at most: off unless asked for (see wait())


class _Channel(Protocol):
    native: Any
    fd: int

    def push(self, slot: int) -> None: ...
    def drain(self) -> list[int]: ...


class _NativeChannel:
    """The compiled ring: host functions that never take the GIL.

    The ring is static in the extension, so there is one per process and one bridge owns it.
    """

    owned = False

    def __init__(self, module: Any) -> None:
        self.native = module
        self.fd: int = module.open(CAPACITY)
        self.push: Callable[[int], None] = module.notify
        self.drain: Callable[[], list[int]] = module.drain


class _PythonChannel:
    """The fallback when the extension is not built: same shape, GIL-taking producers."""

    native = None

    def __init__(self) -> None:
        self._slots: collections.deque[int] = collections.deque()
        if hasattr(os, "eventfd"):
            self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._wfd = self.fd
        else:  # pragma: no cover - non-Linux
            self.fd, self._wfd = os.pipe()
            os.set_blocking(self.fd, False)

    def push(self, slot: int) -> None:
        self._slots.append(slot)  # deque.append is atomic under the GIL
        os.write(self._wfd, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def drain(self) -> list[int]:
        try:
            os.read(self.fd, 4096)
        except BlockingIOError:
            pass
        out = []
        pop = self._slots.popleft
        while True:
            try:
                out.append(pop())
            except IndexError:
                return out


class _Probe:
    """A stream (or, for an event never recorded, a backend) with waiters pending on it:
    what the watchdog queries for faults. Shared by those waiters' slots; ``batch`` is the
    stream's open batch of awaits, if any (see :meth:`CompletionBridge.on_done`)."""

    __slots__ = ("backend", "batch", "count", "key", "stream")

    def __init__(self, key: object, backend: Backend, stream: RawStream | None) -> None:
        self.key = key  # what the bridge files it under: its stream, else its backend
        self.backend = backend
        self.stream = stream
        self.count = 0
        self.batch: _Batch | None = None


class _Batch:
    """Waiters that will share one completion signal: their tokens in arming order, and
    where the signal goes — behind ``target``, a stream (its end when the batch is sent) or
    the event of the last member to join. Open until sent; made and changed under the
    bridge's lock.

    Two kinds use it. A stream's batch of awaits (``loop``: the asyncio loop whose current
    iteration's end sends it; ``probe``: the stream's probe, which files it), and a batch
    a holder keeps for work it launches back to back (:meth:`CompletionBridge.hold`: the
    dispatcher's launcher threads). Either is sent when ``cap`` members have joined, and
    by the watchdog if it is still open at the watchdog's second look at it (``seen``)."""

    __slots__ = ("cap", "loop", "open", "probe", "seen", "target", "tokens")

    def __init__(
        self,
        target: RawStream | RawEvent,
        cap: int,
        probe: _Probe | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.tokens: list[int] = []
        self.target = target
        self.cap = cap
        self.probe = probe
        self.loop = loop
        self.open = True
        self.seen = False


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
        self, channel: _Channel, *, watchdog_interval: float = 0.1, coalesce: int | None = None
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
        if getattr(channel, "owned", False):
            raise InvalidArgument(
                "the native completion channel is process-wide and already has its bridge; "
                "use default_bridge()"
            )
        if isinstance(channel, _NativeChannel):
            channel.owned = True
        self._ch = channel
        self._gen: list[int] = []  # per slot: bumped when a failed waiter's slot is reused early
        self._trio_var: Any = None
        self.native = channel.native  # the Signal protocol the backends use
        self.push = channel.push
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        # The waiter table: parallel lists indexed by slot, grown on demand up to CAPACITY.
        # A pending await allocates nothing here (no per-waiter object for the garbage
        # collector to count and traverse: docs/adr/0028); a free slot holds None.
        self._resolve: list[Callable[[BaseException | None], None] | None] = []
        self._probe: list[_Probe | None] = []  # what each slot's waiter waits on
        self._rest: list[list[int] | None] = []  # the other waiters a slot's signal stands for
        self._probes: dict[object, _Probe] = {}  # by stream: the watchdog's worklist
        self._free: list[int] = []
        self._live = 0
        self._armed = 0  # waiters registered, ever
        self._signals = 0  # signals enqueued for them, ever
        #: At most this many waiters on one stream share one signal (see :meth:`wait`).
        self.coalesce = coalesce
        self._loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._interval = watchdog_interval
        self.spin_us = float(os.environ.get("PYGPUKIT_SPIN_US", DEFAULT_SPIN_US))
        self._wake = threading.Event()
        self._watchdog: threading.Thread | None = None
        # the open batches, in the order they were opened: for the watchdog (_send_stranded)
        self._batches: dict[_Batch, None] = {}

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
        if self.spin_us > 0 and backend.spin_helps and not self._live:
            query = target.query
            end = time.perf_counter_ns() + self.spin_us * 1000
            while True:
                if query():
                    await checkpoint()  # an await is a scheduling point, done or not
                    return
                if time.perf_counter_ns() >= end:
                    break
        self.attach()
        one = Oneshot()
        self.on_done(target, backend, one, share=True)  # this task suspends just below
        await one.wait(again=False)

    def on_done(
        self,
        target: RawStream | RawEvent,
        backend: Backend,
        callback: Callable[[BaseException | None], None],
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
        if spin and self.spin_us > 0 and backend.spin_helps and not self._live:
            query = target.query
            end = time.perf_counter_ns() + self.spin_us * 1000
            while time.perf_counter_ns() < end:
                if query():
                    callback(None)
                    return
        # what the watchdog queries for faults: an event's stream, or the stream itself
        probe = getattr(target, "origin", target)  # (no ABC isinstance: once per await)
        # A stream awaited on an asyncio loop's thread may share its signal (see above).
        loop = (
            asyncio._get_running_loop() if share and probe is target and self.coalesce > 1 else None
        )
        if self._watchdog is None:
            self._ensure_watchdog()
        opened = full = None
        with self._lock:
            token, on = self._add(callback, backend, probe)  # type: ignore[arg-type]
            if loop is not None and on.count > 1:  # others pending on the stream: share
                batch = on.batch
                if batch is None:  # this waiter opens the stream's batch
                    batch = on.batch = opened = self._open(_Batch(target, self.coalesce, on, loop))
                if batch.loop is loop:
                    full = self._join(batch, token)
                    token = -1
            if token >= 0:
                self._signals += 1
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
        batch: _Batch | None,
        event: RawEvent,
        backend: Backend,
        callback: Callable[[BaseException | None], None],
        cap: int,
    ) -> _Batch:
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
        if self._watchdog is None:
            self._ensure_watchdog()
        with self._lock:
            token, _ = self._add(callback, backend, event.origin)
            if batch is None or not batch.open:
                batch = self._open(_Batch(event, cap))
            batch.target = event
            full = self._join(batch, token)
        if full is not None:
            self._send(full)
        return batch

    def send(self, batch: _Batch | None) -> None:
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

    # -- slots --------------------------------------------------------------------------
    # A signal carries a token: the slot's generation above _GEN_SHIFT, the slot below, so a
    # late signal for a waiter that the watchdog already failed (and whose slot was reused)
    # is recognised and ignored.
    def _add(
        self,
        resolve: Callable[[BaseException | None], None],
        backend: Backend,
        stream: RawStream | None,
    ) -> tuple[int, _Probe]:
        """Take a slot for ``resolve`` (call with the lock held); its token and its probe."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._resolve[slot] = resolve
        key = backend if stream is None else stream
        probe = self._probes.get(key)
        if probe is None:
            probe = self._probes[key] = _Probe(key, backend, stream)
        probe.count += 1
        self._probe[slot] = probe
        self._live += 1
        self._armed += 1
        if self._live == 1:
            # The watchdog clears its wake-up flag under this lock once nothing is pending:
            # the first waiter after that sets it again.
            self._wake.set()
        return self._gen[slot] << _GEN_SHIFT | slot, probe

    def _open(self, batch: _Batch) -> _Batch:
        """``batch``, new, where the watchdog sees it (call with the lock held)."""
        self._batches[batch] = None
        return batch

    def _join(self, batch: _Batch, token: int) -> _Batch | None:
        """Add ``token`` to ``batch`` (call with the lock held); the batch, closed, when that
        filled it and the caller must send it."""
        batch.tokens.append(token)
        if len(batch.tokens) < batch.cap:
            return None
        self._close(batch)
        return batch

    def _close(self, batch: _Batch) -> None:
        """No more members for ``batch``: it is about to be sent (call with the lock held)."""
        batch.open = False
        self._batches.pop(batch, None)
        if batch.probe is not None and batch.probe.batch is batch:
            batch.probe.batch = None

    def _send(self, batch: _Batch) -> None:
        """Enqueue one signal behind ``batch``'s target (the batch closed) for its members
        still pending: it carries the last one's token, and that slot lists the others."""
        gens, target = self._gen, batch.target
        with self._lock:
            live = [t for t in batch.tokens if t >> _GEN_SHIFT == gens[t & _SLOT]]
            if not live:
                return  # every one failed by the watchdog meanwhile
            lead = live.pop()
            self._rest[lead & _SLOT] = live or None
            self._signals += 1
        try:
            target.signal_when_done(lead, self)
        except BaseException as exc:  # a faulted or closed stream: every waiter hears it
            error: BaseException | None = exc
            if isinstance(exc, Exception):
                try:  # closed after its work ran (close() waits for it): all done, then
                    error = None if target.query() else exc
                except Exception:
                    pass
            with self._lock:
                doomed = [self._retire(token) for token in (*live, lead)]
            _resolve_all([resolve for resolve in doomed if resolve is not None], error)
            if error is not None and not isinstance(error, Exception):
                raise

    def _grow(self) -> None:
        """Double the table (call with the lock held).

        :raises PygpukitError: CAPACITY waiters are pending already
        """
        size = len(self._resolve)
        if size >= CAPACITY:
            raise PygpukitError(
                f"more than {CAPACITY} GPU completions are awaited at once; await "
                "fewer at a time (e.g. gather in batches)"
            )
        more = min(max(size, 1024), CAPACITY - size)
        self._resolve.extend([None] * more)
        self._probe.extend([None] * more)
        self._rest.extend([None] * more)
        self._gen.extend([0] * more)
        self._free.extend(range(size + more - 1, size - 1, -1))  # lowest slots first

    def _release(self, token: int) -> None:
        """Take back the slot ``token`` names, unless its waiter is gone already (the
        watchdog failed it, and the slot may be another waiter's now). The slot moves to a
        new generation: a signal already queued for ``token`` resolves nothing."""
        with self._lock:
            self._retire(token)

    def _retire(self, token: int) -> Callable[[BaseException | None], None] | None:
        """Empty ``token``'s slot under a new generation, if it is still that waiter's (call
        with the lock held); its callback, or ``None``."""
        slot = token & _SLOT
        if token >> _GEN_SHIFT != self._gen[slot]:
            return None
        resolve = self._take(slot)
        self._gen[slot] += 1
        return resolve

    def _take(self, slot: int) -> Callable[[BaseException | None], None] | None:
        """Empty ``slot`` (call with the lock held); its callback, or ``None``."""
        resolve = self._resolve[slot]
        if resolve is not None:
            self._resolve[slot] = None
            self._rest[slot] = None
            probe = self._probe[slot]
            self._probe[slot] = None
            assert probe is not None  # a slot with a callback has its probe
            probe.count -= 1
            if not probe.count:
                del self._probes[probe.key]
            self._free.append(slot)
            self._live -= 1
        return resolve

    def _on_readable(self) -> None:
        with self._drain_lock:
            tokens = self._ch.drain()
        if not tokens:
            return
        done = []
        gens, rests, take = self._gen, self._rest, self._take
        with self._lock:
            size = len(gens)
            for token in tokens:
                slot = token & _SLOT
                if slot >= size or token >> _GEN_SHIFT != gens[slot]:
                    continue  # no waiter of ours, or one failed and its slot reused
                rest = rests[slot]
                if rest is not None:  # the members this signal was shared by, in order
                    for other in rest:
                        if other >> _GEN_SHIFT == gens[other & _SLOT]:
                            resolve = take(other & _SLOT)
                            if resolve is not None:
                                done.append(resolve)
                resolve = take(slot)  # the last member
                if resolve is not None:
                    done.append(resolve)
        _resolve_all(done, None)

    def stats(self) -> BridgeStats:
        with self._lock:
            return BridgeStats(
                self._live,
                CAPACITY - self._live,
                CAPACITY,
                self.native is not None,
                self._armed,
                self._signals,
            )

    # -- the watchdog ------------------------------------------------------------------
    def _ensure_watchdog(self) -> None:
        self._wake.set()
        if self._watchdog is None:
            with self._lock:
                if self._watchdog is None:
                    self._watchdog = threading.Thread(
                        target=self._watch, name="pygpukit-completion-watchdog", daemon=True
                    )
                    self._watchdog.start()

    def _watch(self) -> None:
        while True:
            self._wake.wait()
            _stop.wait(self._interval)
            if _stop.is_set():
                return
            with self._lock:
                if not self._live and not self._batches:  # asleep until the next waiter
                    self._wake.clear()  # (_add sets the flag again)
                    continue
            try:
                self._send_stranded()
                self.check_faults()
            except BaseException:  # never let the watchdog die: pending awaits rely on it
                _log.exception("the completion watchdog's fault check failed; it goes on")

    def _send_stranded(self) -> None:
        """Send the open batches that were open at the last look already, or whose loop is
        not running: whoever would send them has not, and may not (a loop blocked in one
        iteration, a launcher thread stuck in a function). Sending early is safe — the
        signal still lands after every member's work — except into a stream we are
        capturing into a graph: the signal would become a node of the graph, so a stream's
        batch waits for the capture's end. (A held batch's signal goes on a companion
        stream behind its event, never into the captured stream.) Each batch is sent
        whatever sending another raised; a ``KeyboardInterrupt`` or the like from a
        member's callback is raised again once all are sent."""
        with self._lock:
            stranded = []
            for batch in self._batches:
                if getattr(batch.target, "capturing", False):
                    continue
                loop = batch.loop
                if batch.seen or (loop is not None and not loop.is_running()):
                    stranded.append(batch)
                else:
                    batch.seen = True
            for batch in stranded:
                self._close(batch)
        interrupt: BaseException | None = None
        for batch in stranded:  # closed: if one were skipped, no one would ever send it
            try:
                self._send(batch)
            except BaseException as exc:
                interrupt = interrupt or exc
        if interrupt is not None:
            raise interrupt

    def check_faults(self) -> int:
        """Fail every pending waiter whose device has faulted; returns how many.

        The device is asked once per stream that waiters wait on, not once per waiter: with
        tens of thousands in flight a look every ``watchdog_interval`` must stay cheap, as
        it holds the GIL. A failed waiter's slot is freed at once under a new generation:
        its signal will never come on a faulted device, and if it does, it is ignored.
        """
        with self._lock:
            probes = list(self._probes.values())
        by_backend: dict[Backend, list[RawStream]] = {}
        for probe in probes:
            streams = by_backend.setdefault(probe.backend, [])
            if probe.stream is not None:
                streams.append(probe.stream)
        del probes
        failed = 0
        for backend, streams in by_backend.items():
            try:
                error = backend.fault(streams)
            except Exception as exc:  # a query that itself fails is a fault too
                error = exc
            if error is None:
                continue
            with self._lock:  # every waiter on the faulted device
                doomed = []
                for slot, on in enumerate(self._probe):
                    if on is not None and on.backend is backend:
                        doomed.append(self._take(slot))
                        self._gen[slot] += 1
            _resolve_all(doomed, error)  # type: ignore[arg-type]
            failed += len(doomed)
        return failed


_log = logging.getLogger("pygpukit")


def _resolve_all(
    callbacks: list[Callable[[BaseException | None], None]], error: BaseException | None
) -> None:
    """Call every callback, whatever one of them raises: a waiter left out would wait
    forever. An exception is logged; a ``KeyboardInterrupt`` or the like is raised again
    once the rest have run."""
    interrupt: BaseException | None = None
    for resolve in callbacks:
        try:
            resolve(error)
        except Exception:
            _log.exception("a GPU-completion callback raised; the other waiters are unaffected")
        except BaseException as exc:
            interrupt = interrupt or exc
    if interrupt is not None:
        raise interrupt


async def checkpoint() -> None:
    """Let the loop run other tasks once (asyncio or trio)."""
    if asyncio._get_running_loop() is not None:
        await asyncio.sleep(0)
    else:
        import trio

        await trio.lowlevel.checkpoint()


_stop = threading.Event()
_native_channel: _NativeChannel | None = None
_default: CompletionBridge | None = None
_default_lock = threading.Lock()


def make_channel(kind: str = "auto") -> _Channel:
    """``"native"``, ``"python"``, or ``"auto"`` (native when built; ``PYGPUKIT_BRIDGE``)."""
    if kind == "auto":
        kind = os.environ.get("PYGPUKIT_BRIDGE", "auto").strip().lower() or "auto"
    global _native_channel
    if kind in ("auto", "native"):
        try:
            from . import _cbridge  # type: ignore[attr-defined]
        except ImportError:
            if kind == "native":
                raise
        else:
            if _native_channel is None:
                _native_channel = _NativeChannel(_cbridge)
            return _native_channel
    return _PythonChannel()


def default_bridge() -> CompletionBridge:
    """The process-wide bridge (created on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = CompletionBridge(make_channel())
    return _default
