"""Evictable buffers: device arrays the runtime may spill to host memory under pressure.

``ctx.evictable(array)`` hands an array (model weights, say) of a Burstable or BestEffort
context to the runtime. When a higher tier needs the room, the runtime copies its bytes to
(pinned, on CUDA) host memory and frees the device memory; the next session or task of the
context copies them back, bit for bit. A context that is in a session or has a task in
flight is never evicted from, and a buffer someone else still references is skipped (it
would free nothing).
"""

from __future__ import annotations

import enum
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from .._exceptions import ContextClosed, InvalidArgument

if TYPE_CHECKING:
    from ._context import ExecutionContext

__all__ = ("Evictable", "EvictableState")


class EvictableState(enum.Enum):
    RESIDENT = "resident"
    EVICTED = "evicted"
    RELEASED = "released"


class Evictable:
    """A context's spillable device array; read it through :attr:`array` each time."""

    __slots__ = (
        "_array",
        "_ctx",
        "_host",
        "_last_used",
        "dtype",
        "evictions",
        "last_evict_s",
        "last_restore_s",
        "nbytes",
        "restores",
        "shape",
        "state",
    )

    def __init__(self, ctx: ExecutionContext, array: Any) -> None:
        self._ctx = ctx
        self._array = array
        self._host: Any = None
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        self.nbytes = int(array.nbytes)
        self.state = EvictableState.RESIDENT
        self.evictions = 0
        self.restores = 0
        self.last_evict_s = 0.0
        self.last_restore_s = 0.0
        self._last_used = time.monotonic()

    @property
    def array(self) -> Any:
        """The device array, restored first if it was evicted (inside the context's
        session or task, where restores happen anyway)."""
        if self.state is EvictableState.RELEASED:
            raise InvalidArgument("this evictable was released; make a new one")
        if self.state is EvictableState.EVICTED:
            self._ctx._restore_evicted()
        self._last_used = time.monotonic()
        return self._array

    @property
    def on_device(self) -> bool:
        return self.state is EvictableState.RESIDENT

    def release(self) -> None:
        """Stop managing the buffer and drop it (device and host copies)."""
        with self._ctx._evict_lock:
            self._ctx._evictables.discard(self)
            self._array = self._host = None
            self.state = EvictableState.RELEASED

    # -- called by the context, under its eviction lock --------------------------------
    def _evict(self) -> int:
        arr = self._array
        if not _sole_owner(arr):
            return 0  # freeing our reference would free nothing
        backend = self._ctx.runtime.backend
        t0 = time.perf_counter()
        self._host = backend.array_to_host(arr, self._host)
        self.last_evict_s = time.perf_counter() - t0
        self._array = None
        del arr
        self.state = EvictableState.EVICTED
        self.evictions += 1
        return self.nbytes

    def _restore(self) -> None:
        backend = self._ctx.runtime.backend
        t0 = time.perf_counter()
        self._array = backend.array_from_host(self._host)  # allocated in the bound context
        self.last_restore_s = time.perf_counter() - t0
        self.state = EvictableState.RESIDENT
        self.restores += 1

    def __repr__(self) -> str:
        return (
            f"<Evictable {self.shape} {self.dtype} of {self._ctx.name!r} "
            f"state={self.state.value} evictions={self.evictions}>"
        )


def _sole_owner(arr: Any) -> bool:
    """Whether dropping the handle's reference would free ``arr``'s memory.

    Views of an array hold its ``base`` (NumPy and CuPy point every view at the array that
    owns the memory), so the owner's reference count tells: the handle's ``_array`` (or
    the array's own base pointer), our local names and ``getrefcount``'s argument, nothing
    more.
    """
    # arr: the handle's _array, the caller's local, this parameter, getrefcount's argument
    if sys.getrefcount(arr) > 4:
        return False
    base = getattr(arr, "base", None)
    if base is None:
        return True
    return sys.getrefcount(base) <= 3  # arr.base, the local `base`, the argument


class EvictionMixin:
    """The eviction half of :class:`ExecutionContext` (kept here to keep that file small)."""

    __slots__ = ()
    _evict_lock: threading.RLock
    _evictables: set[Evictable]
    _busy: int

    def evictable(self: Any, array: Any) -> Evictable:
        """Hand ``array`` (allocated in this context) to the runtime as spillable.

        Drop your own references to it and read it through the returned handle's
        ``.array``: a buffer referenced elsewhere cannot be evicted.

        :raises InvalidArgument: a Guaranteed context (never evicted) or not an array
        """
        from ._tiers import QoSPolicy

        self._check_open()
        if self.qos is QoSPolicy.GUARANTEED:
            raise InvalidArgument(
                f"context {self.name!r} is GUARANTEED and is never evicted; keep the array "
                "as it is, or use a BURSTABLE or BEST_EFFORT context for spillable buffers"
            )
        if not hasattr(array, "nbytes") or not hasattr(array, "shape"):
            raise InvalidArgument(f"evictable() takes a device array, not {type(array).__name__}")
        handle = Evictable(self, array)
        with self._evict_lock:
            self._evictables.add(handle)
        return handle

    def _reclaim(self: Any, want: int) -> int:
        """Evict least recently used buffers until ``want`` bytes are freed; 0 if busy."""
        if not self._evict_lock.acquire(timeout=1.0):
            return 0
        try:
            if self._busy or self.state.value == "closed":
                return 0
            resident = sorted(
                (e for e in self._evictables if e.state is EvictableState.RESIDENT),
                key=lambda e: e._last_used,
            )
            if not resident:
                return 0
            self.stream.synchronize()  # nothing in flight may still read them
            freed = 0
            for handle in resident:
                if freed >= want:
                    break
                freed += handle._evict()
            if freed:
                self._pool.release_cached()  # hand the freed blocks back to the device
            return freed
        finally:
            self._evict_lock.release()

    def _restore_evicted(self: Any) -> None:
        """Bring every evicted buffer back (allocations charged to this context)."""
        from ._session import _current

        with self._evict_lock:
            evicted = [e for e in self._evictables if e.state is EvictableState.EVICTED]
            if not evicted:
                return
            if self.state.value == "closed":
                raise ContextClosed(self.name)
            # Allocated, copied into and later freed on this context's stream, where the
            # buffers are used: a session restores them before it binds that stream.
            backend = self._runtime.backend
            token = _current.set(self)
            try:
                bound = backend.bind_stream(self.stream.raw)
                try:
                    for handle in evicted:
                        handle._restore()
                finally:
                    backend.restore_stream(bound)
            finally:
                _current.reset(token)

    def _nothing_evicted(self: Any) -> bool:
        """Whether :meth:`_enter` would restore nothing (and so cannot take long)."""
        if not self._evictables:
            return True
        with self._evict_lock:
            return not any(e.state is EvictableState.EVICTED for e in self._evictables)

    def _enter(self: Any) -> None:
        """A session or task begins: pin the buffers and bring back evicted ones."""
        with self._evict_lock:
            self._busy += 1
            if not self._evictables:
                return  # nothing could be evicted: the common case, kept cheap
            try:
                self._restore_evicted()
            except BaseException:
                self._busy -= 1
                raise

    def _leave(self: Any) -> None:
        with self._evict_lock:
            self._busy -= 1
