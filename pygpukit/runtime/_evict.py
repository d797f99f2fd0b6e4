"""Evictable buffers: device arrays the runtime may spill to host memory under pressure.

``ctx.evictable(array)`` hands an array (model weights, say) of a Burstable or BestEffort
context to the runtime. When a higher tier needs the room, the runtime copies its bytes to
(pinned, on CUDA) host memory and frees the device memory; the next session or task of the
context copies them back, bit for bit. A context that is in a session or has a task in
flight is never evicted from, and a buffer someone else still references is skipped (it
would free nothing). The runtime holds the handles weakly: dropping the last reference to a
handle frees its buffer, as dropping an array does (``release()`` frees it at once).
"""

from __future__ import annotations

import contextlib
import enum
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._exceptions import ContextClosed, InvalidArgument, InvalidArgumentType
from ._tiers import QoSPolicy

if TYPE_CHECKING:
    from ._backends import Backend, RawPool
    from ._stream import Stream

__all__ = ("Evictable", "EvictableModule", "EvictableState", "Eviction")


class EvictableState(enum.Enum):
    RESIDENT = "resident"
    EVICTED = "evicted"
    RELEASED = "released"


class _Handle:
    """What an array's and a module's handles share: state, counts, last use."""

    __slots__ = (
        "__weakref__",
        "_host",
        "_last_used",
        "_owner",
        "evictions",
        "last_evict_s",
        "last_restore_s",
        "nbytes",
        "restores",
        "state",
    )

    def __init__(self, owner: Eviction, nbytes: int) -> None:
        self._owner = owner
        self._host: Any = None
        self.nbytes = nbytes
        self.state = EvictableState.RESIDENT
        self.evictions = 0
        self.restores = 0
        self.last_evict_s = 0.0
        self.last_restore_s = 0.0
        self._last_used = time.monotonic()

    def _use(self) -> None:
        """About to hand out what it manages: restored first if it was evicted."""
        if self.state is EvictableState.RELEASED:
            raise InvalidArgument("this evictable was released; make a new one")
        if self.state is EvictableState.EVICTED:
            self._owner.restore()
        self._last_used = time.monotonic()

    @property
    def on_device(self) -> bool:
        return self.state is EvictableState.RESIDENT

    def _evict(self) -> int:
        raise NotImplementedError

    def _restore(self) -> None:
        raise NotImplementedError


class Evictable(_Handle):
    """A context's spillable device array; read it through :attr:`array` each time."""

    __slots__ = ("_array", "dtype", "shape")

    def __init__(self, owner: Eviction, array: Any) -> None:
        super().__init__(owner, int(array.nbytes))
        self._array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    @property
    def array(self) -> Any:
        """The device array, restored first if it was evicted (inside the context's
        session or task, where restores happen anyway)."""
        self._use()
        return self._array

    def release(self) -> None:
        """Stop managing the buffer and drop it (device and host copies)."""
        with self._owner._lock:
            self._owner._evictables.discard(self)
            self._array = self._host = None
            self.state = EvictableState.RELEASED

    # -- called by its Eviction, under its lock ------------------------------------------
    def _evict(self) -> int:
        arr = self._array
        if not _sole_owner(arr):
            return 0  # freeing our reference would free nothing
        t0 = time.perf_counter()
        self._host = self._owner._backend.array_to_host(arr, self._host)
        self.last_evict_s = time.perf_counter() - t0
        self._array = None
        del arr
        self.state = EvictableState.EVICTED
        self.evictions += 1
        return self.nbytes

    def _restore(self) -> None:
        t0 = time.perf_counter()
        # allocated in the context, which Eviction.restore binds
        self._array = self._owner._backend.array_from_host(self._host)
        self.last_restore_s = time.perf_counter() - t0
        self.state = EvictableState.RESIDENT
        self.restores += 1

    def __repr__(self) -> str:
        return (
            f"<Evictable {self.shape} {self.dtype} of {self._owner.name!r} "
            f"state={self.state.value} evictions={self.evictions}>"
        )


class EvictableModule(_Handle):
    """A context's spillable PyTorch module: its CUDA parameters and buffers spill to pinned
    host memory together and come back bit for bit, in place (the ``Parameter`` objects stay
    the same, only their ``.data`` moves). Call the module through :attr:`module`, or in a
    session or task of the context, where evicted modules are restored first."""

    __slots__ = ("_module",)

    def __init__(self, owner: Eviction, module: Any) -> None:
        tensors = _module_tensors(module)
        devices = {t.device for t in tensors}
        if owner._backend.name != "cuda":
            raise InvalidArgument(
                "evictable() takes a torch.nn.Module on the CUDA backend only: on the host "
                "backend PyTorch runs on the CPU, where there is no device memory to free"
            )
        own = getattr(owner._backend, "device_id", None)
        if len(devices) != 1 or any(d.type != "cuda" or d.index != own for d in devices):
            where = ", ".join(sorted(str(d) for d in devices)) or "no tensors"
            raise InvalidArgument(
                f"evictable() takes a module whose parameters and buffers are all on this "
                f"context's CUDA device (cuda:{own}); this one has {where}: move it with "
                f"module.to('cuda:{own}') inside the context's session first"
            )
        super().__init__(owner, sum(int(t.nbytes) for t in tensors))
        self._module = module

    @property
    def module(self) -> Any:
        """The module, restored first if it was evicted."""
        self._use()
        return self._module

    def release(self) -> None:
        """Stop managing the module; an evicted one is brought back to the device first."""
        with self._owner._lock:
            self._owner._evictables.discard(self)
            if self.state is EvictableState.EVICTED:
                self._owner.restore_one(self)
            self._host = None
            self.state = EvictableState.RELEASED

    def _evict(self) -> int:
        torch = sys.modules["torch"]
        t0 = time.perf_counter()
        tensors = _module_tensors(self._module)
        host: list[Any] = self._host or [
            torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True) for t in tensors
        ]
        for t, h in zip(tensors, host, strict=True):
            h.copy_(t.detach())
        for t in tensors:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        self._host = host
        self.last_evict_s = time.perf_counter() - t0
        self.state = EvictableState.EVICTED
        self.evictions += 1
        return self.nbytes

    def _restore(self) -> None:
        t0 = time.perf_counter()
        assert self._host is not None
        # allocated in the context, which Eviction.restore binds: on its stream
        for t, h in zip(_module_tensors(self._module), self._host, strict=True):
            t.data = h.to(t.device, non_blocking=False)
        self.last_restore_s = time.perf_counter() - t0
        self.state = EvictableState.RESIDENT
        self.restores += 1

    def __repr__(self) -> str:
        return (
            f"<EvictableModule {type(self._module).__name__} of {self._owner.name!r} "
            f"state={self.state.value} evictions={self.evictions}>"
        )


