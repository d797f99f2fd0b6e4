"""The host backend: a real CPU executor that behaves like a CUDA device.

Each stream is an in-order queue of items (host functions, event records, event waits,
completion signals). A fixed number of execution units (``PYGPUKIT_HOST_WORKERS``) run
those items; whenever a unit is free it takes the head of the *highest-priority* stream
that has runnable work (lower number = higher priority, as in CUDA), oldest-ready first
among equals. What an item enqueues on its own stream while it runs goes right behind it,
ahead of what others queued there meanwhile, as on CUDA, where a task's function enqueues
its kernels before the next task is launched: a task runs as a stream item here (the
launcher), and the event marking the end of its work must complete right after it, not
after every task queued behind it. An item that raises faults the device the way a bad
kernel faults a CUDA context: nothing more runs, events never complete, and every query
reports a :class:`~pygpukit.CudaError` — which is what the completion watchdog is tested
against.

"Device memory" is NumPy memory charged against ``PYGPUKIT_HOST_VRAM`` (default 16 GiB).
Array work through :mod:`pygpukit.xp` runs synchronously on the calling thread, so it is
complete, in stream order, by the time the next item is enqueued.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from ..._exceptions import CudaError, InvalidArgument
from ..._locks import BookkeepingLock, give_back
from ..._units import GB, parse_size
from ._arena import ArenaPool
from ._base import Backend, DeviceInfo, Grower, RawEvent, RawGraph, RawStream, Shrinker, Signal
from ._hostxp import HostXP

__all__ = ("HostBackend",)

PRIORITY_RANGE = (0, -5)  # (least, greatest), the range the project's H200 reports
_ALIGN = 512  # CuPy rounds allocations to 512 bytes; so do we, so budgets read the same


class _Item:
    __slots__ = ("arg", "kind")

    def __init__(self, kind: str, arg: Any) -> None:
        self.kind = kind  # "call" | "record" | "wait" | "signal"
        self.arg = arg


class HostGraph(RawGraph):
    """Host "device work" is array work done synchronously on the calling thread, so a
    replay runs the captured function again."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._fn: Callable[[], object] | None = fn

    def launch(self, stream: RawStream) -> None:
        if self._fn is None:
            raise InvalidArgument("this graph is closed; capture the work again")
        self._fn()

    def close(self) -> None:
        self._fn = None


class HostEvent(RawEvent):
    def __init__(self, executor: _Executor, timing: bool) -> None:
        self._ex = executor
        self.handle = id(self)
        self._timing = timing
        self._recorded = 0  # generation of the latest record
        self._completed = 0  # latest generation whose record has run
        self._time: float | None = None
        self._signals: list[tuple[int, int, Signal]] = []
        self._closed = False

    # called by the executor, under its lock
    def _complete(self, generation: int) -> list[tuple[int, Signal]]:
        if self._timing and generation >= self._completed:
            self._time = time.perf_counter()
        self._completed = max(self._completed, generation)
        ready = [(slot, sig) for g, slot, sig in self._signals if g <= self._completed]
        self._signals = [s for s in self._signals if s[0] > self._completed]
        return ready

    def _done_locked(self, generation: int | None = None) -> bool:
        return self._completed >= (self._recorded if generation is None else generation)

    def query(self) -> bool:
        with self._ex.cv:
            self._ex.raise_fault()
            return self._done_locked()

    def synchronize(self) -> None:
        with self._ex.cv:
            target = self._recorded
            while not self._done_locked(target):
                self._ex.raise_fault()
                self._ex.cv.wait()
            self._ex.raise_fault()

    def elapsed_ms(self, end: RawEvent) -> float:
        if not isinstance(end, HostEvent):
            raise InvalidArgument("elapsed time needs two events of the same backend")
        if self._time is None or end._time is None:
            raise InvalidArgument(
                "elapsed time needs both events created with timing=True and completed"
            )
        return (end._time - self._time) * 1e3

    def signal_when_done(self, slot: int, signal: Signal) -> None:
        with self._ex.cv:
            if self._done_locked():
                fire = True
            else:
                self._signals.append((self._recorded, slot, signal))
                fire = False
        if fire:
            signal.push(slot)

    def close(self) -> None:
        self._closed = True


