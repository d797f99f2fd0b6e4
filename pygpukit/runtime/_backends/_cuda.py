"""The CUDA backend, on CuPy (>= 14.1). CuPy is imported here and nowhere else.

CuPy's errors never leave this module untranslated: CUDA runtime errors become
:class:`~pygpukit.CudaError`, allocation failures :class:`~pygpukit.VRAMBudgetExceeded`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from ..._exceptions import BackendUnavailable, CudaError, InvalidArgument, VRAMBudgetExceeded
from ..._locks import BookkeepingLock, give_back
from ._arena import Arena
from ._base import (
    Backend,
    DeviceInfo,
    Grower,
    RawEvent,
    RawGraph,
    RawPool,
    RawStream,
    Shrinker,
    Signal,
)
from ._idle_trim import IdleTrimmer

try:
    import cupy
    from cupy.cuda import runtime as _rt
except ImportError as exc:  # pragma: no cover - exercised on machines without CuPy
    raise BackendUnavailable(
        "the cuda backend needs CuPy >= 14.1; install it with "
        "pip install 'pygpukit[cuda12]' (CUDA 12) or 'pygpukit[cuda13]' (CUDA 13), "
        "or use backend='host'"
    ) from exc

__all__ = ("CudaBackend",)

_log = logging.getLogger("pygpukit")

_NOT_READY = 600  # cudaErrorNotReady
_OUT_OF_MEMORY = 2  # cudaErrorMemoryAllocation (CuPy does not export the name)
# cudaMemPoolProps of a device's memory pool: pinned (not host-mapped) device memory
_ALLOCATION_PINNED, _HANDLE_NONE, _LOCATION_DEVICE = 1, 0, 1
DEFAULT_POOL_IDLE_S = 2.0  # unused pool memory goes back to the driver after this long quiet
_FOREIGN_EVENT = "a CUDA stream can only record or wait for events of the same runtime's backend"


class _Translating:
    """Maps CuPy's CUDA errors to ours at the boundary: ``with _translated(): ...``.

    A plain class, not a ``contextmanager`` generator: it wraps calls made several times
    per submitted task (event records, timing), where a generator costs about 1 µs more.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if kind is not None and issubclass(kind, _rt.CUDARuntimeError):
            raise CudaError(f"CUDA error: {exc}", status=exc.status) from exc  # type: ignore[union-attr]


_TRANSLATING = _Translating()


def _translated() -> _Translating:
    return _TRANSLATING


_T = TypeVar("_T")
_exchange_mode: Any = None  # cuThreadExchangeStreamCaptureMode: _load_exchange()


def _load_exchange() -> None:
    """Load the driver's capture-mode switch, once, when the first backend is made: every
    :func:`_relaxed` call (queries in a spin loop among them) then finds it ready."""
    global _exchange_mode
    if _exchange_mode is None:
        exchange = ctypes.CDLL("libcuda.so.1").cuThreadExchangeStreamCaptureMode
        exchange.argtypes = [ctypes.POINTER(ctypes.c_int)]
        exchange.restype = ctypes.c_int
        _exchange_mode = exchange


def _relaxed(call: Callable[..., _T], *args: Any) -> _T:
    """``call(*args)`` with this thread's stream capture mode relaxed for the call.

    A query, a synchronization or a pool call made in the default (global) mode while
    another thread captures a graph in global mode (PyTorch's default) invalidates that
    capture — queries even while returning normally (measured on the H200,
    docs/decisions.md). Ours never touch a capturing stream, so relaxing is safe for them.
    Needs a :class:`CudaBackend` made first (:func:`_load_exchange`).
    """
    exchange = _exchange_mode
    mode = ctypes.c_int(2)  # CU_STREAM_CAPTURE_MODE_RELAXED; the old mode comes back here
    if exchange(mode) != 0:  # not switched: a second exchange would leave the thread relaxed
        return call(*args)
    try:
        return call(*args)
    finally:
        exchange(mode)  # the thread's own mode again


def _check(status: int, what: str) -> bool:
    """``True`` for success, ``False`` for not-ready; raise for a device error."""
    if status == 0:
        return True
    if status == _NOT_READY:
        return False
    raise CudaError(
        f"{what} failed: CUDA error {status} ({_error_name(status)}); the CUDA context is "
        "unusable after a device fault — restart the process",
        status=status,
    )


def _error_name(status: int) -> str:
    try:
        return str(_rt.getErrorName(status))
    except Exception:  # pragma: no cover - an unknown code
        return "unknown"


