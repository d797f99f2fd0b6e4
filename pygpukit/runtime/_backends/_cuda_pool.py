"""The CUDA backend's device memory: a stream-ordered pool per backend, and on it the
budgeted CuPy pool of each context.

:class:`DevicePool` is one backend's pool (``cudaMallocFromPoolAsync``). A block goes back
with ``cudaFreeAsync`` on the stream it was allocated on: ordered after that stream's work,
and nobody waits. The pool keeps freed memory mapped for the next allocation of any context
until it has been quiet for its idle time (``_idle_trim``) or an allocation runs out of
device memory. :class:`CudaPool` is a context's CuPy memory pool, whose new memory is charged
to the context's budget and, for a Guaranteed context, carved from its reservation.

What the pools of every backend in the process share — the streams their frees are queued
on, the frees waiting for a capture to end, the pools an out-of-memory trims — is one
:class:`SharedPools` object, :data:`SHARED`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from contextlib import AbstractContextManager
from typing import Any, Protocol

from ..._exceptions import CudaError, InvalidArgument
from ..._locks import BookkeepingLock, give_back
from .._book import native
from ._arena import ArenaPool, fragmented
from ._base import Grower, Shrinker
from ._cuda_calls import OUT_OF_MEMORY, cupy, relaxed, translated, warn_unraisable
from ._cuda_calls import runtime as _rt
from ._idle_trim import IdleTrimmer

__all__ = ("DEFAULT_POOL_IDLE_S", "SHARED", "CudaPool", "DevicePool", "OrderedStream")

_log = logging.getLogger("pygpukit")

# cudaMemPoolProps of a device's memory pool: pinned (not host-mapped) device memory
_ALLOCATION_PINNED, _HANDLE_NONE, _LOCATION_DEVICE = 1, 0, 1
DEFAULT_POOL_IDLE_S = 2.0  # unused pool memory goes back to the driver after this long quiet


class OrderedStream(Protocol):
    """What the pools need of one of the backend's streams (a ``CudaStream``)."""

    @property
    def handle(self) -> int: ...

    @property
    def cp(self) -> Any:
        """The ``cupy.cuda.Stream``."""

    @property
    def capture_lock(self) -> AbstractContextManager[Any]:
        """Held while a capture begins, and by a free deciding between queueing and
        deferring: a free never lands in a capture that began meanwhile."""

    def captured(self) -> bool:
        """Whether work queued on the stream now would be recorded into a graph."""


class _PoolMemory:
    """Device memory from a backend's stream-ordered pool (``cudaMallocFromPoolAsync``).

    Given back with ``cudaFreeAsync`` on the stream it was allocated on: ordered after that
    stream's work, and nobody waits. ``cudaFree`` instead waits until the whole device is
    idle — 48 ms while another stream ran a 50 ms kernel — and hands the pages to the
    driver, which slows the next large copy to 75% (docs/adr/0024). The pool keeps
    the memory mapped for the next allocation of any context.
    """

    __slots__ = ("__weakref__", "ptr", "size")

    def __init__(self, ptr: int, size: int, stream: OrderedStream, pool: DevicePool) -> None:
        self.ptr = ptr
        self.size = size
        # The free keeps the owning stream alive until it is queued: a finalizer's
        # arguments are held by its registry, never part of the garbage, so CuPy's stream
        # is not destroyed first even when both die in one batch of cyclic garbage. Not at
        # interpreter exit: the process's device memory goes with the process.
        weakref.finalize(self, SHARED.free, ptr, stream, pool).atexit = False