class HostStream(RawStream):
    def __init__(self, executor: _Executor, priority: int) -> None:
        self._ex = executor
        self.handle = id(self)
        self.priority = priority
        self.items: deque[_Item] = deque()
        self.busy = False
        self.ready_seq = 0
        self.runner = 0  # the unit running the current item (thread ident), 0 if none
        self.nested = 0  # items that item enqueued here so far: they go first, in order
        self._closing = False
        self._closed = False

    def _put(self, kind: str, arg: Any) -> None:
        if self._closed:
            raise CudaError("this host stream is closed; enqueue work on an open stream")
        self._ex.raise_fault()  # as on CUDA: a faulted context refuses new work
        self._ex.enqueue(self, _Item(kind, arg))

    def _own(self, event: RawEvent) -> HostEvent:
        if not isinstance(event, HostEvent) or event._ex is not self._ex:
            raise InvalidArgument(
                "an event can only be used with streams of the runtime that created it"
            )
        return event

    def synchronize(self) -> None:
        with self._ex.cv:
            while self.items or self.busy:
                self._ex.raise_fault()
                self._ex.cv.wait()
            self._ex.raise_fault()

    def query(self) -> bool:
        with self._ex.cv:
            self._ex.raise_fault()
            return not (self.items or self.busy)

    def record(self, event: RawEvent) -> None:
        event = self._own(event)
        with self._ex.cv:
            event._recorded += 1
            generation = event._recorded
        self._put("record", (event, generation))

    def wait_event(self, event: RawEvent) -> None:
        event = self._own(event)
        with self._ex.cv:
            generation = event._recorded
        self._put("wait", (event, generation))

    def launch_host_func(self, fn: Callable[[], object]) -> None:
        self._put("call", fn)

    def signal_when_done(self, slot: int, signal: Signal) -> None:
        self._put("signal", (slot, signal))

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:  # work already queued (and what it enqueues) still runs, as on CUDA
            self.synchronize()
        except CudaError:
            pass
        self._closed = True
        self._ex.remove(self)


class _Executor:
    """Execution units serving the highest-priority ready stream first."""

    def __init__(self, units: int) -> None:
        self.cv = threading.Condition(threading.Lock())
        self.streams: list[HostStream] = []
        self.fault_error: CudaError | None = None
        self._seq = itertools.count(1)
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"pygpukit-host-unit-{i}", daemon=True)
            for i in range(units)
        ]
        for t in self._threads:
            t.start()

    def raise_fault(self) -> None:
        if self.fault_error is not None:
            raise self.fault_error

    def add(self, stream: HostStream) -> None:
        with self.cv:
            self.streams.append(stream)

    def remove(self, stream: HostStream) -> None:
        with self.cv:
            if stream in self.streams:
                self.streams.remove(stream)

    def enqueue(self, stream: HostStream, item: _Item) -> None:
        me = threading.get_ident()
        with self.cv:
            if stream.busy and stream.runner == me:  # by the stream's own running item
                stream.items.insert(stream.nested, item)
                stream.nested += 1
            else:
                if not stream.items and not stream.busy:
                    stream.ready_seq = next(self._seq)
                stream.items.append(item)
            self.cv.notify_all()  # workers and synchronize() callers share this condition

    def _runnable(self, stream: HostStream) -> bool:
        if stream.busy or not stream.items:
            return False
        head = stream.items[0]
        if head.kind == "wait":
            event, generation = head.arg
            return bool(event._done_locked(generation))
        return True

    def _pick(self) -> HostStream | None:
        best: HostStream | None = None
        for s in self.streams:
            if self._runnable(s) and (
                best is None or (s.priority, s.ready_seq) < (best.priority, best.ready_seq)
            ):
                best = s
        return best

    def _run(self) -> None:
        cv = self.cv
        me = threading.get_ident()
        while True:
            with cv:
                while True:
                    if self._closed:
                        return
                    stream = self._pick() if self.fault_error is None else None
                    if stream is not None:
                        break
                    cv.wait()
                item = stream.items.popleft()
                stream.busy = True
                stream.runner, stream.nested = me, 0
                if item.kind == "record":
                    event, generation = item.arg
                    signals = event._complete(generation)
                elif item.kind == "signal":
                    signals = [item.arg]
                else:
                    signals = []
            try:
                if item.kind == "call":
                    item.arg()
                for slot, signal in signals:
                    signal.push(slot)
            except BaseException as exc:  # a failing item faults the device, as on CUDA
                with cv:
                    self.fault_error = CudaError(
                        f"host device faulted: a stream item raised {exc!r}; the host "
                        "runtime is unusable now, as a CUDA context is after a kernel "
                        "fault — create a new Runtime",
                        status=None,
                    )
                    self.fault_error.__cause__ = exc
            del item, signals  # hold nothing of it while waiting for the next item
            with cv:
                stream.busy = False
                stream.runner = 0
                stream.ready_seq = next(self._seq)
                cv.notify_all()

    def close(self) -> None:
        with self.cv:
            self._closed = True
            self.cv.notify_all()