def _push_from_python(arg: tuple[Signal, int]) -> None:
    signal, slot = arg
    signal.push(slot)


class CudaEvent(RawEvent):
    def __init__(self, backend: CudaBackend, timing: bool) -> None:
        with _translated(), cupy.cuda.Device(backend.device_id):  # an event is a device's
            self._ev = cupy.cuda.Event(block=False, disable_timing=not timing)
        self.handle = int(self._ev.ptr)
        self._backend = backend
        self.origin: CudaStream | None = None

    def query(self) -> bool:
        return _check(_relaxed(_rt.eventQuery, self.handle), "cudaEventQuery")

    def synchronize(self) -> None:
        with _translated():
            self._ev.synchronize()

    def elapsed_ms(self, end: RawEvent) -> float:
        if type(end) is not CudaEvent:
            raise InvalidArgument("elapsed time needs two events of the same backend")
        with _translated():
            return float(_relaxed(cupy.cuda.get_elapsed_time, self._ev, end._ev))

    def signal_when_done(self, slot: int, signal: Signal) -> None:
        origin = self.origin
        if origin is None:  # never recorded: complete, as CUDA reports it
            signal.push(slot)
            return
        # A companion stream of the origin waits for the event, then signals; the origin
        # stream itself may already have later work queued behind the event.
        companion = origin.companion()
        companion.wait_event(self)
        companion.signal_when_done(slot, signal)

    def close(self) -> None:
        """CuPy destroys the handle when the last reference goes; nothing to do early."""


class CudaStream(RawStream):
    def __init__(self, backend: CudaBackend, priority: int) -> None:
        with _translated(), cupy.cuda.Device(backend.device_id):
            self.cp = cupy.cuda.Stream(non_blocking=True, priority=priority)
        self.handle = int(self.cp.ptr)
        self.priority = priority
        self._backend = backend
        backend._ours[self.handle] = self
        _streams[self.handle] = self
        self._companion: CudaStream | None = None
        self._torch: Any = None
        self._closed = False
        self.capturing = False
        # Held while a capture begins, and by a free on this stream while it decides between
        # queueing and deferring: a free never lands in a capture that began meanwhile.
        # Reentrant: a block's finalizer can run on the thread beginning the capture.
        self.capture_lock = threading.RLock()

    def captured(self) -> bool:
        """Whether work queued on this stream now would be recorded into a graph: our own
        capture, or one CUDA reports (someone else's, or one an error invalidated)."""
        return self.capturing or _capturing(self.cp)

    def companion(self) -> CudaStream:
        if self._companion is None:
            with self._backend._lock:
                if self._companion is None:
                    self._companion = CudaStream(self._backend, self.priority)
        return self._companion

    def torch_stream(self) -> Any:
        if self._torch is None:
            import torch

            self._torch = torch.cuda.ExternalStream(self.handle, device=self._backend.device_id)
        return self._torch

    def synchronize(self) -> None:
        with _translated():
            self.cp.synchronize()

    def query(self) -> bool:
        if self.capturing:  # querying a capturing stream would break the capture
            return False
        return _check(_relaxed(_rt.streamQuery, self.handle), "cudaStreamQuery")

    def record(self, event: RawEvent) -> None:
        if type(event) is not CudaEvent:  # not isinstance: an ABC check costs ~0.5 µs
            raise InvalidArgument(_FOREIGN_EVENT)
        with _translated():
            event._ev.record(self.cp)
        event.origin = self

    def wait_event(self, event: RawEvent) -> None:
        if type(event) is not CudaEvent:
            raise InvalidArgument(_FOREIGN_EVENT)
        with _translated():
            self.cp.wait_event(event._ev)

    def launch_host_func(self, fn: Callable[[], object]) -> None:
        with _translated():
            self.cp.launch_host_func(lambda _arg: fn(), None)

    def signal_when_done(self, slot: int, signal: Signal) -> None:
        native = signal.native
        if native is not None:
            status = native.launch(self.handle, slot)
            if status != 0:
                raise CudaError(
                    f"cuLaunchHostFunc failed with CUDA driver error {status}", status=status
                )
        else:
            with _translated():
                self.cp.launch_host_func(_push_from_python, (signal, slot))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.cp.synchronize()
        except _rt.CUDARuntimeError:
            pass
        # no longer ours: once CuPy destroys it, another stream may get the same handle
        self._backend._ours.pop(self.handle, None)
        _streams.pop(self.handle, None)
        if self._companion is not None:
            self._companion.close()