class DevicePool:
    """One backend's stream-ordered pool, shared with the backend's finalizer: ``pool`` is
    ``None`` once destroyed, so nothing uses a destroyed pool (a closed runtime stays
    CuPy's allocator).

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

    @classmethod
    def open(cls, owner: object, device_id: int) -> DevicePool:
        """The pool of ``owner`` (a backend) on ``device_id``, closed when ``owner`` dies.

        Without a pool (allocations use ``cudaMalloc``) where the device has none or
        ``PYGPUKIT_STREAM_ORDERED=0``. Every other backend's pool gives its unused memory
        back to the driver first.

        :raises InvalidArgument: ``PYGPUKIT_POOL_IDLE_S`` is not a positive number
        """
        pool = cls(None, device_id, _pool_idle_s())
        if os.environ.get("PYGPUKIT_STREAM_ORDERED", "1").strip() != "0":
            with cupy.cuda.Device(device_id):
                try:
                    pool.pool = _make_pool(device_id)
                except _rt.CUDARuntimeError as exc:  # no pool after all: cudaMalloc, as before
                    _log.warning("no stream-ordered memory pool (%s); using cudaMalloc", exc)
        with SHARED.lock:
            others = list(SHARED.pools)
            if pool.pool is not None:
                SHARED.pools.add(pool)
                weakref.finalize(owner, give_back, pool.close)
                SHARED.trimmer.ensure()
        # A runtime sizes its budget from the driver's free memory: what other runtimes'
        # pools keep unused goes back first (they map it again when they need it).
        with translated():
            for other in others:
                other.trim()
        return pool

    def take(self, nbytes: int, owner: OrderedStream | None) -> Any:
        """``nbytes`` of device memory (an object with ``ptr``), given back when it dies.

        From the pool, allocated and later freed on ``owner`` (the backend's stream the
        memory is for), when there is one and it is not being captured; otherwise from
        ``cudaMalloc``.
        """
        SHARED.free_deferred()
        if self.pool is None or owner is None or owner.captured():
            # The null stream does not wait for our (non-blocking) streams, so a free on it
            # is not ordered after their use; a user's stream may be gone by the free; an
            # allocation on a capturing stream would become a node of the graph.
            return SHARED.malloc(self.device_id, nbytes)
        for retry in (False, True):
            # Under the lock: a runtime closed on another thread meanwhile never has its
            # destroyed pool allocated from (this falls back to cudaMalloc).
            with self.lock, cupy.cuda.Device(self.device_id):
                if self.pool is None:
                    break
                try:
                    ptr = _rt.mallocFromPoolAsync(nbytes, self.pool, owner.handle)
                except _rt.CUDARuntimeError as exc:
                    if exc.status != OUT_OF_MEMORY or retry:
                        raise
                else:
                    self.busy_at = time.monotonic()
                    return _PoolMemory(ptr, nbytes, owner, self)
            SHARED.make_room()  # without the lock: it trims every pool, this one included
        return SHARED.malloc(self.device_id, nbytes)

    def own(self, arena: Any, owner: OrderedStream | None) -> tuple[int, int]:
        """Give ``arena`` (a native Arena, which frees it) its block of device memory:
        ``(status, address)``. From the pool on ``owner`` as :meth:`take` does, made room
        for once on out-of-memory; from ``cuMemAlloc`` without a pool or a stream."""
        status, address = self._own_once(arena, owner)
        if status == OUT_OF_MEMORY:
            SHARED.make_room()  # without the lock: it trims every pool, this one included
            status, address = self._own_once(arena, owner)
        return status, address

    def _own_once(self, arena: Any, owner: OrderedStream | None) -> tuple[int, int]:
        # Under the lock: a pool destroyed on another thread is never allocated from.
        with self.lock, cupy.cuda.Device(self.device_id):
            pool = self.pool if owner is not None and not owner.captured() else None
            status, address = arena.own_block(pool or 0, owner.handle if owner else 0)
            return int(status), int(address)

    def close(self) -> None:
        """Give the idle memory back to the driver; the pool itself goes once the last of
        its allocations is freed (the driver defers the destruction until then)."""
        with self.lock:
            pool, self.pool = self.pool, None
            if pool is None:
                return
            try:
                with cupy.cuda.Device(self.device_id):
                    relaxed(_rt.memPoolTrimTo, pool, 0)
                    relaxed(_rt.memPoolDestroy, pool)
            except Exception as exc:  # a faulted device: (from a finalizer) nowhere to raise
                warn_unraisable("closing a stream-ordered memory pool", exc)

    def trim(self) -> bool:
        """Give memory no allocation uses back to the driver (frees already run); whether
        all of it went (a free still queued behind its stream's work keeps its block)."""
        with self.lock:
            if self.pool is None:
                return True
            with cupy.cuda.Device(self.device_id):
                relaxed(_rt.memPoolTrimTo, self.pool, 0)
                reserved, used = relaxed(_pool_use, self.pool)
            return reserved <= used

    def use(self) -> tuple[int, int]:
        """``(reserved, used)``: bytes the pool holds from the driver, and those of them
        allocations use (the rest is kept for reuse); zeros without a pool."""
        with self.lock, cupy.cuda.Device(self.device_id):
            if self.pool is None:
                return 0, 0
            return relaxed(_pool_use, self.pool)


class SharedPools:
    """What the stream-ordered pools of every CUDA backend in the process share.

    Process-wide by nature: an allocation that runs out of device memory waits for the
    frees queued on every backend's streams and trims every backend's pool (another
    runtime's unused memory is as far out of its reach as memory the driver never had),
    and the frees a capture deferred are queued by whichever backend next allocates or
    ends a capture.
    """

    def __init__(self) -> None:
        # Every open stream of every CUDA backend, by handle (weak, as a backend's own).
        self.streams: weakref.WeakValueDictionary[int, OrderedStream] = (
            weakref.WeakValueDictionary()
        )
        # Frees that could not be queued because their stream was being captured: a free
        # queued during capture would become a node of the graph (and fail: the block is
        # not the graph's). They are queued once the capture is over (free_deferred).
        self.deferred: list[tuple[int, OrderedStream, DevicePool]] = []
        # Every live backend's pool, and the lock for it and for the trimmer's start.
        self.pools: weakref.WeakSet[DevicePool] = weakref.WeakSet()
        self.lock = threading.Lock()
        self.trimmer = IdleTrimmer(self.pools, self.lock)  # type: ignore[arg-type]

    def free(self, ptr: int, stream: OrderedStream, pool: DevicePool) -> None:
        """Give ``ptr`` back to ``pool`` on ``stream``, ordered after the stream's work (once
        the stream's capture is over, if it is being captured)."""
        later = (ptr, stream, pool)  # made before the lock: nothing in it allocates
        pool.busy_at = time.monotonic()  # (a float store: no lock here)
        try:
            with cupy.cuda.Device(pool.device_id):
                with stream.capture_lock:
                    if stream.captured():
                        self.deferred.append(later)  # list.append: atomic
                        return
                    _rt.freeAsync(ptr, stream.handle)
        except Exception as exc:  # a faulted device: (from a finalizer) nowhere to raise
            warn_unraisable(f"a stream-ordered free of {ptr:#x}", exc)

    def free_deferred(self) -> None:
        """Queue the frees that waited for a capture to end, where it has."""
        waiting = []
        while self.deferred:
            try:
                waiting.append(self.deferred.pop())
            except IndexError:  # another thread took the last one
                break
        for ptr, stream, pool in waiting:
            self.free(ptr, stream, pool)  # still capturing: deferred again

    def make_room(self) -> None:
        """After an allocation ran out of device memory: let queued frees run, and give
        every pool's unused memory back to the driver (then the caller tries once more).

        Memory freed on another stream is reused only once that free has run (see
        :func:`_make_pool`), and pool frees are queued on our streams only: so every open
        stream of ours that is not being captured is waited for — not the device, whose
        synchronization would break any capture in progress (another runtime's, PyTorch's).
        """
        with translated():
            for s in list(self.streams.values()):
                if not s.captured():
                    relaxed(s.cp.synchronize)
            with self.lock:
                pools = list(self.pools)
            for pool in pools:
                pool.trim()

    def malloc(self, device_id: int, nbytes: int) -> Any:
        """``cudaMalloc``; on out-of-memory, the pools' unused memory is given back first."""
        with cupy.cuda.Device(device_id):
            try:
                return cupy.cuda.Memory(nbytes)
            except _rt.CUDARuntimeError as exc:
                if exc.status != OUT_OF_MEMORY or not self.pools:
                    raise
                self.make_room()
                return cupy.cuda.Memory(nbytes)


SHARED = SharedPools()


def _pool_use(pool: int) -> tuple[int, int]:
    """``(reserved, used)`` bytes of a stream-ordered pool."""
    return (
        int(_rt.memPoolGetAttribute(pool, _rt.cudaMemPoolAttrReservedMemCurrent)),
        int(_rt.memPoolGetAttribute(pool, _rt.cudaMemPoolAttrUsedMemCurrent)),
    )


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
    # closes, an allocation runs out of device memory (SharedPools.make_room), or the
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


class _Memory(Protocol):
    """What a context's pool needs of the backend."""

    device_id: int

    def own_block(self, arena: Any, stream: OrderedStream | None) -> tuple[int, int]:
        """Give ``arena`` (a native Arena) its block: ``(status, address)``."""

    def device_memory(self, nbytes: int, stream: Any = None) -> Any:
        """``nbytes`` of device memory for ``stream`` (a CuPy stream; the current one by
        default), given back when the object returned dies."""


class CudaPool(ArenaPool):
    """A CuPy memory pool whose new device memory is charged through ``grow``/``shrink``.

    CuPy caches freed blocks in the pool; cached blocks stay charged (they occupy the
    device) until :meth:`release_cached` gives them back.
    """

    def __init__(
        self,
        backend: _Memory,
        grow: Grower,
        shrink: Shrinker,
        arena_bytes: int = 0,
        label: str | None = None,
        stream: OrderedStream | None = None,
    ) -> None:
        super().__init__(grow, shrink, arena_bytes, label)
        self._backend = backend
        self._device = backend.device_id
        self.torch_memory: Any = None  # PyTorch's pools of the context (the backend sets it)
        self._base_ptr = 0
        if arena_bytes:
            with translated(), cupy.cuda.Device(self._device):
                self._base = self._reserve(arena_bytes, stream)
        self._pool = cupy.cuda.MemoryPool(allocator=self._allocate)
        self.fast_malloc = self._pool.malloc  # type: ignore[method-assign]  # no Python frame

    def _reserve(self, nbytes: int, stream: OrderedStream | None) -> Any:
        """The reservation's block, on the context's own stream (its free is ordered after
        the context's work); with the native extension, the arena owns it in C, so that
        PyTorch's allocator carves the same reservation (``_torch.py``)."""
        if native is None:
            base = self._backend.device_memory(nbytes, stream.cp if stream else None)
            self._base_ptr = base.ptr
            return base
        arena = native.Arena(nbytes)
        status, self._base_ptr = self._backend.own_block(arena, stream)
        if status == OUT_OF_MEMORY:  # the driver's CUDA_ERROR_OUT_OF_MEMORY is 2 as well
            raise CudaError(
                f"the device is out of memory for the {nbytes}-byte reservation of context "
                f"{self._label!r}; memory outside pygpukit's budgets took it — lower vram_limit",
                status=OUT_OF_MEMORY,
            )
        if status:
            raise CudaError(
                f"reserving {nbytes} bytes failed: CUDA driver error {status}", status=status
            )
        self._arena = arena
        return arena

    def _allocate(self, size: int) -> Any:
        # Called by CuPy's pool only on a cache miss, with the size already rounded.
        self._grow(size)
        if self._arena is not None:
            offset = self._arena.take(size)
            if offset is None:  # fragmented: CuPy frees its cached blocks and asks again
                self._shrink(size)
                raise _rt.CUDARuntimeError(OUT_OF_MEMORY)
            grant = _Grant(self._base)
            weakref.finalize(grant, give_back, self._give, offset, size)
            ptr = self._base_ptr + offset
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
            return fragmented(self._label, nbytes, self._arena.largest_free, self._arena.size)
        return CudaError(
            f"the device is out of memory for {nbytes} bytes ({exc}); memory outside "
            "pygpukit's budgets (other processes, libraries) took it — lower vram_limit",
            status=OUT_OF_MEMORY,
        )

    def used_bytes(self) -> int:
        return int(self._pool.used_bytes())

    def release_cached(self) -> None:
        self._pool.free_all_blocks()
        if self.torch_memory is not None:
            self.torch_memory.trim()

    def close(self) -> None:
        if self.torch_memory is not None:
            self.torch_memory.close()
        if native is not None and isinstance(self._arena, native.Arena):
            self._arena.forget_stream()  # its free now waits for nothing of ours
        super().close()