class HostPool(ArenaPool):
    """Allocations charged through ``grow``/``shrink`` and returned when the array dies."""

    def __init__(
        self,
        backend: HostBackend,
        grow: Grower,
        shrink: Shrinker,
        arena_bytes: int = 0,
        label: str | None = None,
    ) -> None:
        super().__init__(grow, shrink, arena_bytes, label)
        self._backend = backend
        self._used = 0
        self._lock = BookkeepingLock()  # released from finalizers: see pygpukit._locks
        self._base: np.ndarray[Any, Any] | None = (
            backend.alloc_raw(arena_bytes) if arena_bytes else None
        )

    def malloc(self, nbytes: int) -> np.ndarray[Any, Any]:
        if nbytes < 0:  # before the charge: a negative size would credit the budget
            raise InvalidArgument(f"cannot allocate a negative number of bytes ({nbytes})")
        size = -(-nbytes // _ALIGN) * _ALIGN if nbytes else 0
        self._grow(size)
        offset = -1
        try:
            owner: Any
            if self._arena is None or self._base is None or size == 0:
                buf = owner = self._backend.take(size)
            else:
                offset = self._arena.carve(size)
                # A ctypes view of the range owns it: NumPy collapses chains of array views
                # down to the first non-array base, so every array made from ``buf`` keeps
                # this object (and its charge) alive, and no longer.
                owner = (ctypes.c_uint8 * size).from_buffer(self._base, offset)  # type: ignore[arg-type]
                buf = np.frombuffer(owner, dtype=np.uint8)
        except BaseException:  # nothing half-taken: the range back, then the charge
            if offset >= 0:
                assert self._arena is not None
                self._arena.give(offset, size)
            self._shrink(size)
            raise
        with self._lock:
            self._used += size
        weakref.finalize(owner, give_back, self._release, size, offset)
        return buf

    def _release(self, size: int, offset: int) -> None:
        with self._lock:
            self._used -= size
        if offset < 0:
            self._backend.release(size)
            self._shrink(size)
        else:
            self._give(offset, size)

    def used_bytes(self) -> int:
        return self._used

    def release_cached(self) -> None:
        """Nothing is cached on the host: freed arrays return their bytes at once."""


class HostBackend(Backend):
    """The CPU executor; see the module docstring."""

    name = "host"
    tasks_on_streams = True

    def __init__(self, device_id: int = 0) -> None:
        if device_id != 0:
            raise InvalidArgument(
                f"device_id={device_id} does not exist on the host backend; it has one device, 0"
            )
        self.device_id = 0
        units = int(os.environ.get("PYGPUKIT_HOST_WORKERS", "0") or 0)
        if units < 0:
            raise InvalidArgument("PYGPUKIT_HOST_WORKERS must be a positive integer")
        self._units = units or max(2, min(4, os.cpu_count() or 2))
        capacity = os.environ.get("PYGPUKIT_HOST_VRAM")
        self._capacity = parse_size(capacity, what="PYGPUKIT_HOST_VRAM") if capacity else 16 * GB
        self._allocated = 0
        self._lock = BookkeepingLock()  # given back from finalizers: see pygpukit._locks
        self._ex = _Executor(self._units)
        self._xp = HostXP()
        self._closed = False

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            backend="host",
            device_id=0,
            name=f"host executor ({self._units} execution units)",
            total_memory=self._capacity,
            priority_range=PRIORITY_RANGE,
            multiprocessor_count=self._units,
            compute_capability=None,
        )

    def mem_get_info(self) -> tuple[int, int]:
        return self._capacity - self._allocated, self._capacity

    def take(self, size: int) -> np.ndarray[Any, Any]:
        with self._lock:
            if self._allocated + size > self._capacity:
                raise MemoryError(
                    f"host device memory exhausted: {size} bytes asked, "
                    f"{self._capacity - self._allocated} free of {self._capacity}"
                )
            self._allocated += size
        try:
            return np.empty(size, dtype=np.uint8)
        except BaseException:
            self.release(size)
            raise

    def release(self, size: int) -> None:
        """``size`` bytes taken with :meth:`take` are free again."""
        with self._lock:
            self._allocated -= size

    def create_stream(self, priority: int) -> HostStream:
        stream = HostStream(self._ex, priority)
        self._ex.add(stream)
        return stream

    def create_event(self, *, timing: bool = False) -> HostEvent:
        return HostEvent(self._ex, timing)

    def capture(self, stream: RawStream, fn: Callable[[], object]) -> HostGraph:
        return HostGraph(fn)

    def create_pool(
        self,
        grow: Grower,
        shrink: Shrinker,
        arena_bytes: int = 0,
        label: str | None = None,
        stream: RawStream | None = None,
    ) -> HostPool:
        # NumPy memory is freed when its last reference goes, which a stream item still to
        # run holds: nothing to order by stream here.
        return HostPool(self, grow, shrink, arena_bytes, label)

    def install_router(self, router: Callable[[int], Any]) -> None:
        self._xp._router = router

    def bind_stream(self, stream: RawStream | None, *, route: bool = True) -> object:
        # NumPy work is synchronous: there is no thread-level "current stream" to set.
        return None

    def restore_stream(self, token: object) -> None:
        return None

    def fault(self, streams: list[RawStream]) -> BaseException | None:
        if self._closed:
            return CudaError("the host runtime was closed while work was awaited")
        return self._ex.fault_error

    def synchronize(self) -> None:
        for s in list(self._ex.streams):
            s.synchronize()

    @property
    def xp(self) -> HostXP:
        return self._xp

    def alloc_raw(self, nbytes: int) -> np.ndarray[Any, Any]:
        buf = self.take(nbytes)
        weakref.finalize(buf, give_back, self.release, nbytes)
        return buf

    def copy_to_host(self, buf: Any, nbytes: int) -> np.ndarray[Any, Any]:
        return np.array(buf[:nbytes], copy=True)

    def copy_from_host(self, buf: Any, host: Any, nbytes: int) -> None:
        buf[:nbytes] = np.frombuffer(host, dtype=np.uint8, count=nbytes)

    def array_to_host(self, array: Any, out: Any = None) -> np.ndarray[Any, Any]:
        if out is None or out.shape != array.shape or out.dtype != array.dtype:
            out = np.empty(array.shape, dtype=array.dtype)
        np.copyto(out, array)
        return out  # type: ignore[no-any-return]

    def array_from_host(self, host: Any) -> np.ndarray[Any, Any]:
        out = self._xp.empty(host.shape, dtype=host.dtype)
        np.copyto(out, host)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in list(self._ex.streams):
            s.close()
        self._ex.close()


backend_class = HostBackend