class CudaGraph(RawGraph):
    """A CUDA graph and the device memory its kernels read and write."""

    def __init__(self, graph: Any, keep: list[Any]) -> None:
        self._graph: Any = graph
        self._keep: list[Any] | None = keep
        self._streams: dict[int, CudaStream] = {}  # every stream it was launched on

    def launch(self, stream: RawStream) -> None:
        assert isinstance(stream, CudaStream)
        if self._graph is None:
            raise InvalidArgument("this graph is closed; capture the work again")
        with _translated():
            self._graph.launch(stream.cp)
        self._streams[stream.handle] = stream

    def close(self) -> None:
        """Free the graph's buffers once every replay has run."""
        for stream in self._streams.values():
            try:
                stream.cp.synchronize()
            except _rt.CUDARuntimeError:
                pass
        self._graph = self._keep = None
        self._streams.clear()


class _PoolMemory:
    """Device memory from the backend's stream-ordered pool (``cudaMallocFromPoolAsync``).

    Given back with ``cudaFreeAsync`` on the stream it was allocated on: ordered after that
    stream's work, and nobody waits. ``cudaFree`` instead waits until the whole device is
    idle — 48 ms while another stream ran a 50 ms kernel — and hands the pages to the
    driver, which slows the next large copy to 75% (bench/RESULTS.md §8). The pool keeps
    the memory mapped for the next allocation of any context.
    """

    __slots__ = ("__weakref__", "device_id", "ptr", "size", "stream")

    def __init__(self, ptr: int, size: int, stream: CudaStream, device_id: int) -> None:
        self.ptr = ptr
        self.size = size
        self.stream = stream
        self.device_id = device_id
        # The owning stream stays alive until the free is queued, from a module-level map
        # rather than only from this object: in a batch of cyclic garbage, finalizers run in
        # no set order, and CuPy's stream would otherwise be destroyed first.
        _keep[ptr] = stream

    def __del__(self) -> None:
        _free_async(self.ptr, self.stream, self.device_id)


# Device pointer -> the CudaStream its free will be queued on (dict operations are atomic).
_keep: dict[int, CudaStream] = {}

# Frees that could not be queued because their stream was being captured: a free queued
# during capture would become a node of the graph (and fail: the block is not the graph's).
# They are queued once the capture is over (CudaBackend.capture, device_memory).
_deferred: list[tuple[int, CudaStream, int]] = []


def _free_async(ptr: int, stream: CudaStream, device_id: int) -> None:
    later = (ptr, stream, device_id)  # made before the lock: nothing in it allocates
    # Before the free, while the pointer is still this block's; `stream` (a local, or the
    # deferred list) keeps the stream alive until the free is queued.
    _keep.pop(ptr, None)
    stream._backend._pool.busy_at = time.monotonic()  # (a float store: no lock here)
    try:
        with cupy.cuda.Device(device_id):
            with stream.capture_lock:
                if stream.captured():
                    _deferred.append(later)  # list.append: atomic
                    return
                _rt.freeAsync(ptr, stream.handle)
    except Exception:  # a faulted device, or interpreter exit: nothing to give back to
        _log.debug("a stream-ordered free failed", exc_info=True)


def _capturing(stream: Any) -> bool:
    """Whether work queued on ``stream`` now would be captured (an error counts as yes: a
    capture invalidated by an error, or the null stream while another stream captures)."""
    try:
        return bool(stream.is_capturing())
    except Exception:
        return True


def _free_deferred() -> None:
    """Queue the frees that waited for a capture to end, where it has."""
    waiting = []
    while _deferred:
        try:
            waiting.append(_deferred.pop())
        except IndexError:  # another thread took the last one
            break
    for ptr, stream, device_id in waiting:
        _free_async(ptr, stream, device_id)  # still capturing: deferred again


# Every open stream of every CUDA backend in the process, by handle (weak, as `_ours`).
_streams: weakref.WeakValueDictionary[int, CudaStream] = weakref.WeakValueDictionary()