def _module_tensors(module: Any) -> list[Any]:
    """The module's parameters and buffers, each once (tied weights share one)."""
    seen: set[int] = set()
    out = []
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _is_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


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


class Eviction:
    """One context's evictable buffers: spilled least recently used first, under pressure
    from a higher tier, and restored when the context is next entered.

    :param activate: makes the context current (its budget charged, its stream bound) for
        the restores' allocations and copies
    """

    __slots__ = (
        "_activate",
        "_backend",
        "_busy",
        "_evictables",
        "_lock",
        "_pool",
        "_stream",
        "closed",
        "evicted_bytes",
        "evictions",
        "name",
        "restores",
        "tier",
    )

    def __init__(
        self,
        name: str,
        tier: QoSPolicy,
        backend: Backend,
        stream: Stream,
        pool: RawPool,
        activate: Callable[[], contextlib.AbstractContextManager[object]],
    ) -> None:
        self.name = name
        self.tier = tier
        self._backend = backend
        self._stream = stream
        self._pool = pool
        self._activate = activate
        self._lock = threading.RLock()
        # Weak: a handle nobody holds can never be read again, so its buffer (and host
        # copy) go with it, as an array's do — in a destroyed context too, where a strong
        # set would keep the buffers, their charge and so the context alive for good.
        self._evictables: weakref.WeakSet[Evictable | EvictableModule] = weakref.WeakSet()
        self._busy = 0  # sessions and tasks running: nothing may be evicted meanwhile
        self.closed = False
        # in all, for usage() and the metrics (written under the lock)
        self.evictions = 0
        self.evicted_bytes = 0
        self.restores = 0

    def add(self, array: Any) -> Evictable | EvictableModule:
        """Manage ``array`` as spillable (see :meth:`ExecutionContext.evictable`)."""
        if self.tier is QoSPolicy.GUARANTEED:
            raise InvalidArgument(
                f"context {self.name!r} is GUARANTEED and is never evicted; keep the array "
                "as it is, or use a BURSTABLE or BEST_EFFORT context for spillable buffers"
            )
        handle: Evictable | EvictableModule
        if _is_module(array):
            handle = EvictableModule(self, array)
        elif not hasattr(array, "nbytes") or not hasattr(array, "shape"):
            raise InvalidArgumentType(
                f"evictable() takes a device array or a torch.nn.Module, not {type(array).__name__}"
            )
        else:
            handle = Evictable(self, array)
        with self._lock:
            self._evictables.add(handle)
        return handle

    def reclaim(self, want: int) -> int:
        """Evict least recently used buffers until ``want`` bytes are freed; 0 if busy."""
        if not self._lock.acquire(timeout=1.0):
            return 0
        try:
            if self._busy or self.closed:
                return 0
            resident = sorted(
                (e for e in self._evictables if e.state is EvictableState.RESIDENT),
                key=lambda e: e._last_used,
            )
            if not resident:
                return 0
            self._stream.synchronize()  # nothing in flight may still read them
            freed = 0
            for handle in resident:
                if freed >= want:
                    break
                spilled = handle._evict()  # 0: still referenced elsewhere, kept
                freed += spilled
                self.evictions += spilled > 0
                self.evicted_bytes += spilled
            if freed:
                self._pool.release_cached()  # hand the freed blocks back to the device
            return freed
        finally:
            self._lock.release()

    def restore(self) -> None:
        """Bring every evicted buffer back (allocations charged to this context)."""
        with self._lock:
            evicted = [e for e in self._evictables if e.state is EvictableState.EVICTED]
            if not evicted:
                return
            if self.closed:
                raise ContextClosed(self.name)
            # Allocated, copied into and later freed on this context's stream, where the
            # buffers are used: a session restores them before it binds that stream.
            with self._activate():
                for handle in evicted:
                    handle._restore()
                    self.restores += 1

    def restore_one(self, handle: EvictableModule) -> None:
        """Bring one evicted handle back (allocations charged to this context)."""
        with self._lock, self._activate():
            handle._restore()
            self.restores += 1

    def nothing_evicted(self) -> bool:
        """Whether :meth:`enter` would restore nothing (and so cannot take long)."""
        if not self._evictables:
            return True
        with self._lock:
            return not any(e.state is EvictableState.EVICTED for e in self._evictables)

    def enter(self) -> None:
        """A session or task begins: pin the buffers and bring back evicted ones."""
        with self._lock:
            self._busy += 1
            if not self._evictables:
                return  # nothing could be evicted: the common case, kept cheap
            try:
                self.restore()
            except BaseException:
                self._busy -= 1
                raise

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1

    def close(self) -> None:
        """The context was destroyed: nothing is evicted or restored any more."""
        with self._lock:
            self.closed = True
