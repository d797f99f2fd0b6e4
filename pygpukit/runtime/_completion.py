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
DEFAULT_SPIN_US = 20.0  # bench/RESULTS.md §1: a trivial kernel completes in ~15 us
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
    what the watchdog queries for faults. Shared by those waiters' slots.

    It also holds the stream's open *batch*: the tokens of waiters armed on the loop thread
    ``loop`` since the stream's last signal, which one signal will stand for (``seen``: the
    batch the watchdog found open at its last look)."""

    __slots__ = ("backend", "batch", "count", "loop", "seen", "stream")

    def __init__(self, backend: Backend, stream: RawStream | None) -> None:
        self.backend = backend
        self.stream = stream
        self.count = 0
        self.batch: list[int] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.seen: list[int] | None = None

    def detach(self) -> list[int] | None:
        """Take the open batch away (with the bridge's lock held) for sending."""
        batch = self.batch
        self.batch = self.loop = self.seen = None
        return batch

    @staticmethod
    def key(backend: Backend, stream: RawStream | None) -> object:
        """What the bridge files a probe under: its stream, else its backend."""
        return backend if stream is None else stream


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
        # collector to count and traverse: RESULTS.md §2); a free slot holds None.
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
        self._lookouts: set[Callable[[], bool]] = set()  # see add_lookout
        self._pokes = 0

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
        # and spinning would cost every one of thousands of awaits (RESULTS.md §2).
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
        token, batch, on = self._register(callback, backend, probe, loop)  # type: ignore[arg-type]
        if batch is None:  # a signal of its own, now
            try:
                target.signal_when_done(token, self)
            except BaseException:
                self._release(token)
                raise
        elif len(batch) == 1:  # it opened the stream's batch: signal it after this iteration
            assert loop is not None
            loop.call_soon(self._flush, on, batch)
        elif batch is not _JOINED:  # it filled the batch: signal it now
            self._send(on, batch)

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
    # A signal carries a token: the slot plus CAPACITY times the slot's generation, so a late
    # signal for a waiter that the watchdog already failed (and whose slot was reused) is
    # recognised and ignored.
    def _register(
        self,
        resolve: Callable[[BaseException | None], None],
        backend: Backend,
        stream: RawStream | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[int, list[int] | None, _Probe]:
        """Take a slot for ``resolve``; returns its token, its batch and its probe. The
        batch is ``None`` when it needs a signal of its own now, else the stream's batch it
        opened (length 1), filled (detached; length :attr:`coalesce`), or ``_JOINED``."""
        key = backend if stream is None else stream  # _Probe.key, inlined: once per await
        batch: list[int] | None = None
        with self._lock:
            if not self._free:
                self._grow()
            slot = self._free.pop()
            self._resolve[slot] = resolve
            probe = self._probes.get(key)
            if probe is None:
                probe = self._probes[key] = _Probe(backend, stream)
            token = slot + CAPACITY * self._gen[slot]
            if loop is not None and probe.count:  # others pending on the stream: share
                batch = probe.batch
                if batch is None:
                    batch = probe.batch = [token]
                    probe.loop = loop
                elif probe.loop is loop:
                    batch.append(token)
                    if len(batch) >= self.coalesce:
                        probe.detach()  # full: the caller sends it
                    else:
                        batch = _JOINED
                else:  # another loop's batch: that loop sends it
                    batch = None
            probe.count += 1
            self._probe[slot] = probe
            self._live += 1
            self._armed += 1
            if batch is None:
                self._signals += 1
            if self._live == 1:
                # The watchdog clears its wake-up flag under this lock once nothing is
                # pending: the first waiter after that sets it again.
                self._wake.set()
        if self._watchdog is None:
            self._ensure_watchdog()
        return token, batch, probe

    def _flush(self, probe: _Probe, batch: list[int]) -> None:
        """Send ``batch`` unless it was sent already (the loop call its opener scheduled)."""
        with self._lock:
            if probe.batch is not batch:
                return  # sent when it filled up, or by the watchdog
            probe.detach()
        self._send(probe, batch)

    def _send(self, probe: _Probe, batch: list[int]) -> None:
        """Enqueue one signal on ``probe``'s stream for the waiters of ``batch`` (detached
        from it) still pending: it carries the last one's token, and that slot lists the
        others."""
        gens, stream = self._gen, probe.stream
        assert stream is not None  # only a stream's waiters share signals
        with self._lock:
            live = [t for t in batch if t >> _GEN_SHIFT == gens[t & _SLOT]]
            if not live:
                return  # every one failed by the watchdog meanwhile
            lead = live.pop()
            self._rest[lead & _SLOT] = live or None
            self._signals += 1
        try:
            stream.signal_when_done(lead, self)
        except BaseException as exc:  # a faulted or closed stream: every waiter hears it
            error: BaseException | None = exc
            if isinstance(exc, Exception):
                try:  # closed after its work ran (close() waits for it): all done, then
                    error = None if stream.query() else exc
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
                del self._probes[_Probe.key(probe.backend, probe.stream)]
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
                resolve = take(slot)
                if resolve is not None:
                    done.append(resolve)
                if rest is not None:  # the waiters this signal was shared by
                    for other in rest:
                        if other >> _GEN_SHIFT == gens[other & _SLOT]:
                            resolve = take(other & _SLOT)
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
    def add_lookout(self, look: Callable[[], bool]) -> None:
        """Have the watchdog call ``look()`` at each of its looks (every
        ``watchdog_interval``) until :meth:`remove_lookout`. ``look`` returns whether it
        still holds something that needs another look; whoever starts holding something
        calls :meth:`poke`, so that a sleeping watchdog looks again."""
        with self._lock:
            self._lookouts.add(look)

    def remove_lookout(self, look: Callable[[], bool]) -> None:
        with self._lock:
            self._lookouts.discard(look)

    def poke(self) -> None:
        """A lookout holds something now: the watchdog keeps looking until it says not."""
        with self._lock:
            self._pokes += 1
            self._wake.set()
        if self._watchdog is None:
            self._ensure_watchdog()

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
                live, pokes, lookouts = self._live, self._pokes, list(self._lookouts)
            held = False
            for look in lookouts:
                try:
                    held = look() or held
                except BaseException:
                    _log.exception("a completion lookout failed; the watchdog goes on")
            if not live:
                with self._lock:  # asleep only if nothing was armed or held meanwhile
                    if not self._live and not held and self._pokes == pokes:
                        self._wake.clear()
                continue
            try:
                self._send_stranded()
                self.check_faults()
            except BaseException:  # never let the watchdog die: pending awaits rely on it
                _log.exception("the completion watchdog's fault check failed; it goes on")

    def _send_stranded(self) -> None:
        """Send the open batches whose loop is not running, or that stayed open since the
        last look (a loop blocked in one iteration): the call that sends them would not
        come, or not soon. Sending early is safe — the signal still lands after every
        waiter's work — except into a stream we are capturing into a graph: the signal
        would become a node of the graph, so such a batch waits for the capture's end."""
        with self._lock:
            stranded = []
            for probe in self._probes.values():
                batch, loop = probe.batch, probe.loop
                if batch is None or getattr(probe.stream, "capturing", False):
                    continue
                if probe.seen is batch or (loop is not None and not loop.is_running()):
                    stranded.append((probe, probe.detach()))
                else:
                    probe.seen = batch
        for probe, batch in stranded:
            assert batch is not None
            self._send(probe, batch)

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


_GEN_SHIFT = CAPACITY.bit_length() - 1  # token = slot + CAPACITY * generation
_SLOT = CAPACITY - 1
_JOINED: list[int] = []  # _register's answer for a waiter that joined an open batch


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