class _PoolHandle:
    """The backend's pool handle, shared with its finalizer: ``None`` once destroyed, so
    nothing uses a destroyed pool (a closed runtime stays CuPy's allocator).

    ``busy_at``: when a block was last taken from or given back to it; once it has been
    quiet for ``idle_s``, the idle trimmer (``_idle_trim``) gives its unused memory back to
    the driver, where libraries that allocate for themselves (PyTorch, cuBLAS) can get it.
    """

    __slots__ = (
        "__weakref__",
        "busy_at",
        "device_id",
        "idle_s",
        "lock",
        "pool",
        "settled",
        "tries",
    )

    def __init__(
        self, pool: int | None, device_id: int, idle_s: float = DEFAULT_POOL_IDLE_S
    ) -> None:
        self.pool = pool
        self.device_id = device_id
        # Held to use the pool: no trim or allocation runs on a pool being destroyed. A
        # bookkeeping lock: the backend's finalizer closes the pool through give_back, so
        # a collection on a thread holding it (the trimmer's, mid-trim) queues the close
        # instead of waiting for itself.
        self.lock = BookkeepingLock()
        self.idle_s = idle_s
        self.busy_at = self.settled = time.monotonic()
        self.tries = 0

    def close(self) -> None:
        """Give the idle memory back to the driver; the pool itself goes once the last of
        its allocations is freed (the driver defers the destruction until then)."""
        with self.lock:
            pool, self.pool = self.pool, None
            if pool is None:
                return
            try:
                with cupy.cuda.Device(self.device_id):
                    _relaxed(_rt.memPoolTrimTo, pool, 0)
                    _relaxed(_rt.memPoolDestroy, pool)
            except Exception:  # a faulted device, or interpreter exit
                pass

    def trim(self) -> bool:
        """Give memory no allocation uses back to the driver (frees already run); whether
        all of it went (a free still queued behind its stream's work keeps its block)."""
        with self.lock:
            if self.pool is None:
                return True
            with cupy.cuda.Device(self.device_id):
                _relaxed(_rt.memPoolTrimTo, self.pool, 0)
                reserved, used = _relaxed(_pool_use, self.pool)
            return reserved <= used


def _pool_use(pool: int) -> tuple[int, int]:
    """``(reserved, used)`` bytes of a stream-ordered pool."""
    return (
        int(_rt.memPoolGetAttribute(pool, _rt.cudaMemPoolAttrReservedMemCurrent)),
        int(_rt.memPoolGetAttribute(pool, _rt.cudaMemPoolAttrUsedMemCurrent)),
    )


# Every live backend's pool: an allocation that runs out of device memory trims them all,
# not just its own (another runtime's idle memory is as unusable to it as the driver's).
_pools: weakref.WeakSet[_PoolHandle] = weakref.WeakSet()
_pools_lock = threading.Lock()


_trimmer = IdleTrimmer(_pools, _pools_lock)  # type: ignore[arg-type]


def _pool_idle_s() -> float:
    raw = os.environ.get("PYGPUKIT_POOL_IDLE_S", "").strip()
    try:
        idle_s = float(raw) if raw else DEFAULT_POOL_IDLE_S
    except ValueError:
        idle_s = -1.0
    if not idle_s > 0:  # NaN, zero, negative, or not a number
        raise InvalidArgument(
            f"PYGPUKIT_POOL_IDLE_S must be a positive number of seconds (how long the "
            f"device pool's unused memory is kept after its last use; inf keeps it until "
            f"the runtime closes), got {raw!r}"
        )
    return idle_s


def _make_pool(device_id: int) -> int | None:
    """A stream-ordered memory pool on the device, where it has them."""
    if not _rt.deviceGetAttribute(_rt.cudaDevAttrMemoryPoolsSupported, device_id):
        return None
    props = _rt.MemPoolProps(_ALLOCATION_PINNED, _HANDLE_NONE, _LOCATION_DEVICE, device_id)
    pool = _rt.memPoolCreate(props)
    # Freed memory stays mapped for the next allocation, of any context, until the backend
    # closes, an allocation runs out of device memory (CudaBackend._make_room), or the
    # pool has been quiet for its idle time (_idle_trim).
    _rt.memPoolSetAttribute(pool, _rt.cudaMemPoolAttrReleaseThreshold, (1 << 64) - 1)
    # Reuse memory freed on another stream only once that free has run: never let the pool
    # make an allocation wait for another stream's work (a Guaranteed context's allocation
    # would queue behind BestEffort kernels).
    _rt.memPoolSetAttribute(pool, _rt.cudaMemPoolReuseAllowInternalDependencies, 0)
    return int(pool)


class _Grant:
    """Owns one device block; its death gives the bytes back to the budget."""

    __slots__ = ("__weakref__", "mem")

    def __init__(self, mem: Any) -> None:
        self.mem = mem


class CudaPool(RawPool):
    """A CuPy memory pool whose new device memory is charged through ``grow``/``shrink``.

    CuPy caches freed blocks in the pool; cached blocks stay charged (they occupy the
    device) until :meth:`release_cached` gives them back.
    """

    def __init__(
        self,
        backend: CudaBackend,
        grow: Grower,
        shrink: Shrinker,
        arena_bytes: int = 0,
        label: str | None = None,
        stream: CudaStream | None = None,
    ) -> None:
        self._label = label
        self._grow = grow
        self._shrink = shrink
        self._backend = backend
        self._device = backend.device_id
        self._arena = Arena(arena_bytes) if arena_bytes else None
        with _translated(), cupy.cuda.Device(self._device):
            # on the context's own stream: its free is ordered after the context's work
            self._base = (
                backend.device_memory(arena_bytes, stream.cp if stream else None)
                if arena_bytes
                else None
            )
        self._pool = cupy.cuda.MemoryPool(allocator=self._allocate)
        self.fast_malloc = self._pool.malloc  # type: ignore[method-assign]  # no Python frame

    def _allocate(self, size: int) -> Any:
        # Called by CuPy's pool only on a cache miss, with the size already rounded.
        self._grow(size)
        if self._arena is not None:
            offset = self._arena.take(size)
            if offset is None:  # fragmented: CuPy frees its cached blocks and asks again
                self._shrink(size)
                raise _rt.CUDARuntimeError(_OUT_OF_MEMORY)
            grant = _Grant(self._base)
            weakref.finalize(grant, give_back, self._give, offset, size)
            ptr = self._base.ptr + offset  # type: ignore[union-attr]
            return cupy.cuda.MemoryPointer(
                cupy.cuda.UnownedMemory(ptr, size, grant, self._device), 0
            )
        try:
            mem = self._backend.device_memory(size)
        except BaseException:
            self._shrink(size)
            raise  # CuPy frees its cached blocks on a CUDA OOM and calls us again
        grant = _Grant(mem)
        weakref.finalize(grant, give_back, self._shrink, size)
        owned = cupy.cuda.UnownedMemory(mem.ptr, size, grant, self._device)
        return cupy.cuda.MemoryPointer(owned, 0)

    def _give(self, offset: int, size: int) -> None:
        assert self._arena is not None
        self._arena.give(offset, size)
        self._shrink(size)

    def malloc(self, nbytes: int) -> Any:
        try:
            return self._pool.malloc(nbytes)
        except Exception as exc:
            error = self.translate(exc, nbytes)
            if error is exc:
                raise
            raise error from exc

    def translate(self, exc: BaseException, nbytes: int) -> BaseException:
        if not isinstance(exc, cupy.cuda.memory.OutOfMemoryError):
            return exc  # a budget refusal from grow, or anything else: as it is
        if self._arena is not None:  # a Guaranteed reservation, fragmented
            return VRAMBudgetExceeded(
                self._label,
                nbytes,
                self._arena.largest_free,
                self._arena.size,
                "its reserved memory is fragmented",
            )
        return CudaError(
            f"the device is out of memory for {nbytes} bytes ({exc}); memory outside "
            "pygpukit's budgets (other processes, libraries) took it — lower vram_limit",
            status=_OUT_OF_MEMORY,
        )

    def used_bytes(self) -> int:
        return int(self._pool.used_bytes())

    def close(self) -> None:
        self.release_cached()
        self._base = None  # live allocations keep it alive until they die

    def release_cached(self) -> None:
        self._pool.free_all_blocks()


class CudaBackend(Backend):
    """One CUDA device through CuPy."""

    name = "cuda"
    spin_helps = True

    @staticmethod
    def _device_count() -> int:
        """Visible CUDA devices (0 where the driver is missing or broken)."""
        try:
            return _device_count_impl()
        except Exception:
            return 0

    def __init__(self, device_id: int = 0) -> None:
        try:
            count = _rt.getDeviceCount()
        except _rt.CUDARuntimeError as exc:
            raise BackendUnavailable(
                f"no usable CUDA GPU ({exc}); use backend='host' or check the driver"
            ) from exc
        if count == 0:
            raise BackendUnavailable("no CUDA GPU is visible; use backend='host'")
        if not 0 <= device_id < count:
            raise InvalidArgument(
                f"device_id={device_id} does not exist; this machine has {count} CUDA "
                f"device(s), numbered 0 to {count - 1}"
            )
        self.device_id = device_id
        _load_exchange()
        # More than one device visible: a thread's current device may not be ours, so
        # binding our stream also makes our device current (bind_stream).
        self._several = count > 1
        with _translated(), cupy.cuda.Device(device_id):
            props = _rt.getDeviceProperties(device_id)
            _rt.memGetInfo()  # make the primary context current on this thread
            least, greatest = _priority_range()
        name = props["name"]
        self._info = DeviceInfo(
            backend="cuda",
            device_id=device_id,
            name=name.decode() if isinstance(name, bytes) else str(name),
            total_memory=int(props["totalGlobalMem"]),
            priority_range=(least, greatest),
            multiprocessor_count=int(props["multiProcessorCount"]),
            compute_capability=f"{props['major']}.{props['minor']}",
            driver=_version(_rt.driverGetVersion()),
        )
        self._local = threading.local()
        self._lock = threading.Lock()
        # Our open streams by handle: to spot a leaked binding, and to give pool memory only
        # to a stream we own, never to a non-owning wrapper of its handle. Weak: a stream
        # nobody closed must still be destroyable.
        self._ours: weakref.WeakValueDictionary[int, CudaStream] = weakref.WeakValueDictionary()
        self._closed = False
        self._pool = _PoolHandle(None, device_id, _pool_idle_s())
        if os.environ.get("PYGPUKIT_STREAM_ORDERED", "1").strip() != "0":
            with cupy.cuda.Device(device_id):
                try:
                    self._pool.pool = _make_pool(device_id)
                except _rt.CUDARuntimeError as exc:  # no pool after all: cudaMalloc, as before
                    _log.warning("no stream-ordered memory pool (%s); using cudaMalloc", exc)
        with _pools_lock:
            others = list(_pools)
            if self._pool.pool is not None:
                _pools.add(self._pool)
                weakref.finalize(self, give_back, self._pool.close)
                _trimmer.ensure()
        # A runtime sizes its budget from the driver's free memory: what other runtimes'
        # pools keep unused goes back first (they map it again when they need it).
        with _translated():
            for handle in others:
                handle.trim()

    def device_memory(self, nbytes: int, stream: Any = None) -> Any:
        """``nbytes`` of device memory (an object with ``ptr``), given back when it dies.

        From the stream-ordered pool, allocated and later freed on ``stream`` (a CuPy
        stream; the current one by default), when that is one of this backend's streams
        and is not being captured; otherwise from ``cudaMalloc``.
        """
        _free_deferred()
        current = stream if stream is not None else cupy.cuda.get_current_stream()
        owner = self._ours.get(current.ptr)
        handle = self._pool
        if handle.pool is None or owner is None or owner.captured():
            # The null stream does not wait for our (non-blocking) streams, so a free on it
            # is not ordered after their use; a user's stream may be gone by the free; an
            # allocation on a capturing stream would become a node of the graph.
            return self._malloc(nbytes)
        for retry in (False, True):
            # Under the handle's lock: a runtime closed on another thread meanwhile never
            # has its destroyed pool allocated from (this falls back to cudaMalloc).
            with handle.lock, cupy.cuda.Device(self.device_id):
                if handle.pool is None:
                    break
                try:
                    ptr = _rt.mallocFromPoolAsync(nbytes, handle.pool, owner.handle)
                except _rt.CUDARuntimeError as exc:
                    if exc.status != _OUT_OF_MEMORY or retry:
                        raise
                else:
                    handle.busy_at = time.monotonic()
                    return _PoolMemory(ptr, nbytes, owner, self.device_id)
            self._make_room()  # without the lock: it trims every pool, this one included
        return self._malloc(nbytes)

    def _make_room(self) -> None:
        """After an allocation ran out of device memory: let queued frees run, and give
        every pool's unused memory back to the driver (then the caller tries once more).

        Memory freed on another stream is reused only once that free has run (see
        :func:`_make_pool`), and pool frees are queued on our streams only: so every open
        stream of ours that is not being captured is waited for — not the device, whose
        synchronization would break any capture in progress (another runtime's, PyTorch's).
        """
        with _translated():
            for s in list(_streams.values()):
                if not s.captured():
                    _relaxed(s.cp.synchronize)
            with _pools_lock:
                handles = list(_pools)
            for handle in handles:
                handle.trim()

    def _malloc(self, nbytes: int) -> Any:
        """``cudaMalloc``; on out-of-memory, the pools' unused memory is given back first."""
        with cupy.cuda.Device(self.device_id):
            try:
                return cupy.cuda.Memory(nbytes)
            except _rt.CUDARuntimeError as exc:
                if exc.status != _OUT_OF_MEMORY or not _pools:
                    raise
                self._make_room()
                return cupy.cuda.Memory(nbytes)

    def stop_pooling(self) -> None:
        """Take device memory with ``cudaMalloc`` from now on, and give the pool's unused
        memory back (what ``PYGPUKIT_STREAM_ORDERED=0`` does from the start; the eviction
        benchmark's baseline)."""
        self._pool.close()

    @property
    def stream_ordered(self) -> bool:
        """Whether device memory comes from the stream-ordered pool."""
        return self._pool.pool is not None

    @property
    def pool_idle_s(self) -> float:
        """How long the pool keeps unused memory after its last use (PYGPUKIT_POOL_IDLE_S)."""
        return self._pool.idle_s

    def pool_bytes(self) -> tuple[int, int]:
        """``(reserved, used)``: bytes the stream-ordered pool holds from the driver, and
        those of them allocations use (the rest is kept for reuse); zeros without it."""
        handle = self._pool
        with handle.lock, cupy.cuda.Device(self.device_id):
            if handle.pool is None:
                return 0, 0
            return _relaxed(_pool_use, handle.pool)

    def info(self) -> DeviceInfo:
        return self._info

    def mem_get_info(self) -> tuple[int, int]:
        with _translated(), cupy.cuda.Device(self.device_id):
            free, total = _rt.memGetInfo()
        return int(free), int(total)

    def create_stream(self, priority: int) -> CudaStream:
        return CudaStream(self, priority)

    def create_event(self, *, timing: bool = False) -> CudaEvent:
        return CudaEvent(self, timing)

    def create_pool(
        self,
        grow: Grower,
        shrink: Shrinker,
        arena_bytes: int = 0,
        label: str | None = None,
        stream: RawStream | None = None,
    ) -> CudaPool:
        assert stream is None or isinstance(stream, CudaStream)
        return CudaPool(self, grow, shrink, arena_bytes, label, stream)

    def install_router(self, router: Callable[[int], Any]) -> None:
        cupy.cuda.set_allocator(router)

    def bind_stream(self, stream: RawStream | None) -> object:
        # not isinstance: this runs at every task step
        ours = stream if type(stream) is CudaStream else None
        own = ours is not None
        torch: Any = sys.modules.get("torch")
        torch_on = torch is not None and torch.cuda.is_initialized()
        # Several devices: binding our stream makes our device current (CuPy and PyTorch
        # allocate and launch there), and PyTorch's set_stream makes its stream's device
        # current; either way the thread's device comes back at restore_stream.
        back = _rt.getDevice() if self._several and (own or torch_on) else None
        here = self.device_id if own else back  # the device of the stream saved as prev
        if own and back is not None and back != self.device_id:
            _rt.setDevice(self.device_id)
        try:
            prev = cupy.cuda.get_current_stream()
            torch_prev = torch.cuda.current_stream(self.device_id) if torch_on else None
            if ours is not None:
                if ours.cp is not prev:
                    ours.cp.use()
                if torch_on:
                    torch.cuda.set_stream(ours.torch_stream())
            elif prev.ptr in self._ours:
                # Another task's session binding is still on this thread: a task outside
                # any session must not run on it. (A stream the user chose is kept.)
                cupy.cuda.Stream.null.use()
                if torch_on:
                    torch.cuda.set_stream(torch.cuda.default_stream(self.device_id))
        except BaseException:
            if back is not None:
                _rt.setDevice(back)
            raise
        return (prev, torch_prev, back, here)

    def restore_stream(self, token: object) -> None:
        prev: Any
        torch_prev: Any
        back: int | None
        here: int | None
        prev, torch_prev, back, here = token  # type: ignore[misc]
        if back is not None and _rt.getDevice() != here:
            _rt.setDevice(here)  # the step switched devices; prev is a stream of `here`
        if cupy.cuda.get_current_stream() is not prev:
            prev.use()
        if torch_prev is not None:
            sys.modules["torch"].cuda.set_stream(torch_prev)  # makes its device current
        if back is not None and _rt.getDevice() != back:
            _rt.setDevice(back)

    def fault(self, streams: list[RawStream]) -> BaseException | None:
        if not getattr(self._local, "device_set", False):
            _rt.setDevice(self.device_id)
            self._local.device_set = True
        for s in streams:
            if s.capturing:
                continue  # being captured: a query would invalidate the capture
            status = _relaxed(_rt.streamQuery, s.handle)
            if status not in (0, _NOT_READY):
                return CudaError(
                    f"the CUDA context faulted: error {status} ({_error_name(status)}); "
                    "pending GPU work will never complete — restart the process",
                    status=status,
                )
        return None

    @property
    def xp(self) -> Any:
        return cupy

    def alloc_raw(self, nbytes: int) -> Any:
        with _translated():
            return self._malloc(nbytes)

    def copy_to_host(self, buf: Any, nbytes: int) -> Any:
        import numpy as np

        with _translated(), cupy.cuda.Device(self.device_id):
            pinned = cupy.cuda.alloc_pinned_memory(nbytes)
            host = np.frombuffer(pinned, dtype=np.uint8, count=nbytes)
            _rt.memcpy(host.ctypes.data, buf.ptr, nbytes, _rt.memcpyDeviceToHost)
        return host

    def copy_from_host(self, buf: Any, host: Any, nbytes: int) -> None:
        import numpy as np

        arr = np.frombuffer(host, dtype=np.uint8, count=nbytes)
        with _translated(), cupy.cuda.Device(self.device_id):
            _rt.memcpy(buf.ptr, arr.ctypes.data, nbytes, _rt.memcpyHostToDevice)

    def array_to_host(self, array: Any, out: Any = None) -> Any:
        import numpy as np

        array = cupy.ascontiguousarray(array)
        if out is None or out.shape != array.shape or out.dtype != array.dtype:
            pinned = cupy.cuda.alloc_pinned_memory(array.nbytes)
            out = np.frombuffer(pinned, dtype=array.dtype, count=array.size).reshape(array.shape)
        with _translated(), cupy.cuda.Device(self.device_id):
            _rt.memcpy(out.ctypes.data, array.data.ptr, array.nbytes, _rt.memcpyDeviceToHost)
        return out

    def array_from_host(self, host: Any) -> Any:
        with _translated(), cupy.cuda.Device(self.device_id):
            out = cupy.empty(host.shape, dtype=host.dtype)  # routed: charged to the context
            # On the stream the memory was allocated for: until that stream's earlier work
            # has run, the block may still be in use by the work of its previous owner.
            stream = cupy.cuda.get_current_stream()
            _rt.memcpyAsync(
                out.data.ptr, host.ctypes.data, host.nbytes, _rt.memcpyHostToDevice, stream.ptr
            )
            stream.synchronize()
        return out

    def capture(self, stream: RawStream, fn: Callable[[], object]) -> CudaGraph:
        assert isinstance(stream, CudaStream)
        route = cupy.cuda.get_allocator()
        keep: list[Any] = []

        def hold(nbytes: int) -> Any:
            # Kept alive with the graph: a block freed during capture and handed to later
            # work would be overwritten by every replay.
            mem = route(nbytes)
            keep.append(mem)
            return mem

        token = self.bind_stream(stream)
        try:
            with _translated(), cupy.cuda.using_allocator(hold):
                # The watchdog and the completion spin query streams from other threads:
                # they see a capturing stream as busy instead of querying it.
                with stream.capture_lock:
                    stream.capturing = True
                    stream.cp.begin_capture()
                try:
                    fn()
                except BaseException:
                    try:
                        stream.cp.end_capture()
                    except _rt.CUDARuntimeError:
                        pass  # fn's own error is the one to report
                    raise
                graph = stream.cp.end_capture()
        finally:
            stream.capturing = False
            self.restore_stream(token)
            _free_deferred()
        return CudaGraph(graph, keep)

    def synchronize(self) -> None:
        with _translated(), cupy.cuda.Device(self.device_id):
            _rt.deviceSynchronize()

    def close(self) -> None:
        self._closed = True
        # later allocations (a closed runtime stays CuPy's allocator) use cudaMalloc
        self._pool.close()


def _device_count_impl() -> int:
    return int(_rt.getDeviceCount())


def _priority_range() -> tuple[int, int]:
    """``(least, greatest)`` stream priority of the current context, from the driver."""
    lib = ctypes.CDLL("libcuda.so.1")
    least, greatest = ctypes.c_int(), ctypes.c_int()
    status = lib.cuCtxGetStreamPriorityRange(ctypes.byref(least), ctypes.byref(greatest))
    if status != 0:
        raise CudaError(f"cuCtxGetStreamPriorityRange failed: {status}", status=status)
    return least.value, greatest.value


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


backend_class = CudaBackend
